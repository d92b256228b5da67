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
from mmwb.models.quantize import (
    QuantizedEmbedding,
    QuantizedExperts,
    QuantizedLinear,
    from_torch_int4,
    pack_int4,
    quantize_model,
    quantize_module,
    to_torch_int4,
    unpack_int4,
)
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
    """bf16 activations times the dequantized weight with bf16-rounded scales (and zero points), accumulated in
    fp32: what torch's kernels compute. Decode rows on a CPU with AVX-512 VNNI run mmwb's kernels instead, which
    round the input to int8 per block (tests/test_int8_kernel.py, tests/test_int4_kernel.py): within the same
    tolerance here."""
    if layer.mode == "int8":
        weight = layer.qweight.float() * _bf16(layer.scale)[:, None]
    else:  # the stored (portable) form, read independently of the kernel's layout
        state = layer.state_dict()
        rows, cols = layer.out_features, layer.in_features
        levels = unpack_int4(state["qweight"], layer.group_size).float().view(rows, -1, layer.group_size)
        scale, zero = state["scale"].float(), state["zero"].float()
        weight = ((levels - 8) * scale[..., None] + zero[..., None]).view(rows, cols)
    return _bf16(x) @ weight.t() + layer.bias


@pytest.mark.parametrize("mode, group", MODES)
@pytest.mark.parametrize("rows", [1, 3, 40, 160])  # 40: int8 runs a bf16 GEMM, 160: int4 too
def test_quantized_linear_equals_its_dequantized_weights(mode, group, rows):
    torch.manual_seed(0)
    # 208 outputs: three blocks of 64 and a last one of 16 in torch's int4 layout, 13 panels in mmwb's
    linear = nn.Linear(256, 208)
    layer = quantize_module(linear, mode, group)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        out = layer(x)
    reference = _kernel_reference(layer, x)
    # torch's kernels return bf16: one rounding of the output (2^-8 relative) and of the fp32 sum order; int8 decode
    # rows (mmwb's kernel) round the input to int8 per block of 128 instead (0.65 % of the output's norm)
    bound = 2**-6 if mode == "int8" and rows <= 4 else 2**-7
    assert (out - reference).abs().max() <= bound * reference.abs().max()
    assert out.shape == (rows, 208) and out.dtype == torch.float32
    # round to nearest: every weight within half a step of the original (int4: plus the bf16 rounding of the
    # stored scale and zero, 2^-9 of each, the scale counted 8 times)
    if mode == "int8":
        bound = layer.scale[:, None] / 2
    else:
        state = layer.state_dict()
        scale, zero = (state[k].float().repeat_interleave(group, dim=1) for k in ("scale", "zero"))
        bound = scale / 2 + 2**-9 * (zero.abs() + 8 * scale) + 2**-8 * scale * 8
    assert ((layer.dequantize() - linear.weight).abs() <= bound + 1e-6).all()
    stored = layer.state_dict()["qweight"]
    assert stored.numel() == 256 * 208 // (1 if mode == "int8" else 2)  # one byte / half a byte a weight
    if mode == "int4":  # one copy in memory: the kernel's layout, no second (portable) one
        assert {n for n, _ in layer.named_buffers()} == {"packed", "scale_zero"}


@pytest.mark.parametrize("inputs", [24, 40, 72])
def test_int8_layers_of_any_input_width_are_right(inputs):
    """torch's int8 kernel sums inputs 16 at a time (other widths gave wrong sums or crashed here): such layers,
    the small latent ranks of MLA among them, take another product with the same result."""
    torch.manual_seed(inputs)
    layer = quantize_module(nn.Linear(inputs, 96), "int8")
    x = torch.randn(5, inputs)
    with torch.no_grad():
        out, reference = layer(x), _kernel_reference(layer, x)
    assert (out - reference).abs().max() <= 2**-7 * reference.abs().max()


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 208, 4160])
def test_int4_layout_equals_torchs_packing(rows, monkeypatch):
    """mmwb lays out int4 levels for the kernel itself (chunk by chunk, no int32 copy): byte for byte what
    ``_convert_weight_to_int4pack_for_cpu`` makes, and back; a large weight laid out in several chunks too."""
    import mmwb.models.quantize as quantize

    monkeypatch.setattr(quantize, "CHUNK_WEIGHTS", 64 * 128)  # several chunks even for small weights
    torch.manual_seed(rows)
    levels = torch.randint(0, 16, (rows, 128), dtype=torch.uint8)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.int(), 1)
    assert torch.equal(to_torch_int4(levels), expected) and torch.equal(from_torch_int4(expected), levels)
    weight = torch.randn(rows, 128)
    chunked = quantize.QuantizedLinear.from_float(weight, None, "int4", 32)
    monkeypatch.setattr(quantize, "CHUNK_WEIGHTS", 1 << 30)
    whole = quantize.QuantizedLinear.from_float(weight, None, "int4", 32)
    assert torch.equal(chunked.packed, whole.packed) and torch.equal(chunked.scale_zero, whole.scale_zero)
    assert torch.equal(chunked.state_dict()["qweight"], whole.state_dict()["qweight"])


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
    quantized = quantize_module(experts, "int8")
    assert isinstance(quantized, QuantizedExperts)
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
    source = quantize_module(nn.Linear(128, 80), mode)
    target = QuantizedLinear(128, 80, mode, bias=True)  # empty: the state dict fills it
    saved = source.state_dict()
    assert "packed" not in saved and "scale_compute" not in saved  # the kernel's forms, not stored
    target.load_state_dict(saved)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
        # a cast of the model leaves the quantized form as it is: the same products in fp16
        assert torch.equal(target.half()(x.half()), source(x.half()))
    assert torch.equal(target.state_dict()["qweight"], saved["qweight"])
    wrong = {**saved, "qweight": saved["qweight"][:16]}
    with pytest.raises(RuntimeError, match="qweight"):
        QuantizedLinear(128, 80, mode, bias=True).load_state_dict(wrong)


def test_a_decoders_token_table_is_int8_rows_in_every_mode():
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=96, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64
    )
    model = DecoderForCausalLM(config).eval().to(torch.bfloat16)
    table = model.model.embed_tokens.weight.detach().float().clone()
    quantize_model(model, "int4", 32)
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantizedEmbedding) and embed.qweight.dtype == torch.int8
    # one byte a value (bf16: two), rows rounded to nearest on their own scale
    assert embed.qweight.numel() * embed.qweight.element_size() == table.numel()
    assert ((embed.dequantize() - table).abs() <= embed.scale[:, None] / 2 + 1e-6).all()
    ids = torch.tensor([[5, 0, 95, 5]])
    with torch.no_grad():
        looked_up = embed(ids)
    assert looked_up.dtype == torch.bfloat16 and torch.equal(
        looked_up, embed.dequantize()[ids].to(torch.bfloat16)
    )
    model.float()  # a cast changes what lookups return, not the stored rows
    assert (
        embed(ids).dtype == torch.float32
        and embed.qweight.dtype == torch.int8
        and embed.scale.dtype == torch.float32
    )


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
    assert {"QuantizedLinear", "QuantizedExperts", "QuantizedEmbedding"} <= kinds and "Experts" not in kinds
    assert model.dtype == dtype and model.model.embed_tokens(torch.tensor([3])).dtype == dtype
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
        quantize_module(nn.Linear(100, 16), "int4", 64)
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 8))
    with pytest.raises(MmwbConfigError, match="8 outputs x 64 inputs cannot be packed"):
        quantize_model(model, "int4", 64)
    assert type(model[0]) is nn.Linear  # every shape is checked before any layer changes
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


def test_an_export_with_a_float_token_table_still_loads(tmp_path):
    """Exports made before token tables were quantized hold a float ``embed_tokens.weight``: it is quantized as it
    loads, to the rows a fresh export holds."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    model = DecoderForCausalLM(config)
    model.save_pretrained(tmp_path / "fp32")
    assert (
        main(
            ["export", "--quantize", "int8", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "q")]
        )
        == 0
    )
    (weights,) = (tmp_path / "q").glob("*.safetensors")
    tensors = load_file(weights)
    fresh = {k: tensors.pop(f"model.embed_tokens.{k}") for k in ("qweight", "scale")}
    tensors["model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    table = mmwb.from_pretrained(tmp_path / "q").model.embed_tokens
    assert torch.equal(table.qweight, fresh["qweight"]) and torch.equal(table.scale, fresh["scale"])


def _float_then_quantized(path, mode, group):
    """The reference for a streamed quantized load: the float model loaded whole, then quantized."""
    return quantize_model(mmwb.from_pretrained(path, device="cpu"), mode, group)


@pytest.mark.parametrize("layout", ["mmwb", "deepseek_v3", "qwen3_moe_tied"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tmp_path, layout, mode):
    """Stacked experts read one row at a time (mmwb's layout), per-expert transformers matrices (with DeepSeek's
    rope row order), a head tied to the embeddings: the same bytes as loading the float model, then quantizing."""
    from decoder_fixtures import deepseek_v3, qwen3_moe, randomize

    if layout == "mmwb":
        torch.manual_seed(0)
        config = DecoderConfig(
            vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, first_k_dense_replace=1,
        )  # fmt: skip
        DecoderForCausalLM(config).save_pretrained(tmp_path)
    else:
        widths = dict(q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, v_head_dim=16)  # int4 packs them
        if layout == "deepseek_v3":
            model = deepseek_v3(vocab_size=128, **widths)
        else:
            model = qwen3_moe(vocab_size=128, tie_word_embeddings=True)
        randomize(model).save_pretrained(tmp_path)
    streamed = mmwb.from_pretrained(tmp_path, quantize=mode, group_size=32)
    reference = _float_then_quantized(tmp_path, mode, 32)
    expected, got = reference.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not any(type(m) in (nn.Linear, Experts) for m in streamed.modules())
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_while_loading_never_holds_the_float_model(tmp_path, mode):
    """Peak private memory of a fresh process loading a 290 MB fp32 MoE checkpoint as int8/int4: the final model
    plus a few float tensors (streamed), where loading the float model first peaks above the whole float size."""
    from decoder_fixtures import measure_load

    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=16000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64,
        intermediate_size=1024, moe_intermediate_size=512, n_routed_experts=16, first_k_dense_replace=1,
    )  # fmt: skip
    model = DecoderForCausalLM(config)
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())  # embeddings / head, 33 MB
    model.save_pretrained(tmp_path)
    del model

    peak, final = measure_load(tmp_path, mode, "streamed")
    float_peak, float_final = measure_load(tmp_path, mode, "float_first")
    mb = 2**20
    print(
        f"\n{mode}: float {float_bytes / mb:.0f} MB; streamed peak {peak / mb:.0f} MB, final {final / mb:.0f} MB;"
        f" float first: peak {float_peak / mb:.0f} MB, final {float_final / mb:.0f} MB"
    )
    assert final < 0.5 * float_bytes and final <= float_final + mb  # the quantized model, nothing left over
    assert peak - final <= largest + 24 * mb  # about one float tensor being read (the embeddings)
    assert float_peak > float_bytes > 1.5 * peak  # what streaming avoids: the whole float model


def test_a_sharded_quantized_decoder_loads_module_by_module(tmp_path):
    """save_pretrained shards an int4 decoder; loading reads each module's tensors into empty quantized layers
    (no float model, no second quantization) and gives the same logits; a first-format int4 folder (fp32 scale
    and low) is named as such."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, first_k_dense_replace=1,
    )  # fmt: skip
    model = quantize_model(DecoderForCausalLM(config), "int4", 32)
    model.save_pretrained(tmp_path / "q", max_shard_bytes=20_000)
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    loaded = mmwb.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    model.save_pretrained(tmp_path / "old")
    tensors = load_file(tmp_path / "old" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj."
    tensors[name + "low"] = tensors.pop(name + "zero").float()
    save_file(tensors, tmp_path / "old" / "model.safetensors")
    with pytest.raises(MmwbCheckpointError, match="earlier format of mmwb"):
        mmwb.from_pretrained(tmp_path / "old")


def test_mla_caches_of_a_quantized_kv_b_follow_its_weight():
    """MLA keeps kv_b dequantized for its absorbed decode: loading other weights into the model, or casting it,
    must not leave the old ones in use."""
    config = DecoderConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, attention="mla",
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=4, first_k_dense_replace=1,
    )  # fmt: skip
    torch.manual_seed(0)
    first = quantize_model(DecoderForCausalLM(config).to(torch.bfloat16), "int8")
    torch.manual_seed(1)
    second = quantize_model(DecoderForCausalLM(config).to(torch.bfloat16), "int8")
    prompt = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        first.generate(prompt, max_new_tokens=3, do_sample=False)  # fills the caches
        first.load_state_dict(second.state_dict())
        assert torch.equal(
            first.generate(prompt, max_new_tokens=5, do_sample=False),
            second.generate(prompt, max_new_tokens=5, do_sample=False),
        )
        first.float()  # the caches are made again in the new dtype
        assert first.generate(prompt, max_new_tokens=2, do_sample=False).shape == (1, 6)
