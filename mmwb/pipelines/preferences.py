"""Preference pairs from a VLM's own mistakes on a shapes split (``mmwb data preferences``).

For each image the model captions (and answers one of its questions) ``samples`` times: greedily once, then by
sampling at ``temperature``. Every distinct output the exact-match checker marks wrong becomes an ``on_policy``
rejection against the reference; the rule-made hard negatives of ``mmwb.data.preferences.rule_pairs`` are added
beside them. On-policy rejections are what the model actually says, so DPO pushes down its own errors (RLHF's
sampling step, offline).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mmwb.data.io import load_image
from mmwb.data.preferences import PreferencePair, rule_pairs
from mmwb.data.shapes import read_index
from mmwb.models.vlm import VisionLanguageModel
from mmwb.pipelines.vlm import VLMPipeline
from mmwb.pipelines.vlm_eval import normalize
from mmwb.runtime import seed_everything


@dataclass
class PreferenceSettings:
    split: str = "train"
    max_images: int = 2000  # the split's first N images
    samples: int = 4  # outputs per image and prompt: one greedy, the rest sampled
    temperature: float = 1.0
    questions: bool = True  # also one question per image (drawn at random)
    rules: bool = True  # add rule-made hard negatives
    on_policy: bool = True
    batch_size: int = 64
    max_new_tokens: int = 32
    seed: int = 0


@torch.no_grad()
def make_preferences(
    vlm: VisionLanguageModel, data_dir: Path, settings: PreferenceSettings, progress: bool = True
) -> tuple[list[PreferencePair], dict[str, Any]]:
    """The pairs and a summary (counts by source and type, the model's greedy caption exact match)."""
    seed_everything(settings.seed)
    rng = np.random.default_rng(settings.seed)
    records = read_index(data_dir, settings.split)[: settings.max_images]
    pairs: list[PreferencePair] = []
    greedy_hits = 0
    if settings.on_policy:
        asked = [(r, None, r["caption"], "caption") for r in records]
        if settings.questions:
            drawn = [r["qa"][int(rng.integers(len(r["qa"])))] for r in records]
            asked += [
                (r, qa["question"], qa["answer"], qa["type"]) for r, qa in zip(records, drawn, strict=True)
            ]
        outputs = _sample(vlm, data_dir, asked, settings, progress)
        for (record, prompt, reference, kind), texts in zip(asked, outputs, strict=True):
            if prompt is None:
                greedy_hits += normalize(texts[0]) == normalize(reference)
            wrong = dict.fromkeys(t for t in texts if t and normalize(t) != normalize(reference))
            pairs += [PreferencePair(record["image"], prompt, reference, t, "on_policy", kind) for t in wrong]
    if settings.rules:
        for record in records:
            pairs += rule_pairs(record, rng)
    summary = {
        "images": len(records),
        "pairs": len(pairs),
        "by_source": dict(Counter(p.source for p in pairs)),
        "by_type": dict(Counter(p.type for p in pairs)),
        "greedy_caption_exact_match": greedy_hits / len(records) if settings.on_policy and records else None,
    }
    return pairs, summary


def _sample(
    vlm, data_dir: Path, asked: list[tuple], settings: PreferenceSettings, progress: bool
) -> list[list[str]]:
    """``settings.samples`` outputs per (record, prompt): the greedy one first."""
    pipeline = VLMPipeline(vlm.eval(), batch_size=settings.batch_size)
    images = {r["image"]: load_image(Path(data_dir) / r["image"]) for r, *_ in asked}
    sources = [images[r["image"]] for r, *_ in asked]
    prompts = [prompt for _, prompt, *_ in asked]
    outputs: list[list[str]] = [[] for _ in asked]
    bar = tqdm(total=len(asked) * settings.samples, desc="sampling", disable=not progress)
    for round_ in range(settings.samples):
        sampling = (
            {"do_sample": True, "temperature": settings.temperature} if round_ else {"do_sample": False}
        )
        results = pipeline.run(
            sources, prompts, progress=bar.update, max_new_tokens=settings.max_new_tokens, **sampling
        )
        for out, result in zip(outputs, results, strict=True):
            out.append(result.text or "")
    bar.close()
    return outputs
