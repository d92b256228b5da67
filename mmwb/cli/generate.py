"""``mmwb generate``: ControlNet-conditioned Stable Diffusion from local weights, with a sidecar to re-run from."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mmwb.cli.args import finite_float

HELP = (
    "Generate images with Stable Diffusion steered by one or several ControlNets. Writes the images, the "
    "conditions, a grid (conditions | images) and run.json, which 'mmwb generate --from run.json' repeats."
)
SIDECAR = "run.json"
# flag destination -> GenerationParams field, for flags whose value simply replaces the field
PARAM_FLAGS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "control_image": "control_images",
    "preprocess": "preprocess", "width": "width", "height": "height", "resize": "resize", "steps": "steps",
    "guidance_scale": "guidance_scale", "cn_scale": "cn_scale", "guidance_start": "guidance_start",
    "guidance_end": "guidance_end", "guess_mode": "guess_mode", "scheduler": "scheduler",
    "num_images": "num_images", "seed": "seed",
}  # fmt: skip
MEMORY_FLAGS = ("attention_slicing", "vae_slicing", "vae_tiling", "cpu_offload", "channels_last")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.data.conditions import PREPROCESSORS, RESIZE_MODES
    from mmwb.models.diffusion.schedulers import SCHEDULERS

    # every default is None so that, with --from, only the flags actually given replace the recorded values
    model = parser.add_argument_group("model (local files only)")
    model.add_argument(
        "--model",
        help="Stable Diffusion 1.x/2.x/XL: a diffusers folder or one .safetensors file "
        "(default: the shipped tiny shapes model with its canny ControlNet)",
    )
    model.add_argument(
        "--controlnet",
        action="extend",
        nargs="+",
        metavar="CN",
        help="ControlNet folder or .safetensors (repeatable)",
    )
    model.add_argument(
        "--config", help="diffusers folder of the base model, giving a single-file --model its configs"
    )
    cond = parser.add_argument_group("conditions")
    cond.add_argument(
        "--control-image",
        action="extend",
        nargs="+",
        metavar="IMG",
        help="one for all ControlNets, or one each",
    )
    cond.add_argument(
        "--preprocess",
        action="extend",
        nargs="+",
        choices=list(PREPROCESSORS),
        metavar="NAME",
        help=f"per ControlNet: {', '.join(PREPROCESSORS)} (default: none)",
    )
    cond.add_argument("--resize", choices=RESIZE_MODES, help="fit control images (default: crop)")
    cond.add_argument(
        "--canny-thresholds", type=int, nargs=2, metavar=("LOW", "HIGH"), help="default: 100 200"
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", help="what to draw")
    gen.add_argument("--negative-prompt", help="what to steer away from")
    gen.add_argument("--steps", type=int, help="denoising steps (default: 30)")
    gen.add_argument(
        "--guidance-scale",
        type=finite_float,
        help="classifier-free guidance (default: 7.5 for SD, 5 for SDXL)",
    )
    gen.add_argument(
        "--cn-scale", type=finite_float, action="extend", nargs="+", help="ControlNet weight(s) (default: 1)"
    )
    gen.add_argument(
        "--guidance-start",
        type=finite_float,
        action="extend",
        nargs="+",
        help="fraction of steps (default: 0)",
    )
    gen.add_argument(
        "--guidance-end", type=finite_float, action="extend", nargs="+", help="fraction of steps (default: 1)"
    )
    gen.add_argument(
        "--guess-mode", action=argparse.BooleanOptionalAction, help="ControlNet without the prompt"
    )
    gen.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        metavar="NAME",
        help=f"sampler: {', '.join(SCHEDULERS)} (default: the model's own)",
    )
    gen.add_argument("--num-images", type=int, help="images per run (default: 1)")
    gen.add_argument(
        "--width", type=int, help="default: the control image's aspect at the model's resolution"
    )
    gen.add_argument("--height", type=int, help="multiple of 8")
    mem = parser.add_argument_group("memory savers")
    for flag in MEMORY_FLAGS:
        mem.add_argument(f"--{flag.replace('_', '-')}", action=argparse.BooleanOptionalAction)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, default=Path("out/generate"), help="output folder (default: out/generate)"
    )
    out.add_argument(
        "--from", dest="from_record", type=Path, metavar="RUN_JSON", help="repeat a recorded run"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.pipelines.controlnet import ControlNetGenerator

    source, runtime, params = resolve_request(args)
    generator = ControlNetGenerator.from_pretrained(
        source.model, source.controlnets, source.config, runtime.device, runtime.dtype, runtime.memory
    )
    start = time.perf_counter()
    result = generator.generate(params)
    seconds = time.perf_counter() - start
    files = write_outputs(result, args.out)
    if not args.json:
        summary = f"grid {files['grid']}, parameters {files['sidecar']}"
        print(f"wrote {len(files['images'])} image(s) in {seconds:.1f} s to {args.out}: {summary}")
    return {**files, "seconds": round(seconds, 3), **result.record()}


def resolve_request(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The run's model source, runtime and parameters: the recorded run (``--from``) with given flags on top."""
    import dataclasses

    from mmwb.data.conditions import ConditionOptions
    from mmwb.errors import MmwbInputError
    from mmwb.models.diffusion.memory import MemorySavers
    from mmwb.pipelines.controlnet import (
        GenerationParams,
        ModelSource,
        RuntimeSpec,
        default_source,
        read_record,
    )

    if args.from_record is not None:
        source, runtime, params = read_record(_read_json(args.from_record), str(args.from_record))
    else:
        if args.prompt is None:
            raise MmwbInputError("--prompt is needed (or --from RUN_JSON)")
        if args.model is not None and not args.controlnet:
            raise MmwbInputError(
                f"--model {args.model} needs its --controlnet (the default one fits the default model)"
            )
        source = default_source() if args.model is None else ModelSource(args.model, [])
        runtime, params = RuntimeSpec(device=None), GenerationParams("")
    source = dataclasses.replace(
        source,
        model=args.model or source.model,
        controlnets=args.controlnet or source.controlnets,
        config=args.config or source.config,
    )
    memory = {flag: getattr(args, flag) for flag in MEMORY_FLAGS if getattr(args, flag) is not None}
    runtime = dataclasses.replace(
        runtime,
        device=args.device or runtime.device,
        dtype=args.dtype or runtime.dtype,
        memory=MemorySavers(**{**dataclasses.asdict(runtime.memory), **memory}),
    )
    given = {
        field: getattr(args, flag) for flag, field in PARAM_FLAGS.items() if getattr(args, flag) is not None
    }
    if args.canny_thresholds is not None:
        low, high = args.canny_thresholds
        given["conditions"] = ConditionOptions(low, high, params.conditions.stroke_width)
    return source, runtime, dataclasses.replace(params, **given)


def write_outputs(result: Any, out: Path) -> dict[str, Any]:
    """Images, conditions, the grid and the sidecar in ``out``; returns their paths."""
    from mmwb.data.io import save_image_grid

    out.mkdir(parents=True, exist_ok=True)
    images = [out / f"image_{i}.png" for i in range(len(result.images))]
    conditions = [out / f"condition_{i}.png" for i in range(len(result.conditions))]
    for path, image in zip([*images, *conditions], [*result.images, *result.conditions], strict=True):
        image.save(path)
    labels = [f"condition {i}" for i in range(len(result.conditions))]
    labels += [f"image {i}" for i in range(len(result.images))]
    grid = save_image_grid(
        [*result.conditions, *result.images], out / "grid.png", labels=labels, ncols=len(labels)
    )
    files = {
        "images": [str(p) for p in images],
        "conditions": [str(p) for p in conditions],
        "grid": str(grid),
    }
    sidecar = out / SIDECAR
    sidecar.write_text(json.dumps({**result.record(), "outputs": files}, indent=2) + "\n", encoding="utf-8")
    return {**files, "sidecar": str(sidecar)}


def _read_json(path: Path) -> dict[str, Any]:
    from mmwb.errors import MmwbInputError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise MmwbInputError(f"{path}: run record not found") from err
    except json.JSONDecodeError as err:
        raise MmwbInputError(f"{path}: not valid JSON ({err})") from err
