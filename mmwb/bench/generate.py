"""``mmwb bench generate``: mmwb's ControlNet generation against the plain diffusers pipeline, and quality vs steps.

Speed: both sides load the same folders on the same device and threads and run the same request (canny control,
prompt, steps, scheduler, seed); the reference is ``StableDiffusionControlNetPipeline`` called the way its
documentation shows, with OpenCV's canny done by hand. Calls alternate which side goes first and the ratio is of
medians, so drift in a shared machine's load hits both sides alike.
Quality: edge F1 (``mmwb.models.diffusion.metrics``) between the canny edges of each generated image and the edges
it was given, for every scheduler and step count, beside the same prompts with the ControlNet switched off
(``cn_scale`` 0), which is the plain base model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

HELP = (
    "Time mmwb generate against the plain diffusers ControlNet pipeline on the same weights (ratio of medians, "
    "order alternated), and measure edge F1 vs steps for every scheduler on the shipped default model."
)


@dataclass(frozen=True)
class ControlExample:
    image: Image.Image  # the picture whose canny edges steer generation
    prompt: str


def shapes_examples(n: int, seed: int = 0, size: int | None = None) -> list[ControlExample]:
    """``n`` test-split shapes images with their captions (never seen in training: another split's stream),
    by default at the shipped model's resolution."""
    from mmwb.data.shapes import make_example
    from mmwb.models.diffusion.shapes_sd import IMAGE_SIZE

    size = size or IMAGE_SIZE

    return [ControlExample(*_image_and_caption(make_example(seed, "test", i, size))) for i in range(n)]


def _image_and_caption(example: tuple[Image.Image, dict]) -> tuple[Image.Image, str]:
    image, record = example
    return image, record["caption"]


def mean_edge_f1(generator: Any, examples: Sequence[ControlExample], params: Any) -> float:
    """Mean edge F1 of ``params`` (canny preprocessing) run on each example's image and prompt."""
    from mmwb.models.diffusion.metrics import image_edge_f1

    scores = []
    for example in examples:
        result = generator.generate(replace(params, prompt=example.prompt), [example.image], progress=False)
        scores.append(image_edge_f1(result.images[0], result.conditions[0]))
    return sum(scores) / len(scores)


def control_f1(generator: Any, examples: Sequence[ControlExample], params: Any) -> dict[str, float]:
    """Edge F1 with the ControlNet and with it switched off (same prompts, seeds and steps)."""
    return {
        "control": mean_edge_f1(generator, examples, params),
        "no_control": mean_edge_f1(generator, examples, replace(params, cn_scale=[0.0])),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mmwb.models.diffusion.schedulers import SCHEDULERS

    parser.add_argument("--model", help="diffusers SD folder (default: the shipped shapes model)")
    parser.add_argument("--controlnet", help="ControlNet folder (default: the shipped canny ControlNet)")
    parser.add_argument(
        "--steps", type=int, default=20, help="denoising steps of the timed runs (default: 20)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per side (default: 7)")
    parser.add_argument(
        "--quality-steps", type=int, nargs="+", default=[5, 10, 20, 40], help="step counts for edge F1"
    )
    parser.add_argument(
        "--schedulers", nargs="+", choices=list(SCHEDULERS), default=list(SCHEDULERS), metavar="NAME"
    )
    parser.add_argument("--images", type=int, default=8, help="control images for edge F1 (default: 8)")
    parser.add_argument("--skip-quality", action="store_true", help="only time generation")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.bench.machine import describe_machine
    from mmwb.pipelines.controlnet import ControlNetGenerator, GenerationParams, default_source

    source = default_source()
    model, controlnet = args.model or source.model, args.controlnet or source.controlnets[0]
    generator = ControlNetGenerator.from_pretrained(model, [controlnet], device=args.device, dtype=args.dtype)
    seed = 0 if args.seed is None else args.seed
    examples = shapes_examples(max(args.images, 1), seed)
    params = GenerationParams(prompt="", preprocess=["canny"], steps=args.steps, seed=seed)
    report: dict[str, Any] = {
        "model": model,
        "controlnet": controlnet,
        "machine": describe_machine(generator.pipe.device),
        "speed": time_against_diffusers(generator, examples[0], params, args.repeats),
    }
    if not args.skip_quality:
        report["quality"] = quality_vs_steps(generator, examples[: args.images], params, args)
    if not args.json:
        print(format_report(report))
    return report


def time_against_diffusers(
    generator: Any, example: ControlExample, params: Any, repeats: int
) -> dict[str, Any]:
    """Median seconds per image of mmwb and of plain diffusers on the same request, calls alternating."""
    import numpy as np

    pipe = reference_pipeline(generator)
    first = generator.generate(replace(params, prompt=example.prompt), [example.image], progress=False)
    resolved = first.params
    reference = np.asarray(reference_generate(pipe, example, resolved), dtype=np.int16)
    pixel_diff = int(np.abs(np.asarray(first.images[0], dtype=np.int16) - reference).max())

    def mmwb_call() -> None:
        generator.generate(resolved, [example.image], progress=False)

    def diffusers_call() -> None:
        reference_generate(pipe, example, resolved)

    times = alternate({"mmwb": mmwb_call, "diffusers": diffusers_call}, repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "steps": resolved.steps,
        "size": [resolved.width, resolved.height],
        "repeats": repeats,
        "median_s": medians,
        "ratio": medians["mmwb"] / medians["diffusers"],
        "max_pixel_diff": pixel_diff,  # 0: both sides drew the same image
        "all_s": times,
    }


def alternate(calls: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Time each call ``repeats`` times after one warm-up, reversing the order on every other round."""
    names = list(calls)
    for name in names:
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def reference_pipeline(generator: Any) -> Any:
    """diffusers' own pipeline loaded from the same folders, on the same device and dtype."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    dtype = generator.pipe.unet.dtype
    controlnet = ControlNetModel.from_pretrained(generator.source.controlnets[0], torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        generator.source.model, controlnet=controlnet, torch_dtype=dtype, safety_checker=None
    ).to(generator.pipe.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_generate(pipe: Any, example: ControlExample, params: Any) -> Image.Image:
    """What a diffusers user writes: OpenCV canny on the resized picture, then one pipeline call."""
    import cv2
    import numpy as np
    import torch

    picture = np.asarray(example.image.resize((params.width, params.height), Image.Resampling.BICUBIC))
    edges = cv2.Canny(cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY), 100, 200)
    condition = Image.fromarray(np.stack([edges] * 3, axis=2))
    return pipe(
        prompt=params.prompt,
        image=condition,
        height=params.height,
        width=params.width,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(params.seed),
    ).images[0]


def quality_vs_steps(
    generator: Any, examples: Sequence[ControlExample], params: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Edge F1 per scheduler and step count, plus the no-control baseline at ``params.steps``."""
    table = {
        scheduler: {
            str(steps): mean_edge_f1(generator, examples, replace(params, scheduler=scheduler, steps=steps))
            for steps in args.quality_steps
        }
        for scheduler in args.schedulers
    }
    baseline = mean_edge_f1(generator, examples, replace(params, cn_scale=[0.0]))
    return {
        "images": len(examples),
        "edge_f1": table,
        "no_control_edge_f1": baseline,
        "baseline_steps": params.steps,
    }


def format_report(report: dict[str, Any]) -> str:
    speed = report["speed"]
    lines = [
        f"generate {speed['size'][0]}x{speed['size'][1]}, {speed['steps']} steps, {speed['repeats']} calls per side "
        f"on {report['machine']['cpu']} ({report['machine']['torch_threads']} threads)",
        f"  median s/image: mmwb {speed['median_s']['mmwb']:.4f}, diffusers {speed['median_s']['diffusers']:.4f}, "
        f"ratio {speed['ratio']:.3f} (max pixel difference {speed['max_pixel_diff']})",
    ]
    if "quality" in report:
        quality = report["quality"]
        steps = list(next(iter(quality["edge_f1"].values())))
        lines.append(f"edge F1 over {quality['images']} control images (steps: {', '.join(steps)})")
        for name, row in quality["edge_f1"].items():
            lines.append(f"  {name:16s} " + "  ".join(f"{row[s]:.3f}" for s in steps))
        lines.append(
            f"  without control ({quality['baseline_steps']} steps, model scheduler): "
            f"{quality['no_control_edge_f1']:.3f}"
        )
    return "\n".join(lines)
