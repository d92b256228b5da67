"""Whole training recipes: make the data, then run each stage from its own YAML config, resumably.

``tiny-shapes`` makes mmwb's default VLM on the synthetic shapes set, Kimi-VL style in miniature: (1) a BPE
tokenizer and LM pretraining of a small decoder on the captions and QA text, (2) one end-to-end stage in which a new
convolutional tower, the projector and the whole decoder train together on captions and questions, with a dense
auxiliary loss on the tower's tokens, attention supervision of the lookups (``mmwb.train.grounding``) and the two
facts of each position answer as targets (``mmwb.train.relation_loss``). ``tiny-shapes-llava`` is the classic LLaVA
recipe in miniature: (1) the tokenizer and contrastive pretraining of a tiny open_clip model, (2) LM pretraining of
a tiny MoE decoder, (3) projector alignment with both towers frozen, (4) LoRA instruction tuning; it stays as the
comparison (issue 19: caption exact match 0.30, VQA 0.67, against the end-to-end recipe's figures in the model
card). Stage ``X`` reads ``<config_dir>/X.yaml`` (a normal mmwb training config; the recipe only fills in paths),
publishes its model folder ``OUT/X/`` whole with ``metrics.json`` in it, and keeps its engine run (checkpoints,
metrics.jsonl, loss.png) in ``OUT/runs/X/``.

Run again on the same ``OUT``, a recipe skips what is finished (the data, every stage whose ``metrics.json``
exists) and resumes an interrupted stage from its latest engine checkpoint.

A stage is a config dataclass (with ``data_dir``, ``out_dir`` and a ``train: TrainConfig`` section, plus the keys
in ``Stage.inputs``) and a function ``run(config) -> metrics`` that publishes ``out_dir`` with ``metrics.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmwb.data.io import write_json
from mmwb.errors import MmwbConfigError, MmwbError
from mmwb.runtime.config import load_config
from mmwb.runtime.resources import shipped
from mmwb.train import checkpoint as ckpt

log = logging.getLogger(__name__)

CONFIG_ROOT = shipped("configs/recipes")
DATA_STEP = "data"  # the step before the stages: `data.n=40000` overrides its data.yaml
DATA_CONFIG = f"{DATA_STEP}.yaml"
STATE_FILE = "recipe.json"
METRICS_FILE = "metrics.json"
# --quick: every stage's own config with a few small steps on a few images, to test the whole chain
QUICK_DATA = {"n": 48, "n_eval": 16}
QUICK_TRAIN = ("train.max_steps=3", "train.batch_size=8", "train.warmup_steps=0", "train.save_every=0")


class StageNotAvailableError(MmwbError):
    """A recipe stage whose trainer is not part of this mmwb yet."""


@dataclass
class ShapesDataConfig:
    """``mmwb data shapes`` settings of a recipe (``<config_dir>/data.yaml``)."""

    n: int = 5000  # training images
    n_eval: int = 500  # images in val and in test
    size: int = 64
    seed: int = 0
    practice: bool = False  # training-only questions in the train split (mmwb.data.shapes.practice_questions)


@dataclass(frozen=True)
class Stage:
    """One stage: ``target`` (``module:function``) takes the loaded ``config`` (``module:Class``), returns metrics.

    ``inputs`` names the config keys the recipe points at earlier outputs (key -> folder under OUT).
    """

    name: str
    config: str
    target: str
    inputs: tuple[tuple[str, str], ...] = ()
    optional: bool = False  # run only when asked for (``run_recipe(..., optional=(name,))``)
    quick: tuple[str, ...] = ()  # its own overrides under --quick, beside QUICK_TRAIN

    def load(self) -> tuple[type, Callable[[Any], dict[str, Any]]]:
        """The config class and run function; ``StageNotAvailableError`` when their module is not there (yet)."""
        module = self.target.split(":")[0]
        try:
            return _resolve(self.config), _resolve(self.target)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise  # the stage's module is there but imports something missing: a real error
            raise StageNotAvailableError(f"{self.name} not available yet: there is no {module}") from err
        except AttributeError as err:
            raise StageNotAvailableError(
                f"{self.name}: the recipe's hook does not match {module} ({err}); update {self.target}"
            ) from err


TINY_SHAPES = (
    Stage("stage1_lm", "mmwb.train.lm:LMStageConfig", "mmwb.train.lm:run_lm_stage"),
    Stage(
        "stage2_vlm",
        "mmwb.train.instruct:InstructStageConfig",
        "mmwb.train.instruct:run_instruct_stage",
        inputs=(("decoder_dir", "stage1_lm"),),
    ),
    Stage(
        "stage3_dpo",
        "mmwb.train.dpo:DPOConfig",
        "mmwb.train.dpo:run_dpo_stage",
        inputs=(("model_dir", "stage2_vlm"), ("pairs_file", "preferences/preferences.jsonl")),
        optional=True,
        quick=("preferences.max_images=16", "preferences.samples=2", "evaluation.max_items=8"),
    ),
)
TINY_SHAPES_LLAVA = (
    Stage("stage1_clip", "mmwb.train.clip:ClipStageConfig", "mmwb.train.clip:run_clip_stage"),
    Stage(
        "stage2_lm",
        "mmwb.train.lm:LMStageConfig",
        "mmwb.train.lm:run_lm_stage",
        inputs=(("tokenizer_dir", "stage1_clip"),),
    ),
    Stage(
        "stage3_align",
        "mmwb.train.align:AlignStageConfig",
        "mmwb.train.align:run_align_stage",
        inputs=(
            ("vision_dir", "stage1_clip"),
            ("decoder_dir", "stage2_lm"),
            ("feature_cache.root", "feature_cache"),
        ),
    ),
    Stage(
        "stage4_instruct",
        "mmwb.train.instruct:InstructStageConfig",
        "mmwb.train.instruct:run_instruct_stage",
        inputs=(("model_dir", "stage3_align"), ("feature_cache.root", "feature_cache")),
    ),
)
RECIPES: dict[str, tuple[Stage, ...]] = {"tiny-shapes": TINY_SHAPES, "tiny-shapes-llava": TINY_SHAPES_LLAVA}


def run_recipe(
    name: str,
    out: Path,
    *,
    quick: bool = False,
    config_dir: Path | None = None,
    overrides: tuple[str, ...] = (),
    data_seed: int | None = None,
    stages: int | None = None,
    progress: bool = True,
    optional: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run recipe ``name`` into ``out``, stopping after ``stages`` stages (default: all); optional stages run
    only when ``optional`` names them (``stage3_dpo`` of tiny-shapes: ``mmwb recipe tiny-shapes --dpo``).

    ``overrides`` (``KEY=VALUE``) apply to every stage, or to one when the key starts with its name
    (``stage1_lm.train.max_steps=200``); ``data.KEY=VALUE`` sets the data step's ``data.yaml``.
    """
    if name not in RECIPES:
        raise MmwbConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    config_dir = Path(config_dir) if config_dir is not None else CONFIG_ROOT / name
    if not config_dir.is_dir():
        raise MmwbConfigError(f"{config_dir}: recipe config folder not found (pass --config-dir)")
    out = Path(out)
    started = time.perf_counter()
    _claim(out, name, quick)
    report: dict[str, Any] = {"recipe": name, "out": str(out), "quick": quick, "stages": {}}
    names = {DATA_STEP} | {stage.name for stage in RECIPES[name]}
    data_overrides = tuple(o.partition(".")[2] for o in overrides if o.partition(".")[0] == DATA_STEP)
    report["data"] = make_data(out / "data", config_dir, quick, data_seed, progress, data_overrides)
    common = (*(QUICK_TRAIN if quick else ()), *overrides, f"train.progress={str(progress).lower()}")
    unknown = set(optional) - {stage.name for stage in RECIPES[name] if stage.optional}
    if unknown:
        raise MmwbConfigError(f"recipe {name!r} has no optional stage {sorted(unknown)[0]!r}")
    chosen = [stage for stage in RECIPES[name] if not stage.optional or stage.name in optional]
    for stage in chosen[:stages]:
        own = stage.quick if quick else ()  # before the user's overrides, which win
        report["stages"][stage.name] = run_stage(
            stage, out, config_dir, (*own, *for_stage(common, stage.name, names))
        )
    report["seconds"] = time.perf_counter() - started
    return report


def for_stage(overrides: tuple[str, ...], stage: str, stages: set[str]) -> tuple[str, ...]:
    """The overrides that concern ``stage``: the common ones, and its own with the ``<stage>.`` prefix removed."""
    kept = []
    for override in overrides:
        head, _, rest = override.partition(".")
        if head not in stages:
            kept.append(override)
        elif head == stage:
            kept.append(rest)
    return tuple(kept)


def make_data(
    folder: Path,
    config_dir: Path,
    quick: bool,
    seed: int | None,
    progress: bool,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write the shapes dataset unless ``folder/meta.json`` (written last) says it is there."""
    from mmwb.data.shapes import write_dataset

    meta = folder / "meta.json"
    if meta.is_file():
        log.info("data: %s exists, skipped", folder)
        return {"status": "skipped", **json.loads(meta.read_text())}
    quick_and_seed = [f"{k}={v}" for k, v in QUICK_DATA.items()] if quick else []
    if seed is not None:
        quick_and_seed.append(f"seed={seed}")
    cfg = load_config(ShapesDataConfig, config_dir / DATA_CONFIG, [*quick_and_seed, *overrides])
    started = time.perf_counter()
    counts = write_dataset(
        folder,
        cfg.n,
        seed=cfg.seed,
        size=cfg.size,
        n_eval=cfg.n_eval,
        progress=progress,
        practice=cfg.practice,
    )
    seconds = time.perf_counter() - started
    log.info("data: %s images in %s (%.0f s)", sum(counts.values()), folder, seconds)
    return {"status": "done", "splits": counts, "seed": cfg.seed, "size": cfg.size, "practice": cfg.practice,
            "seconds": seconds}  # fmt: skip


def run_stage(stage: Stage, out: Path, config_dir: Path, overrides: tuple[str, ...]) -> dict[str, Any]:
    """Skip a finished stage, else load its config with the recipe's paths and run it (resuming if it can)."""
    folder, run_dir = out / stage.name, out / "runs" / stage.name
    done = folder / METRICS_FILE
    if done.is_file():
        metrics = json.loads(done.read_text())
        log.info("%s: finished earlier, skipped (%s)", stage.name, format_metrics(metrics))
        return {"status": "skipped", "folder": str(folder), "metrics": metrics}
    config_cls, run = stage.load()
    paths = {"data_dir": out / "data", "out_dir": folder, "train.out_dir": run_dir}
    paths.update({key: out / source for key, source in stage.inputs})
    resume = ("train.resume=latest",) if ckpt.list_checkpoints(run_dir / "checkpoints") else ()
    if resume:
        log.info("%s: resuming from %s", stage.name, ckpt.list_checkpoints(run_dir / "checkpoints")[-1])
    config = load_config(
        config_cls,
        config_dir / f"{stage.name}.yaml",
        [*overrides, *(f"{key}={value}" for key, value in paths.items()), *resume],
    )
    log.info("%s: training (%s)", stage.name, config_dir / f"{stage.name}.yaml")
    metrics = run(config)
    log.info("%s: done (%s)", stage.name, format_metrics(metrics))
    return {"status": "done", "folder": str(folder), "metrics": metrics}


def write_metrics(metrics: dict[str, Any], folder: Path) -> Path:
    """``folder/metrics.json``, written atomically: its presence marks the stage finished."""
    path = Path(folder) / METRICS_FILE
    write_json(path, metrics)
    return path


def publish_stage(staging: Path, out: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` into a stage's staged model folder, then make the folder visible whole at ``out``."""
    write_metrics(metrics, staging)
    ckpt.publish(staging, out)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The headline numbers of a stage's metrics on one line."""
    shown = {k: v for k, v in metrics.items() if k.startswith(("test_", "val_")) or k == "seconds"}
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())


def _claim(out: Path, name: str, quick: bool) -> None:
    """Record what ``out`` holds, refusing to mix a --quick run with a full one (or two recipes)."""
    state = {"recipe": name, "quick": quick}
    path = out / STATE_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != state:
            raise MmwbConfigError(
                f"{path}: this folder holds a run of {found}, not {state}; pick another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state) + "\n")


def _resolve(spec: str) -> Any:
    module, attribute = spec.split(":")
    return getattr(importlib.import_module(module), attribute)
