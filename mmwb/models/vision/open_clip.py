"""open_clip ViT towers by model name, with features from a chosen block (LLaVA: the penultimate, no CLS).

Weights come only from a local file, a ``local-dir:`` folder, or a pretrained tag already in the local
HF/open_clip cache; mmwb never downloads. Blocks after the chosen one are pruned, so they cost nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.transformer import VisionTransformer

from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.vision.base import (
    FixedSizeImageProcessor,
    PixelInputs,
    VisionFeatures,
    VisionTower,
    hidden_state_index,
)


class OpenClipTower(VisionTower):
    """Token features of one block of an open_clip ``VisionTransformer``: ``(B, N[+1], width)``."""

    _no_split_modules = ["ResidualAttentionBlock"]  # gathered as one unit by sharded training

    def __init__(
        self,
        visual: VisionTransformer,
        select_layer: int = -2,
        drop_cls: bool = True,
        final_norm: bool = False,
        resize_mode: str = "crop",
    ) -> None:
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise MmwbConfigError(f"only open_clip ViT towers are supported, not {type(visual).__name__}")
        index = hidden_state_index(select_layer, len(visual.transformer.resblocks))
        if index == 0:
            raise MmwbConfigError(
                "select_layer=0 (the patch embeddings) is not available from open_clip towers"
            )
        # keep blocks up to the chosen one; keep ln_post only when the features should be normalised by it
        visual.prune_intermediate_layers([index - 1], prune_norm=not final_norm, prune_head=True)
        self.visual = visual
        self.drop_cls = drop_cls
        self.final_norm = final_norm
        self.resize_mode = resize_mode
        self.hidden_size = visual.transformer.width

    @classmethod
    def from_name(
        cls,
        model_name: str,
        pretrained: str | Path | None = None,
        select_layer: int = -2,
        drop_cls: bool = True,
        final_norm: bool = False,
        resize_mode: str = "crop",
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
    ) -> OpenClipTower:
        """Build ``model_name`` (built-in, registered, or ``local-dir:PATH``) with local weights only.

        ``pretrained``: a weights file, or an open_clip tag found in the local cache; None means random weights
        (or the weights inside a ``local-dir:`` folder).
        """
        if model_name.startswith("hf-hub:"):
            raise MmwbConfigError(
                f"{model_name}: mmwb does not download; use 'local-dir:PATH' or a cached tag"
            )
        weights = None if pretrained is None else resolve_pretrained(model_name, str(pretrained), cache_dir)
        try:
            model = open_clip.create_model(model_name, pretrained=weights, device=device or "cpu")
        except (RuntimeError, FileNotFoundError, ValueError) as error:
            raise MmwbCheckpointError(f"open_clip could not build {model_name!r}: {error}") from error
        preprocess = open_clip.get_model_preprocess_cfg(model)
        tower = cls(model.visual, select_layer, drop_cls, final_norm, resize_mode).to(dtype=dtype)
        tower.visual.preprocess_cfg = preprocess
        return tower.eval()

    def encode(self, inputs: PixelInputs) -> VisionFeatures:
        out = self.visual.forward_intermediates(
            inputs.pixel_values,
            indices=[len(self.visual.transformer.resblocks) - 1],
            normalize_intermediates=self.final_norm,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        tokens = out["image_intermediates"][0]  # (B, N, C)
        if not self.drop_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)  # (B, 1+N, C)
        batch, count = tokens.shape[:2]
        return VisionFeatures(tokens, [count] * batch, [tuple(self.visual.grid_size)] * batch)

    def feature_settings(self) -> dict[str, bool | int | str]:
        return {"drop_cls": self.drop_cls, "final_norm": self.final_norm}

    def image_processor(self) -> FixedSizeImageProcessor:
        cfg = self.visual.preprocess_cfg
        return FixedSizeImageProcessor(
            self.visual.image_size[0], tuple(cfg["mean"]), tuple(cfg["std"]), resize_mode=self.resize_mode
        )


def resolve_pretrained(model_name: str, pretrained: str, cache_dir: str | Path | None) -> str:
    """A weights file path for ``pretrained`` (a file, or a tag already cached locally); never downloads."""
    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise MmwbCheckpointError(
            f"pretrained {pretrained!r} is neither a file nor an open_clip tag of {model_name}"
        )
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/file' or 'org/repo/' (default file)
        candidates = _weight_file_names(filename or "open_clip_pytorch_model.bin")
        for name in candidates:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
        raise MmwbCheckpointError(
            f"{model_name}/{pretrained}: {repo} ({', '.join(candidates)}) is not in the local HF cache, and mmwb "
            "does not download; fetch it yourself or pass pretrained=<weights file>"
        )
    cached = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(cfg.get("url", ""))
    if cfg.get("url") and cached.is_file():
        return str(cached)
    raise MmwbCheckpointError(
        f"{model_name}/{pretrained}: no local copy of {cfg.get('url')}; mmwb does not download"
    )


def _weight_file_names(filename: str) -> list[str]:
    """open_clip prefers a safetensors twin of a ``.bin``/``.pth`` file."""
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]
