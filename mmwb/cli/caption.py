"""``mmwb caption IMAGES...``: one caption per image with a vision-language model (default: the shipped one)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from mmwb.cli.args import add_quantize_arguments, finite_float

HELP = "Caption images (files, directories, globs) with a vision-language model."
log = logging.getLogger("mmwb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    add_model_arguments(parser)
    parser.add_argument("--prompt", default=None, help="a question or instruction instead of a plain caption")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags ``caption`` and ``ask`` share: the model, batching, streaming and generation arguments."""
    parser.add_argument("--model", default=None, help="a VLM folder (default: assets/models/tiny-shapes-vlm)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--stream", action="store_true", help="print tokens as they come (one image at a time)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per image (default: 32)")
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=finite_float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=finite_float, default=None)
    parser.add_argument("--repetition-penalty", type=finite_float, default=None)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=1)
    add_quantize_arguments(parser)


def generation_args(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
             "no_repeat_ngram_size", "num_beams")  # fmt: skip
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.data.io import expand_image_sources

    return answer(args, [str(p) for p in expand_image_sources(args.images)], args.prompt)


def answer(args: argparse.Namespace, sources: list[str], prompt: str | None) -> dict[str, Any]:
    """Run the pipeline over ``sources``; print one line per image; exit code 2 if any image failed."""
    from tqdm import tqdm

    from mmwb.pipelines.vlm import DEFAULT_MODEL, VLMPipeline, load_default_or
    from mmwb.runtime import resolve_device, resolve_precision

    device = resolve_device(args.device or ("cpu" if args.quantize else None))  # quantized: CPU kernels
    dtype = resolve_precision(args.dtype, device).param_dtype if args.dtype else None
    vlm = load_default_or(args.model, device, dtype, args.quantize, args.group_size)
    pipeline = VLMPipeline(vlm, batch_size=args.batch_size)
    show_bar = not args.json and not args.stream and len(sources) > pipeline.batch_size
    bar = tqdm(total=len(sources), disable=not show_bar, file=sys.stderr)
    if args.stream and not args.json:
        results = [result for source in sources for result in _streamed(pipeline, source, prompt, args)]
    else:
        results = pipeline.run(sources, prompt, progress=bar.update, **generation_args(args))
    bar.close()
    failed = [r for r in results if r.error is not None]
    for r in results:
        if r.error is not None:
            log.error("%s", r.error)
        elif not args.json and not args.stream:
            print(f"{r.source}\t{r.text}")
    if failed:
        log.error("%d of %d images failed", len(failed), len(results))
    return {
        "model": str(args.model or DEFAULT_MODEL),
        "results": [
            {
                "image": r.source,
                "text": r.text,
                "error": r.error,
                "tokens": r.tokens,
                "seconds": r.seconds,
                "tokens_per_s": r.tokens_per_s,
            }  # fmt: skip
            for r in results
        ],
        "exit_code": 2 if failed else 0,
    }


def _streamed(pipeline, source: str, prompt: str | None, args: argparse.Namespace) -> list:
    """--stream: the image's name, then its tokens as they come, then a newline."""
    print(f"{source}\t", end="", flush=True)
    results = pipeline.run([source], prompt, on_token=lambda _i, text: print(text, end="", flush=True),
                           **generation_args(args))  # fmt: skip
    print()
    return results
