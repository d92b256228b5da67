"""``mmwb bench sde``: sample quality against the number of score evaluations (NFE) for every sampler.

The shipped models are sampled by every sampler at a few step counts (adaptive ODE solvers at a few
tolerances), all from the same seed, so each run starts from the same prior draw. Quality is the sliced
Wasserstein distance to test points (2-D sets, with the samples' NLL under the exact 8-gaussians density or the
share of samples on the checkerboard's squares) or the Fréchet distance in the digit classifier's features
(digits, with the classifier's mean confidence); the reference is 1000-step predictor-corrector sampling, and
every row is also given as a ratio to it. The floor is the same metric for real data of the same size (a
fresh draw for the checkerboard, training images for digits): no sampler can be expected below it.
Goal (issue 8): the fast deterministic solver (heun) at <= 50 NFE within 10 % of the reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = (
    "Quality vs NFE for each SDE sampler on the shipped checkerboard and 8-gaussians (sliced Wasserstein; "
    "exact-density NLL / share on the squares) and digits (Fréchet distance in the digit classifier's features) "
    "models, as ratios to 1000-step PC sampling, with a PNG of the curves per model."
)
REFERENCE = ("pc", {"steps": 1000})
GOAL_NFE, GOAL_RATIO = 50, 1.10
# sampler -> settings; steps for the fixed-grid samplers, rtol = atol for the adaptive ODE solvers
SETTINGS: dict[str, list[dict[str, Any]]] = {
    "heun": [{"steps": 4}, {"steps": 8}, {"steps": 12}, {"steps": 24}],
    "euler_maruyama": [{"steps": 50}, {"steps": 200}],
    "reverse_diffusion": [{"steps": 50}, {"steps": 200}],
    "ancestral": [{"steps": 50}, {"steps": 200}],
    "pc": [{"steps": 50}, {"steps": 200}],
    "ode": [{"rtol": 1e-3, "atol": 1e-3}, {"rtol": 1e-5, "atol": 1e-5}],
    "ode_torch": [{"rtol": 1e-3, "atol": 1e-3}, {"rtol": 1e-5, "atol": 1e-5}],
}
METRICS = {"checkerboard": "sliced_wasserstein", "8gaussians": "sliced_wasserstein", "digits": "fd"}
# a second column per model: what the samples score under the exact density, or the classifier's confidence
SECOND = {"checkerboard": "in_support", "8gaussians": "sample_nll", "digits": "confidence"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=["checkerboard", "8gaussians", "digits"],
        choices=list(METRICS),
        help="which shipped models",
    )
    parser.add_argument(
        "--n-2d", type=int, default=2000, help="samples per row for the 2-D models (default: 2000)"
    )
    parser.add_argument("--n-digits", type=int, default=256, help="samples per row (default: 256)")
    parser.add_argument("--out", type=Path, default=Path("out/bench/sde"), help="folder for the PNG curves")
    parser.add_argument(
        "--samplers", nargs="+", choices=list(SETTINGS), help="a subset of samplers (default: all)"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.bench.machine import describe_machine
    from mmwb.runtime import resolve_device

    device = resolve_device(args.device)
    seed = args.seed if args.seed is not None else 0
    settings = {name: SETTINGS[name] for name in (args.samplers or SETTINGS)}
    report: dict[str, Any] = {"machine": describe_machine(device), "seed": seed, "models": {}}
    for name in args.models:
        n = args.n_digits if name == "digits" else args.n_2d
        report["models"][name] = bench_model(
            name, n, settings, device, seed, args.out, progress=not args.json
        )
    if not args.json:
        print(format_report(report))
    return report


def bench_model(
    name: str,
    n: int,
    settings: dict[str, list[dict[str, Any]]],
    device: Any,
    seed: int,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    """Every setting of every sampler on one shipped model, the reference, the floor and the PNG."""
    import sys

    from mmwb.models.sde import plots
    from mmwb.pipelines.sde import DEFAULT_MODEL, DIGITS_MODEL, EIGHT_GAUSSIANS_MODEL, load_trained

    folders = {"checkerboard": DEFAULT_MODEL, "8gaussians": EIGHT_GAUSSIANS_MODEL, "digits": DIGITS_MODEL}
    trained = load_trained(folders[name], device)
    metric = METRICS[name]
    reference = measure(trained, REFERENCE[0], REFERENCE[1], n, seed)
    rows = []
    for sampler, options in ((s, o) for s, opts in settings.items() for o in opts):
        row = measure(trained, sampler, options, n, seed)
        row["ratio"] = row[metric] / reference[metric]
        rows.append(row)
        if progress:
            print(f"{name}: {_setting(row)}: {row['nfe']} NFE, {metric} {row[metric]:.4g}", file=sys.stderr)
    floor = data_floor(trained, n, seed)
    title = f"{name}, {n} samples (dashed: 1000-step PC)"
    picture = plots.quality_vs_nfe(rows, metric, out / f"quality_vs_nfe_{name}.png", title, reference[metric])
    return {
        "metric": metric,
        "second": SECOND[name],
        "n": n,
        "reference": reference,
        "floor": floor,
        "rows": rows,
        "goal": goal(rows, metric, reference),
        "picture": str(picture),
    }


def measure(trained: Any, sampler: str, options: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """One sampling run: its NFE, wall time and quality."""
    from mmwb.pipelines.sde import generate, model_device, quality
    from mmwb.runtime import Timer, make_generator

    device = model_device(trained)
    with Timer(device) as timer:
        samples, nfe = generate(
            trained, n, sampler, generator=make_generator(seed, device), disable=True, **options
        )
    return {
        "sampler": sampler,
        **options,
        "nfe": nfe,
        "seconds": timer.seconds,
        **quality(trained, samples, seed),
    }


def data_floor(trained: Any, n: int, seed: int) -> dict[str, float]:
    """The metric for ``n`` real items instead of samples: a fresh draw (toy) or training images (digits)."""
    from mmwb.models.sde.data import dataset, to_model_space
    from mmwb.pipelines.sde import quality

    spec = trained.spec.data
    real = to_model_space(spec, dataset(spec, "train", seed + 2, n if not spec.is_image else None)[:n])
    return quality(trained, real, seed)


def goal(rows: list[dict[str, Any]], metric: str, reference: dict[str, Any]) -> dict[str, Any]:
    """The best heun row within the NFE budget and whether it is within 10 % of the reference."""
    fast = [row for row in rows if row["sampler"] == "heun" and row["nfe"] <= GOAL_NFE]
    if not fast:
        return {"met": None, "note": "no heun setting within the NFE budget was run"}
    best = min(fast, key=lambda row: row[metric])
    return {
        "nfe": best["nfe"],
        metric: best[metric],
        "reference": reference[metric],
        "ratio": best["ratio"],
        "met": best["ratio"] <= GOAL_RATIO,
    }


def _setting(row: dict[str, Any]) -> str:
    return (
        f"{row['sampler']} steps={row['steps']}"
        if "steps" in row
        else f"{row['sampler']} tol={row['rtol']:g}"
    )


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for name, result in report["models"].items():
        metric, second, ref = result["metric"], result["second"], result["reference"]
        lines.append(f"\n{name} ({result['n']} samples, seed {report['seed']}): {metric}, lower is better")
        lines.append(f"{'sampler':<34}{'NFE':>7}{metric:>20}{'ratio to ref':>14}{second:>14}{'seconds':>10}")
        for row in [ref, *result["rows"]]:
            ratio = row.get("ratio", 1.0)
            tag = " (reference)" if row is ref else ""
            lines.append(
                f"{_setting(row) + tag:<34}{row['nfe']:>7}{row[metric]:>20.4g}{ratio:>14.3f}"
                f"{row[second]:>14.4g}{row['seconds']:>10.2f}"
            )
        floor = result["floor"]
        lines.append(
            f"{'real data (floor)':<34}{'':>7}{floor[metric]:>20.4g}{floor[metric] / ref[metric]:>14.3f}"
            f"{floor[second]:>14.4g}"
        )
        g = result["goal"]
        if g.get("met") is not None:
            verdict = "met" if g["met"] else "NOT met"
            lines.append(
                f"goal: heun at {g['nfe']} NFE is {g['ratio']:.3f}x the {ref['nfe']}-NFE PC figure "
                f"(<= {GOAL_RATIO:.2f} wanted): {verdict}"
            )
        lines.append(f"curves: {result['picture']}")
    machine = report["machine"]
    lines.append(
        f"\nmachine: {machine['cpu']} ({machine['usable_cpus']} CPUs, {machine['torch_threads']} threads)"
    )
    return "\n".join(lines)
