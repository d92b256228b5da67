"""``mmwb train controlnet`` on a tiny random SD: checkpoints that load as ControlNets, exact resume, frozen base,
zero-convolution start, bad records skipped and counted, mixed precision keeping the ControlNet in fp32."""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import ControlNetModel
from PIL import Image
from safetensors.torch import load_file

from mmwb.cli.main import main
from mmwb.data.controlnet import ControlNetDataset, build_canny_jsonl, read_records
from mmwb.data.shapes import write_dataset
from mmwb.errors import MmwbInputError
from mmwb.models.diffusion.loading import load_controlnet
from mmwb.runtime import resolve_precision
from mmwb.testing.tiny_sd import save_tiny_controlnet_sd
from mmwb.train import TrainConfig, train
from mmwb.train.controlnet import (
    ControlNetLoss,
    freeze,
    load_sd_parts,
    make_controlnet,
)

SIZE = 32  # the tiny SD's VAE halves 32x32 images to its 16x16 latents


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random SD folder and 8 shapes records (plus one whose conditioning image is missing)."""
    root = tmp_path_factory.mktemp("cn_train")
    model, _ = save_tiny_controlnet_sd(root, n_controlnets=0)
    data = root / "data"
    write_dataset(data, 8, size=SIZE, n_eval=2, progress=False)
    jsonl = build_canny_jsonl(data, "train", progress=False)
    lines = jsonl.read_text().splitlines()
    missing = {**json.loads(lines[0]), "conditioning_image": "canny/train/nowhere.png"}
    with_bad = root / "with_bad.jsonl"
    with_bad.write_text("\n".join([*lines, json.dumps(missing)]) + "\n")
    return model, data, jsonl, with_bad


def write_config(path, model, data, jsonl, out_dir, **train):
    config = {
        "model": str(model),
        "data": {"jsonl": str(jsonl), "image_root": str(data), "size": SIZE},
        "validation": {"num_images": 2, "steps": 2},
        "train": {
            "out_dir": str(out_dir),
            "batch_size": 2,
            "lr": 1e-3,
            "progress": False,
            "schedule": "constant",
            **train,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_canny_builder_writes_records_with_edge_maps(setup):
    _, data, jsonl, _ = setup
    records = read_records(jsonl)
    assert len(records) == 8 and records[0].conditioning_image == "canny/train/000000.png"
    edges = np.asarray(Image.open(data / records[0].conditioning_image))
    assert set(np.unique(edges)) <= {0, 255} and edges.any()


@pytest.mark.slow
def test_cli_checkpoints_load_as_controlnet_and_resume_exactly(setup, tmp_path):
    model, data, jsonl, _ = setup
    straight = write_config(
        tmp_path / "a.yaml", model, data, jsonl, tmp_path / "a", max_steps=3, save_every=2
    )
    assert main(["train", "controlnet", "--config", str(straight)]) == 0
    split = write_config(tmp_path / "b.yaml", model, data, jsonl, tmp_path / "b", max_steps=2, save_every=2)
    assert main(["train", "controlnet", "--config", str(split)]) == 0
    checkpoint = tmp_path / "b" / "checkpoints" / "step-00000002"
    net = load_controlnet(checkpoint)  # mmwb's loader and diffusers' own read the checkpoint folder
    assert isinstance(ControlNetModel.from_pretrained(checkpoint), ControlNetModel)
    saved = weights(checkpoint)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    assert main(["train", "controlnet", "--config", str(split), "train.max_steps=3", "--resume"]) == 0
    resumed, reference = (
        weights(tmp_path / "b/checkpoints/step-00000003"),
        weights(tmp_path / "a/checkpoints/step-00000003"),
    )
    assert resumed.keys() == reference.keys()
    assert all(torch.allclose(resumed[k], reference[k], atol=1e-6) for k in reference)
    final = ControlNetModel.from_pretrained(tmp_path / "b" / "controlnet")
    assert all(torch.equal(final.state_dict()[k], resumed[k]) for k in resumed)
    assert (tmp_path / "b" / "validation" / "step-00000003.png").is_file()


def test_base_stays_frozen_and_zero_convolutions_start_at_the_base_model(setup, tmp_path):
    model, data, jsonl, _ = setup
    sd = load_sd_parts(model)
    controlnet = make_controlnet(sd, None)
    hidden = torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, SIZE, SIZE)
    down, mid = controlnet(
        torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), hidden, cond, return_dict=False
    )
    assert all(not residual.any() for residual in [*down, mid])  # zero convolutions: nothing added at step 0
    freeze(sd, torch.device("cpu"), torch.float32)
    frozen = [{k: v.clone() for k, v in module.state_dict().items()} for module in sd.modules()]
    start = {k: v.clone() for k, v in controlnet.state_dict().items()}
    config = TrainConfig(out_dir=tmp_path / "c", max_steps=2, batch_size=2, lr=1e-2, progress=False)
    loss = ControlNetLoss(sd, resolve_precision("fp32", torch.device("cpu")), caption_dropout=0.0)
    train(controlnet, loss, ControlNetDataset(jsonl, data, sd.tokenize, SIZE), config)
    for module, saved in zip(sd.modules(), frozen):
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in controlnet.state_dict().items())


def test_loss_trains_only_the_controlnet_and_keeps_it_fp32_under_bf16(setup):
    model, data, jsonl, _ = setup
    sd = load_sd_parts(model)
    snapshot = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    controlnet = make_controlnet(sd, None)
    precision = resolve_precision("bf16", torch.device("cpu"))
    freeze(sd, torch.device("cpu"), precision.param_dtype)
    dataset = ControlNetDataset(jsonl, data, sd.tokenize, SIZE)
    batch = {key: torch.stack([dataset[i][key] for i in range(2)]) for key in dataset[0]}
    loss = ControlNetLoss(sd, precision, caption_dropout=0.5)(controlnet, batch)
    loss.backward()
    assert torch.isfinite(loss) and sd.unet.dtype == torch.bfloat16 and controlnet.dtype == torch.float32
    assert all(p.grad is None for module in sd.modules() for p in module.parameters())
    assert any(p.grad is not None and p.grad.dtype == torch.float32 for p in controlnet.parameters())
    assert all(
        torch.equal(v.float(), snapshot[k].bfloat16().float()) for k, v in sd.unet.state_dict().items()
    )


def test_missing_conditioning_images_are_skipped_and_counted(setup, tmp_path, capsys):
    model, data, _, with_bad = setup
    config = write_config(
        tmp_path / "d.yaml", model, data, with_bad, tmp_path / "d", max_steps=1, batch_size=9, shuffle=False
    )
    assert main(["train", "controlnet", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped_items"] == 1 and report["step"] == 1
    with pytest.raises(MmwbInputError, match="nowhere.png"):
        ControlNetDataset(with_bad, data, lambda caption: torch.zeros(1), SIZE)[8]


def test_bad_data_files_are_named(setup, tmp_path, capsys):
    model, data, _, _ = setup
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    config = write_config(tmp_path / "e.yaml", model, data, broken, tmp_path / "e", max_steps=1)
    assert main(["train", "controlnet", "--config", str(config)]) == 2
    assert "broken.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["train", "controlnet", "--config", str(config), "data.nope=1"]) == 2
    assert "unknown config key 'data.nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_weights_and_grids_come_every_n_steps(setup, tmp_path):
    model, data, jsonl, _ = setup
    runs = {}
    for name, checkpointing in (("plain", False), ("ckpt", True)):
        config = write_config(
            tmp_path / f"{name}.yaml", model, data, jsonl, tmp_path / name, max_steps=2, eval_every=1
        )
        text = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**text, "gradient_checkpointing": checkpointing}))
        assert main(["train", "controlnet", "--config", str(config)]) == 0
        runs[name] = weights(tmp_path / name / "checkpoints" / "step-00000002")
        for step in (1, 2):  # a validation grid at every eval_every steps, not only at the end
            assert (tmp_path / name / "validation" / f"step-0000000{step}.png").is_file()
    assert all(torch.allclose(runs["ckpt"][k], v, atol=1e-6) for k, v in runs["plain"].items())
