"""``mmwb eval vlm --model DIR --data DIR``: a VLM's captions and answers on a shapes split, scored."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmwb.cli.args import add_quantize_arguments

HELP = (
    "Caption every image of a shapes split (mmwb data shapes) and answer its questions with a VLM (mmwb's own "
    "or an imported LLaVA/Kimi-VL), greedy; print caption exact match (overall and by object count), CIDEr-D "
    "and VQA accuracy (overall and by question type)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="a VLM folder (default: the shipped tiny-shapes VLM)"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="a shapes data folder (mmwb data shapes --out)"
    )
    parser.add_argument("--split", default="test", help="train, val or test (default: test)")
    parser.add_argument(
        "--max-items", type=int, default=None, help="score only the first N images (default: all)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per generation batch (default: 64)"
    )
    parser.add_argument("--no-vqa", action="store_true", help="captions only")
    add_quantize_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmwb.data.shapes import read_index
    from mmwb.errors import MmwbInputError
    from mmwb.pipelines.vlm import DEFAULT_MODEL, load_default_or
    from mmwb.pipelines.vlm_eval import EvaluationConfig, evaluate_vlm, shapes_report
    from mmwb.runtime import resolve_device, resolve_precision

    if args.max_items is not None and args.max_items < 1:
        raise MmwbInputError(f"--max-items must be >= 1, got {args.max_items}")
    records = read_index(args.data, args.split)
    limit = len(records) if args.max_items is None else min(args.max_items, len(records))
    device = resolve_device(args.device or ("cpu" if args.quantize else None))  # quantized: CPU kernels
    dtype = resolve_precision(args.dtype, device).param_dtype if args.dtype else None
    vlm = load_default_or(args.model, device, dtype, args.quantize, args.group_size)
    config = EvaluationConfig(split=args.split, max_items=limit, batch_size=args.batch_size)
    metrics, rows = evaluate_vlm(vlm, args.data, config, vqa=not args.no_vqa, progress=not args.json)
    report = {"model": str(args.model or DEFAULT_MODEL), "data": str(args.data), "split": args.split}
    report["quantize"] = (
        f"{args.quantize} (group {args.group_size})" if args.quantize == "int4" else args.quantize
    )
    report |= shapes_report(metrics, rows, records[:limit], args.split)
    if not args.json:
        print(format_report(report))
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['model']} on {report['data']} ({report['split']}, {report['n_images']} images)"]
    lines.append(f"  caption exact match {report['caption_exact_match']:.3f}  CIDEr-D {report['cider']:.3f}")
    lines += [f"    {n} object(s): {acc:.3f}" for n, acc in report["caption_exact_match_by_objects"].items()]
    if report["vqa_accuracy"] is not None:
        lines.append(f"  VQA accuracy {report['vqa_accuracy']:.3f} ({report['n_questions']} questions)")
        lines += [f"    {kind}: {acc:.3f}" for kind, acc in report["vqa_by_type"].items()]
    return "\n".join(lines)
