"""Device and precision policy decisions, seeding, timing and memory tracking."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmwb.errors import MmwbDeviceError
from mmwb.runtime import (
    Timer,
    make_generator,
    median_time,
    rate,
    resolve_device,
    resolve_precision,
    seed_everything,
    supported_precisions,
    track_peak_memory,
)

CPU = torch.device("cpu")


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None, env={}) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device(None, env={}) == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device(None, env={}) == CPU
    assert resolve_device("auto", env={}) == CPU


def test_explicit_device_beats_environment_and_environment_beats_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cpu", env={"MMWB_DEVICE": "cuda:1"}) == CPU
    assert resolve_device(None, env={"MMWB_DEVICE": "cuda:1"}) == torch.device("cuda:1")


def test_unavailable_devices_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(MmwbDeviceError, match="CUDA is not available"):
        resolve_device("cuda", env={})
    with pytest.raises(MmwbDeviceError, match=r"\$MMWB_DEVICE.*MPS is not available"):
        resolve_device(None, env={"MMWB_DEVICE": "mps"})
    with pytest.raises(MmwbDeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0", env={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MmwbDeviceError, match="only 1 CUDA device"):
        resolve_device("cuda:3", env={})


def test_cpu_precisions_and_refusal_of_fp16():
    assert supported_precisions(CPU) == ["fp32", "bf16"]
    with pytest.raises(MmwbDeviceError, match="fp16 is not supported on cpu"):
        resolve_precision("fp16", CPU)
    with pytest.raises(MmwbDeviceError, match="not one of"):
        resolve_precision("fp8", CPU)
    assert resolve_precision(None, CPU).param_dtype == torch.float32
    assert resolve_precision("bfloat16", CPU).name == "bf16"
    assert resolve_precision(torch.bfloat16, CPU).name == "bf16"


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_cuda_policy_scaler_only_for_fp16_and_bf16_needs_hardware(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert supported_precisions(cuda) == ["fp32", "fp16"]
    with pytest.raises(MmwbDeviceError, match="no bf16 support"):
        resolve_precision("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("bf16", cuda).grad_scaler() is None
    assert resolve_precision("fp32", cuda).grad_scaler() is None
    assert resolve_precision("fp16", cuda).grad_scaler() is not None
    assert resolve_precision("bf16", CPU).grad_scaler() is None


def test_autocast_runs_matmuls_in_the_policy_dtype():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with resolve_precision("bf16", CPU).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with resolve_precision("fp32", CPU).autocast():
        assert (a @ b).dtype == torch.float32


def test_seed_everything_reproduces_python_numpy_and_torch():
    import random

    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    seed_everything(123)
    first = draw()
    seed_everything(123)
    assert draw() == first
    seed_everything(124)
    assert draw() != first


def test_generators_are_private_streams():
    g1, g2 = make_generator(7), make_generator(7)
    a = torch.randn(4, generator=g1)
    torch.randn(100)  # global RNG use in between must not matter
    assert torch.equal(a, torch.randn(4, generator=g2))
    assert not torch.equal(torch.randn(4, generator=make_generator(8)), a)


def test_timer_median_and_rate():
    with Timer(CPU) as timer:
        time.sleep(0.02)
    assert 0.015 < timer.seconds < 0.5
    calls = []
    assert median_time(lambda: calls.append(time.sleep(0.005)), CPU, repeats=3, warmup=2) >= 0.004
    assert len(calls) == 5
    assert rate(100, 2.0) == 50.0 and rate(5, 0.0) == 0.0


def test_peak_memory_sees_a_temporary_allocation():
    with track_peak_memory(CPU) as mem:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched so it is resident
        time.sleep(0.05)
        del block
    assert mem.source == "process-rss"
    assert mem.added_bytes > 32 * 2**20


def test_shipped_files_resolve_from_mmwb_home_then_the_checkout(tmp_path, monkeypatch):
    from mmwb.runtime.resources import HOME_ENV, resource_roots, shipped, shipped_model

    checkout = Path(__file__).resolve().parents[1]
    assert shipped_model("tiny-shapes-vlm") == checkout / "assets" / "models" / "tiny-shapes-vlm"
    (tmp_path / "assets" / "models" / "tiny-shapes-vlm").mkdir(parents=True)
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    assert resource_roots()[:2] == [tmp_path, checkout]
    assert shipped_model("tiny-shapes-vlm") == tmp_path / "assets" / "models" / "tiny-shapes-vlm"  # home wins
    assert shipped("configs/recipes") == checkout / "configs" / "recipes"  # what home lacks: the next root
    assert shipped("nowhere") == tmp_path / "nowhere"  # none has it: the first root, for the error message
