"""instructblip checkpoints through mmwb.from_pretrained against transformers on the same random weights: the EVA
tower, mmwb's Q-Former reading the instruction in its own (BERT) vocabulary, and a Llama text model; the caption
CLI with the checkpoint's processor and both tokenizers; alignment training of the Q-Former; broken folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertTokenizerFast,
    BlipImageProcessor,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import mmwb
from mmwb.errors import MmwbCheckpointError
from mmwb.models.projectors import QFormer
from mmwb.models.vlm import VisionLanguageModel

IMAGE = 16  # pixels a side
# words of the prompts and of the shapes captions (alignment trains on them)
WORDS = (
    "A short image caption : what colour is the circle square triangle ? a an small big large red green blue "
    "yellow orange purple white grey and , left right of above below how many shapes are there one two three yes no"
).split()
# (vision width, Q-Former width, text width, query tokens, cross_attention_frequency, Q-Former layers)
SIZES = {"every-layer": (32, 24, 32, 3, 1, 2), "every-other": (24, 16, 40, 6, 2, 3)}


def text_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level stand-in for Vicuna's tokenizer: ``<s>`` opens every encoding, ``<image>`` is special."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab["<image>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def qformer_tokenizer() -> BertTokenizerFast:
    """A lower-casing WordPiece (BERT) tokenizer over the same words, as InstructBLIP's Q-Former reads them."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(w.lower() for w in WORDS)]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


def write_instructblip(folder: Path, sizes: tuple[int, ...], seed: int = 0):
    """A random InstructBLIP (perturbed so every tensor matters) saved with its processor, as the hub holds one:
    weights and config, the text tokenizer at the top, the Q-Former's in ``qformer_tokenizer/``."""
    vision, qformer, text, queries, frequency, layers = sizes
    tokenizer, bert = text_tokenizer(), qformer_tokenizer()
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=vision, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE, patch_size=4,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(bert), hidden_size=qformer, num_hidden_layers=layers, num_attention_heads=2,
            intermediate_size=40, max_position_embeddings=64, cross_attention_frequency=frequency,
        ).to_dict(),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=text, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
            eos_token_id=2, pad_token_id=0,
        ).to_dict(),
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    reference = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    reference.eval().save_pretrained(folder)
    image_processor = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    processor = InstructBlipProcessor(image_processor, tokenizer, bert, num_query_tokens=queries)
    processor.save_pretrained(folder)
    return reference, processor


@pytest.fixture(scope="module", params=sorted(SIZES))
def instructblip(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("instructblip") / request.param
    reference, processor = write_instructblip(folder, SIZES[request.param])
    return reference, processor, folder


def _inputs(reference, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two left-padded rows of query tokens + text, two right-padded Q-Former instructions (transformers' way)."""
    g = torch.Generator().manual_seed(seed)
    queries, image_id = reference.config.num_query_tokens, reference.config.image_token_index
    words = lambda n: torch.randint(5, 40, (n,), generator=g).tolist()  # noqa: E731
    rows = [[image_id] * queries + [1] + words(5), [image_id] * queries + [1] + words(2)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    qformer_ids = torch.tensor([[2, *words(4), 3], [2, *words(2), 3, 0, 0]])
    return dict(
        input_ids=ids, attention_mask=mask, qformer_input_ids=qformer_ids,
        qformer_attention_mask=(qformer_ids != 0).long(), pixel_values=torch.randn(2, 3, IMAGE, IMAGE, generator=g),
    )  # fmt: skip


def test_logits_and_greedy_tokens_match_transformers(instructblip):
    reference, _, folder = instructblip
    model = mmwb.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert isinstance(model, VisionLanguageModel) and isinstance(model.projector, QFormer)
    assert model.projector.config.num_queries == reference.config.num_query_tokens
    inputs = _inputs(reference)
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    hf = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(hf, ours)


def test_left_padded_batch_equals_one_by_one(instructblip):
    reference, _, folder = instructblip
    model = mmwb.from_pretrained(folder, device="cpu", dtype=torch.float32)
    inputs = _inputs(reference, seed=2)
    batch = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0, new_tokens_only=True)
    for i in range(2):
        real, qreal = inputs["attention_mask"][i].bool(), inputs["qformer_attention_mask"][i].bool()
        alone = dict(
            input_ids=inputs["input_ids"][i : i + 1, real], pixel_values=inputs["pixel_values"][i : i + 1],
            qformer_input_ids=inputs["qformer_input_ids"][i : i + 1, qreal],
        )  # fmt: skip
        ours = model.generate(
            **alone, max_new_tokens=5, do_sample=False, pad_token_id=0, new_tokens_only=True
        )
        hf = reference.generate(**alone, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[i], ours[0]) and torch.equal(ours[0], hf[0, alone["input_ids"].shape[1] :])


def test_caption_and_ask_cli_match_transformers_processor(instructblip, tmp_path, capsys):
    """``mmwb caption/ask --model DIR --json`` prompt as InstructBLIP's processor does: the query tokens, ``<s>`` and
    the instruction for the language model, the same instruction in BERT's vocabulary for the Q-Former."""
    from mmwb.cli.main import main

    reference, processor, folder = instructblip
    picture = tmp_path / "red.png"
    image = Image.new("RGB", (IMAGE, IMAGE), (200, 40, 40))
    image.paste((30, 60, 220), (4, 4, 12, 12))
    image.save(picture)
    for verb, prompt in (("caption", "A short image caption:"), ("ask", "what colour is the circle?")):
        question = [prompt] if verb == "ask" else []
        args = [verb, str(picture), *question, "--model", str(folder), "--json", "--max-new-tokens", "4"]
        assert main(args) == 0
        got = json.loads(capsys.readouterr().out)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        hf = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected = processor.tokenizer.decode(hf[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert got["results"][0]["text"] == expected.strip(), verb


def test_pipeline_batch_of_different_prompts_equals_one_by_one(instructblip):
    """Prompts of different lengths in one batch: left-padded for the language model, right-padded for the
    Q-Former, each answer as if alone."""
    from mmwb.pipelines.vlm import VLMPipeline

    *_, folder = instructblip
    pipeline = VLMPipeline(mmwb.from_pretrained(folder, device="cpu"))
    pictures = [Image.new("RGB", (IMAGE, IMAGE), colour) for colour in ((200, 40, 40), (20, 90, 200))]
    prompts = ["how many shapes are there?", None]
    together = pipeline(pictures, prompts, max_new_tokens=5)
    alone = [pipeline(picture, prompt, max_new_tokens=5) for picture, prompt in zip(pictures, prompts)]
    assert together == alone and all(together)


@pytest.mark.parametrize("layout", ["processor_config", "preprocessor_config"])
def test_processor_settings_are_the_checkpoints(instructblip, tmp_path, layout):
    """Mean and std come from the saved image processor (transformers 5's processor_config.json section, or the
    hub's older preprocessor_config.json); pixels equal BLIP's processor for an image of the tower's size."""
    _, _, folder = instructblip
    custom = tmp_path / "custom"
    shutil.copytree(folder, custom)
    saved = json.loads((custom / "processor_config.json").read_text())
    stats = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    if layout == "processor_config":
        saved["image_processor"] |= stats
        (custom / "processor_config.json").write_text(json.dumps(saved))
    else:
        (custom / "processor_config.json").unlink()
        (custom / "preprocessor_config.json").write_text(json.dumps(saved["image_processor"] | stats))
    model = mmwb.from_pretrained(custom, device="cpu")
    image = Image.effect_noise((IMAGE, IMAGE), 60).convert("RGB")
    blip = BlipImageProcessor(size={"height": IMAGE, "width": IMAGE}, **stats)
    expected = blip(image, return_tensors="pt").pixel_values
    assert (model.process_images([image]).pixel_values - expected).abs().max() <= 1e-5


def test_save_load_round_trip_keeps_both_tokenizers(instructblip, tmp_path):
    reference, _, folder = instructblip
    model = mmwb.from_pretrained(folder, device="cpu")
    model.save_pretrained(tmp_path / "saved")
    loaded = mmwb.from_pretrained(tmp_path / "saved", device="cpu")
    assert loaded.config.template == "instructblip" and loaded.qformer_tokenizer is not None
    from mmwb.pipelines.vlm import VLMPipeline

    image = Image.new("RGB", (IMAGE, IMAGE), (10, 200, 30))
    assert VLMPipeline(loaded)(image, max_new_tokens=4) == VLMPipeline(model)(image, max_new_tokens=4)
    inputs = _inputs(reference)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


@pytest.mark.slow
def test_alignment_trains_the_qformer_alone(tmp_path):
    """Stage-1 alignment of an imported InstructBLIP (model_dir): the Q-Former, its queries and the language
    projection train on captions behind InstructBLIP's caption instruction; tower and language model do not."""
    from mmwb.data.shapes import write_dataset
    from mmwb.train.align import AlignConfig, HealthConfig, train_align
    from mmwb.train.config import TrainConfig
    from mmwb.train.image_features import FeatureCacheConfig

    folder = tmp_path / "instructblip"
    write_instructblip(folder, SIZES["every-layer"])
    data = tmp_path / "data"
    write_dataset(data, 16, seed=0, size=IMAGE, n_eval=8, progress=False)
    train = TrainConfig(out_dir=tmp_path / "run", max_steps=3, batch_size=8, lr=3e-3, warmup_steps=0,
                        device="cpu", progress=False)  # fmt: skip
    config = AlignConfig(data_dir=data, model_dir=folder, out_dir=tmp_path / "aligned", max_length=48,
                         feature_cache=FeatureCacheConfig(root=tmp_path / "cache"),
                         health=HealthConfig(max_items=8, retrieval_group=4), train=train)  # fmt: skip
    vlm = mmwb.from_pretrained(folder, device="cpu")
    frozen = {k: v.clone() for k, v in vlm.state_dict().items() if not k.startswith("projector.")}
    before = {k: v.clone() for k, v in vlm.projector.state_dict().items()}
    result, report = train_align(config, vlm)
    assert all(torch.equal(vlm.state_dict()[k], v) for k, v in frozen.items())
    changed = {k for k, v in vlm.projector.state_dict().items() if not torch.equal(v, before[k])}
    assert {"query_tokens", "language_projection.weight"} <= changed and len(changed) > len(before) // 2
    assert report["eval_items"] == 8 and result.step == 3
    aligned = mmwb.from_pretrained(config.out_dir, device="cpu")
    assert aligned.config.template == "instructblip" and aligned.qformer_tokenizer is not None
    assert all(
        torch.equal(aligned.projector.state_dict()[k], v) for k, v in vlm.projector.state_dict().items()
    )


def test_broken_folders_are_one_line_errors(instructblip, tmp_path, capsys):
    from mmwb.cli.main import main

    _, _, folder = instructblip
    config = json.loads((folder / "config.json").read_text())

    def variant(name: str, **changes) -> Path:
        path = tmp_path / name
        shutil.copytree(folder, path)
        (path / "config.json").write_text(json.dumps(config | changes))
        return path

    t5 = variant("flan-t5", text_config={"model_type": "t5", "d_model": 32, "vocab_size": 50})
    with pytest.raises(MmwbCheckpointError, match="text model 't5' is not a decoder-only causal LM"):
        mmwb.from_pretrained(t5, device="cpu")

    no_qformer = variant("no-qformer")
    state = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in state.items() if not k.startswith("qformer.")}
    save_file(kept, no_qformer / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MmwbCheckpointError, match="Q-Former tensors do not fit .missing \\['word_embeddings"):
        mmwb.from_pretrained(no_qformer, device="cpu")

    no_tokenizer = variant("no-qformer-tokenizer")
    shutil.rmtree(no_tokenizer / "qformer_tokenizer")
    with pytest.raises(MmwbCheckpointError, match="no qformer_tokenizer/ beside the text tokenizer"):
        mmwb.from_pretrained(no_tokenizer, device="cpu")

    legacy = variant("legacy", image_token_index=None)
    with pytest.raises(MmwbCheckpointError, match="image_token_index is missing"):
        mmwb.from_pretrained(legacy, device="cpu")

    picture = tmp_path / "a.png"
    Image.new("RGB", (IMAGE, IMAGE)).save(picture)
    assert main(["caption", str(picture), "--model", str(t5), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a decoder-only causal LM" in err[0]
