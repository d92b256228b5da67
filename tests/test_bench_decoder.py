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
