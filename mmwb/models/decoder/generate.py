"""Token generation for any model with ``allocate_cache`` / ``step`` / ``reorder_cache`` (the decoder, the VLM).

Greedy decoding, sampling and beam search follow transformers' ``generate`` step for step (same processor
order, same tie-breaking, same padding after eos), so the two produce identical tokens from identical logits.
Only the model calls run under ``no_grad`` (a grad-mode switch held across a ``yield`` would leak into the
caller's code). Speed: the KV cache and the output buffer are allocated once; each decode step feeds only the
new token; the loop itself syncs with the host once per step, for the "all rows finished?" check, and only when an
eos id or stop string can finish a row (plus the decode for stop strings, which needs text). The model may sync
too: on CUDA an MoE layer reads its per-expert counts on the host unless torch._grouped_mm takes the dispatch.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mmwb.errors import MmwbInputError
from mmwb.models.decoder import logits_processors as lp
from mmwb.models.decoder.mask import positions_from_mask

_NEG = -1.0e9  # transformers' "impossible" beam score; kept identical so beam ranking ties break the same way


class StepModel(Protocol):
    """What generation needs from a model: a preallocated cache and one forward over the new tokens.

    ``attention_mask`` is None when no row is padded. A ``step`` that also takes ``logits_to_keep`` is asked for
    the last position's logits only at prefill (the LM head over a whole prompt costs as much as a layer)."""

    def allocate_cache(self, batch_size: int, max_length: int) -> Any: ...

    def step(
        self,
        input_ids: torch.Tensor | None,
        *,
        cache: Any,
        cache_position: int,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any: ...


class Streamer(Protocol):
    """transformers' streamer protocol (``TextStreamer`` works): the prompt, then each step's tokens, then end."""

    def put(self, value: torch.Tensor) -> None: ...

    def end(self) -> None: ...


# mmwb's one default for every generating caller (transformers bounds the total length instead: max_length=20)
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class GenerationConfig:
    """transformers' generation arguments, names and defaults included (but ``max_new_tokens``, see above)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise MmwbInputError(f"generation argument {name}={getattr(self, name)!r}: {why}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            fail("temperature", "must be > 0 (use do_sample=False for greedy decoding)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            fail("top_k", "must be an integer >= 0 (0 or None disables it)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "must be an integer >= 0")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            fail("num_beams", "must be an integer >= 1")
        if self.early_stopping not in (True, False, "never"):
            fail("early_stopping", "must be True, False or 'never'")
        if any(not _is_int(i) or i < 0 for i in self.eos_ids):
            fail("eos_token_id", "must be a non-negative integer or a list of them")
        if self.pad_token_id is not None and not _is_int(self.pad_token_id):
            fail("pad_token_id", "must be an integer")
        if self.stop_strings is not None and not all(isinstance(s, str) and s for s in self.stop_list):
            fail("stop_strings", "must be a non-empty string or a list of them")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if _is_int(self.eos_token_id) else list(self.eos_token_id)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop_strings] if isinstance(self.stop_strings, str) else list(self.stop_strings or [])

    @property
    def pad(self) -> int:
        """transformers pads finished rows with ``pad_token_id``, falling back to the first eos id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_config(config: GenerationConfig | None = None, **kwargs: Any) -> GenerationConfig:
    """``config`` (or the defaults) with ``kwargs`` applied; an unknown argument name is an input error."""
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise MmwbInputError(f"unknown generation argument(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(config or GenerationConfig(), **kwargs)


def process_logits(
    scores: torch.Tensor,
    input_ids: torch.Tensor,
    cfg: GenerationConfig,
    ignore_before: torch.Tensor | None,
) -> torch.Tensor:
    """transformers' processor chain: penalties always, warpers only when sampling (in its order)."""
    if cfg.repetition_penalty != 1.0:
        scores = lp.repetition_penalty(scores, input_ids, float(cfg.repetition_penalty), ignore_before)
    if cfg.no_repeat_ngram_size > 0:
        scores = lp.no_repeat_ngram(scores, input_ids, cfg.no_repeat_ngram_size)
    if not cfg.do_sample:
        return scores
    # Beam sampling keeps one non-eos candidate per beam alive, as transformers does.
    keep = len(cfg.eos_ids) + 1 if cfg.num_beams > 1 and cfg.eos_ids else (2 if cfg.num_beams > 1 else 1)
    if cfg.temperature != 1.0:
        scores = lp.temperature(scores, cfg.temperature)
    if cfg.top_k:
        scores = lp.top_k(scores, cfg.top_k, keep)
    if cfg.top_p < 1.0:
        scores = lp.top_p(scores, cfg.top_p, keep)
    if cfg.min_p is not None:
        scores = lp.min_p(scores, cfg.min_p, keep)
    return scores


@dataclass
class _Prompt:
    """Everything both decoding loops share: buffers sized for the whole generation, allocated once."""

    sequences: torch.Tensor  # (N, T0 + max_new): prompt ids (maybe none), then new tokens
    mask: torch.Tensor  # (N, T + max_new): prompt mask, then ones
    positions: torch.Tensor  # (N,) RoPE position of the next new token
    ignore_before: torch.Tensor | None  # (N,) left-padding length, for the repetition penalty
    prompt_len: int  # T: cache slots the prompt fills
    ids_len: int  # T0: prompt ids that the output starts with (0 when only embeddings were given)
    padded: bool = True  # False: no padding anywhere, so steps pass no mask (plain causal attention)

    def step_mask(self, end: int) -> torch.Tensor | None:
        """The attention mask over cache slots [0, end), or None when nothing is padded."""
        return self.mask[:, :end] if self.padded else None


def _prepare(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    cfg: GenerationConfig,
    expand: int,
) -> _Prompt:
    if input_ids is None and inputs_embeds is None:
        raise MmwbInputError("generate needs input_ids or inputs_embeds")
    if input_ids is not None and input_ids.dim() != 2:
        raise MmwbInputError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise MmwbInputError(
            f"inputs_embeds must be (batch, length, dim), got shape {tuple(inputs_embeds.shape)}"
        )
    ref = inputs_embeds if inputs_embeds is not None else input_ids
    batch, prompt_len, device = ref.shape[0], ref.shape[1], ref.device
    if input_ids is not None and input_ids.shape[0] != batch:
        raise MmwbInputError(f"input_ids batch {input_ids.shape[0]} != inputs_embeds batch {batch}")
    if attention_mask is None:
        attention_mask = torch.ones(batch, prompt_len, dtype=torch.long, device=device)
    if tuple(attention_mask.shape) != (batch, prompt_len):
        raise MmwbInputError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match the prompt {(batch, prompt_len)}"
        )
    new = cfg.max_new_tokens
    ids_len = input_ids.shape[1] if input_ids is not None else 0
    sequences = torch.full((batch, ids_len + new), cfg.pad, dtype=torch.long, device=device)
    if input_ids is not None:
        sequences[:, :ids_len] = input_ids
    mask = torch.ones(batch, prompt_len + new, dtype=torch.long, device=device)
    mask[:, :prompt_len] = attention_mask
    ignore = (attention_mask != 0).int().argmax(dim=1) if input_ids is not None else None
    padded = not bool(attention_mask.all())  # one host sync per generation, none per step
    prompt = _Prompt(sequences, mask, attention_mask.long().sum(-1), ignore, prompt_len, ids_len, padded)
    if expand > 1:  # beam search: each row becomes `expand` adjacent rows, like transformers
        for field in ("sequences", "mask", "positions", "ignore_before"):
            value = getattr(prompt, field)
            if value is not None:
                setattr(prompt, field, value.repeat_interleave(expand, dim=0))
    return prompt


@torch.no_grad()
def _prefill(
    model: StepModel, prompt: _Prompt, cache: Any, input_ids, inputs_embeds, expand: int
) -> torch.Tensor:
    """Run the prompt through the model; return the last position's logits (N, V) in float32 (the LM head runs
    on the last position only)."""
    mask = prompt.mask[:, : prompt.prompt_len]
    position_ids = positions_from_mask(mask, *mask.shape, cache_position=0, device=mask.device)  # (N, T)
    if inputs_embeds is not None:
        inputs_embeds = inputs_embeds.repeat_interleave(expand, dim=0)
        input_ids = None
    else:
        input_ids = input_ids.repeat_interleave(expand, dim=0)
    logits = model.step(
        input_ids,
        cache=cache,
        cache_position=0,
        position_ids=position_ids,
        attention_mask=prompt.step_mask(prompt.prompt_len),
        inputs_embeds=inputs_embeds,
        **_last_logits_only(model),
    )
    return logits[:, -1].float()


def _last_logits_only(model: StepModel) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` for a step that takes it, else nothing (see StepModel)."""
    accepts = "logits_to_keep" in inspect.signature(model.step).parameters
    return {"logits_to_keep": 1} if accepts else {}


@torch.no_grad()
def _decode_one(
    model: StepModel, tokens: torch.Tensor, prompt: _Prompt, cache: Any, slot: int
) -> torch.Tensor:
    """Feed one new token per row into cache slot ``slot``; return the next logits (N, V) in float32."""
    logits = model.step(
        tokens[:, None],
        cache=cache,
        cache_position=slot,
        position_ids=prompt.positions[:, None],
        attention_mask=prompt.step_mask(slot + 1),
    )
    prompt.positions += 1
    return logits[:, -1].float()


class _StopStrings:
    """Finishes a row once its generated text contains a stop string (a host-side check on the tail only)."""

    def __init__(self, strings: list[str], decode: Callable[[list[int]], str]):
        self.strings = strings
        self.decode = decode
        self.window = max(len(s) for s in strings) + 1  # tokens: each carries at least one character, mostly

    def hits(self, new_tokens: torch.Tensor, unfinished: torch.Tensor) -> torch.Tensor:
        rows = new_tokens[:, -self.window :].tolist()
        alive = unfinished.tolist()
        hit = [
            bool(a) and any(s in self.decode(r) for s in self.strings)
            for r, a in zip(rows, alive, strict=True)
        ]
        return torch.tensor(hit, device=new_tokens.device)


def _decoder_fn(tokenizer: Any) -> Callable[[list[int]], str]:
    if tokenizer is None:
        raise MmwbInputError(
            "stop_strings need a tokenizer (an object with .decode, or a callable ids -> text)"
        )
    return tokenizer.decode if hasattr(tokenizer, "decode") else tokenizer


def _sample_loop(
    model: StepModel,
    prompt: _Prompt,
    cfg: GenerationConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    generator: torch.Generator | None,
    tokenizer: Any,
) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; writes into ``prompt.sequences`` and yields each step's tokens (N,)."""
    batch = prompt.sequences.shape[0]
    cache = model.allocate_cache(batch, prompt.prompt_len + cfg.max_new_tokens)
    eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=prompt.sequences.device)
    stops = _StopStrings(cfg.stop_list, _decoder_fn(tokenizer)) if cfg.stop_list else None
    can_finish = bool(cfg.eos_ids) or stops is not None
    unfinished = torch.ones(batch, dtype=torch.bool, device=prompt.sequences.device)
    logits = _prefill(model, prompt, cache, input_ids, inputs_embeds, expand=1)
    for step in range(cfg.max_new_tokens):
        col = prompt.ids_len + step
        scores = process_logits(logits, prompt.sequences[:, :col], cfg, prompt.ignore_before)
        if cfg.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if can_finish:
            tokens = torch.where(unfinished, tokens, cfg.pad)
        prompt.sequences[:, col] = tokens
        yield tokens
        if can_finish:
            unfinished &= ~torch.isin(tokens, eos)
            if stops is not None:
                unfinished &= ~stops.hits(prompt.sequences[:, prompt.ids_len : col + 1], unfinished)
            if not bool(unfinished.any()):  # the one host sync per step
                return
        if step + 1 < cfg.max_new_tokens:
            logits = _decode_one(model, tokens, prompt, cache, prompt.prompt_len + step)


def _beam_search(
    model: StepModel,
    prompt: _Prompt,
    cfg: GenerationConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """transformers' vectorised beam search (``_beam_search``): keep ``(1 + n_eos) * num_beams`` candidates per
    step, continue the best ``num_beams`` unfinished ones, and keep the best ``num_beams`` finished hypotheses
    scored ``sum log p / generated_len ** length_penalty``. Returns ``(B, T0 + generated)``."""
    nb, device = cfg.num_beams, prompt.sequences.device
    flat, total = prompt.sequences.shape
    batch, t0 = flat // nb, prompt.ids_len
    eos = torch.tensor(cfg.eos_ids, dtype=torch.long, device=device)
    keep = max(2, 1 + len(cfg.eos_ids)) * nb
    top_mask = torch.arange(keep, device=device) < nb  # (K,)
    batch_offset = torch.arange(batch, device=device)[:, None] * nb  # (B, 1)

    running = prompt.sequences.view(batch, nb, total)
    # transformers fills beam outputs with `pad_token_id or eos_token_id[0]`, so a pad id of 0 pads with eos;
    # mirrored to stay token-identical.
    running[:, :, t0:] = (cfg.pad_token_id or cfg.eos_ids[0]) if cfg.eos_ids else cfg.pad
    running_scores = torch.zeros(batch, nb, device=device)
    running_scores[:, 1:] = _NEG  # all beams start identical; only the first may expand at step one
    best = running.clone()
    best_scores = torch.full((batch, nb), _NEG, device=device)
    best_lengths = torch.zeros(batch, nb, dtype=torch.long, device=device)
    finished = torch.zeros(batch, nb, dtype=torch.bool, device=device)
    may_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)

    cache = model.allocate_cache(flat, prompt.prompt_len + cfg.max_new_tokens)
    logits = _prefill(model, prompt, cache, input_ids, inputs_embeds, expand=nb)
    for step in range(cfg.max_new_tokens):
        col, generated = t0 + step, step + 1
        log_probs = torch.log_softmax(logits, dim=-1)
        log_probs = process_logits(
            log_probs, running.reshape(flat, total)[:, :col], cfg, prompt.ignore_before
        )
        vocab = log_probs.shape[-1]
        acc = (log_probs.view(batch, nb, vocab) + running_scores[..., None]).view(batch, nb * vocab)
        if cfg.do_sample:
            idx = torch.multinomial(torch.softmax(acc, dim=-1), keep, generator=generator)  # (B, K)
            # Best first, as topk gives them: only the first num_beams candidates may finish a hypothesis, so
            # the order decides which ones can (transformers >= 5.24 sorts too; 5.23 kept the draw order).
            top_lp, order = torch.gather(acc, 1, idx).sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            top_lp, idx = torch.topk(acc, keep)  # (B, K)
        source, tokens = idx // vocab, idx % vocab
        cand = torch.take_along_dim(running, source[..., None], dim=1)  # (B, K, L)
        cand[:, :, col] = tokens
        hits = torch.isin(tokens, eos) | (generated == cfg.max_new_tokens)  # (B, K)

        run_lp = top_lp + hits.float() * _NEG
        nxt = torch.topk(run_lp, nb)[1]  # (B, nb)
        running = torch.take_along_dim(cand, nxt[..., None], dim=1)
        running_scores = torch.take_along_dim(run_lp, nxt, dim=1)
        beam_idx = (torch.take_along_dim(source, nxt, dim=1) + batch_offset).view(-1)  # (B * nb,)

        just_done = hits & top_mask
        done_lp = top_lp / (generated**cfg.length_penalty)
        full = finished.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        done_lp = done_lp + full.float() * _NEG + (~may_improve).float() * _NEG + (~just_done).float() * _NEG
        merged_scores = torch.cat((best_scores, done_lp), dim=1)
        pick = torch.topk(merged_scores, nb)[1]  # (B, nb)
        best = torch.take_along_dim(torch.cat((best, cand), dim=1), pick[..., None], dim=1)
        best_scores = torch.take_along_dim(merged_scores, pick, dim=1)
        cand_lengths = torch.full_like(tokens, generated)
        best_lengths = torch.take_along_dim(torch.cat((best_lengths, cand_lengths), dim=1), pick, dim=1)
        finished = torch.take_along_dim(torch.cat((finished, just_done), dim=1), pick, dim=1)

        may_improve = _may_improve(may_improve, running_scores, best_scores, finished, generated, cfg)
        open_beams = ~(finished.all() & (cfg.early_stopping is True))
        if not bool(may_improve.any() & open_beams & ~hits.all()):  # the one host sync per step
            break
        cache = model.reorder_cache(cache, beam_idx)
        # Beams of one row share its prompt mask and positions, so only the cache needs reordering.
        logits = _decode_one(model, running[:, :, col].reshape(flat), prompt, cache, prompt.prompt_len + step)
    out_len = t0 + int(best_lengths[:, 0].max())
    return best[:, 0, :out_len]


def _may_improve(
    may_improve: torch.Tensor,
    running_scores: torch.Tensor,
    best_scores: torch.Tensor,
    finished: torch.Tensor,
    generated: int,
    cfg: GenerationConfig,
) -> torch.Tensor:
    """transformers' early-stop heuristic: can the best running beam still beat the worst finished one?"""
    length = cfg.max_new_tokens if cfg.early_stopping == "never" and cfg.length_penalty > 0 else generated
    best_running = running_scores[:, :1] / (length**cfg.length_penalty)
    worst_done = torch.where(finished, best_scores.min(dim=1, keepdim=True)[0], -1.0e9)
    return may_improve & (best_running > worst_done).any(dim=-1, keepdim=True)


def stream(
    model: StepModel,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> Iterator[torch.Tensor]:
    """An iterator over the new token of every row (B,) per step; rows that finished give ``pad_token_id``.

    Arguments are checked here, before the first token is asked for."""
    cfg = make_config(generation_config, **kwargs)
    if cfg.num_beams > 1:
        raise MmwbInputError("streaming needs num_beams=1 (beam search only knows its result at the end)")
    if cfg.stop_list:
        _decoder_fn(tokenizer)
    prompt = _prepare(input_ids, attention_mask, inputs_embeds, cfg, expand=1)
    return _sample_loop(model, prompt, cfg, input_ids, inputs_embeds, generator, tokenizer)


def generate(
    model: StepModel,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    streamer: Streamer | None = None,
    tokenizer: Any = None,
    generation_config: GenerationConfig | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Generate like transformers' ``model.generate``: returns ``(B, T + new)`` ids (only the new ones when the
    prompt came as ``inputs_embeds`` alone), rows padded with ``pad_token_id`` after their eos."""
    cfg = make_config(generation_config, **kwargs)
    if cfg.num_beams > 1:
        if streamer is not None or cfg.stop_list:
            raise MmwbInputError("num_beams > 1 does not support a streamer or stop_strings; use num_beams=1")
        prompt = _prepare(input_ids, attention_mask, inputs_embeds, cfg, expand=cfg.num_beams)
        return _beam_search(model, prompt, cfg, input_ids, inputs_embeds, generator)
    prompt = _prepare(input_ids, attention_mask, inputs_embeds, cfg, expand=1)
    if streamer is not None and input_ids is not None:
        streamer.put(input_ids.cpu())
    steps = 0
    for tokens in _sample_loop(model, prompt, cfg, input_ids, inputs_embeds, generator, tokenizer):
        steps += 1
        if streamer is not None:
            streamer.put(tokens.cpu())
    if streamer is not None:
        streamer.end()
    return prompt.sequences[:, : prompt.ids_len + steps]


__all__ = ["GenerationConfig", "StepModel", "generate", "make_config", "process_logits", "stream"]
