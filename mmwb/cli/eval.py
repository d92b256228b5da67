"""``mmwb eval``: score a model on a data set, with the evaluation the recipes and model cards use."""

from __future__ import annotations

HELP = "Score a model on a data set split and print the metrics (--json for one document)."
# sub-command -> (module, summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "vlm": ("mmwb.cli.eval_vlm", "caption exact match, CIDEr-D and VQA accuracy of a VLM on a shapes split"),
}
