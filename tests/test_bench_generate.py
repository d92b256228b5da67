"""``mmwb bench generate``: one JSON report with the speed ratio against diffusers and an edge F1 table."""

import json

from mmwb.cli.main import main


def test_bench_generate_reports_ratio_same_pixels_and_quality(capsys):
    argv = ["bench", "generate", "--repeats", "1", "--steps", "2", "--quality-steps", "2", "3",
            "--schedulers", "ddim", "euler_a", "--images", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    speed = report["speed"]
    assert speed["max_pixel_diff"] == 0  # the same weights, request and seed draw the same image
    assert speed["ratio"] > 0 and len(speed["all_s"]["mmwb"]) == 1
    quality = report["quality"]
    assert set(quality["edge_f1"]) == {"ddim", "euler_a"} and set(quality["edge_f1"]["ddim"]) == {"2", "3"}
    assert 0 <= quality["no_control_edge_f1"] <= 1
