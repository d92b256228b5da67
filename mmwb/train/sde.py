"""Train a score model with denoising score matching on the shared engine (``mmwb train sde``).

The config's ``data``, ``sde`` and ``network`` sections are the model's spec: they are written as
``config.json`` into every checkpoint (so a checkpoint loads with ``load_trained``) and into the final
``out_dir/model`` folder, which holds the EMA weights as ``model.safetensors``. Each evaluation draws samples
with a fast deterministic solver and measures them (sliced Wasserstein for 2-D data, the digit classifier's
Fréchet distance for digits), for the live and the EMA weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from mmwb.data.io import write_json
from mmwb.errors import MmwbConfigError
from mmwb.models.sde.data import dataset, to_model_space
from mmwb.models.sde.digit_metrics import load_classifier
from mmwb.models.sde.evaluate import DIGITS_CLASSIFIER, generate, quality
from mmwb.models.sde.losses import dsm_loss
from mmwb.models.sde.sdes import SDE
from mmwb.models.sde.trained import (
    DataSpec,
    ModelSpec,
    NetworkSpec,
    SDESpec,
    TrainedSDE,
    build_score_model,
    build_sde,
    save_folder,
    spec_config,
)
from mmwb.runtime import make_generator, seed_everything
from mmwb.train.config import TrainConfig
from mmwb.train.engine import TrainResult, train

FINAL_DIR = "model"  # out_dir/model: the trained model folder (EMA weights)


@dataclass
class LossConfig:
    weighting: Literal["sigma2", "likelihood"] = "sigma2"  # sigma2 is DDPM's eps loss for VP
    importance: bool = False  # sample t by the likelihood weighting (weighting: likelihood only)
    eps: float = 1e-5  # smallest training time
    reduce_mean: bool = False


@dataclass
class EvalConfig:
    """Samples drawn at each evaluation (``train.eval_every`` and the end); ``samples: 0`` turns it off."""

    samples: int = 1000
    sampler: str = "heun"
    steps: int = 25
    seed: int = 0
    classifier: Path = DIGITS_CLASSIFIER  # digits only: the feature space of the Fréchet distance


@dataclass
class SDETrainConfig:
    data: DataSpec = field(default_factory=DataSpec)
    sde: SDESpec = field(default_factory=SDESpec)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            out_dir=Path("runs/sde"), batch_size=256, lr=1e-3, ema_decay=0.999
        )
    )

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.data, self.sde, self.network)


class TensorItems(Dataset):
    """Rows of one tensor as the engine's items."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class Evaluator:
    """``eval_fn`` of the engine: sample with the fast solver, return the quality figures."""

    def __init__(self, config: SDETrainConfig) -> None:
        self.config = config
        use_classifier = config.data.is_image and config.eval.samples > 0
        self.classifier = load_classifier(config.eval.classifier) if use_classifier else None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        cfg = self.config
        model = getattr(model, "module", model)  # DDP / AveragedModel wrappers
        trained = TrainedSDE(cfg.spec, model.sde, model)
        device = next(model.parameters()).device
        samples, nfe = generate(
            trained,
            cfg.eval.samples,
            cfg.eval.sampler,
            cfg.eval.steps,
            make_generator(cfg.eval.seed, device),
            disable=True,
        )
        return {**quality(trained, samples, cfg.eval.seed, self.classifier), "nfe": float(nfe)}


def loss_fn(config: SDETrainConfig, sde: SDE):
    """``loss(model, batch)``: DSM on the batch mapped to model space (digits dequantised afresh)."""
    loss = config.loss

    def compute(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        x0 = to_model_space(config.data, batch)
        return dsm_loss(
            sde,
            model,
            x0,
            weighting=loss.weighting,
            importance=loss.importance,
            eps=loss.eps,
            reduce_mean=loss.reduce_mean,
        )

    return compute


def train_sde(config: SDETrainConfig) -> tuple[TrainResult, Path]:
    """Train and write the final model folder ``out_dir/model``; returns the engine's result and that folder."""
    if config.eval.samples < 0:
        raise MmwbConfigError(f"eval.samples must be >= 0, got {config.eval.samples}")
    seed_everything(config.train.seed)  # the initial weights come from the run's seed
    sde = build_sde(config.sde)
    model = build_score_model(config.spec, sde)
    data = TensorItems(dataset(config.data, "train", config.train.seed))
    evaluator = Evaluator(config) if config.eval.samples else None
    started = time.perf_counter()
    result = train(
        model,
        loss_fn(config, sde),
        data,
        config.train,
        eval_fn=evaluator,
        on_save=lambda folder: write_json(folder / "config.json", spec_config(config.spec)),
    )
    final = Path(config.train.out_dir) / FINAL_DIR
    if result.rank == 0:
        info = _info(config, result, time.perf_counter() - started)
        save_folder(final, spec_config(config.spec, info), model.state_dict())  # EMA weights when kept
    return result, final


def _info(config: SDETrainConfig, result: TrainResult, seconds: float) -> dict[str, Any]:
    """What the model card needs: steps, seed, loss, the final evaluation and the training recipe."""
    return {
        "steps": result.step,
        "seed": config.train.seed,
        "last_loss": result.last_loss,
        "train_seconds_this_run": round(seconds, 1),
        "final_eval": result.final_eval,
        "loss": asdict(config.loss),
        "train": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.train).items()},
    }
