"""Preference tuning: the DPO family's loss and gradients against trl's DPOTrainer on the same transformers model
and batch, the pairs file and its errors, rule-made and on-policy pairs, and DPO runs of a VLM (LoRA: reference =
adapters off; whole model: cached reference) and of a text decoder."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import mmwb
from mmwb.data.preferences import PreferencePair, read_preferences, rule_pairs, write_preferences
from mmwb.data.shapes import read_index, write_dataset
from mmwb.errors import MmwbConfigError, MmwbInputError
from mmwb.models.decoder.model import IGNORE_INDEX
from mmwb.pipelines.vlm import DEFAULT_MODEL
from mmwb.pipelines.vlm_eval import normalize
from mmwb.train import dpo_loss
from mmwb.train.dpo import DPOConfig, DPOTraining, load_policy, sft_loss, text_logps, train_dpo
from mmwb.train.instruct import LoraSettings

WORDS = "a small big red blue green circle square triangle and describe the image what colour is".split()


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


@pytest.mark.parametrize(
    ("loss_type", "sft_weight"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("sigmoid", 0.5)]
)
def test_loss_and_gradients_match_trl(loss_type, sft_weight, tmp_path):
    """trl's DPOTrainer.compute_loss and mmwb's text_logps + dpo_loss (+ sft_loss, trl's "sft" loss beside the
    sigmoid one) on copies of one Llama, on trl's own batch (its tokenization, padding and completion mask): the
    same loss and gradients."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig as TrlConfig
    from trl import DPOTrainer

    tokenizer = _word_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    reference = LlamaForCausalLM(config).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for param in policy.parameters():  # a policy that has moved away from its reference
            param.add_(0.05 * torch.randn_like(param))
    pairs = [
        {"prompt": "describe the image", "chosen": " a small red circle", "rejected": " a big blue square"},
        {"prompt": "what colour is the circle", "chosen": " red", "rejected": " blue green"},
        {"prompt": "describe the image", "chosen": " a big green triangle", "rejected": " a green big"},
    ]  # fmt: skip
    types, weights = ([loss_type, "sft"], [1.0, sft_weight]) if sft_weight else ([loss_type], None)
    args = TrlConfig(output_dir=str(tmp_path), beta=0.2, loss_type=types, loss_weights=weights, report_to="none",
                     use_cpu=True, bf16=False, per_device_train_batch_size=3)  # fmt: skip
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, batch)
    expected.backward()

    ours = copy.deepcopy(policy).train()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    logps, counts = text_logps(ours, rows)
    with torch.no_grad():
        ref_logps = text_logps(reference, rows)[0]
    n = len(pairs)
    chosen, rejected = (0.2 * (logps - ref_logps).detach()).split(n)  # the rewards trl logs, on the sums
    sft = sft_loss(logps[:n], counts[:n])
    if loss_type == "ipo":  # trl's IPO works on per-token averages
        logps, ref_logps = logps / counts, ref_logps / counts
    losses, *_ = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], 0.2, loss_type)
    loss = losses.mean() + sft_weight * sft
    loss.backward()
    assert losses.shape == (n,) and abs(loss.item() - expected.item()) <= 1e-5
    grads = [
        (a.grad - b.grad).abs().max().item() for a, b in zip(trainer.model.parameters(), ours.parameters())
    ]
    assert max(grads) <= 1e-5
    metrics = trainer._metrics["train"]
    assert math.isclose(chosen.mean().item(), metrics["rewards/chosen"][-1], abs_tol=1e-6)
    assert math.isclose((chosen - rejected).mean().item(), metrics["rewards/margins"][-1], abs_tol=1e-6)


def test_label_smoothing_is_conservative_dpo_and_settings_are_checked():
    policy_c, policy_r, ref_c, ref_r = (
        torch.tensor(v) for v in ([-3.0, -1.0], [-5.0, -0.5], [-4.0, -1.0], [-4.0, -1.0])
    )
    plain, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5)
    smooth, *_ = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=0.5, label_smoothing=0.2)
    z = 0.5 * ((policy_c - ref_c) - (policy_r - ref_r))
    assert torch.allclose(plain, -torch.nn.functional.logsigmoid(z))
    assert torch.allclose(
        smooth, -0.8 * torch.nn.functional.logsigmoid(z) - 0.2 * torch.nn.functional.logsigmoid(-z)
    )
    assert torch.allclose(chosen, 0.5 * (policy_c - ref_c)) and torch.allclose(
        rejected, 0.5 * (policy_r - ref_r)
    )
    for bad in (
        {"loss_type": "kto"},
        {"beta": 0.0},
        {"label_smoothing": 0.5},
        {"loss_type": "ipo", "label_smoothing": 0.1},
    ):
        with pytest.raises(MmwbConfigError):
            dpo_loss(policy_c, policy_r, ref_c, ref_r, **bad)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "a.png", "prompt": null, "chosen": "x"}', "missing field 'rejected'"),
        ('{"image": "a.png", "prompt": null, "chosen": " ", "rejected": "y"}', "'chosen' is empty"),
        (
            '{"image": "a.png", "prompt": "q?", "chosen": "red", "rejected": " red "}',
            "chosen and rejected are the same",
        ),
        ("not json", "not valid JSON"),
    ],
)
def test_a_bad_pair_is_an_error_naming_its_line(tmp_path, line, message):
    """Lines are counted at newlines only: a U+2028 inside a JSON string (legal) neither breaks nor shifts them."""
    path = tmp_path / "pairs.jsonl"
    good = '{"image": "a.png", "prompt": null, "chosen": "x", "rejected": "y"}'
    odd = '{"image": "a.png", "prompt": "q\u2028?", "chosen": "x\u2028y", "rejected": "y"}'
    path.write_text(f"{good}\n{odd}\n{line}\n")
    with pytest.raises(MmwbInputError, match=f"pairs.jsonl:3: {message}"):
        read_preferences(path)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("shapes")
    write_dataset(data, 48, seed=0, size=64, n_eval=16, progress=False)
    return data


def test_rule_pairs_make_each_named_mistake(shapes):
    rng = np.random.default_rng(0)
    records = read_index(shapes, "train")
    pairs = [pair for record in records for pair in rule_pairs(record, rng)]
    assert {p.source for p in pairs} == {
        "swap_attributes",
        "repeat_object",
        "wrong_count",
        "flip_relation",
        "flip_answer",
    }
    assert all(normalize(p.chosen) != normalize(p.rejected) for p in pairs)
    by_image = {r["image"]: r for r in records}
    for pair in pairs:
        record = by_image[pair.image]
        if pair.prompt is None:
            assert pair.chosen == record["caption"]
            if pair.source == "repeat_object":  # the first object's phrase twice
                first = " ".join(pair.rejected.replace(",", "").split()[:4])
                assert pair.rejected.replace(",", "").count(first) == 2
            if pair.source == "flip_relation":
                assert sorted(pair.rejected.split()) == sorted(pair.chosen.split())
        else:
            assert any(qa["question"] == pair.prompt and qa["answer"] == pair.chosen for qa in record["qa"])


def test_on_policy_pairs_are_the_models_wrong_outputs(shapes, tmp_path):
    from mmwb.pipelines.preferences import PreferenceSettings, make_preferences

    vlm = mmwb.from_pretrained(DEFAULT_MODEL)
    settings = PreferenceSettings(max_images=24, samples=3, temperature=3.0, rules=False)
    pairs, summary = make_preferences(vlm, shapes, settings, progress=False)
    assert pairs and {p.source for p in pairs} == {"on_policy"} and summary["pairs"] == len(pairs)
    references = {(r["image"], None): r["caption"] for r in read_index(shapes, "train")}
    references |= {
        (r["image"], qa["question"]): qa["answer"] for r in read_index(shapes, "train") for qa in r["qa"]
    }
    for pair in pairs:
        assert pair.chosen == references[(pair.image, pair.prompt)]
        assert normalize(pair.rejected) != normalize(pair.chosen)
    write_preferences(pairs, tmp_path / "p.jsonl")
    assert read_preferences(tmp_path / "p.jsonl") == pairs  # round trip (the line numbers are not compared)


def _config(tmp_path: Path, shapes: Path, pairs: list[PreferencePair], **overrides) -> DPOConfig:
    from mmwb.pipelines.vlm_eval import EvaluationConfig
    from mmwb.train.config import TrainConfig
    from mmwb.train.image_features import FeatureCacheConfig

    write_preferences(pairs, tmp_path / "pairs.jsonl")
    train = TrainConfig(out_dir=tmp_path / "run", max_steps=6, batch_size=8, lr=2e-3, warmup_steps=0,
                        device="cpu", progress=False, log_every=1, save_every=0)  # fmt: skip
    options = dict(model_dir=DEFAULT_MODEL, pairs_file=tmp_path / "pairs.jsonl", data_dir=shapes,
                   out_dir=tmp_path / "model", lora=LoraSettings(r=4, alpha=8),
                   feature_cache=FeatureCacheConfig(enabled=False), evaluation=EvaluationConfig(max_items=0),
                   train=train)  # fmt: skip
    return DPOConfig(**(options | overrides))


def _caption_pairs(shapes: Path) -> list[PreferencePair]:
    rng = np.random.default_rng(1)
    return [p for r in read_index(shapes, "train") for p in rule_pairs(r, rng) if p.prompt is None][:32]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_dpo_reference_is_the_adapters_off(shapes, tmp_path):
    """Step 1's loss is log 2 (adapters start at zero: policy == reference), rewards then separate; only LoRA
    moved (tower and projector are bit-identical in the merged model); images are encoded once per pair."""
    config = _config(tmp_path, shapes, _caption_pairs(shapes))
    base = mmwb.from_pretrained(DEFAULT_MODEL)
    calls = []
    original = type(base.vision_tower).encode

    def counting(self, inputs):
        calls.append(len(inputs.pixel_values))
        return original(self, inputs)

    type(base.vision_tower).encode = counting
    try:
        train_dpo(config)
    finally:
        type(base.vision_tower).encode = original
    rows = _metrics(config.train.out_dir)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5 and rows[0]["reward_margin"] == pytest.approx(
        0, abs=1e-6
    )
    assert rows[-1]["reward_margin"] > 0.05 and rows[-1]["reward_accuracy"] >= 0.75
    assert calls and all(n == 8 for n in calls)  # 8 pairs -> 8 images per forward (policy and reference each)
    tuned = mmwb.from_pretrained(config.out_dir)
    for part in ("vision_tower", "projector"):
        for key, value in getattr(base, part).state_dict().items():
            assert torch.equal(getattr(tuned, part).state_dict()[key], value), key
    assert not all(
        torch.equal(a, b) for a, b in zip(tuned.language_model.parameters(), base.language_model.parameters())
    )


@pytest.mark.slow
def test_whole_model_dpo_caches_the_reference_once(shapes, tmp_path):
    pairs = _caption_pairs(shapes)
    config = _config(tmp_path, shapes, pairs, lora=None, loss_type="ipo", train_vision=True, train=None)
    from mmwb.train.config import TrainConfig

    config.train = TrainConfig(out_dir=tmp_path / "run", max_steps=4, batch_size=8, lr=1e-4, warmup_steps=0,
                               device="cpu", progress=False, log_every=1, save_every=2)  # fmt: skip
    train_dpo(config)
    cache = tmp_path / "run" / "reference_logps.safetensors"
    from safetensors.torch import load_file

    saved = load_file(cache)["logps"]
    assert saved.shape == (len(pairs), 2)
    policy = load_policy(config)  # the untouched model's log-probs are the cached reference
    module = DPOTraining(policy, config)
    from mmwb.train.dpo import collate_pairs, pair_encoder
    from mmwb.train.image_features import ProcessedPixels

    encode = pair_encoder(policy, config.max_length, {})
    load = ProcessedPixels(policy.vlm.image_processor())
    items = [load(shapes / p.image) | encode(p) for p in pairs[:4]]
    with torch.no_grad():
        module.eval()
        fresh = module.logps(collate_pairs(items, policy.tokenizer.pad_token_id))[0]
    assert torch.allclose(fresh.view(2, -1).T, saved[:4], atol=1e-4)
    assert (
        abs(_metrics(config.train.out_dir)[0]["loss"] - 1 / (4 * 0.1**2)) < 1e-3
    )  # IPO at logits 0: (1/2b)^2
    tuned, base = mmwb.from_pretrained(config.out_dir), mmwb.from_pretrained(DEFAULT_MODEL)
    for part in ("vision_tower", "projector", "language_model"):  # train_vision: everything moved
        assert not all(
            torch.equal(a, b)
            for a, b in zip(getattr(tuned, part).parameters(), getattr(base, part).parameters())
        )
    stamp = cache.stat().st_mtime_ns
    config.train.max_steps, config.train.resume = 6, "latest"
    train_dpo(config)  # resumed: the cache is read back, not recomputed
    assert cache.stat().st_mtime_ns == stamp and len(_metrics(config.train.out_dir)) == 6


def test_the_reference_cache_key_follows_the_model_files_and_the_images(shapes, tmp_path):
    import os
    import shutil

    from mmwb.train.dpo import _reference_key

    shutil.copytree(DEFAULT_MODEL, tmp_path / "model")
    config = _config(tmp_path, shapes, _caption_pairs(shapes)[:2], model_dir=tmp_path / "model")
    key = _reference_key(config)
    assert _reference_key(config) == key
    weights = tmp_path / "model" / "model.safetensors"
    os.utime(
        weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9)
    )  # retrained in place
    assert _reference_key(config) != key
    moved = _reference_key(config)
    config.data_dir = tmp_path / "other-images"
    assert _reference_key(config) != moved


def test_train_vision_with_lora_is_a_config_error(shapes, tmp_path):
    config = _config(tmp_path, shapes, _caption_pairs(shapes)[:2], train_vision=True)
    with pytest.raises(MmwbConfigError, match="train_vision needs lora: null"):
        train_dpo(config)


def test_an_unreadable_image_stops_the_run_before_it_starts(shapes, tmp_path):
    pairs = _caption_pairs(shapes)[:4]
    pairs[2] = PreferencePair("train/missing.png", None, "a small red circle", "a small blue circle", "given")
    config = _config(tmp_path, shapes, pairs)
    with pytest.raises(MmwbInputError, match="pairs.jsonl:3: .*missing.png"):
        train_dpo(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_text_decoder_dpo_and_cli(tmp_path):
    """A text decoder (mmwb's own folder) tuned on text-only pairs through ``mmwb train dpo --json``; a bad pairs
    file is exit 2 with one line naming it."""
    from mmwb.cli.main import main
    from mmwb.testing.tiny_vlm import make_tiny_parts

    data = tmp_path / "data"
    write_dataset(data, 16, seed=0, size=32, n_eval=4, progress=False)
    _, decoder = make_tiny_parts(tmp_path / "parts", data)
    pairs = [PreferencePair(None, "what colour is the circle?", "red", "blue", "given"),
             PreferencePair(None, "what shape is the red object?", "circle", "square", "given")] * 4  # fmt: skip
    write_preferences(pairs, tmp_path / "text.jsonl")
    config = Path(__file__).resolve().parents[1] / "configs" / "train" / "dpo_tiny.yaml"
    args = ["train", "dpo", "--config", str(config), f"model_dir={decoder}", f"pairs_file={tmp_path / 'text.jsonl'}",
            f"data_dir={data}", f"out_dir={tmp_path / 'model'}", f"train.out_dir={tmp_path / 'run'}",
            "train.max_steps=3", "train.warmup_steps=0", "train.batch_size=4", "train.save_every=0",
            "train.log_every=1",
            "evaluation.max_items=0", "--json",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    rows = _metrics(tmp_path / "run")
    assert len(rows) > 0 and abs(rows[0]["reward_margin"]) < 1e-6
    from mmwb.runtime.config import load_config
    from mmwb.train.dpo import pair_encoder

    policy = load_policy(load_config(DPOConfig, config, [a for a in args[4:] if "=" in a]))
    item = pair_encoder(policy, 64, {})(pairs[0])  # the start token first, as the decoder was pretrained
    assert item["chosen_input_ids"][0] == policy.tokenizer.bos_token_id
    assert isinstance(mmwb.from_pretrained(tmp_path / "model"), torch.nn.Module)
    (tmp_path / "bad.jsonl").write_text('{"image": null, "prompt": "q", "chosen": "a"}\n')
    bad = [a if not a.startswith("pairs_file=") else f"pairs_file={tmp_path / 'bad.jsonl'}" for a in args]
    bad = [a if not a.startswith("train.out_dir=") else f"train.out_dir={tmp_path / 'run2'}" for a in bad]
    assert main(bad) == 2


@pytest.mark.slow
def test_an_imported_llava_trains_with_lora_dpo(tmp_path):
    """A transformers LLaVA folder (its own tokenizer and ``<image>``/``<s>`` tokens, a Llama text model run by
    transformers): LoRA DPO on its captions, the first step at log 2, the merged model saved as an mmwb VLM."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = _word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=16)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id)
    ).save_pretrained(tmp_path / "llava")
    tokenizer.save_pretrained(tmp_path / "llava")
    data = tmp_path / "data"
    write_dataset(data, 8, seed=0, size=16, n_eval=2, progress=False)
    images = [r["image"] for r in read_index(data, "train")]
    pairs = [
        PreferencePair(image, None, "a small red circle", "a big blue square", "given") for image in images
    ]
    pairs[1] = PreferencePair(images[1], "what colour is the circle", "red", "blue", "given", "colour")
    config = _config(tmp_path, data, pairs, model_dir=tmp_path / "llava")
    from mmwb.train.dpo import pair_encoder

    item = pair_encoder(load_policy(config), 64, {})(pairs[1])  # LLaVA's plain template keeps the question
    question = tokenizer("what colour is the circle", add_special_tokens=False).input_ids
    ids = item["chosen_input_ids"].tolist()
    assert any(ids[i : i + len(question)] == question for i in range(len(ids)))
    config.train.max_steps, config.train.batch_size = 3, 4
    train_dpo(config)
    rows = _metrics(config.train.out_dir)
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5 and rows[-1]["reward_margin"] > 0
    tuned = mmwb.from_pretrained(config.out_dir)
    assert tuned.config.source == "llava" and tuned.tokenizer.convert_tokens_to_ids("<image>") == image_id


def test_eval_every_logs_the_policys_task_metrics(shapes, tmp_path):
    from mmwb.pipelines.vlm_eval import EvaluationConfig

    config = _config(tmp_path, shapes, _caption_pairs(shapes)[:16], evaluation=EvaluationConfig(max_items=4))
    config.train.max_steps, config.train.eval_every = 4, 2
    train_dpo(config)
    evals = [row for row in _metrics(config.train.out_dir) if "eval_test_caption_exact_match" in row]
    assert [row["step"] for row in evals] == [2, 4]
    assert all(0.0 <= row["eval_test_vqa_accuracy"] <= 1.0 for row in evals)
