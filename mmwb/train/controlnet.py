"""Train a ControlNet on a frozen Stable Diffusion with the shared engine (``mmwb train controlnet``).

The ControlNet starts as a copy of the UNet's encoder (``ControlNetModel.from_unet``) whose outputs pass through
zero convolutions, so step 0 reproduces the base model exactly and training only ever adds control. UNet, VAE
and text encoder are frozen and, under mixed precision, stored in the half dtype (they never take an optimizer
step, so fp32 masters would only cost memory); the ControlNet, the one trained part, keeps fp32 weights and runs
under autocast. The engine owns the loop, checkpoints and resume; each checkpoint also gets the ControlNet's
``config.json`` and a ``diffusion_pytorch_model.safetensors`` link, so a checkpoint folder loads as a ControlNet
(``mmwb generate --controlnet runs/x/checkpoints/step-00000100``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from mmwb.data.conditions import fit_image
from mmwb.data.controlnet import ControlNetDataset, read_records
from mmwb.data.io import load_image, save_image_grid
from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.diffusion.loading import load_controlnet
from mmwb.models.diffusion.metrics import image_edge_f1
from mmwb.models.diffusion.shapes_sd import DEFAULT_MODEL
from mmwb.runtime import Precision, make_generator, resolve_device, resolve_precision, seed_everything
from mmwb.train import checkpoint as ckpt
from mmwb.train.checkpoint import MODEL_FILE
from mmwb.train.config import TrainConfig
from mmwb.train.engine import TrainResult, train

log = logging.getLogger(__name__)
WEIGHTS_LINK = "diffusion_pytorch_model.safetensors"  # the name diffusers looks for in a model folder
GRID_CELL = 128  # validation grids show small images enlarged, so their labels stay readable
FINAL_DIR = "controlnet"  # out_dir/controlnet: the trained ControlNet as a diffusers folder
# diffusers' default channels of the conditioning encoder; one stride-2 stage fewer per halving of the VAE factor
COND_CHANNELS = (16, 32, 96, 256)


@dataclass
class ControlNetDataConfig:
    jsonl: Path = Path("data/shapes/train_controlnet.jsonl")  # records: image, conditioning_image, caption
    image_root: Path = Path("data/shapes")  # the records' paths are relative to it
    val_jsonl: Path | None = None  # validation records; None: the first records of ``jsonl``
    size: int = 512  # training resolution (square; images are centre-cropped)


@dataclass
class ValidationConfig:
    """Images generated every ``train.eval_every`` steps (and at the end), saved as grids with their edge F1."""

    num_images: int = 4
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0


@dataclass
class ControlNetTrainConfig:
    model: Path = DEFAULT_MODEL  # diffusers folder of the frozen base model (default: the shipped shapes SD)
    controlnet: Path | None = None  # continue from this ControlNet; None: ``ControlNetModel.from_unet``
    caption_dropout: float = (
        0.1  # fraction of prompts replaced by "" so the condition alone must carry the image
    )
    gradient_checkpointing: bool = False
    data: ControlNetDataConfig = field(default_factory=ControlNetDataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir=Path("runs/controlnet")))


@dataclass
class FrozenSD:
    """The frozen parts of a Stable Diffusion and the noise schedule it was trained with."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler_config: dict[str, Any]  # the model's own scheduler (its class in ``_class_name``)

    @property
    def noise_scheduler(self) -> DDPMScheduler:
        """The forward (noising) process of the model's schedule: betas and prediction type."""
        return DDPMScheduler.from_config(self.scheduler_config)

    def modules(self) -> tuple[nn.Module, ...]:
        return (self.vae, self.text_encoder, self.unet)

    def tokenize(self, captions: str | list[str]) -> torch.Tensor:
        """(L,) ids for one caption or (B, L) for a list, padded to the text encoder's length."""
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids[0] if isinstance(captions, str) else ids


def load_sd_parts(folder: Path) -> FrozenSD:
    """The base model's parts from a diffusers folder, in fp32 on the CPU, not yet frozen."""
    if not (folder / "model_index.json").is_file():
        raise MmwbCheckpointError(f"{folder}: not a diffusers Stable Diffusion folder (no model_index.json)")
    options = {"local_files_only": True}
    try:
        return FrozenSD(
            AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, **options),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True, **options),
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", **options),
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, **options),
            dict(DDPMScheduler.load_config(folder, subfolder="scheduler", **options)),
        )
    except (OSError, ValueError) as err:
        raise MmwbCheckpointError(f"{folder}: cannot load the base model ({err})") from err


def freeze(sd: FrozenSD, device: torch.device, dtype: torch.dtype) -> None:
    """No gradients, eval mode, stored in ``dtype`` (the half dtype under mixed precision)."""
    for module in sd.modules():
        module.requires_grad_(False).eval().to(device, dtype)


def make_controlnet(sd: FrozenSD, start: Path | None) -> ControlNetModel:
    """``start`` loaded, or a copy of the UNet's encoder with zero convolutions (fp32, trainable).

    The conditioning encoder downsamples the control image to the latent size, one stride-2 stage per halving
    of the VAE, so its channels follow the VAE's depth (SD's factor 8 gives diffusers' default four stages).
    """
    if start is not None:
        return load_controlnet(start).float().requires_grad_(True)
    scale = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    stages = int(math.log2(scale)) + 1
    return ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=COND_CHANNELS[:stages])


def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) latents in the UNet's scale (a sample of the posterior)."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy latents at uniform random timesteps and the UNet's regression target (noise, or v)."""
    noise = torch.randn_like(latents)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, steps, scheduler.get_velocity(latents, noise, steps)
    if scheduler.config.prediction_type != "epsilon":
        raise MmwbConfigError(f"prediction_type {scheduler.config.prediction_type!r} is not trained by mmwb")
    return noisy, steps, noise


def drop_captions(input_ids: torch.Tensor, empty_ids: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, L) ids with each row replaced by the empty prompt with probability ``fraction``."""
    if fraction <= 0:
        return input_ids
    drop = torch.rand(input_ids.shape[0], device=input_ids.device) < fraction  # (B,)
    return torch.where(drop[:, None], empty_ids.to(input_ids.device)[None], input_ids)


class ControlNetLoss:
    """``loss(controlnet, batch)``: the frozen UNet's denoising error with the ControlNet's residuals added."""

    def __init__(self, sd: FrozenSD, precision: Precision, caption_dropout: float) -> None:
        self.sd = sd
        self.precision = precision
        self.caption_dropout = caption_dropout
        self.noise_scheduler = sd.noise_scheduler
        self.empty_ids = sd.tokenize("")

    def __call__(self, controlnet: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sd, dtype = self.sd, self.sd.unet.dtype
        ids = drop_captions(batch["input_ids"], self.empty_ids, self.caption_dropout)
        with torch.no_grad(), self.precision.autocast():
            latents = encode_latents(sd.vae, batch["pixel_values"]).float()
            hidden = sd.text_encoder(ids)[0]  # (B, L, D)
        noisy, steps, target = add_noise(self.noise_scheduler, latents)
        with self.precision.autocast():
            down, mid = controlnet(
                noisy,
                steps,
                encoder_hidden_states=hidden,
                controlnet_cond=batch["conditioning_pixel_values"],
                return_dict=False,
            )
            prediction = sd.unet(
                noisy.to(dtype),
                steps,
                encoder_hidden_states=hidden.to(dtype),
                down_block_additional_residuals=[residual.to(dtype) for residual in down],
                mid_block_additional_residual=mid.to(dtype),
            ).sample
        return F.mse_loss(prediction.float(), target.float())


class Validator:
    """``eval_fn`` of the engine: generates the validation images, saves them as a grid, returns edge F1."""

    def __init__(self, sd: FrozenSD, config: ControlNetTrainConfig, precision: Precision) -> None:
        records = read_records(config.data.val_jsonl or config.data.jsonl)[: config.validation.num_images]
        root, size = config.data.image_root, config.data.size
        self.prompts = [record.caption for record in records]
        self.conditions = [
            fit_image(load_image(root / str(record.conditioning_image)), (size, size), "crop")
            for record in records
        ]
        self.sd, self.options, self.size, self.precision = sd, config.validation, size, precision
        self.folder = Path(config.train.out_dir) / "validation"
        self.step = 0

    def set_step(self, step: int, record: dict[str, Any]) -> None:
        self.step = step

    def __call__(self, controlnet: nn.Module) -> dict[str, float]:
        pipe = validation_pipeline(self.sd, getattr(controlnet, "module", controlnet))
        with self.precision.autocast():
            images = pipe(
                prompt=self.prompts,
                image=self.conditions,
                height=self.size,
                width=self.size,
                num_inference_steps=self.options.steps,
                guidance_scale=self.options.guidance_scale,
                generator=make_generator(self.options.seed, "cpu"),
            ).images
        scores = [image_edge_f1(image, condition) for image, condition in zip(images, self.conditions)]
        labels = [f"control: {prompt}" for prompt in self.prompts] + [f"edge F1 {f1:.2f}" for f1 in scores]
        save_image_grid(
            [*self.conditions, *images],
            self.folder / f"step-{self.step:08d}.png",
            labels=labels,
            ncols=len(images),
            cell_size=max(self.size, GRID_CELL),
        )
        return {"edge_f1": sum(scores) / len(scores)}


def validation_pipeline(sd: FrozenSD, controlnet: ControlNetModel) -> StableDiffusionControlNetPipeline:
    """The diffusers pipeline over the frozen parts and the ControlNet in training, with the model's scheduler."""
    import diffusers

    scheduler = getattr(diffusers, sd.scheduler_config["_class_name"]).from_config(sd.scheduler_config)
    pipe = StableDiffusionControlNetPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        unet=sd.unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def checkpoint_files(controlnet: ControlNetModel) -> Callable[[Path], None]:
    """``on_save`` hook: the ControlNet's config and a link under diffusers' weights name in each checkpoint."""

    def add(folder: Path) -> None:
        controlnet.save_config(folder)
        (folder / WEIGHTS_LINK).symlink_to(MODEL_FILE)

    return add


def train_controlnet(config: ControlNetTrainConfig) -> tuple[TrainResult, Path]:
    """Train, then write the final ControlNet as a diffusers folder ``out_dir/controlnet``; returns both."""
    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    sd = load_sd_parts(Path(config.model))
    seed_everything(config.train.seed)  # the conditioning encoder's initial weights are random
    controlnet = make_controlnet(sd, config.controlnet)
    freeze(sd, device, precision.param_dtype)
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        sd.unet.enable_gradient_checkpointing()
    controlnet.train()
    dataset = ControlNetDataset(config.data.jsonl, config.data.image_root, sd.tokenize, config.data.size)
    size = sum(p.numel() for p in controlnet.parameters()) / 1e6
    log.info("training a %.2fM-parameter ControlNet on %d records (%s)", size, len(dataset), precision.name)
    validator = Validator(sd, config, precision)
    result = train(
        controlnet,
        ControlNetLoss(sd, precision, config.caption_dropout),
        dataset,
        config.train,
        eval_fn=validator,
        on_step=validator.set_step,
        on_save=checkpoint_files(controlnet),
    )
    final = Path(config.train.out_dir) / FINAL_DIR
    if result.rank == 0:
        ckpt.save_model_folder(controlnet, final)
    return result, final
