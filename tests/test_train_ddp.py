"""Two CPU processes over gloo (``accelerate launch``) train exactly like one process with the same global batch,
including an MoE whose second expert gets no tokens in many micro-batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_toy.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
ARGS = ["--model", "moe", "--items", "64", "--epochs", "1"]
FINAL = "checkpoints/step-00000016"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(out: Path, *extra: str) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15); this starts two over gloo.
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = [str(SCRIPT), "--out", str(out), *ARGS, "--batch-size", "2", *extra]
    return subprocess.run(command + script, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "one"), *ARGS, "--batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    two = _launch_two(tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]

    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["step"]) for r in ranks] == [(0, 2, 16), (1, 2, 16)]
    one_weights = load_file(tmp_path / "one" / FINAL / "model.safetensors")
    two_weights = load_file(tmp_path / "two" / FINAL / "model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    diff = max((one_weights[k] - two_weights[k]).abs().max().item() for k in one_weights)
    assert diff < 1e-5
    assert not torch.equal(one_weights["experts.1.weight"], _initial_expert_weight())  # it did get tokens


def _initial_expert_weight() -> torch.Tensor:
    """Expert 1 as the script initialises it."""
    sys.path.insert(0, str(SCRIPT.parents[1]))
    from train_fixtures import TwoExpertMoE

    from mmwb.runtime import seed_everything

    seed_everything(0)
    return TwoExpertMoE().state_dict()["experts.1.weight"]


@pytest.mark.slow
def test_unused_experts_break_ddp_without_the_zero_touch(tmp_path):
    """The failure the engine prevents: without touching every parameter DDP's reduction never completes."""
    two = _launch_two(tmp_path / "two", "--no-touch")
    assert two.returncode != 0
    assert "Expected to have finished reduction" in two.stderr
