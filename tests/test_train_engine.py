"""The training engine in one process on the CPU: learning, accumulation, clipping, NaN handling, checkpoints,
EMA, schedules, param groups, bad data and metrics files."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from train_fixtures import MLP, ToyRegression, mse_loss

from mmwb.errors import MmwbCheckpointError, MmwbConfigError, MmwbDeviceError, MmwbError
from mmwb.train import (
    DataPosition,
    ParamGroupConfig,
    ResumableBatchSampler,
    TrainConfig,
    TrainingDivergedError,
    param_groups,
    train,
)
from mmwb.train import checkpoint as ckpt
from mmwb.train.ema import make_ema
from mmwb.train.metrics import read_jsonl
from mmwb.train.schedules import make_scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; every run in this file builds its own Accelerator from scratch."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    base = dict(
        out_dir=tmp_path / "run",
        max_steps=8,
        batch_size=8,
        lr=1e-2,
        schedule="constant",
        clip_grad_norm=None,
        device="cpu",
        progress=False,
    )
    return TrainConfig(**(base | overrides))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_decreases_and_metrics_files_are_written(tmp_path):
    result = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=None, epochs=6, lr=3e-2))
    records = [r for r in read_jsonl(result.metrics) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 49))
    assert records[-1]["loss"] < records[0]["loss"] / 3
    assert {"lr", "grad_norm", "samples_per_s", "mae", "epoch"} <= records[0].keys()
    assert records[-1]["epoch"] == 5 and result.epoch == 6
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.checkpoint / ckpt.MODEL_FILE).is_file() and result.world_size == 1


def test_eval_every_n_steps_on_live_and_ema_weights(tmp_path):
    data = ToyRegression(32, seed=9)
    batch = {
        "x": torch.stack([data[i]["x"] for i in range(32)]),
        "y": torch.stack([data[i]["y"] for i in range(32)]),
    }
    seen_modes = []

    def eval_fn(model):
        seen_modes.append((model.training, torch.is_grad_enabled()))
        return {"loss": mse_loss(model, batch)[0].item()}

    cfg = _config(tmp_path, eval_every=4, ema_decay=0.5)
    model = MLP()
    result = train(model, mse_loss, ToyRegression(64), cfg, eval_fn=eval_fn)
    evals = [r for r in read_jsonl(result.metrics) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all("ema_eval_loss" in r for r in evals)
    assert result.final_eval == {k: evals[-1][k] for k in ("eval_loss", "ema_eval_loss")}
    assert set(seen_modes) == {(False, False)}  # eval mode, no autograd
    assert (result.checkpoint / ckpt.EMA_FILE).is_file()
    live = load_file(result.checkpoint / ckpt.MODEL_FILE)
    ema = {
        k.removeprefix("module."): v
        for k, v in load_file(result.checkpoint / ckpt.EMA_FILE).items()
        if k != "n_averaged"
    }
    # the run ends with the average in the model it was given: that is what trainers export
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, live[k]) for k, v in model.state_dict().items())


def test_accumulation_equals_one_big_batch(tmp_path):
    torch.manual_seed(1)
    small, big = MLP(), MLP()
    big.load_state_dict(small.state_dict())
    train(small, mse_loss, ToyRegression(64), _config(tmp_path / "a", batch_size=2, grad_accum=4))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(big, mse_loss, ToyRegression(64), _config(tmp_path / "b", batch_size=8, grad_accum=1))
    diff = max((a - b).abs().max().item() for a, b in zip(small.parameters(), big.parameters()))
    assert diff < 1e-6


def test_clipping_scales_the_gradient(tmp_path):
    """With a huge Adam eps the first update is ``lr * g / eps``: linear in the (clipped) gradient."""
    torch.manual_seed(2)
    start = MLP()
    deltas, norms = {}, {}
    for clip in (None, 0.05):
        model = MLP()
        model.load_state_dict(start.state_dict())
        cfg = _config(tmp_path / str(clip), max_steps=1, lr=1e5, eps=1e6, clip_grad_norm=clip)
        result = train(model, mse_loss, ToyRegression(64), cfg)
        deltas[clip] = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), start.parameters())])
        norms[clip] = read_jsonl(result.metrics)[0]["grad_norm"]
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert norms[None] == pytest.approx(norms[0.05]) and norms[None] > 0.5  # the logged norm is pre-clip
    expected = deltas[None] * (0.05 / norms[None])
    assert torch.allclose(deltas[0.05], expected, rtol=1e-3, atol=1e-7)


def _nan_on_calls(bad_calls: set[int]):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, metrics = mse_loss(model, batch)
        return (loss * float("nan") if calls["n"] in bad_calls else loss), metrics

    return loss_fn


def test_nan_steps_are_skipped_and_counted(tmp_path, caplog):
    model = MLP()
    with caplog.at_level(logging.WARNING):
        result = train(model, _nan_on_calls({3, 4}), ToyRegression(64), _config(tmp_path, max_steps=6))
    assert result.bad_steps == 2 and result.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = read_jsonl(result.metrics)
    assert [r["step"] for r in records] == list(range(1, 7)) and records[-1]["bad_steps"] == 2
    assert "update skipped (2 in a row" in caplog.text


def test_run_stops_after_k_bad_steps_in_a_row(tmp_path):
    with pytest.raises(
        TrainingDivergedError, match=r"NaN/inf for 3 steps in a row \(max_bad_steps=3\)"
    ) as err:
        train(MLP(), _nan_on_calls(set(range(3, 100))), ToyRegression(64), _config(tmp_path, max_bad_steps=3))
    assert isinstance(err.value, MmwbError) and "after step 2" in str(err.value)
    assert "resume from" in str(err.value) and "step-00000002" in str(err.value)
    saved = ckpt.find_checkpoint(tmp_path / "run" / "checkpoints", "latest")  # the last good step, saved
    assert saved.name == "step-00000002" and ckpt.load_state(saved / ckpt.STATE_FILE)["bad_in_a_row"] == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    result = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_bad_steps=3, resume="latest"))
    assert result.step == 8 and result.bad_steps == 3  # the fixed run goes on from step 2


def test_resume_trains_at_the_configs_lr_not_the_checkpoints(tmp_path):
    train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=4, lr=1e-2, weight_decay=0.0))
    result = train(
        MLP(), mse_loss, ToyRegression(64),
        _config(tmp_path, max_steps=8, lr=1e-3, weight_decay=0.1, resume="latest"),
    )  # fmt: skip
    records = read_jsonl(result.metrics)
    assert [r["lr"] for r in records] == [1e-2] * 4 + [1e-3] * 4
    state = ckpt.load_state(result.checkpoint / ckpt.STATE_FILE)
    assert {g["weight_decay"] for g in state["optimizer"]["param_groups"]} == {0.1}


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=6, save_every=2, keep_last=0))
    root = tmp_path / "run" / "checkpoints"
    train(
        MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=3, resume=str(root / "step-00000002"))
    )
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-00000002", "step-00000003", "step-00000004.abandoned", "step-00000006.abandoned"]
    assert ckpt.find_checkpoint(root, "latest").name == "step-00000003"


def test_resuming_a_finished_run_keeps_its_last_loss(tmp_path):
    first = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=4))
    again = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=4, resume="latest"))
    assert again.step == 4 and again.last_loss == first.last_loss and math.isfinite(again.last_loss)


@pytest.mark.parametrize("key", ["log_every", "max_bad_steps", "save_every"])
def test_counts_out_of_range_are_config_errors(tmp_path, key):
    with pytest.raises(MmwbConfigError, match=key):
        train(
            MLP(), mse_loss, ToyRegression(64), _config(tmp_path, **{key: -1 if key == "save_every" else 0})
        )


def test_trainers_in_one_process_each_get_their_precision(tmp_path):
    """A recipe runs its stages in one process: a bf16 stage after an fp32 one must not hit accelerate's
    process-wide state ("AcceleratorState has already been initialized")."""
    fp32 = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path / "a", max_steps=2))
    bf16 = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path / "b", max_steps=2, precision="bf16"))
    assert math.isfinite(fp32.last_loss) and math.isfinite(bf16.last_loss)


def test_keep_last_k_checkpoints(tmp_path):
    result = train(
        MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=10, save_every=2, keep_last=2)
    )
    root = result.checkpoint.parent
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000010"]
    state = ckpt.load_state(result.checkpoint / ckpt.STATE_FILE)  # weights_only=True
    assert state["step"] == 10 and state["epoch"] == 1 and state["sample"] == 16


def test_checkpoint_is_all_or_nothing(tmp_path):
    root = tmp_path / "checkpoints"
    done = ckpt.checkpoint_path(root, 4)
    ckpt.save_state({"step": 4}, ckpt.begin(done) / ckpt.STATE_FILE)
    ckpt.publish(ckpt.staging_path(done), done)
    torn = ckpt.begin(ckpt.checkpoint_path(root, 6))  # a save killed half-way: never published
    ckpt.save_state({"step": 6}, torn / ckpt.STATE_FILE)
    assert ckpt.list_checkpoints(root) == [done]
    assert ckpt.find_checkpoint(root, "latest") == done
    assert ckpt.begin(ckpt.checkpoint_path(root, 6)) == torn and not any(
        torn.iterdir()
    )  # stale files cleared
    with pytest.raises(MmwbCheckpointError, match="no checkpoint under"):
        ckpt.find_checkpoint(tmp_path / "empty", "latest")
    with pytest.raises(MmwbCheckpointError, match="not a checkpoint folder"):
        ckpt.find_checkpoint(root, str(torn))


def test_a_save_killed_between_its_two_renames_is_recovered(tmp_path):
    """Re-saving a step swaps the old folder out (.old) before the new one goes in: killed in between, the next
    run brings the old checkpoint back instead of deleting the only copy."""
    root = tmp_path / "checkpoints"
    done = ckpt.checkpoint_path(root, 4)
    ckpt.save_state({"step": 4}, ckpt.begin(done) / ckpt.STATE_FILE)
    ckpt.publish(ckpt.staging_path(done), done)
    done.rename(done.with_name(done.name + ".old"))  # the kill: swapped out, replacement still staged
    ckpt.begin(done)
    assert ckpt.recover(root) == [ckpt.staging_path(done)]
    assert ckpt.list_checkpoints(root) == [done] and sorted(p.name for p in root.iterdir()) == [done.name]


def test_model_folders_with_subfolders_are_published_whole(tmp_path):
    class Pipeline:  # writes like a diffusers pipeline: a folder per part
        def save_pretrained(self, folder):
            (folder / "unet").mkdir()
            (folder / "unet" / "config.json").write_text("{}")
            (folder / "model_index.json").write_text("{}")

    for _ in range(2):  # the second save replaces the first
        ckpt.save_model_folder(Pipeline(), tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "unet" / "config.json").read_text() == "{}"


def test_resume_keeps_the_global_batch(tmp_path):
    train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=2))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(MmwbConfigError, match="holds checkpoints of an earlier run"):
        train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=4))
    with pytest.raises(MmwbCheckpointError, match="global batch of 8 samples per step, this run has 4"):
        train(
            MLP(), mse_loss, ToyRegression(64), _config(tmp_path, max_steps=4, batch_size=4, resume="latest")
        )


def test_ema_follows_the_weights():
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, decay=0.9)
    first = _weights(model)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for name, value in ema.module.state_dict().items():
        assert torch.allclose(value, 0.9 * first[name] + 0.1 * (first[name] + 1.0), atol=1e-6)
    with pytest.raises(MmwbConfigError, match="ema_decay"):
        make_ema(model, 1.0)


def test_schedules_match_transformers():
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    references = {
        "cosine": lambda opt: get_cosine_schedule_with_warmup(opt, 5, 40),
        "linear": lambda opt: get_linear_schedule_with_warmup(opt, 5, 40),
        "constant": lambda opt: get_constant_schedule_with_warmup(opt, 5),
    }
    for name, reference in references.items():
        ours_opt, ref_opt = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0) for _ in range(2))
        ours, ref = make_scheduler(ours_opt, name, 5, 40), reference(ref_opt)
        lrs = []
        for _ in range(41):
            assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
            lrs.append(ours.get_last_lr()[0])
            ours_opt.step(), ref_opt.step(), ours.step(), ref.step()
        assert lrs[:6] == pytest.approx([0.0, 0.4, 0.8, 1.2, 1.6, 2.0])  # linear warmup to the peak
        assert lrs[40] == pytest.approx({"cosine": 0.0, "linear": 0.0, "constant": 2.0}[name], abs=1e-12)
    half = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "cosine", 0, 10)
    assert half.lr_lambdas[0](5) == pytest.approx(0.5)  # half-way down the cosine
    with pytest.raises(MmwbConfigError, match="schedule must be one of"):
        make_scheduler(ours_opt, "step", 0, 10)


def test_param_groups_have_their_own_lr_and_frozen_params_stay(tmp_path):
    model = MLP()
    model.net[0].bias.requires_grad_(False)
    groups = param_groups(model, _config(tmp_path, param_groups=[ParamGroupConfig("net.3.*", lr=0.0)]))
    assert [(g["name"], len(g["params"]), g["lr"]) for g in groups] == [
        ("net.3.*", 2, 0.0),
        ("default", 1, 1e-2),
    ]
    before = _weights(model)
    cfg = _config(tmp_path, param_groups=[ParamGroupConfig("net.3.*", lr=0.0, weight_decay=0.5)])
    train(model, mse_loss, ToyRegression(64), cfg)
    after = _weights(model)
    assert torch.equal(before["net.0.bias"], after["net.0.bias"])  # frozen
    assert torch.equal(before["net.3.weight"], after["net.3.weight"])  # its group has lr 0
    assert not torch.equal(before["net.0.weight"], after["net.0.weight"])
    frozen = MLP().requires_grad_(False)
    with pytest.raises(MmwbConfigError, match="no trainable parameters"):
        param_groups(frozen, _config(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_items_are_skipped_named_and_counted(tmp_path, caplog, workers):
    data = ToyRegression(64, bad=frozenset({3, 40}))
    with caplog.at_level(logging.WARNING):
        result = train(
            MLP(), mse_loss, data, _config(tmp_path, max_steps=None, epochs=1, num_workers=workers)
        )
    assert result.skipped_items == 2 and result.step == 8
    assert "item-003.png" in caplog.text and "item-040.png" in caplog.text
    assert read_jsonl(result.metrics)[-1]["skipped_items"] == 2


def test_a_step_without_any_readable_item_is_not_an_update(tmp_path):
    data = ToyRegression(16, bad=frozenset({0, 1}))  # unshuffled: the first step of every epoch is all bad
    cfg = _config(tmp_path, max_steps=None, epochs=1, batch_size=2, shuffle=False)
    result = train(MLP(), mse_loss, data, cfg)
    assert (result.step, result.skipped_items, result.bad_steps) == (8, 4, 0)  # 7 updates in epoch 0, 1 in 1
    assert [r["step"] for r in read_jsonl(result.metrics)] == list(range(1, 9))


def test_sampler_shards_one_global_order_and_resumes_mid_epoch():
    single = ResumableBatchSampler(40, batch_size=8, grad_accum=1, seed=3)
    ranks = [
        ResumableBatchSampler(40, batch_size=2, grad_accum=2, world_size=2, rank=r, seed=3) for r in range(2)
    ]
    single_batches = list(single)
    rank_batches = [list(s) for s in ranks]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 5 and len(single_batches) == 5
    for step, batch in enumerate(single_batches):  # step s: micro-batches 2s, 2s+1 over both ranks
        parts = [rank_batches[r][2 * step + m] for m in range(2) for r in range(2)]
        assert sorted(sum(parts, [])) == sorted(batch)
    single.set_position(DataPosition(epoch=0, sample=16))
    assert list(single) == single_batches[2:]
    single.set_position(DataPosition(epoch=1, sample=0))
    assert list(single) != single_batches  # a new order each epoch
    with pytest.raises(MmwbConfigError, match="not a multiple"):
        single.set_position(DataPosition(epoch=0, sample=12))
    with pytest.raises(MmwbConfigError, match="fewer than one step's global batch"):
        ResumableBatchSampler(7, batch_size=8)


def test_precision_is_checked_against_the_device(tmp_path):
    with pytest.raises(MmwbDeviceError, match="fp16 is not supported on cpu"):
        train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, precision="fp16"))
    result = train(MLP(), mse_loss, ToyRegression(64), _config(tmp_path, precision="bf16", max_steps=3))
    assert math.isfinite(result.last_loss)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("single_gpu", "NO"),
        ("multi_gpu_ddp", "MULTI_GPU"),
        ("cpu_2proc", "MULTI_GPU"),  # run by test_train_fsdp.py
        ("gpu_untested/deepspeed_zero2", "DEEPSPEED"),
        ("gpu_untested/deepspeed_zero3", "DEEPSPEED"),
    ],
)
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == kind and config.mixed_precision == "no"


def test_train_config_loads_from_yaml_with_overrides(tmp_path):
    from mmwb.runtime.config import load_config

    path = tmp_path / "train.yaml"
    path.write_text("lr: 1e-3\nbetas: [0.9, 0.95]\nparam_groups:\n  - {pattern: 'projector.*', lr: 1e-4}\n")
    config = load_config(TrainConfig, path, ["grad_accum=4", "resume=latest"])
    assert (config.lr, config.betas, config.grad_accum, config.resume) == (1e-3, (0.9, 0.95), 4, "latest")
    assert config.param_groups == [ParamGroupConfig("projector.*", lr=1e-4)]
    with pytest.raises(MmwbConfigError, match="unknown config key 'lrr'"):
        load_config(TrainConfig, None, ["lrr=1"])
