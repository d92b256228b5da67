"""Weight-only int8 / int4 quantization (mmwb.models.quantize): each kernel against its dequantized weights,
quantized MoE experts against mmwb's own experts on those weights, whole decoders (GQA + MoE, MLA) generating
through the quantized layers, the shipped VLM's scores, and the requests that cannot work."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import mmwb
from mmwb.cli.main import main
from mmwb.data.captions import read_records
from mmwb.data.shapes import write_dataset
from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.decoder.moe import Experts
from mmwb.models.quantize import QuantizedExperts, QuantizedLinear, pack_int4, quantize_model, unpack_int4
from mmwb.models.vlm.prompt import caption_question, make_encoder, model_tokens
from mmwb.pipelines.vlm import DEFAULT_MODEL, VLMPipeline
from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm
from mmwb.train.image_features import ProcessedPixels
from mmwb.train.multimodal import collate
from mmwb.train.vlm_loss import multimodal_loss

MODES = [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)]


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _kernel_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """What torch's kernels compute: bf16 activations times the dequantized weight with bf16-rounded scales (and
    zero points), accumulated in fp32."""
    if layer.mode == "int8":
        weight = layer.qweight.float() * _bf16(layer.scale)[:, None]
    else:
        rows, cols = layer.out_features, layer.in_features
        levels = unpack_int4(layer.qweight, layer.group_size).float().view(rows, -1, layer.group_size)
        scale, zero = _bf16(layer.scale), _bf16(layer.low + 8 * layer.scale)
        weight = ((levels - 8) * scale[..., None] + zero[..., None]).view(rows, cols)
    return _bf16(x) @ weight.t() + layer.bias


@pytest.mark.parametrize("mode, group", MODES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quantized_linear_equals_its_dequantized_weights(mode, group, rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    layer = QuantizedLinear(linear, mode, group)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        out = layer(x)
    reference = _kernel_reference(layer, x)
    # the kernels return bf16: one rounding of the output (2^-8 relative) and of the fp32 sum order
    assert (out - reference).abs().max() <= 2**-7 * reference.abs().max()
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    # round to nearest: every weight within half a step of the original
    step = layer.scale[:, None] if mode == "int8" else layer.scale.repeat_interleave(group, dim=1)
    assert ((layer.dequantize() - linear.weight).abs() <= step / 2 + 1e-6).all()
    assert layer.qweight.numel() == 256 * 96 // (
        1 if mode == "int8" else 2
    )  # one byte / half a byte a weight


def test_int4_bytes_unpack_exactly_in_mmwbs_order():
    levels = torch.randint(0, 16, (32, 128), dtype=torch.uint8)
    packed = pack_int4(levels, 64)
    assert packed.shape == (32, 64) and torch.equal(unpack_int4(packed, 64), levels)
    # byte u of a group: input u (low nibble) and input u + 32 (high); row 3, group 1, u = 5
    assert packed[3, 32 + 5].item() == levels[3, 64 + 5].item() | (levels[3, 64 + 32 + 5].item() << 4)


def test_quantized_experts_equal_mmwb_experts_on_the_dequantized_weights():
    torch.manual_seed(0)
    config = DecoderConfig(
        hidden_size=64, moe_intermediate_size=32, n_routed_experts=6, num_experts_per_tok=2
    )
    experts = Experts(config)
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    quantized = QuantizedExperts(experts, "int8")
    reference = Experts(config)
    with torch.no_grad():
        reference.gate_up_proj.copy_(torch.stack([q.dequantize() for q in quantized.gate_up]))
        reference.down_proj.copy_(torch.stack([q.dequantize() for q in quantized.down]))
    x = torch.randn(9, 64)
    indices = torch.tensor(
        [[0, 1], [1, 2], [0, 2], [5, 1], [1, 0], [2, 5], [5, 0], [1, 2], [0, 5]]
    )  # 3, 4 unused
    weights = torch.rand(9, 2)
    with torch.no_grad():
        out, counts = quantized(x, indices, weights)
        expected, expected_counts = reference(x, indices, weights)
    assert torch.equal(counts, expected_counts) and counts[3] == counts[4] == 0
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()  # bf16 activations in two products
    with torch.no_grad():  # decode-sized: the host-side path, bf16 from kernel to kernel
        few, _ = quantized(x[:3], indices[:3], weights[:3])
        expected_few, _ = reference(x[:3], indices[:3], weights[:3])
    assert (few - expected_few).abs().max() <= 2e-2 * expected_few.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_state_dict_round_trip_rebuilds_what_the_kernels_read(mode):
    torch.manual_seed(0)
    source, target = QuantizedLinear(nn.Linear(128, 32), mode), QuantizedLinear(nn.Linear(128, 32), mode)
    saved = source.state_dict()
    assert "packed" not in saved and "scale_compute" not in saved  # derived, not stored
    target.load_state_dict(saved)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_layers_read_by_their_owners_stay_float():
    """torch's MultiheadAttention reads out_proj.weight itself: it is left as it is, and the model still runs."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(32, 4, batch_first=True), "head": nn.Linear(32, 16)})
    quantize_model(model, "int8")
    assert type(model["attn"].out_proj) is not QuantizedLinear and isinstance(model["head"], QuantizedLinear)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        assert model["head"](model["attn"](x, x, x)[0]).shape == (1, 3, 16)


@pytest.mark.parametrize(
    "attention, mode, dtype",
    [("gqa", "int8", torch.float32), ("mla", "int8", torch.float32), ("mla", "int4", torch.bfloat16)],
)
def test_a_quantized_decoder_generates_through_its_quantized_layers(attention, mode, dtype):
    torch.manual_seed(0)
    extra = (
        {
            "attention": "mla",
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
        }
        if attention == "mla"
        else {}
    )
    config = DecoderConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
        first_k_dense_replace=1, **extra,
    )  # fmt: skip
    model = DecoderForCausalLM(config).eval().to(dtype)
    quantize_model(model, mode, 32)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"QuantizedLinear", "QuantizedExperts"} <= kinds and "Experts" not in kinds
    assert not any(type(m) is nn.Linear or isinstance(m, nn.Linear) for m in model.modules())
    prompt = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)  # cached: MLA absorbs kv_b
        if (
            dtype != torch.float32
        ):  # bf16: the absorbed and expanded paths round differently; cached decode runs
            assert tokens.shape == (1, 9) and model(tokens).logits.dtype == dtype
            return
        ids = prompt
        for _ in range(5):  # no cache: full forwards, the same layers
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert tokens[0].tolist() == ids[0].tolist()


@pytest.fixture(scope="module")
def fixed_sample(tmp_path_factory):
    recorded = json.loads((DEFAULT_MODEL / "metrics.json").read_text())["fixed_sample"]
    root = tmp_path_factory.mktemp("quantize_sample")
    write_dataset(
        root, 1, seed=recorded["seed"], size=recorded["size"], n_eval=recorded["images"], progress=False
    )
    return root, recorded


@pytest.mark.slow
@pytest.mark.parametrize("mode, group, points", [("int8", 64, 1), ("int4", 64, 3)])
def test_the_quantized_shipped_vlm_keeps_its_scores(fixed_sample, mode, group, points):
    """Within 1 point (int8) / 3 points (int4) of the fp32 scores recorded on the fixed test sample."""
    root, recorded = fixed_sample
    vlm = mmwb.from_pretrained(DEFAULT_MODEL, quantize=mode, group_size=group)
    assert any(isinstance(m, QuantizedLinear) for m in vlm.modules())
    metrics, _ = evaluate_vlm(vlm, root, EvaluationConfig(max_items=recorded["images"]), progress=False)
    for key in ("test_caption_exact_match", "test_vqa_accuracy"):
        assert metrics[key] >= recorded[key] - points / 100, (key, metrics[key], recorded[key])


@pytest.mark.slow
def test_the_quantized_trained_decoder_keeps_its_perplexity(fixed_sample, capsys):
    """The shipped VLM's trained decoder on what it was trained for: the val split's captions and answers after
    their image and question (per-token perplexity): within 1 % (int8) / 5 % (int4) of fp32."""
    root, _ = fixed_sample

    def measured(mode: str | None) -> float:
        vlm = mmwb.from_pretrained(DEFAULT_MODEL, quantize=mode)
        question = caption_question(vlm.config.template)
        records = read_records(root / "val.jsonl", prefer="qa", caption_question=question)
        tokens = model_tokens(vlm.tokenizer, vlm.config.image_token_id)
        encode = make_encoder(vlm.tokenizer, vlm.config.template, 96, **tokens)
        load = ProcessedPixels(vlm.image_processor())
        batch = collate([{**load(root / r.image), **encode(r)} for r in records], vlm.tokenizer.pad_token_id)
        with torch.no_grad():
            return math.exp(multimodal_loss(vlm, batch, "token").item())

    fp32, int8, int4 = measured(None), measured("int8"), measured("int4")
    with capsys.disabled():
        print(f"\nshipped VLM answer perplexity: fp32 {fp32:.4f}, int8 {int8:.4f}, int4 {int4:.4f}")
    assert int8 <= 1.01 * fp32 and int4 <= 1.05 * fp32


def test_requests_that_cannot_work_are_clear_errors(tmp_path, capsys):
    with pytest.raises(MmwbConfigError, match="16 outputs x 100 inputs cannot be packed"):
        QuantizedLinear(nn.Linear(100, 16), "int4", 64)
    with pytest.raises(MmwbConfigError, match="8 outputs x 128 inputs cannot be packed"):
        QuantizedLinear(nn.Linear(128, 8), "int4", 64)
    with pytest.raises(MmwbConfigError, match="runs on the CPU"):
        mmwb.from_pretrained(DEFAULT_MODEL, device="cuda", quantize="int8")
    with pytest.raises(MmwbConfigError, match="'int3' is not one of"):
        mmwb.from_pretrained(DEFAULT_MODEL, quantize="int3")
    with pytest.raises(MmwbConfigError, match="group_size 48"):
        mmwb.from_pretrained(DEFAULT_MODEL, quantize="int4", group_size=48)
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(tmp_path / "x.png"), "--quantize", "int3"])
    assert exit_.value.code == 2
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(image)
    assert main(["caption", str(image), "--quantize", "int4", "--group-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["text"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_an_exported_vlm_loads_back_bit_identically(tmp_path, mode, capsys):
    out = tmp_path / mode
    argv = [
        "export",
        "--quantize",
        mode,
        "--group-size",
        "32",
        "--model",
        str(DEFAULT_MODEL),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    in_memory = mmwb.from_pretrained(DEFAULT_MODEL, quantize=mode, group_size=32)
    loaded = mmwb.from_pretrained(out)  # no second quantization: the stored bytes
    assert json.loads((out / "config.json").read_text())["quantization"] == {"mode": mode, "group_size": 32}
    expected, got = in_memory.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert (out / "model.safetensors").stat().st_size < 0.5 * (
        DEFAULT_MODEL / "model.safetensors"
    ).stat().st_size
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(image)
    captions = [VLMPipeline(model)(image) for model in (in_memory, loaded)]
    assert captions[0] == captions[1]
    with pytest.raises(MmwbCheckpointError, match="already quantized"):
        mmwb.from_pretrained(out, quantize="int8")


def test_an_exported_moe_decoder_loads_back_bit_identically(tmp_path):
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, first_k_dense_replace=1,
        tie_word_embeddings=True,
    )  # fmt: skip
    DecoderForCausalLM(config).save_pretrained(tmp_path / "fp32")
    argv = ["export", "--quantize", "int4", "--group-size", "32", "--model", str(tmp_path / "fp32")]
    assert main([*argv, "--out", str(tmp_path / "q")]) == 0
    in_memory = mmwb.from_pretrained(tmp_path / "fp32", quantize="int4", group_size=32)
    loaded = mmwb.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(in_memory(ids).logits, loaded(ids).logits)
