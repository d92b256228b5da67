"""ControlNet-conditioned Stable Diffusion: diffusers' pipeline wrapped with mmwb's runtime and conditions.

The diffusers pipeline is built once and called as it is, so sampling costs exactly what diffusers costs; mmwb
only works before the loop (device and precision, conditions, scheduler, a private CPU generator) and after it
(a parameters record that reproduces the run). Everything that decides the pixels is in ``GenerationParams``,
``ModelSource`` and ``RuntimeSpec``; together they are the JSON sidecar a run can be repeated from.

    generator = ControlNetGenerator.from_pretrained("models/sd15", ["models/cn-canny"])
    result = generator.generate(GenerationParams(prompt="a house", control_images=["house.png"], preprocess=["canny"]))
    result.images[0].save("house_out.png")
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmwb.data.conditions import (
    ConditionOptions,
    check_preprocessor_name,
    check_resize_mode,
    default_size,
    prepare_condition,
)
from mmwb.data.io import read_image_file
from mmwb.errors import MmwbInputError
from mmwb.models.diffusion.loading import load_controlnet_pipeline
from mmwb.models.diffusion.memory import MemorySavers, place_pipeline
from mmwb.models.diffusion.schedulers import check_scheduler_name, make_scheduler
from mmwb.models.diffusion.shapes_sd import DEFAULT_CONTROLNET, DEFAULT_MODEL
from mmwb.runtime import make_generator, resolve_device, resolve_precision
from mmwb.runtime.config import from_dict, to_dict

log = logging.getLogger(__name__)
SIZE_MULTIPLE = 8  # SD's pipelines refuse heights and widths not divisible by 8


@dataclass
class ModelSource:
    """Where the weights come from: a base model (folder or single file) and its ControlNets."""

    model: str
    controlnets: list[str]
    config: str | None = None  # a local diffusers folder giving a single-file model its configs


@dataclass
class RuntimeSpec:
    device: str | None = None  # None: $MMWB_DEVICE, else the best available
    dtype: str = "fp32"
    memory: MemorySavers = field(default_factory=MemorySavers)


@dataclass
class GenerationParams:
    """One generation request. Per-ControlNet lists take one value for all ControlNets or one value each."""

    prompt: str
    control_images: list[str] = field(
        default_factory=list
    )  # files; images given in memory are recorded as ""
    preprocess: list[str] = field(default_factory=lambda: ["none"])
    negative_prompt: str = ""
    width: int | None = None  # None: the control image's aspect at the model's native resolution
    height: int | None = None
    resize: str = "crop"  # how control images are fitted to (width, height): crop, pad or resize
    steps: int = 30
    guidance_scale: float | None = None  # None: the pipeline's default (7.5 for SD 1.x/2.x, 5.0 for SDXL)
    cn_scale: list[float] = field(default_factory=lambda: [1.0])
    guidance_start: list[float] = field(default_factory=lambda: [0.0])
    guidance_end: list[float] = field(default_factory=lambda: [1.0])
    guess_mode: bool = False
    scheduler: str | None = None  # None: the model's own scheduler
    seed: int = 0
    num_images: int = 1
    conditions: ConditionOptions = field(default_factory=ConditionOptions)


@dataclass
class GenerationResult:
    images: Any  # list of PIL images, or a (N, H, W, 3) float array in [0, 1] for output_type="np"
    conditions: list[Image.Image]  # what each ControlNet received, for inspection
    params: GenerationParams  # as run: sizes resolved, per-ControlNet lists expanded
    source: ModelSource
    runtime: RuntimeSpec

    def record(self) -> dict[str, Any]:
        """Plain data that ``generate`` can be re-run from (``read_record``)."""
        return {
            "model": to_dict(self.source),
            "runtime": to_dict(self.runtime),
            "params": to_dict(self.params),
        }


def default_source() -> ModelSource:
    """The shipped tiny shapes Stable Diffusion and its canny ControlNet."""
    return ModelSource(str(DEFAULT_MODEL), [str(DEFAULT_CONTROLNET)])


def read_record(
    record: dict[str, Any], source: str = "<record>"
) -> tuple[ModelSource, RuntimeSpec, GenerationParams]:
    """Parse a ``GenerationResult.record()`` (e.g. a JSON sidecar) back into its three dataclasses."""
    missing = [key for key in ("model", "runtime", "params") if key not in record]
    if missing:
        raise MmwbInputError(f"{source}: not an mmwb generate record (missing {', '.join(missing)})")
    return (
        from_dict(ModelSource, record["model"], source, "model."),
        from_dict(RuntimeSpec, record["runtime"], source, "runtime."),
        from_dict(GenerationParams, record["params"], source, "params."),
    )


class ControlNetGenerator:
    """A loaded ControlNet pipeline on its device; ``generate`` runs one request through diffusers."""

    def __init__(self, pipe: Any, source: ModelSource, runtime: RuntimeSpec) -> None:
        self.pipe = pipe
        self.source = source
        self.runtime = runtime
        self._model_scheduler_config = dict(pipe.scheduler.config)
        self._model_scheduler_class = type(pipe.scheduler)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        controlnets: Sequence[str | Path],
        config: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        memory: MemorySavers | None = None,
    ) -> ControlNetGenerator:
        """Load from local files (see ``mmwb.models.diffusion.loading``) and place on ``device`` in ``dtype``."""
        resolved = resolve_device(device)
        precision = resolve_precision(dtype, resolved)
        memory = memory or MemorySavers()
        pipe = load_controlnet_pipeline(model, controlnets, config, precision.param_dtype)
        place_pipeline(pipe, resolved, memory)
        source = ModelSource(
            str(model), [str(path) for path in controlnets], None if config is None else str(config)
        )
        return cls(pipe, source, RuntimeSpec(str(resolved), precision.name, memory))

    @property
    def n_controlnets(self) -> int:
        return len(getattr(self.pipe.controlnet, "nets", [self.pipe.controlnet]))

    @property
    def _default_guidance_scale(self) -> float:
        return inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default

    @property
    def native_size(self) -> int:
        """The side length the UNet was trained at (512 for SD 1.5, 1024 for SDXL)."""
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def generate(
        self,
        params: GenerationParams,
        control_images: Sequence[Image.Image] | None = None,
        progress: bool = True,
        output_type: str = "pil",
    ) -> GenerationResult:
        """Run ``params``; ``control_images`` replaces loading ``params.control_images`` from files."""
        if control_images is None:
            images = [open_image(path) for path in params.control_images]
        else:
            images = list(control_images)
            params = dataclasses.replace(params, control_images=[""] * len(images))
        params = self._resolved(params, images)
        images = _per_controlnet(images, self.n_controlnets, "control images")
        conditions = [
            prepare_condition(
                image,
                name,
                (params.width, params.height),
                params.resize,
                params.conditions,
                f"control image {i}",
            )
            for i, (image, name) in enumerate(zip(images, params.preprocess, strict=True))
        ]
        warn_if_truncated(params.prompt, self.pipe.tokenizer)
        warn_if_truncated(params.negative_prompt, self.pipe.tokenizer, "negative prompt")
        self.pipe.scheduler = self._scheduler(params.scheduler)
        self.pipe.set_progress_bar_config(disable=not progress)
        single = self.n_controlnets == 1
        output = self.pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,  # None, not "": SDXL then uses zero embeddings
            image=conditions[0] if single else conditions,
            height=params.height,
            width=params.width,
            num_inference_steps=params.steps,
            guidance_scale=params.guidance_scale,
            num_images_per_prompt=params.num_images,
            generator=make_generator(params.seed, "cpu"),  # CPU noise: the same latents on every device
            controlnet_conditioning_scale=params.cn_scale[0] if single else params.cn_scale,
            guess_mode=params.guess_mode,
            control_guidance_start=params.guidance_start,
            control_guidance_end=params.guidance_end,
            output_type=output_type,
        )
        return GenerationResult(output.images, conditions, params, self.source, self.runtime)

    def _resolved(self, params: GenerationParams, images: Sequence[Image.Image]) -> GenerationParams:
        """``params`` checked, with per-ControlNet lists expanded and the size filled in, as recorded."""
        n = self.n_controlnets
        if params.scheduler is not None:
            check_scheduler_name(params.scheduler)
        check_resize_mode(params.resize)
        for name in params.preprocess:
            check_preprocessor_name(name)
        if params.steps < 1 or params.num_images < 1:
            raise MmwbInputError(
                f"steps ({params.steps}) and number of images ({params.num_images}) must be >= 1"
            )
        if not images:
            raise MmwbInputError("a control image is needed (--control-image IMG)")
        _check_finite(params)
        width, height = params.width, params.height
        if width is None or height is None:
            auto_width, auto_height = default_size(images[0].size, self.native_size, SIZE_MULTIPLE)
            width, height = width or auto_width, height or auto_height
        if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
            raise MmwbInputError(
                f"size {width}x{height}: width and height must be multiples of {SIZE_MULTIPLE}"
            )
        return dataclasses.replace(
            params,
            control_images=[str(path) for path in params.control_images],
            preprocess=_per_controlnet(params.preprocess, n, "--preprocess"),
            cn_scale=[float(s) for s in _per_controlnet(params.cn_scale, n, "--cn-scale")],
            guidance_start=[float(s) for s in _per_controlnet(params.guidance_start, n, "--guidance-start")],
            guidance_end=[float(s) for s in _per_controlnet(params.guidance_end, n, "--guidance-end")],
            width=width,
            height=height,
            guidance_scale=self._default_guidance_scale
            if params.guidance_scale is None
            else params.guidance_scale,
        )

    def _scheduler(self, name: str | None) -> Any:
        """A fresh scheduler per call, so no state carries from one generation into the next."""
        if name is None:
            return self._model_scheduler_class.from_config(self._model_scheduler_config)
        return make_scheduler(name, self._model_scheduler_config)


def _check_finite(params: GenerationParams) -> None:
    """NaN or inf guidance runs to the end and writes NaN images: refuse it before any work."""
    scales = [params.guidance_scale] if params.guidance_scale is not None else []
    named = {"guidance_scale": scales, "cn_scale": params.cn_scale, "guidance_start": params.guidance_start,
             "guidance_end": params.guidance_end}  # fmt: skip
    for name, values in named.items():
        if not all(math.isfinite(float(v)) for v in values):
            raise MmwbInputError(f"{name} must be finite, got {list(values)}")


def _per_controlnet(values: Sequence[Any], n: int, what: str) -> list[Any]:
    """``values`` as one per ControlNet: a single value is shared by all."""
    if len(values) == n:
        return list(values)
    if len(values) == 1:
        return list(values) * n
    raise MmwbInputError(
        f"{what}: got {len(values)} values for {n} ControlNet(s); give one, or one per ControlNet"
    )


def warn_if_truncated(prompt: str, tokenizer: Any, what: str = "prompt") -> None:
    """Say which words the text encoder will not see; diffusers cuts the prompt to the encoder's length."""
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        dropped = tokenizer.decode(ids[limit - 1 : -1])  # the last position holds the end-of-text token
        log.warning(
            "%s is %d tokens but the text encoder reads %d; this end is ignored: %r",
            what,
            len(ids),
            limit,
            dropped,
        )


def open_image(path: str | Path) -> Image.Image:
    """An image file in its own mode (conditions convert it, and say so), rotated as its EXIF says."""
    if not str(path):
        raise MmwbInputError("this run's control image was given in memory, not as a file; pass it again")
    path = Path(path)
    if not path.is_file():
        raise MmwbInputError(f"{path}: control image not found")
    return read_image_file(path)  # size-checked before decoding, like every image mmwb reads
