"""Scheduler names users type (``euler_a``, ``dpmpp_2m_karras``) mapped onto diffusers scheduler classes.

A scheduler is rebuilt from the checkpoint's own scheduler config, so the noise schedule the model was trained
with (betas, prediction type, timestep spacing) is kept and only the sampling algorithm changes.
"""

from __future__ import annotations

from typing import Any

from mmwb.errors import MmwbInputError

# name -> (diffusers scheduler class, keyword arguments layered over the checkpoint's scheduler config).
# Class names, not classes, so that listing the choices (``mmwb generate --help``) does not import diffusers.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def check_scheduler_name(name: str) -> str:
    """Return ``name`` if mmwb knows it, else raise an error that lists the names it knows."""
    if name not in SCHEDULERS:
        raise MmwbInputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A fresh scheduler ``name`` on the noise schedule of ``base_config`` (a checkpoint's scheduler config)."""
    import diffusers

    class_name, overrides = SCHEDULERS[check_scheduler_name(name)]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def sd_scheduler(prediction_type: str = "epsilon") -> Any:
    """SD's noise schedule (scaled linear betas over 1000 steps; epsilon prediction, v for SD 2.x) sampled by
    DDIM."""
    from diffusers import DDIMScheduler  # lazy, as make_scheduler: --help lists names without diffusers

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
