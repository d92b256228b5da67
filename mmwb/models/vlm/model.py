"""A vision-language model: vision tower -> projector -> causal LM, image embeddings spliced at ``<image>`` tokens.

Two prompt conventions are accepted, so code written for transformers runs unchanged:
- one ``<image>`` token per image (mmwb's prompts): each is widened to that image's token count;
- already widened prompts (transformers' processors): as many image tokens as image embeddings.
The rows are re-padded after widening on the side they came padded on (left for generation, right for training).

Training code that caches the frozen tower's output calls ``encode_images`` once and then passes the result as
``vision_features=`` to ``forward`` / ``generate``; the projector and the language model run as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmwb.errors import MmwbInputError
from mmwb.models.decoder.generate import DEFAULT_MAX_NEW_TOKENS, generate, stream
from mmwb.models.decoder.model import IGNORE_INDEX, DecoderForCausalLM
from mmwb.models.vision.base import PixelInputs, VisionFeatures, VisionTower
from mmwb.models.vlm.save import save_vlm


@dataclass
class VLMConfig:
    """Everything beyond the three parts' own configs: how they are wired and how prompts look.

    ``vision``, ``projector`` and ``text`` are the parts' specs (see ``mmwb.models.vlm.parts``), kept so that
    ``save_pretrained`` can write a folder that rebuilds the same modules.
    """

    image_token_id: int
    vision: dict[str, Any] = field(default_factory=dict)
    projector: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    template: str = "chat"  # prompt format of mmwb.models.vlm.prompt the model was trained with
    source: str = "mmwb"  # where the weights came from: mmwb, kimi_k25, llava, instructblip


_IMAGE_ARGUMENTS = (
    "attention_mask", "pixel_values", "image_grid_thw", "grid_hw", "images", "vision_features",
    "qformer_input_ids", "qformer_attention_mask",
)  # fmt: skip


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, T', V), T' the widened length
    loss: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # (B, T') the widened mask
    labels: torch.Tensor | None = None  # (B, T') the widened labels, image positions IGNORE_INDEX


class VisionLanguageModel(nn.Module):
    """``tower`` (frozen in training), ``projector`` and ``language_model`` (an mmwb decoder, or a transformers
    causal LM wrapped by ``mmwb.models.vlm.hf_text.TransformersCausalLM``)."""

    def __init__(
        self,
        config: VLMConfig,
        vision_tower: VisionTower,
        projector: nn.Module,
        language_model: nn.Module,
        tokenizer: Any = None,
        qformer_tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.tokenizer = tokenizer
        # InstructBLIP's Q-Former reads instructions in a vocabulary of its own (BERT's); None: the text one
        self.qformer_tokenizer = qformer_tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.language_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.language_model.parameters()).dtype

    # --- images ---

    def image_processor(self):
        return self.vision_tower.image_processor()

    def process_images(self, images: Sequence[Image.Image]) -> PixelInputs:
        """PIL images -> the tower's pixel inputs (native-resolution towers pack them into one sequence)."""
        return self.image_processor()(list(images))

    def encode_images(self, pixels: PixelInputs) -> VisionFeatures:
        """The tower's features: without gradient unless the tower is being trained (a frozen tower's features
        are what a feature cache stores)."""
        tower_param = next(self.vision_tower.parameters())
        trained = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trained):
            return self.vision_tower.encode(pixels.to(tower_param.device, tower_param.dtype))

    def image_embeddings(
        self, vision_features: VisionFeatures, instructions: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Tower features (fresh or cached) -> one ``(N_i, D)`` language-model embedding block per image.

        A projector that reads instructions (the Q-Former) gets ``instructions``: ``(I, L)`` ids and mask, one row
        per image (see ``image_instructions``)."""
        param = next(self.projector.parameters())
        features = VisionFeatures(
            vision_features.features.to(param.device, param.dtype),
            list(vision_features.token_counts),
            list(vision_features.grid_hw),
        )
        if not getattr(self.projector, "reads_instruction", False):
            return self.projector(features).per_image()
        if instructions is None:
            raise MmwbInputError("this model's Q-Former needs each image's instruction (its prompt tokens)")
        ids, mask = (t.to(param.device) for t in instructions)
        return self.projector(features, ids, mask).per_image()

    def image_instructions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a Q-Former reads beside each image: its row's prompt, the text tokens that are not padding, not
        image placeholders and not trained on (labels -100), so training and generation see the same prompt.

        Returns ``(images, L)`` ids right-padded with the Q-Former's pad id and their mask; the images of a row
        (one ``<image>`` token each, or as many tokens as the projector makes if already widened) share it. With
        a ``qformer_tokenizer`` (InstructBLIP) the prompt's text is tokenized again in the Q-Former's vocabulary,
        special tokens left out, as InstructBLIP's processor tokenizes the same instruction text twice."""
        is_image = (input_ids == self.config.image_token_id) & attention_mask.bool()
        keep = attention_mask.bool() & ~is_image
        if labels is not None:
            keep &= labels == IGNORE_INDEX
        per_row = is_image.sum(1)
        if int(per_row.sum()) != images:  # widened prompts: every image has the same number of query tokens
            per_row = per_row // self.projector.config.num_queries
        rows = [ids[k] for ids, k in zip(input_ids, keep)]
        if self.qformer_tokenizer is not None:
            ids, mask = self._retokenized(rows)
        elif self.config.source == "instructblip":  # its Q-Former's vocabulary is BERT's, not the prompt's
            raise MmwbInputError("this InstructBLIP model has no Q-Former tokenizer; pass qformer_input_ids")
        else:
            ids = _pad(rows, self.projector.config.pad_token_id, "right")
            mask = _pad([torch.ones_like(r) for r in rows], 0, "right")
        index = torch.repeat_interleave(torch.arange(len(rows), device=input_ids.device), per_row)
        return ids[index], mask[index]

    def _retokenized(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt rows in the language model's ids -> ``(B, L)`` Q-Former ids and mask (right-padded)."""
        if self.tokenizer is None:
            raise MmwbInputError(
                "the Q-Former's instructions need the text tokenizer, or pass qformer_input_ids"
            )
        texts = [self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in rows]
        encoded = self.qformer_tokenizer(texts, padding=True, return_tensors="pt")
        device = rows[0].device
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def _features(
        self,
        pixel_values: torch.Tensor | PixelInputs | None,
        grid_hw: torch.Tensor | None,
        images: Sequence[Image.Image] | None,
        vision_features: VisionFeatures | None,
    ) -> VisionFeatures | None:
        given = [x is not None for x in (pixel_values, images, vision_features)]
        if sum(given) > 1:
            raise MmwbInputError("pass only one of pixel_values, images and vision_features")
        if vision_features is not None:
            return vision_features
        if images is not None:
            return self.encode_images(self.process_images(images))
        if pixel_values is None:
            return None
        if not isinstance(pixel_values, PixelInputs):
            pixel_values = PixelInputs(pixel_values, grid_hw)
        return self.encode_images(pixel_values)

    # --- prompts ---

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | PixelInputs | None = None,
        image_grid_thw: torch.Tensor | None = None,
        grid_hw: torch.Tensor | None = None,
        images: Sequence[Image.Image] | None = None,
        vision_features: VisionFeatures | None = None,
        padding_side: str | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """``input_ids``, ``inputs_embeds``, ``attention_mask`` and ``labels`` with the images spliced in.

        Rows widened to different lengths are padded on ``padding_side`` (None: the side the input was padded on,
        right if it was not padded; generation passes "left"). A Q-Former reads ``qformer_input_ids`` (one row
        per image, as transformers' InstructBLIP takes them) or, by default, each image's prompt."""
        if image_grid_thw is not None:  # transformers' Kimi layout: (N, 3) with t = 1 for images
            grid_hw = image_grid_thw[:, 1:]
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        labels = labels.to(device) if labels is not None else None
        features = self._features(pixel_values, grid_hw, images, vision_features)
        blocks = []
        if features is not None:
            instructions = None
            if qformer_input_ids is not None:
                given = qformer_attention_mask
                instructions = (
                    qformer_input_ids,
                    torch.ones_like(qformer_input_ids) if given is None else given,
                )
            elif getattr(self.projector, "reads_instruction", False):
                count = len(features.token_counts)
                instructions = self.image_instructions(input_ids, attention_mask, labels, count)
            blocks = self.image_embeddings(features, instructions)
        input_ids, attention_mask, labels = expand_image_tokens(
            input_ids,
            attention_mask,
            labels,
            self.config.image_token_id,
            [len(b) for b in blocks],
            padding_side,
        )
        embeds = splice_embeddings(self.input_embeddings(), input_ids, self.config.image_token_id, blocks)
        return {
            "input_ids": input_ids,
            "inputs_embeds": embeds,
            "attention_mask": attention_mask,
            "labels": labels,
        }

    def input_embeddings(self) -> nn.Module:
        """The text model's token table: an ``nn.Embedding``, or mmwb's int8 ``QuantizedEmbedding``."""
        lm = self.language_model
        return lm.model.embed_tokens if isinstance(lm, DecoderForCausalLM) else lm.get_input_embeddings()

    # --- running ---

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | PixelInputs | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        grid_hw: torch.Tensor | None = None,
        images: Sequence[Image.Image] | None = None,
        vision_features: VisionFeatures | None = None,
        logits_to_keep: int = 0,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> VLMOutput:
        """Logits over the widened sequence, and the language model's loss when ``labels`` are given."""
        inputs = self.prepare_inputs(
            input_ids,
            attention_mask,
            labels,
            pixel_values,
            image_grid_thw,
            grid_hw,
            images,
            vision_features,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
        )
        out = self.language_model(
            inputs_embeds=inputs["inputs_embeds"],
            attention_mask=inputs["attention_mask"],
            labels=inputs["labels"],
            logits_to_keep=logits_to_keep,
        )
        return VLMOutput(out.logits, out.loss, inputs["attention_mask"], inputs["labels"])

    def step_model(self):
        """What ``mmwb.models.decoder.generate`` drives: the decoder itself, or the transformers wrapper."""
        return self.language_model

    def generate(self, input_ids: torch.Tensor, new_tokens_only: bool = False, **kwargs: Any) -> torch.Tensor:
        """transformers-style ``generate``: prefill with the spliced embeddings, then the decoder's cached loop.

        Image arguments as in ``forward``; the rest are generation arguments. Returns ``(B, T' + new)``: the
        (widened) prompt ids, then the new tokens (only these if ``new_tokens_only``)."""
        inputs = self._generation_inputs(input_ids, kwargs)
        out = generate(self.step_model(), **inputs, **kwargs)
        return out[:, inputs["input_ids"].shape[1] :] if new_tokens_only else out

    def stream(self, input_ids: torch.Tensor, **kwargs: Any):
        """Like ``generate`` but yields each step's new tokens ``(B,)`` (num_beams=1)."""
        return stream(self.step_model(), **self._generation_inputs(input_ids, kwargs), **kwargs)

    def _generation_inputs(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Pop the image arguments from ``kwargs`` and splice them; default eos/pad/tokenizer for generation."""
        picked = {name: kwargs.pop(name) for name in _IMAGE_ARGUMENTS if name in kwargs}
        inputs = self.prepare_inputs(input_ids, **picked, padding_side="left")
        self._check_context(
            inputs["input_ids"].shape[1], int(kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        )
        kwargs.setdefault("tokenizer", self.tokenizer)
        self._default_special_ids(kwargs)
        return {key: inputs[key] for key in ("input_ids", "attention_mask", "inputs_embeds")}

    def _check_context(self, prompt_length: int, new_tokens: int) -> None:
        lm = self.language_model
        config = lm.config if isinstance(lm, DecoderForCausalLM) else lm.model.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and prompt_length + new_tokens > limit:
            raise MmwbInputError(
                f"the prompt ({prompt_length} tokens with its images) plus max_new_tokens={new_tokens} does not fit "
                f"the model's context of {limit} tokens; use smaller images, a shorter prompt or fewer new tokens"
            )

    def _default_special_ids(self, kwargs: dict[str, Any]) -> None:
        """eos/pad from the tokenizer when the caller gives none (transformers reads its generation_config)."""
        tok = self.tokenizer
        if tok is None:
            return
        if "eos_token_id" not in kwargs and tok.eos_token_id is not None:
            kwargs["eos_token_id"] = tok.eos_token_id
        if "pad_token_id" not in kwargs and tok.pad_token_id is not None:
            kwargs["pad_token_id"] = tok.pad_token_id

    # --- checkpoints ---

    def save_pretrained(self, path: str | Path) -> None:
        """mmwb's VLM folder: config.json (model_type mmwb_vlm), model.safetensors, tokenizer files; read back by
        ``mmwb.from_pretrained`` (``mmwb.models.vlm.load_vlm``)."""
        save_vlm(self, Path(path))


def expand_image_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_token_id: int,
    counts: Sequence[int],
    padding_side: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Widen each ``<image>`` token to its image's ``counts[i]`` tokens (images in row-major order of the batch).

    Prompts that are already widened (as many image tokens as ``sum(counts)``) pass unchanged. Labels of image
    positions become IGNORE_INDEX either way."""
    is_image = (input_ids == image_token_id) & attention_mask.bool()
    found = int(is_image.sum())
    if found == sum(counts):
        if labels is not None:
            labels = labels.masked_fill(is_image, IGNORE_INDEX)
        return input_ids, attention_mask, labels
    if found != len(counts):
        raise MmwbInputError(
            f"the prompts hold {found} image tokens but {len(counts)} images were given "
            f"(each image needs one <image> token, or {sum(counts)} tokens in all if already expanded)"
        )
    if padding_side is None:  # left-padded input (generation) stays left-padded
        padding_side = "left" if bool((attention_mask[:, 0] == 0).any()) else "right"
    keep = attention_mask.bool()
    repeats = keep.long()  # (B, T): copies of each token; padding 0, image placeholders their token counts
    repeats[is_image] = torch.as_tensor(counts, device=input_ids.device)  # images in row-major order
    lengths = repeats.sum(1)  # (B,) widened rows
    row = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device), lengths)  # (sum,)
    starts = torch.cumsum(lengths, 0) - lengths
    col = torch.arange(row.numel(), device=input_ids.device) - starts[row]
    if padding_side == "left":
        col += int(lengths.max()) - lengths[row]
    pad_id = int(input_ids[~keep][0]) if not bool(keep.all()) else 0

    def widen(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = values.new_full((len(lengths), int(lengths.max())), fill)
        out[row, col] = values.flatten().repeat_interleave(repeats.flatten())
        return out

    out_labels = (
        widen(labels.masked_fill(is_image, IGNORE_INDEX), IGNORE_INDEX) if labels is not None else None
    )
    return widen(input_ids, pad_id), widen(keep.long(), 0).to(attention_mask.dtype), out_labels


def _pad(rows: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value, padding_side=side)


def splice_embeddings(
    embed: nn.Module, input_ids: torch.Tensor, image_token_id: int, blocks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Token embeddings ``(B, T, D)`` with the image positions (row-major) replaced by the image blocks.

    Image token ids are embedded as id 0 first (checkpoints such as Kimi's keep them outside the vocabulary)."""
    is_image = input_ids == image_token_id
    embeds = embed(input_ids.masked_fill(is_image, 0))
    if not blocks:
        if bool(is_image.any()):
            raise MmwbInputError("the prompt holds image tokens but no images were given")
        return embeds
    flat = torch.cat(list(blocks)).to(embeds.dtype)  # (sum N_i, D)
    if int(is_image.sum()) != flat.shape[0]:
        raise MmwbInputError(
            f"{int(is_image.sum())} image positions but {flat.shape[0]} image embeddings (padding holds image ids?)"
        )
    return embeds.masked_scatter(is_image[..., None].expand_as(embeds), flat)
