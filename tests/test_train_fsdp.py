"""Sharded training (``train.sharding``: FSDP2 ``full`` = ZeRO-3, ``grad_op`` = ZeRO-2) on two CPU processes over
gloo, launched with the shipped ``configs/accelerate/cpu_2proc.yaml``: the same weights as one process with the
same global batch (an MoE decoder whose experts get no tokens on one rank, and a VLM with a frozen tower + LoRA),
half the training state per rank, a SIGKILLed run that resumes to the uninterrupted weights, and a consolidated
checkpoint that loads with ``mmwb.from_pretrained`` and generates what the sharded training state generates."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmwb
from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.train import TrainConfig, train
from mmwb.train.align import HEALTH_FILE
from mmwb.train.metrics import read_jsonl
from mmwb.train.sharding import planned_state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import MLP, ToyRegression, mse_loss  # noqa: E402
from vlm_train_fixtures import make_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_sharded_lm.py"
LAUNCH_CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")
MMWB = Path(sys.executable).with_name("mmwb")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
FINAL = "checkpoints/step-00000006"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two(*command: str) -> list[str]:
    """``command`` (a script and its arguments) under ``accelerate launch`` with the shipped 2-process config."""
    launch = [str(ACCELERATE), "launch", "--config_file", str(LAUNCH_CONFIG), "--main_process_port"]
    return [*launch, str(_free_port()), *command]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-12000:]


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(len(list(out.glob("rank*.json"))))]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """6 steps of a tiny MoE decoder: one process (batch 4), and two processes (batch 2 each) per sharding, and
    with sharding full as two micro-batches of 1 (gradient accumulation over reduce-scattered shards)."""
    root = tmp_path_factory.mktemp("fsdp_lm")
    _run([sys.executable, str(SCRIPT), "--out", str(root / "one"), "--batch-size", "4"])
    for sharding in ("full", "grad_op"):
        _run(_two(str(SCRIPT), "--out", str(root / sharding), "--batch-size", "2", "--sharding", sharding))
    accumulated = ["--batch-size", "1", "--grad-accum", "2", "--sharding", "full"]
    _run(_two(str(SCRIPT), "--out", str(root / "full_accumulated"), *accumulated))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("run", ["full", "grad_op", "full_accumulated"])
def test_sharded_moe_decoder_matches_one_process(lm_runs, run):
    ranks = _ranks(lm_runs / run)
    assert [(r["rank"], r["world_size"], r["step"], r["sharded"]) for r in ranks] == [
        (0, 2, 6, True),
        (1, 2, 6, True),
    ]
    one = load_file(lm_runs / "one" / FINAL / "model.safetensors")
    sharded = load_file(lm_runs / run / FINAL / "model.safetensors")
    assert _max_diff(one, sharded) <= 1e-5
    # the case DDP needed its zero touch for: a micro-batch routed no token to an expert on one rank only
    counts = [torch.tensor(r["expert_counts"]) for r in ranks]  # (micro-batches, MoE layers, experts)
    assert ((counts[0] == 0) != (counts[1] == 0)).any()
    # between a unit's forward and backward its parameters are back in shards under full, gathered under grad_op
    assert all(
        all(r["resharded"]) == (run != "grad_op") and any(r["resharded"]) == (run != "grad_op") for r in ranks
    )
    assert (lm_runs / run / FINAL / "sharded").is_dir()  # the shards of model and optimizer state


@pytest.mark.slow
def test_full_sharding_halves_the_training_state_per_rank(lm_runs):
    single = _ranks(lm_runs / "one")[0]["state_bytes"]
    for sharding in ("full", "grad_op"):
        for rank in _ranks(lm_runs / sharding):
            ratio = sum(rank["state_bytes"].values()) / sum(single.values())
            print(
                f"{sharding} rank {rank['rank']}: {rank['state_bytes']} = {ratio:.3f} of one process's {single}"
            )
            assert ratio <= 0.6
            assert rank["state_bytes"]["optimizer"] <= 0.6 * single["optimizer"]
    # the plan configs/accelerate/README.md tabulates, against what was measured
    parameters = single["parameters"] // 4  # every parameter of this model trains
    assert planned_state_bytes(parameters, parameters, 1, "none") == single
    assert (
        planned_state_bytes(parameters, parameters, 2, "full") == _ranks(lm_runs / "full")[0]["state_bytes"]
    )


@pytest.mark.slow
def test_consolidated_checkpoint_generates_what_the_sharded_state_generates(lm_runs):
    """The sharded model's greedy continuation (every rank, at the end of training) equals the exported model's."""
    ranks = _ranks(lm_runs / "full")
    model = mmwb.from_pretrained(lm_runs / "full" / FINAL)
    prompt = torch.tensor([ranks[0]["tokens"][:4]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated[0].tolist() == ranks[0]["tokens"] == ranks[1]["tokens"]


@pytest.mark.slow
def test_killed_sharded_run_resumes_to_the_uninterrupted_weights(lm_runs, tmp_path):
    out = tmp_path / "killed"
    args = ["--out", str(out), "--batch-size", "2", "--sharding", "full", "--save-every", "2"]
    killed = subprocess.Popen(
        _two(str(SCRIPT), *args, "--step-sleep", "0.5"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000002").is_dir():
        assert killed.poll() is None, killed.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote its step-2 checkpoint"
        time.sleep(0.02)
    launcher = psutil.Process(killed.pid)
    for process in [*launcher.children(recursive=True), launcher]:  # both workers and their launcher, at once
        process.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert not (out / FINAL).exists()
    steps_before = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert 2 <= steps_before[-1] < 6

    _run(_two(str(SCRIPT), *args, "--resume", "latest"))
    resumed = load_file(out / FINAL / "model.safetensors")
    uninterrupted = load_file(lm_runs / "full" / FINAL / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    log = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]  # training steps (not the final eval)
    assert [r["step"] for r in log] == list(range(1, 7))  # nothing lost, nothing repeated
    reference = [r["loss"] for r in read_jsonl(lm_runs / "full" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in log] == reference


@pytest.fixture(scope="module")
def vlm_parts(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("fsdp_vlm"), n=16)


def _vlm_config(root: Path, setup: dict[str, Path], name: str, batch: int, **extra) -> Path:
    """A YAML config for ``mmwb train align|instruct`` on the tiny parts, writing under ``root/name``."""
    body = {
        "data_dir": str(setup["data"]),
        "vision_dir": str(setup["vision"]),
        "decoder_dir": str(setup["decoder"]),
        "max_length": 48,
        "out_dir": str(root / name / "model"),
        "feature_cache": {"root": str(root / name / "cache")},
        "train": {"out_dir": str(root / name / "run"), "max_steps": 3, "batch_size": batch, "lr": 3e-3},
        **extra,
    }
    body["train"] |= {"warmup_steps": 0, "progress": False}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _one_and_two(root: Path, setup: dict[str, Path], verb: str, **extra) -> tuple[dict, dict]:
    """The final checkpoints of ``mmwb train VERB`` in one process (batch 4) and sharded over two (batch 2)."""
    command = ["train", verb, "--device", "cpu", "--config"]
    _run([str(MMWB), *command, str(_vlm_config(root, setup, "one", 4, **extra))])
    _run(_two(str(MMWB), *command, str(_vlm_config(root, setup, "two", 2, **extra)), "train.sharding=full"))
    final = "run/checkpoints/step-00000003/model.safetensors"
    return load_file(root / "one" / final), load_file(root / "two" / final)


@pytest.mark.slow
def test_sharded_vlm_with_frozen_tower_and_lora_matches_one_process(vlm_parts, tmp_path):
    """``mmwb train instruct``: LoRA on attention, shared and routed experts; the tower frozen, features cached."""
    one, two = _one_and_two(tmp_path, vlm_parts, "instruct", lora={"r": 4})
    assert any(".lora_" in k for k in one) and any(k.startswith("projector.") for k in one)
    assert _max_diff(one, two) <= 1e-5
    # rank 0 built the model again from the consolidated checkpoint and merged it, as a one-process run does
    merged_one, merged_two = (load_file(tmp_path / n / "model" / "model.safetensors") for n in ("one", "two"))
    assert _max_diff(merged_one, merged_two) <= 1e-5
    assert (tmp_path / "two" / "run" / "adapter").is_dir()


@pytest.mark.slow
def test_sharded_alignment_matches_one_process(vlm_parts, tmp_path):
    """``mmwb train align``: the projector alone trains; tower and decoder stay frozen beside it."""
    one, two = _one_and_two(tmp_path, vlm_parts, "align", health={"max_items": 8, "retrieval_group": 4})
    assert one and all(k.startswith("projector.") for k in one)
    assert _max_diff(one, two) <= 1e-5
    reports = [json.loads((tmp_path / n / "model" / HEALTH_FILE).read_text()) for n in ("one", "two")]
    assert reports[0]["caption_loss"] == pytest.approx(reports[1]["caption_loss"], abs=1e-5)


@pytest.mark.slow
def test_sharded_bf16_keeps_fp32_shards(lm_runs, tmp_path):
    """bf16 (the config's precision) gathers and computes in bf16; the shards and optimizer stay fp32."""
    _run(
        _two(
            str(SCRIPT),
            "--out",
            str(tmp_path),
            "--batch-size",
            "2",
            "--sharding",
            "full",
            "--precision",
            "bf16",
        )
    )
    ranks = _ranks(tmp_path)
    assert all(r["sharded"] and r["step"] == 6 for r in ranks)
    assert [r["state_bytes"] for r in ranks] == [
        r["state_bytes"] for r in _ranks(lm_runs / "full")
    ]  # fp32 sizes
    weights = load_file(tmp_path / FINAL / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    fp32 = load_file(lm_runs / "full" / FINAL / "model.safetensors")
    assert _max_diff(weights, fp32) > 1e-4  # the forward and backward did run in bf16
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r)


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    options = {
        "out_dir": tmp_path / "run",
        "max_steps": 2,
        "batch_size": 4,
        "device": "cpu",
        "progress": False,
    }
    return TrainConfig(**(options | overrides))


def test_sharding_requests_that_cannot_work_are_config_errors(tmp_path):
    with pytest.raises(MmwbConfigError, match="does not support sharding"):
        train(MLP(), mse_loss, ToyRegression(16), _config(tmp_path, sharding="full"))
    with pytest.raises(MmwbConfigError, match="without EMA"):
        train(
            MLP(),
            mse_loss,
            ToyRegression(16),
            _config(tmp_path, sharding="full", ema_decay=0.9),
            shardable=True,
        )
    from mmwb.runtime.config import load_config

    with pytest.raises(MmwbConfigError, match="sharding"):
        load_config(TrainConfig, None, ["sharding=zero3"])


@pytest.mark.slow
def test_a_micro_batch_without_data_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """Five unreadable items among 24 drawn, one item per micro-batch: some micro-batch is empty on one rank
    only, and no rank may run its forward alone (a unit's gather would wait for the other rank forever)."""
    command = _two(str(SCRIPT), "--out", str(tmp_path), "--batch-size", "1", "--grad-accum", "2")
    done = subprocess.run(
        [*command, "--sharding", "full", "--bad", "0", "1", "2", "3", "5"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-12000:]
    assert "sit out the micro-batch" in done.stderr
    assert all(r["step"] == 6 for r in _ranks(tmp_path))


def test_shard_units_naming_no_module_is_a_config_error():
    from mmwb.train.sharding import shard_units

    with pytest.raises(MmwbConfigError, match="no module of class DecoderBlok"):
        shard_units(MLP(), {"DecoderBlok"}, ["DecoderBlok"])


def test_one_process_has_nothing_to_shard(tmp_path):
    result = train(MLP(), mse_loss, ToyRegression(16), _config(tmp_path, sharding="full"), shardable=True)
    assert not result.sharded and result.step == 2


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_only_sharded(lm_runs, tmp_path):
    checkpoint = lm_runs / "full" / "checkpoints" / "step-00000006"
    with pytest.raises(MmwbCheckpointError, match="saved with train.sharding full over 2 processes"):
        train(MLP(), mse_loss, ToyRegression(16), _config(tmp_path, resume=str(checkpoint), max_steps=8))


def test_cli_refuses_sharding_for_a_trainer_without_it(tmp_path, capsys):
    from mmwb.cli.main import main

    config = ROOT / "configs" / "train" / "sde_checkerboard.yaml"
    code = main(["train", "sde", "--config", str(config), f"train.out_dir={tmp_path}", "train.sharding=full"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not support sharding" in err[0]
