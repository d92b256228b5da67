"""``mmwb likelihood``: test-set likelihood of a score-based SDE model through the probability-flow ODE."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmwb.cli.args import finite_float

HELP = (
    "Test-set likelihood of a score-based SDE model (default: the shipped checkerboard model) through the "
    "probability-flow ODE: bits/dim of dequantised digits (Hutchinson trace estimate), NLL in nats of 2-D "
    "test points (exact divergence) next to the data's own NLL where its density is known."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="model folder (default: assets/models/sde-checkerboard)")
    parser.add_argument("--n", type=int, help="test items used (default: all digits / 2000 points)")
    parser.add_argument(
        "--solver", default="scipy", choices=["scipy", "torch"], help="ODE solver (default: scipy RK45)"
    )
    parser.add_argument("--rtol", type=finite_float, default=1e-5, help="relative tolerance (default: 1e-5)")
    parser.add_argument("--atol", type=finite_float, default=1e-5, help="absolute tolerance (default: 1e-5)")
    divergence = parser.add_mutually_exclusive_group()
    divergence.add_argument(
        "--exact", dest="exact", action="store_true", default=None, help="exact divergence"
    )
    divergence.add_argument("--hutchinson", dest="exact", action="store_false", help="Hutchinson estimate")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.cli.sample import check_model_args
    from mmwb.pipelines.sde import DEFAULT_MODEL, likelihood, load_trained
    from mmwb.runtime import resolve_device

    check_model_args(args)
    model = args.model or DEFAULT_MODEL
    trained = load_trained(model, resolve_device(args.device))
    seed = args.seed if args.seed is not None else 0
    result = likelihood(
        trained,
        args.n,
        seed,
        exact_divergence=args.exact,
        solver=args.solver,
        rtol=args.rtol,
        atol=args.atol,
        disable=args.json,
    )
    result = {"model": str(model), "data": trained.spec.data.name, **result}
    if not args.json:
        if "bits_per_dim" in result:
            figure = f"{result['bits_per_dim']:.4f} ± {result['bits_per_dim_sem']:.4f} bits/dim"
        else:
            figure = f"NLL {result['nll']:.4f} ± {result['nll_sem']:.4f} nats"
            figure += f" (data's own {result['data_nll']:.4f})" if "data_nll" in result else ""
        print(f"{model} on {result['n']} test items of {result['data']}: {figure}, {result['nfe']} NFE")
    return result
