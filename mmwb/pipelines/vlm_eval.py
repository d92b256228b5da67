"""Caption and VQA evaluation of a VLM on a split of the shapes data (or any index with captions and QA pairs).

Captions score by exact match (after lower-casing and collapsing spaces) and CIDEr-D (pycocoevalcap's scorer,
the COCO caption metric); answers by exact match, overall and per question type. The same function measures each
stage of ``mmwb recipe tiny-shapes`` and the shipped model's test (tests/test_shipped_vlm.py), so the metrics in a
model card are the ones a user reproduces.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pycocoevalcap.cider.cider import Cider
from tqdm.auto import tqdm

from mmwb.data.io import load_image
from mmwb.data.shapes import read_index
from mmwb.models.decoder.generate import DEFAULT_MAX_NEW_TOKENS
from mmwb.models.vlm import VisionLanguageModel
from mmwb.pipelines.vlm import VLMPipeline


@dataclass
class EvaluationConfig:
    """Which records are scored, and how the model is run on them (greedy decoding)."""

    split: str = "test"  # <data_dir>/<split>.jsonl
    max_items: int = 500  # the first records of the split
    batch_size: int = 64
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


def normalize(text: str | None) -> str:
    """Lower case, single spaces, no trailing full stop: what two equal answers share."""
    return re.sub(r"\s+", " ", (text or "").lower()).strip().rstrip(".")


def caption_scores(predictions: list[str | None], references: list[str]) -> dict[str, float]:
    """Exact match and CIDEr-D (one reference per image; commas are dropped as COCO's tokeniser does)."""
    hyps = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    exact = sum(h == r for h, r in zip(hyps, refs, strict=True)) / len(refs)

    def tokens(text: str) -> list[str]:
        return [text.replace(",", " ")]

    cider, _ = Cider().compute_score(
        {i: tokens(r) for i, r in enumerate(refs)}, {i: tokens(h or "<empty>") for i, h in enumerate(hyps)}
    )
    return {"caption_exact_match": exact, "caption_cider": float(cider)}


def vqa_scores(predictions: list[str | None], answers: list[str], kinds: list[str]) -> dict[str, float]:
    """Exact-match accuracy of the answers, overall and per question type (``vqa_accuracy_<type>``)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for prediction, answer, kind in zip(predictions, answers, kinds, strict=True):
        hit = normalize(prediction) == normalize(answer)
        hits["all"].append(hit)
        hits[kind].append(hit)
    scores = {"vqa_accuracy": sum(hits["all"]) / len(hits["all"])}
    scores |= {f"vqa_accuracy_{kind}": sum(v) / len(v) for kind, v in sorted(hits.items()) if kind != "all"}
    return scores


@torch.no_grad()
def evaluate_vlm(
    vlm: VisionLanguageModel,
    data_dir: Path,
    config: EvaluationConfig,
    vqa: bool = True,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Caption (and, with ``vqa``, question) the split's first records; returns the metrics (prefixed with the
    split's name) and one row per record with the predictions beside the references."""
    records = read_index(data_dir, config.split)[: config.max_items]
    images = [load_image(Path(data_dir) / r["image"]) for r in records]  # decoded once, asked many times
    pipeline = VLMPipeline(vlm.eval(), batch_size=config.batch_size)
    generation = {"max_new_tokens": config.max_new_tokens, "do_sample": False}
    bar = tqdm(total=len(records), desc=f"{config.split} captions", disable=not progress)
    captions = [r.text for r in pipeline.run(images, None, progress=bar.update, **generation)]
    bar.close()
    metrics = caption_scores(captions, [r["caption"] for r in records])
    rows = [
        {"image": r["image"], "caption": c, "reference": r["caption"]}
        for r, c in zip(records, captions, strict=True)
    ]
    if vqa:
        asked = [(i, qa) for i, r in enumerate(records) for qa in r["qa"]]
        bar = tqdm(total=len(asked), desc=f"{config.split} questions", disable=not progress)
        results = pipeline.run(
            [images[i] for i, _ in asked],
            [qa["question"] for _, qa in asked],
            progress=bar.update,
            **generation,
        )
        bar.close()
        answers = [r.text for r in results]
        metrics |= vqa_scores(answers, [qa["answer"] for _, qa in asked], [qa["type"] for _, qa in asked])
        for (i, qa), answer in zip(asked, answers, strict=True):
            rows[i].setdefault("qa", []).append({**qa, "prediction": answer})
    metrics = {f"{config.split}_{k}": v for k, v in metrics.items()}
    metrics[f"{config.split}_images"] = len(records)
    return metrics, rows


def shapes_report(metrics: dict[str, Any], rows: list[dict[str, Any]], records: list[dict[str, Any]], split: str
                  ) -> dict[str, Any]:  # fmt: skip
    """``evaluate_vlm``'s metrics as one document (``mmwb eval vlm --json``), with caption exact match by object
    count added from its rows."""
    by_objects: dict[int, list[bool]] = defaultdict(list)
    for row, record in zip(rows, records, strict=True):
        by_objects[len(record["objects"])].append(normalize(row["caption"]) == normalize(row["reference"]))
    prefix = f"{split}_vqa_accuracy_"
    return {
        "caption_exact_match": metrics[f"{split}_caption_exact_match"],
        "cider": metrics[f"{split}_caption_cider"],
        "vqa_accuracy": metrics.get(f"{split}_vqa_accuracy"),
        "vqa_by_type": {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)},
        "caption_exact_match_by_objects": {n: sum(v) / len(v) for n, v in sorted(by_objects.items())},
        "n_images": len(rows),
        "n_questions": sum(len(row.get("qa", [])) for row in rows),
    }
