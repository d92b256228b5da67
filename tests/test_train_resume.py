"""A run SIGKILLed mid-epoch and resumed with ``--resume latest`` ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmwb.train.metrics import read_jsonl

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_toy.py"
# 64 items, batch 4: 16 steps an epoch, 32 in all; checkpoints every 5 steps; the model has dropout and EMA.
ARGS = ["--items", "64", "--epochs", "2", "--batch-size", "4", "--save-every", "5"]
FINAL = "checkpoints/step-00000032"


def _run(out: Path, *extra: str, wait: bool = True) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    return proc


@pytest.mark.slow
def test_killed_run_resumes_bit_exactly(tmp_path):
    killed = _run(tmp_path / "killed", "--step-sleep", "0.25", wait=False)
    reference = _run(tmp_path / "reference", wait=False)  # runs meanwhile
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.monotonic() + 240
    while not checkpoint.is_dir():
        assert killed.poll() is None, killed.communicate()[0]
        assert time.monotonic() < deadline, "the run never wrote its step-10 checkpoint"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # mid-epoch 0 (steps 1-16), after the step-10 checkpoint
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / FINAL).exists()
    reference_output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_output

    steps_before_kill = [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")]
    assert 10 <= steps_before_kill[-1] < 16  # killed inside the first epoch

    _run(tmp_path / "killed", "--resume", "latest")

    for name in ("model.safetensors", "ema.safetensors"):
        resumed = load_file(tmp_path / "killed" / FINAL / name)
        uninterrupted = load_file(tmp_path / "reference" / FINAL / name)
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            assert torch.equal(resumed[key], uninterrupted[key]), f"{name}:{key} differs"
    resumed_log = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    reference_log = read_jsonl(tmp_path / "reference" / "metrics.jsonl")
    assert [r["step"] for r in resumed_log] == list(range(1, 33))  # nothing lost, nothing repeated
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in reference_log]
