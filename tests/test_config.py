"""YAML configs into typed dataclasses: overrides, and errors that name the key and the file."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmwb.errors import MmwbConfigError
from mmwb.runtime.config import load_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass
class Train:
    steps: int = 10
    name: str = "run"
    out: Path | None = None
    ema: float | None = None
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


def write(tmp_path, text):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "steps: 50\noptim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\nout: runs/a\ntags: [x, y]\n")
    cfg = load_config(Train, path, ["optim.schedule=linear", "ema=0.999", "name=exp1"])
    assert cfg.steps == 50 and cfg.name == "exp1" and cfg.ema == 0.999
    assert cfg.optim == Optim(lr=1e-4, betas=(0.8, 0.9), schedule="linear")
    assert cfg.out == Path("runs/a") and cfg.tags == ["x", "y"]
    assert to_dict(cfg)["optim"]["lr"] == 1e-4


def test_defaults_without_a_file():
    assert load_config(Train) == Train()
    assert load_config(Train, overrides=["steps=3"]).steps == 3


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(
        MmwbConfigError, match=r"train\.yaml: unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"
    ):
        load_config(Train, path)
    with pytest.raises(MmwbConfigError, match="unknown config key 'stepz'"):
        load_config(Train, overrides=["stepz=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=ten", r"steps must be an integer, got 'ten'"),
        ("steps=true", r"steps must be an integer"),
        ("optim.lr=fast", r"optim\.lr must be a number"),
        ("optim.schedule=step", r"optim\.schedule must be one of 'cosine', 'linear'"),
        ("optim.betas=0.9", r"optim\.betas must be a list"),
        ("optim=3", r"optim must be a mapping"),
        ("steps", r"expected KEY=VALUE"),
    ],
)
def test_wrong_types_are_errors(tmp_path, override, message):
    with pytest.raises(MmwbConfigError, match=message):
        load_config(Train, write(tmp_path, "name: a\n"), [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MmwbConfigError, match="config file not found"):
        load_config(Train, tmp_path / "nope.yaml")
    with pytest.raises(MmwbConfigError, match="not valid YAML"):
        load_config(Train, write(tmp_path, "steps: [1,\n"))
    with pytest.raises(MmwbConfigError, match="must be a mapping"):
        load_config(Train, write(tmp_path, "- 1\n- 2\n"))


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "'inf'"])
def test_non_finite_numbers_are_config_errors(value):
    @dataclasses.dataclass
    class Opt:
        lr: float = 1e-3
        betas: tuple[float, ...] = (0.9, 0.99)

    with pytest.raises(MmwbConfigError, match=r"<defaults>: lr must be a finite number, got"):
        load_config(Opt, None, [f"lr={value}"])
    with pytest.raises(MmwbConfigError, match=r"betas\[1\] must be a finite number"):
        load_config(Opt, None, [f"betas=[0.9, {value}]"])
