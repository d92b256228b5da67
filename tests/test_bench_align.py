"""`mmwb bench align` end to end on a few images, for more steps than one epoch holds."""

import json

import pytest

from mmwb.cli.main import main


def test_bench_align_runs_past_one_epoch_and_reports_ratios(tmp_path, capsys):
    # 3 steps x 4 images > 8 images: the transformers loop must wrap around its shuffled order
    args = ["bench", "align", "--device", "cpu", "--images", "8", "--steps", "3", "--batch-size", "4"]
    assert main([*args, "--work-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["ratios"]) == {
        "cached_vs_uncached",
        "cached_vs_transformers",
        "uncached_vs_transformers",
        "amortised_vs_uncached",
        "amortised_vs_transformers",
    }
    assert all(report[side]["samples_per_s"] > 0 for side in ("mmwb_cached", "mmwb_uncached", "transformers"))
    # both sides compute the same per-caption loss on the same first batch
    same = report["same_loss"]
    assert same["captions"] == 4 and same["same"] and same["max_abs_diff"] <= 1e-4 and same["mmwb_mean"] > 1
    # the fill is timed on its own and amortised over the run's 12 samples: below the full cached rate
    cached = report["mmwb_cached"]
    assert cached["filled_images"] == 8 and cached["fill_s"] > 0
    expected = 12 / (cached["fill_s"] + 12 / cached["samples_per_s"])
    assert cached["amortised_samples_per_s"] == pytest.approx(expected)
    assert cached["amortised_samples_per_s"] < cached["samples_per_s"]
