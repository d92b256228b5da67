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


def test_bench_decoder_refuses_int4_on_widths_it_cannot_pack(capsys):
    argv = ["bench", "decoder", "--size", "tiny", "--variants", "gqa", "--repeats", "1", "--prompt-len", "6",
            "--new-tokens", "4", "--decode-batches", "1", "--prefill-shape", "1", "8", "--skip-train",
            "--quantize", "int4"]  # fmt: skip
    assert main(argv) == 2
    assert "cannot be packed" in capsys.readouterr().err
