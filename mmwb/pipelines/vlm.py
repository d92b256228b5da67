"""Caption and VQA pipelines: image files (or PIL images, arrays) in, texts out, in batches.

A broken image does not stop a batch: it is reported by name in its result and the others are still captioned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmwb.data.io import ImageSource, load_image
from mmwb.errors import MmwbError, MmwbInputError
from mmwb.models.vlm import VisionLanguageModel
from mmwb.models.vlm.prompt import build_prompt, encode_prompts, model_tokens
from mmwb.runtime.resources import shipped_model

Prompts = str | None | Sequence[str | None]
DEFAULT_MODEL = shipped_model("tiny-shapes-vlm")
log = logging.getLogger(__name__)


@dataclass
class VLMResult:
    """One image's answer, or the reason it has none."""

    source: str
    text: str | None = None
    error: str | None = None
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def load_default_or(
    path: str | Path | None,
    device=None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int = 64,
) -> VisionLanguageModel:
    """The model in ``path``, or the shipped default, with a one-line error while that is not built."""
    from mmwb.models.vlm import load_any_vlm

    if path is None:
        if not DEFAULT_MODEL.is_dir():
            raise MmwbInputError(
                f"the default model {DEFAULT_MODEL} is missing: `mmwb recipe tiny-shapes --out runs/tiny-shapes` "
                "then `python pipelines/ship_tiny_shapes_vlm.py --recipe runs/tiny-shapes` remake it (or pass "
                "--model DIR)"
            )
        path = DEFAULT_MODEL
    return load_any_vlm(path, device=device, dtype=dtype, quantize=quantize, group_size=group_size)


class VLMPipeline:
    """``pipeline(images, prompt=None, **generation_args) -> texts``; ``prompt`` is a question (None: caption),
    or a list with one question (or None) per image."""

    def __init__(self, model: VisionLanguageModel, batch_size: int = 8) -> None:
        if model.tokenizer is None:
            raise MmwbInputError("the model has no tokenizer; pipelines need one to build prompts")
        if batch_size < 1:
            raise MmwbInputError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size

    def __call__(self, images: Sequence[ImageSource] | ImageSource, prompt: Prompts = None, **kwargs) -> list:
        """Texts (None for an image that failed, its reason logged); one image in, its text out or its error."""
        single = not isinstance(images, list | tuple)
        results = self.run([images] if single else list(images), prompt, **kwargs)
        if single and results[0].error is not None:
            raise MmwbInputError(results[0].error)
        for result in results:
            if result.error is not None:
                log.warning("%s", result.error)
        texts = [r.text for r in results]
        return texts[0] if single else texts

    def run(
        self,
        images: Sequence[ImageSource],
        prompt: Prompts = None,
        on_token: Callable[[int, str], None] | None = None,
        progress: Callable[[int], None] | None = None,
        **generation_args: Any,
    ) -> list[VLMResult]:
        """Per-image results in input order; ``on_token(i, text)`` streams image i's new text (images then go
        one at a time)."""
        prompts = list(prompt) if isinstance(prompt, list | tuple) else [prompt] * len(images)
        if len(prompts) != len(images):
            raise MmwbInputError(f"{len(prompts)} prompts for {len(images)} images; give one per image")
        size = 1 if on_token is not None else self.batch_size
        results = []
        for start in range(0, len(images), size):
            end = min(start + size, len(images))
            stream = None if on_token is None else partial(on_token, start)
            results.extend(self._batch(images[start:end], prompts[start:end], stream, generation_args))
            if progress is not None:
                progress(end - start)
        return results

    def _batch(self, sources, prompts, on_token, generation_args) -> list[VLMResult]:
        """Load, then answer together; an image the model refuses (too small for a patch, a prompt past the
        context) is found by answering each alone, so only it fails, by name."""
        results, loaded = [], []
        for source, prompt in zip(sources, prompts, strict=True):
            result = VLMResult(str(source) if not hasattr(source, "size") else "image")
            try:
                loaded.append((result, load_image(source), prompt))
            except MmwbError as err:
                result.error = str(err)
            results.append(result)
        groups = [loaded] if loaded else []
        while groups:
            group = groups.pop(0)
            try:
                self._answer(group, on_token, generation_args)
            except MmwbError as err:
                if len(group) > 1:
                    groups = [[item] for item in group] + groups
                else:
                    group[0][0].error = f"{group[0][0].source}: {err}"
        return results

    def _answer(self, loaded, on_token, generation_args) -> None:
        """Generate for (result, image, prompt) triples in one batch and fill their results."""
        tokenizer = self.model.tokenizer
        tokens = model_tokens(tokenizer, self.model.config.image_token_id)
        texts = [build_prompt(prompt, self.model.config.template, **tokens) for _, _, prompt in loaded]
        ids, mask = encode_prompts(tokenizer, texts)
        start = time.perf_counter()
        images = [image for _, image, _ in loaded]
        if on_token is not None:  # one image (run() streams one at a time)
            new = []
            for tokens in self.model.stream(ids, attention_mask=mask, images=images, **generation_args):
                new.append(int(tokens[0]))
                on_token(tokenizer.decode(new[-1:], skip_special_tokens=True))
            out = torch.tensor([new])
        else:
            out = self.model.generate(
                ids, attention_mask=mask, images=images, new_tokens_only=True, **generation_args
            )
        seconds = time.perf_counter() - start
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        for (result, _, _), row in zip(loaded, out.tolist(), strict=True):
            kept = [t for t in row if t not in (eos, pad)]
            result.text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            result.tokens = len(kept)
            result.seconds = seconds / len(loaded)


CaptionPipeline = VLMPipeline  # captions: prompt=None
VQAPipeline = VLMPipeline  # questions: prompt="what colour is the circle?"
