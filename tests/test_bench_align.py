"""`mmwb bench align` end to end on a few images, for more steps than one epoch holds."""

import json

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
    }
    assert all(report[side]["samples_per_s"] > 0 for side in ("mmwb_cached", "mmwb_uncached", "transformers"))
