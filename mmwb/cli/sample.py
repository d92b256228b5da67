"""``mmwb sample``: draw samples from a trained score-based SDE model and save a picture of them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mmwb.cli.args import finite_float

HELP = (
    "Sample a score-based SDE model (default: the shipped checkerboard model) with any sampler: pc, "
    "euler_maruyama, reverse_diffusion, ancestral, ode (scipy RK45), ode_torch, heun. Writes a picture: a grid "
    "for images, the samples over the data density (with the score field) for 2-D data. Digits models draw a "
    "chosen class with --label, guided by a noisy classifier."
)
# 1 is the exact conditional score; 2 reads as the asked digit far more often (the figures:
# assets/models/digits-noisy-classifier/MODEL_CARD.md)
DEFAULT_GUIDANCE = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="model folder (default: assets/models/sde-checkerboard)")
    parser.add_argument("--sampler", default="pc", help="sampler name (default: pc)")
    parser.add_argument("--steps", type=int, help="time steps (default: the SDE's N; 18 for heun)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--out", type=Path, default=Path("out/sde/samples.png"), help="picture to write")
    parser.add_argument("--schedule", help="time grid: uniform or karras (default: karras for heun)")
    parser.add_argument("--snr", type=finite_float, help="Langevin corrector signal-to-noise ratio (pc only)")
    parser.add_argument(
        "--label",
        type=_label,
        help="digits models: the class to draw (0-9), or 'all' for 0, 1, ..., 9 in turn",
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        help="noisy classifier that guides --label (default: assets/models/digits-noisy-classifier)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        help=f"classifier gradient multiplier for --label (default: {DEFAULT_GUIDANCE:g}; 1 is the exact "
        "conditional score)",
    )
    parser.add_argument(
        "--quality",
        action="store_true",
        help="also measure the samples (sliced Wasserstein / Fréchet distance; with --label, the accuracy)",
    )


def _label(text: str) -> str | int:
    if text == "all":
        return text
    if text.isdigit() and int(text) < 10:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a digit class: give 0-9 or 'all'")


def guidance(args: argparse.Namespace, trained: Any, device: Any) -> dict[str, Any]:
    """``generate``'s guidance arguments for ``--label``: the labels, the checked classifier and the scale."""
    import torch

    from mmwb.errors import MmwbInputError
    from mmwb.pipelines.sde import DIGITS_NOISY_CLASSIFIER, check_compatible, load_noisy_classifier

    if args.label is None:
        given = [flag for flag, value in (("--classifier", args.classifier), ("--guidance-scale", args.guidance_scale))
                 if value is not None]  # fmt: skip
        if given:
            raise MmwbInputError(f"{' and '.join(given)} guide --label; give the class to draw with --label")
        return {}
    if not trained.spec.data.is_image:
        raise MmwbInputError(
            f"--label needs a digits model; this one was trained on {trained.spec.data.name}"
        )
    classifier, spec = load_noisy_classifier(args.classifier or DIGITS_NOISY_CLASSIFIER, device)
    check_compatible(spec, trained)
    labels = torch.arange(args.n) % 10 if args.label == "all" else torch.full((args.n,), args.label)
    scale = DEFAULT_GUIDANCE if args.guidance_scale is None else args.guidance_scale
    return {"labels": labels.to(device), "classifier": classifier, "guidance_scale": scale}


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse what sampling and likelihoods cannot do before loading anything."""
    from mmwb.errors import MmwbInputError

    if args.dtype not in (None, "fp32"):
        raise MmwbInputError(f"--dtype {args.dtype}: score-based SDE models run in fp32 only")
    if args.n is not None and args.n < 1:
        raise MmwbInputError(f"--n must be >= 1, got {args.n}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.errors import MmwbInputError
    from mmwb.models.sde.samplers import SAMPLERS
    from mmwb.pipelines.sde import DEFAULT_MODEL, generate, load_trained, quality, save_samples_figure
    from mmwb.runtime import make_generator, resolve_device

    check_model_args(args)
    if args.sampler not in SAMPLERS:
        raise MmwbInputError(f"unknown sampler {args.sampler!r}; choose from {', '.join(sorted(SAMPLERS))}")
    if args.snr is not None and args.sampler != "pc":
        raise MmwbInputError(f"--snr sets pc's Langevin corrector; sampler {args.sampler!r} has no corrector")
    options = {"snr": args.snr} if args.snr is not None else {}
    device = resolve_device(args.device)
    model = args.model or DEFAULT_MODEL
    trained = load_trained(model, device)
    seed = args.seed if args.seed is not None else 0
    guide = guidance(args, trained, device)
    started = time.perf_counter()
    samples, nfe = generate(
        trained,
        args.n,
        args.sampler,
        args.steps,
        make_generator(seed, device),
        schedule=args.schedule,
        disable=args.json,
        **guide,
        **options,
    )
    seconds = time.perf_counter() - started
    asked = f", label {args.label} (scale {guide['guidance_scale']:g})" if guide else ""
    title = f"{trained.spec.data.name}{asked}: {args.sampler}, {nfe} NFE, seed {seed}"
    ncols = 10 if args.label == "all" else None  # one class per column
    picture = save_samples_figure(trained, samples, args.out, title, seed, ncols)
    result: dict[str, Any] = {
        "model": str(model),
        "sampler": args.sampler,
        "steps": args.steps,
        "n": args.n,
        "nfe": nfe,
        "seconds": round(seconds, 3),
        "seed": seed,
        "picture": str(picture),
    }
    if guide:
        result |= {"label": args.label, "guidance_scale": guide["guidance_scale"]}
    if args.quality:
        result["quality"] = quality(trained, samples, seed, labels=guide.get("labels"))
    if not args.json:
        measured = "".join(f", {k} {v:.4g}" for k, v in result.get("quality", {}).items())
        print(
            f"{args.n} samples of {model} ({args.sampler}, {nfe} NFE, {seconds:.1f} s{measured}) -> {picture}"
        )
    return result
