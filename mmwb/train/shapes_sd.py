"""Pre-train the shipped tiny Stable Diffusion on shapes: the autoencoder first, then UNet and text encoder.

Both stages run on the shared engine. Stage 1 fits the KL autoencoder (L1 reconstruction plus SD's tiny KL
weight), then sets ``scaling_factor`` to 1/std of its latents, so the UNet sees unit-variance latents as in SD.
Stage 2 trains UNet and text encoder together from scratch on the frozen autoencoder's latents, with the same
noising and caption dropout as ControlNet training (``mmwb.train.controlnet``), which keeps classifier-free
guidance usable. The result is a diffusers ``StableDiffusionPipeline`` folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from torch import nn
from torch.utils.data import DataLoader

from mmwb.data.controlnet import ControlNetDataset, read_records
from mmwb.models.diffusion import shapes_sd
from mmwb.models.diffusion.schedulers import sd_scheduler
from mmwb.train.checkpoint import list_checkpoints, save_model_folder
from mmwb.train.config import TrainConfig
from mmwb.train.controlnet import ControlNetDataConfig, FrozenSD, add_noise, drop_captions, encode_latents
from mmwb.train.engine import train


@dataclass
class ShapesSDConfig:
    out_dir: Path = Path("runs/shapes-sd")
    data: ControlNetDataConfig = field(
        default_factory=lambda: ControlNetDataConfig(size=shapes_sd.IMAGE_SIZE)
    )
    kl_weight: float = 1e-6  # SD's autoencoder weight: latents stay close to the image, barely regularised
    caption_dropout: float = 0.1
    vae: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=600, batch_size=16, lr=1e-3))
    unet: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1500, batch_size=16, lr=1e-3))


class TextToImage(nn.Module):
    """UNet and text encoder trained as one model (one optimizer, one checkpoint)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, steps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, steps, encoder_hidden_states=self.text_encoder(input_ids)[0]).sample


def vae_loss(kl_weight: float):
    def loss(vae: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch["pixel_values"]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction, pixels)
        kl = posterior.kl().mean()
        return l1 + kl_weight * kl, {"l1": l1.detach(), "kl": kl.detach()}

    return loss


def set_latent_scale(vae: AutoencoderKL, dataset: ControlNetDataset, batches: int = 8) -> float:
    """Set ``scaling_factor`` to 1/std of the latents of a few training batches; returns it."""
    loader = DataLoader(dataset, batch_size=32, shuffle=False)
    vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():
        latents = [encode_latents(vae, batch["pixel_values"]) for _, batch in zip(range(batches), loader)]
    scale = float(1 / torch.cat(latents).std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def stage_config(config: TrainConfig, out_dir: Path) -> TrainConfig:
    """``config`` writing to ``out_dir``, continuing the stage's latest checkpoint when a run was cut short
    (a finished stage then just loads its weights)."""
    resume = "latest" if list_checkpoints(out_dir / "checkpoints") else config.resume
    return dataclasses.replace(config, out_dir=out_dir, resume=resume)


def train_shapes_sd(config: ShapesSDConfig) -> Path:
    """Both stages; returns the diffusers folder ``out_dir/model``."""
    out = Path(config.out_dir)
    torch.manual_seed(config.unet.seed)
    tokenizer = shapes_sd.train_clip_tokenizer(record.caption for record in read_records(config.data.jsonl))
    parts = (shapes_sd.vae(), shapes_sd.text_encoder(tokenizer), tokenizer, shapes_sd.unet())
    sd = FrozenSD(*parts, dict(sd_scheduler().config))
    dataset = ControlNetDataset(config.data.jsonl, config.data.image_root, sd.tokenize, config.data.size)

    train(sd.vae, vae_loss(config.kl_weight), dataset, stage_config(config.vae, out / "vae"))
    set_latent_scale(sd.vae.eval(), dataset)
    sd.vae.requires_grad_(False)

    noise_scheduler = sd.noise_scheduler
    empty_ids = sd.tokenize("")

    def unet_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            latents = encode_latents(sd.vae, batch["pixel_values"])
        noisy, steps, target = add_noise(noise_scheduler, latents)
        ids = drop_captions(batch["input_ids"], empty_ids, config.caption_dropout)
        return F.mse_loss(model(noisy, steps, ids), target)

    model = TextToImage(sd.unet, sd.text_encoder)
    train(model, unet_loss, dataset, stage_config(config.unet, out / "unet"))
    pipe = StableDiffusionPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=tokenizer,
        unet=sd.unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_model_folder(pipe, out / "model")
