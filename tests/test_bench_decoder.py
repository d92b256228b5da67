"""``mmwb bench decoder``: one JSON report of mmwb/transformers ratios on identical random weights."""

import json

import pytest

from mmwb.cli.main import main


@pytest.mark.slow
def test_bench_decoder_tiny_reports_ratios_and_same_tokens(capsys):
    argv = ["bench", "decoder", "--size", "tiny", "--variants", "mla", "--repeats", "1", "--prompt-len", "6",
            "--new-tokens", "4", "--decode-batches", "1", "--prefill-shape", "1", "8", "--train-shape", "1", "8",
            "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    result = report["variants"]["mla"]
    decode = result["decode"]["1"]
    assert decode["tokens_match"]  # greedy tokens equal: both sides hold the same weights
    assert decode["transformers_experts"] in ("eager", "batched_mm", "grouped_mm")
    assert result["prefill"]["ratio"] > 0 and result["train"]["ratio"] > 0
    # both cache the MLA latent: kv_lora_rank + rope dims per layer, fp32
    assert result["kv_bytes_per_token"] == {"mmwb": (16 + 8) * 2 * 4, "transformers": (16 + 8) * 2 * 4}
    assert 0 < result["decode_bandwidth_utilisation"]["mmwb"]
    assert len(result["copy_bandwidth_gbs"]) == 2 and min(result["copy_bandwidth_gbs"]) > 0  # before, after


@pytest.mark.slow
def test_bench_decoder_times_quantized_copies_against_mmwb_fp32(capsys):
    argv = ["bench", "decoder", "--size", "tiny", "--variants", "gqa", "--repeats", "1", "--prompt-len", "6",
            "--new-tokens", "4", "--decode-batches", "1", "--prefill-shape", "1", "8", "--skip-train",
            "--quantize", "int8", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)["variants"]["gqa"]
    quantized = result["quantized"]["int8"]
    assert quantized["tokens_per_s"] > 0 and quantized["ratio_vs_mmwb_fp32"] > 0
    assert quantized["ratio_vs_transformers_fp32"] > 0 and 0 < quantized["bandwidth_utilisation"] < 1
    assert 0 <= quantized["same_tokens_as_fp32"] <= 1
    # int8 reads about a quarter of the fp32 weight bytes (plus the KV cache, the norms and the bf16 scales)
    assert quantized["bytes_per_token"] < 0.5 * result["decode_bytes_per_token"]
    # the peer the issue names, where torchao is installed (mmwb does not depend on it): transformers with
    # torchao's int8 weight-only config, in the same rounds
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:
        assert quantized["torchao_int8_tokens_per_s"] > 0 and quantized["ratio_vs_torchao_int8"] > 0
    else:
        assert "torchao_int8_tokens_per_s" not in quantized


def test_bench_decoder_refuses_int4_on_widths_it_cannot_pack(capsys):
    argv = ["bench", "decoder", "--size", "tiny", "--variants", "gqa", "--repeats", "1", "--prompt-len", "6",
            "--new-tokens", "4", "--decode-batches", "1", "--prefill-shape", "1", "8", "--skip-train",
            "--quantize", "int4"]  # fmt: skip
    assert main(argv) == 2
    assert "cannot be packed" in capsys.readouterr().err


TINY_KIMI = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=16, v_head_dim=16, num_hidden_layers=3, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def test_the_large_bench_writes_a_checkpoint_transformers_and_mmwb_read_alike(tmp_path, monkeypatch):
    """The kimi-vl-a3b size's writer at tiny widths: a sharded deepseek_v3 folder with one matrix per expert, as
    released, whose weights give transformers' and mmwb's models the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    import mmwb
    from mmwb.bench import large_decoder

    monkeypatch.setattr(large_decoder, "SHARD_BYTES", 100_000)
    config = {**large_decoder.text_config(None), **TINY_KIMI}
    written = large_decoder.write_checkpoint(tmp_path, config)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / name).is_file() for name in shards)
    assert index["metadata"]["total_size"] == written
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ours = mmwb.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max() < 1e-3


@pytest.mark.slow
def test_the_large_bench_reports_memory_decode_and_first_token(tmp_path, monkeypatch, capsys):
    """The whole kimi-vl-a3b flow on tiny text widths (MoonViT at its real size): fresh processes per mode, and
    transformers' load attempt under the memory cap."""
    from mmwb.bench import large_decoder

    monkeypatch.setattr(large_decoder, "TEXT_CONFIG", {**large_decoder.TEXT_CONFIG, **TINY_KIMI})
    argv = ["bench", "decoder", "--size", "kimi-vl-a3b", "--layers", "2", "--quantize", "int8", "int4",
            "--group-size", "32", "--checkpoint-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == 2 and report["checkpoint_bytes"] > 0
    for mode in ("int8", "int4"):
        result = report["modes"][mode]
        memory = result["load_memory"]
        assert (
            0 < memory["final_rss"] <= memory["peak_rss"] and memory["peak_anonymous"] <= memory["peak_rss"]
        )
        assert result["decode"]["tokens_per_s"] > 0 and 0 < result["decode"]["bandwidth_utilisation"]
        first = result["first_token"]
        assert first["image_tokens"] == 256 and first["prefill_tokens"] == 256 + 64
        assert first["total_s"] >= first["tower_s"] > 0
    assert (
        report["modes"]["int4"]["decode"]["bytes_per_token"]
        < report["modes"]["int8"]["decode"]["bytes_per_token"]
    )
    assert report["transformers"]["loaded"]  # tiny: it fits


def test_the_llama_cpp_row_has_a_tokenizer_of_the_models_size_and_names_a_missing_build(tmp_path, capsys):
    """What the llama.cpp row needs of mmwb itself (the row runs where a llama.cpp build exists, BENCHMARKS.md):
    a byte-level BPE tokenizer with exactly the model's vocabulary, and a clear error without the build."""
    from transformers import AutoTokenizer

    from mmwb.bench.llama_cpp import write_tokenizer

    write_tokenizer(tmp_path / "tok", 512)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == 512 and max(tokenizer.get_vocab().values()) == 511
    text = "a caption, with émojis 🦙 and 3 numbers"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    argv = ["bench", "decoder", "--size", "tiny", "--variants", "gqa", "--repeats", "1", "--prompt-len", "6",
            "--new-tokens", "4", "--decode-batches", "1", "--prefill-shape", "1", "8", "--skip-train",
            "--quantize", "int8", "--llama-cpp", str(tmp_path / "nowhere")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a built llama.cpp tree" in err and "llama-bench" in err


def test_decode_bytes_count_the_dequantized_kv_b_an_mla_decode_reads():
    """A quantized MLA layer's absorbed decode reads kv_b dequantized (fp32 here), not its int8 bytes."""
    from mmwb.bench.machine import active_decode_bytes
    from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
    from mmwb.models.quantize import QuantizedLinear, quantize_model

    config = DecoderConfig(
        vocab_size=96, hidden_size=128, num_layers=1, num_heads=4, intermediate_size=256, attention="mla",
        kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
    )  # fmt: skip
    model = quantize_model(DecoderForCausalLM(config), "int8")
    kv_b = model.model.layers[0].self_attn.kv_b_proj
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m is not kv_b]
    floats = sum(p.numel() * 4 for p in model.parameters())  # the norms (the token table is int8 buffers)
    want = sum(m.kernel_bytes() for m in layers) + kv_b.out_features * kv_b.in_features * 4 + floats
    assert active_decode_bytes(model, 0) == want
