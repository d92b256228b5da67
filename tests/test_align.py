"""Stage 1: only the projector trains and is saved; the feature cache changes nothing but speed; bad images are
skipped and counted; the health report flags a run that learned nothing; killed and two-process runs match."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmwb.cli.main import main
from mmwb.models.vlm import load_any_vlm
from mmwb.train.align import HEALTH_FILE, AlignConfig, HealthConfig, train_align
from mmwb.train.image_features import FeatureCacheConfig
from mmwb.train.metrics import read_jsonl
from mmwb.train.vlm_setup import starting_vlm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_train_fixtures import CONFIGS, make_setup, tiny_train  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "scripts" / "train_align.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    paths = make_setup(root, n=30)
    records = (paths["data"] / "train.jsonl").read_text().splitlines()
    (paths["data"] / "broken.png").write_bytes(b"\x89PNG not really")
    bad = [
        json.dumps({"image": name, "caption": "a small red circle"}) for name in ("broken.png", "missing.png")
    ]
    (paths["data"] / "with_bad.jsonl").write_text("\n".join(records + bad) + "\n")  # 32 records, 4 steps of 8
    return paths


def _config(setup, out: Path, cache: Path | None = None, **train) -> AlignConfig:
    return AlignConfig(
        data_dir=setup["data"],
        train_file="with_bad.jsonl",
        vision_dir=setup["vision"],
        decoder_dir=setup["decoder"],
        out_dir=out / "model",
        max_length=32,
        feature_cache=FeatureCacheConfig(enabled=cache is not None, root=cache or out / "unused"),
        health=HealthConfig(max_items=16, retrieval_group=8),
        train=tiny_train(out / "run", **({"max_steps": 4} | train)),
    )


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_only_the_projector_changes_and_is_saved(setup, tmp_path, caplog):
    config = _config(setup, tmp_path, cache=tmp_path / "cache")
    vlm = starting_vlm(None, setup["vision"], setup["decoder"])
    parts = {"tower": vlm.vision_tower, "projector": vlm.projector, "decoder": vlm.language_model}
    before = {name: _snapshot(module) for name, module in parts.items()}
    result, report = train_align(config, vlm)

    for name in ("tower", "decoder"):
        after = parts[name].state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), f"the frozen {name} changed"
    projector = vlm.projector.state_dict()
    assert all(not torch.equal(projector[k], v) for k, v in before["projector"].items())

    saved = load_file(result.checkpoint / "model.safetensors")
    assert saved.keys() == {f"projector.{k}" for k in projector}
    assert all(torch.equal(saved[f"projector.{k}"], v) for k, v in projector.items())
    assert sum(f.stat().st_size for f in result.checkpoint.iterdir()) < 200_000  # no tower, no decoder

    assert result.skipped_items == 2  # one epoch: the broken and the missing image, each logged by name
    assert "broken.png" in caplog.text and "missing.png" in caplog.text
    saved_report = json.loads((config.out_dir / HEALTH_FILE).read_text())
    assert saved_report == report
    assert {"caption_loss", "text_only_loss", "image_gain_nats", "retrieval_top1"} <= report.keys()
    aligned = load_any_vlm(config.out_dir)  # the aligned VLM loads as any mmwb VLM
    assert all(torch.equal(aligned.projector.state_dict()[k], v) for k, v in projector.items())


@pytest.mark.slow
def test_feature_cache_gives_the_same_losses_as_encoding_images(setup, tmp_path):
    cached, _ = train_align(_config(setup, tmp_path / "cached", cache=tmp_path / "cache", max_steps=2))
    plain, _ = train_align(_config(setup, tmp_path / "plain", max_steps=2))
    cached_losses = [r["loss"] for r in read_jsonl(cached.metrics)]
    plain_losses = [r["loss"] for r in read_jsonl(plain.metrics)]
    assert cached_losses == pytest.approx(plain_losses, abs=1e-5)
    weights = [load_file(r.checkpoint / "model.safetensors") for r in (cached, plain)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


def _cli_overrides(setup, out: Path, *extra: str) -> list[str]:
    return [
        f"data_dir={setup['data']}",
        f"vision_dir={setup['vision']}",
        f"decoder_dir={setup['decoder']}",
        f"out_dir={out / 'model'}",
        f"feature_cache.root={out / 'cache'}",
        f"train.out_dir={out / 'run'}",
        "train.batch_size=4",
        "train.warmup_steps=0",
        "train.log_every=1",
        "health.max_items=8",
        "health.retrieval_group=4",
        *extra,
    ]


@pytest.mark.slow
def test_cli_flags_a_run_that_learned_nothing(setup, tmp_path, capsys):
    args = ["train", "align", "--config", str(CONFIGS / "align_tiny.yaml"), "--device", "cpu", "--json"]
    code = main([*args, *_cli_overrides(setup, tmp_path, "train.max_steps=2", "train.lr=0.0")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2
    assert out["health"]["learned_from_images"] is False
    assert out["health"]["verdict"].startswith("FLAGGED")
    assert (tmp_path / "model" / HEALTH_FILE).is_file()


def _script(out: Path, setup, *extra: str) -> list[str]:
    return [str(SCRIPT), "--config", str(CONFIGS / "align_tiny.yaml"), *extra, *_cli_overrides(setup, out)]


@pytest.mark.slow
def test_killed_align_run_resumes_to_the_same_weights(setup, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    steps = ["train.max_steps=12", "train.save_every=4", "train.keep_last=0"]
    killed = subprocess.Popen(
        [sys.executable, *_script(tmp_path / "killed", setup, "--step-sleep", "0.3"), *steps],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reference = subprocess.Popen(  # runs meanwhile
        [sys.executable, *_script(tmp_path / "reference", setup), *steps],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    checkpoint = tmp_path / "killed" / "run" / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 240
    while not checkpoint.is_dir():
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never wrote its step-4 checkpoint"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)  # mid-epoch (8 steps an epoch), after the step-4 checkpoint
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    steps_done = [r["step"] for r in read_jsonl(tmp_path / "killed" / "run" / "metrics.jsonl")]
    assert 4 <= steps_done[-1] < 8
    reference_output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, reference_output[-3000:]

    resumed = subprocess.run(
        [sys.executable, *_script(tmp_path / "killed", setup), *steps, "train.resume=latest"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = "run/checkpoints/step-00000012/model.safetensors"
    a, b = load_file(tmp_path / "killed" / final), load_file(tmp_path / "reference" / final)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended with other weights"
    log = read_jsonl(tmp_path / "killed" / "run" / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))  # nothing lost, nothing repeated
    assert [r["loss"] for r in log] == [
        r["loss"] for r in read_jsonl(tmp_path / "reference" / "run" / "metrics.jsonl")
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    steps = ["train.max_steps=3"]
    single = subprocess.run(
        [sys.executable, *_script(tmp_path / "one", setup), *steps, "train.batch_size=4"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15); this starts two over gloo
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run(
        [*launch, *_script(tmp_path / "two", setup), *steps, "train.batch_size=2"],
        env=env | {"ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / "run" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["step"]) for r in ranks] == [(0, 2, 3), (1, 2, 3)]
    final = "run/checkpoints/step-00000003/model.safetensors"
    one, both = load_file(tmp_path / "one" / final), load_file(tmp_path / "two" / final)
    assert one.keys() == both.keys()
    assert max((one[k] - both[k]).abs().max().item() for k in one) < 1e-5


def test_sequence_losses_equal_the_full_logits_loss(setup):
    """The LM head runs only from the first labelled position on; the per-sequence losses are those of full
    logits, with and without images, including a row that has no label at all."""
    import torch.nn.functional as F

    from mmwb.data.captions import read_records
    from mmwb.models.vlm.prompt import make_encoder
    from mmwb.train.image_features import ProcessedPixels
    from mmwb.train.multimodal import IGNORE_INDEX, collate, drop_image_tokens
    from mmwb.train.vlm_loss import multimodal_loss, sequence_losses

    vlm = starting_vlm(None, setup["vision"], setup["decoder"]).eval()
    records = read_records(setup["data"] / "train.jsonl")[:4]
    encode, pixels = make_encoder(vlm.tokenizer, "plain", 32), ProcessedPixels(vlm.image_processor())
    items = [{**encode(r), **pixels(setup["data"] / r.image)} for r in records]
    items[1]["labels"] = torch.full_like(items[1]["labels"], IGNORE_INDEX)
    batch = collate(items, vlm.tokenizer.pad_token_id)
    for with_images in (True, False):
        with torch.no_grad():
            losses = sequence_losses(vlm, batch, with_images)
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            if with_images:
                inputs = vlm.prepare_inputs(ids, mask, labels, pixel_values=batch["pixel_values"])
            else:
                inputs = vlm.prepare_inputs(*drop_image_tokens(ids, mask, labels, vlm.config.image_token_id))
            logits = vlm.language_model(
                inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"]
            ).logits
        targets = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
        full = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        expected = full.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)
        assert losses[1] == 0 and torch.allclose(losses, expected, atol=1e-6), (losses, expected)
    # the two averages of the training loss: over sequences, or over all labelled tokens of the batch
    with torch.no_grad():
        by_sequence = multimodal_loss(vlm, batch)
        by_token = multimodal_loss(vlm, batch, average="token")
        with_images = sequence_losses(vlm, batch)
    counts = (batch["labels"] != IGNORE_INDEX).sum(1)  # the first token is never a target
    assert torch.allclose(by_sequence, with_images.mean(), atol=1e-6)
    assert torch.allclose(by_token, (with_images * counts).sum() / counts.sum(), atol=1e-6)
    assert not torch.allclose(by_token, by_sequence)  # a label-less row and unequal lengths: they differ
