"""``mmwb bench``: each benchmark prints mmwb's speed as ratios against the reference, measured in one run."""

from __future__ import annotations

HELP = (
    "Benchmark mmwb against its reference implementation on this machine, in the same run, and print the "
    "ratios (--json for scripts). Results worth keeping go to BENCHMARKS.md with the command and the machine."
)
# sub-command -> (module, summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "decoder": ("mmwb.bench.decoder", "MoE decoder prefill, decode and training step vs transformers"),
    "vlm": ("mmwb.bench.vlm", "end-to-end captioning vs transformers' Kimi-K2.5"),
    "align": (
        "mmwb.bench.align",
        "stage-1 alignment samples/s with and without the feature cache vs a transformers loop",
    ),
    "generate": (
        "mmwb.bench.generate",
        "ControlNet generation vs the plain diffusers pipeline; quality vs steps",
    ),
    "sde": ("mmwb.bench.sde", "quality vs number of function evaluations for each SDE sampler"),
    "dpo": ("mmwb.bench.dpo", "peak memory of a DPO step with LoRA vs an instruct step (no reference copy)"),
}
