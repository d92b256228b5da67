"""``mmwb train``: one sub-command per trainer, all on the shared engine (mmwb.train.engine)."""

from __future__ import annotations

HELP = (
    "Train a model from a YAML config (dotted overrides such as train.lr=1e-4 follow it). Every trainer "
    "checkpoints atomically and continues a killed run with --resume."
)
# sub-command -> (module, summary); None marks a planned trainer
SUBCOMMANDS: dict[str, tuple[str | None, str]] = {
    "align": (None, "LLaVA stage 1: train the projector with vision tower and decoder frozen"),
    "instruct": (None, "stage 2: LoRA on the decoder plus the projector, loss on assistant turns"),
    "controlnet": (None, "train a ControlNet on a frozen Stable Diffusion"),
    "sde": (None, "train a score-based SDE model"),
}
