"""``mmwb ask IMAGE "question"``: answer a question about one image with a vision-language model."""

from __future__ import annotations

import argparse
from typing import Any

from mmwb.cli.caption import add_model_arguments, answer

HELP = "Answer a question about an image with a vision-language model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file")
    parser.add_argument("question", help="the question, e.g. 'what colour is the circle?'")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return answer(args, [args.image], args.question)
