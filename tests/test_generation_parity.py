"""mmwb's ``generate`` against transformers' ``generate`` on a tiny random Llama (fp32, CPU).

mmwb's own adapter (``TransformersCausalLM``) gives the transformers model the ``StepModel`` interface (a
DynamicCache fed one step at a time), so any difference in tokens comes from the generation loop, the thing under
test.
"""

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM

from mmwb.errors import MmwbInputError
from mmwb.models.decoder.generate import generate, stream
from mmwb.models.vlm.hf_text import TransformersCausalLM

VOCAB, PAD, NEW = 61, 0, 32


class LlamaStepper(TransformersCausalLM):
    """mmwb's ``StepModel`` adapter for transformers models, recording every call's last-position logits."""

    def __init__(self, model: LlamaForCausalLM):
        super().__init__(model)
        self.steps: list[torch.Tensor] = []  # for the sampling checks

    def step(self, input_ids, *, cache, cache_position, **kwargs):
        assert cache.get_seq_length() == cache_position
        logits = super().step(input_ids, cache=cache, cache_position=cache_position, **kwargs)
        self.steps.append(logits[:, -1])
        return logits


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the default init, so beams and samples differ visibly
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 7, 4 and 1, left-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _hf(model, ids, mask, **kwargs) -> torch.Tensor:
    kwargs = {"eos_token_id": None, "top_k": None, **kwargs}
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs
        )


def _ours(model, ids, mask, **kwargs) -> torch.Tensor:
    return generate(LlamaStepper(model), ids, mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)


def _eos_mid_generation(model, ids, mask) -> int:
    """A token that greedy decoding emits part-way through row 0, so eos really ends rows early."""
    return int(_hf(model, ids, mask, do_sample=False)[0, ids.shape[1] + 6])


def test_greedy_matches_transformers(llama, batch):
    ids, mask = batch
    expected = _hf(llama, ids, mask, do_sample=False)
    got = _ours(llama, ids, mask)
    assert got.shape == (3, 7 + NEW)
    assert torch.equal(got, expected)


def test_greedy_with_penalties_matches_transformers(llama, batch):
    ids, mask = batch
    kwargs = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    assert torch.equal(_ours(llama, ids, mask, **kwargs), _hf(llama, ids, mask, do_sample=False, **kwargs))


def test_greedy_eos_pads_finished_rows_like_transformers(llama, batch):
    ids, mask = batch
    eos = _eos_mid_generation(llama, ids, mask)
    expected = _hf(llama, ids, mask, do_sample=False, eos_token_id=[eos, 2])
    got = _ours(llama, ids, mask, eos_token_id=[eos, 2])
    assert torch.equal(got, expected)
    row = got[0, 7:].tolist()
    stop = row.index(eos)
    assert stop < NEW - 1 and all(t == PAD for t in row[stop + 1 :])


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping", "use_eos"),
    [(1.0, False, False), (1.0, True, True), (0.6, False, True), (-0.5, True, True), (2.0, "never", True)],
)
def test_beam_search_matches_transformers(llama, batch, length_penalty, early_stopping, use_eos):
    ids, mask = batch
    kwargs = {"num_beams": 3, "length_penalty": length_penalty, "early_stopping": early_stopping}
    if use_eos:
        kwargs["eos_token_id"] = _eos_mid_generation(llama, ids, mask)
    expected = _hf(llama, ids, mask, do_sample=False, **kwargs)
    got = _ours(llama, ids, mask, **kwargs)
    assert torch.equal(got, expected)


def test_beam_search_differs_from_greedy(llama, batch):
    ids, mask = batch
    assert not torch.equal(_ours(llama, ids, mask, num_beams=3), _ours(llama, ids, mask))


def test_sampling_matches_transformers_with_the_same_seed(llama, batch):
    """Same global RNG state -> same multinomial draws -> same tokens: the processor chain matches."""
    ids, mask = batch
    kwargs = {"do_sample": True, "temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05}
    torch.manual_seed(5)
    expected = _hf(llama, ids, mask, **kwargs)
    torch.manual_seed(5)
    got = _ours(llama, ids, mask, **kwargs)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_and_stays_in_top_k(llama, batch):
    ids, mask = batch
    runs = []
    for _ in range(2):
        stepper = LlamaStepper(llama)
        gen = torch.Generator().manual_seed(3)
        out = generate(stepper, ids, mask, max_new_tokens=NEW, do_sample=True, top_k=3, generator=gen)
        runs.append(out)
        for t, logits in enumerate(stepper.steps):
            allowed = torch.topk(logits, 3).indices
            assert (allowed == out[:, 7 + t, None]).any(dim=-1).all()
    assert torch.equal(runs[0], runs[1])
    other = generate(
        LlamaStepper(llama),
        ids,
        mask,
        max_new_tokens=NEW,
        do_sample=True,
        top_k=3,
        generator=torch.Generator().manual_seed(4),
    )
    assert not torch.equal(runs[0], other)


def test_stream_yields_the_generated_tokens(llama, batch):
    ids, mask = batch
    eos = _eos_mid_generation(llama, ids, mask)
    expected = _ours(llama, ids, mask, eos_token_id=eos)
    steps = list(
        stream(LlamaStepper(llama), ids, mask, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos)
    )
    assert torch.equal(torch.stack(steps, dim=1), expected[:, 7:])


def test_streamer_receives_prompt_then_tokens(llama, batch):
    ids, mask = batch

    class Recorder:
        def __init__(self):
            self.values, self.ended = [], False

        def put(self, value):
            self.values.append(value)

        def end(self):
            self.ended = True

    rec = Recorder()
    out = _ours(llama, ids, mask, streamer=rec)
    assert rec.ended and torch.equal(rec.values[0], ids)
    assert torch.equal(torch.stack(rec.values[1:], dim=1), out[:, 7:])


def test_stop_strings_end_rows(llama, batch):
    ids, mask = batch

    def decode(tokens: list[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in tokens)

    free = _ours(llama, ids, mask)
    target = decode(free[0, 7 + 4 : 7 + 6].tolist())  # text of generated tokens 4 and 5 of row 0
    text = decode(free[0, 7:].tolist())
    end = text.index(target) + len(target)  # first place the stop string is complete
    out = _ours(llama, ids, mask, stop_strings=[target], tokenizer=decode)
    assert torch.equal(out[0, 7 : 7 + end], free[0, 7 : 7 + end])
    assert (out[0, 7 + end :] == PAD).all()
    for row in range(3):  # every row that contains the stop string stops right after it
        gen = out[row, 7:].tolist()
        if target in decode(free[row, 7:].tolist()):
            assert target in decode(gen)


def test_inputs_embeds_returns_only_new_tokens(llama, batch):
    ids, mask = batch
    embeds = llama.get_input_embeddings()(ids)
    got = generate(LlamaStepper(llama), inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(got, _ours(llama, ids, mask)[:, 7:])


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"num_beams": 0}, "num_beams"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"eos_token_id": [2, "x"]}, "eos_token_id"),
        ({"beams": 2}, "beams"),
        ({"stop_strings": ["x"]}, "tokenizer"),
        ({"num_beams": 2, "stop_strings": ["x"], "tokenizer": str}, "num_beams"),
    ],
)
def test_bad_arguments_name_the_culprit(llama, batch, kwargs, culprit):
    ids, mask = batch
    with pytest.raises(MmwbInputError, match=culprit):
        generate(LlamaStepper(llama), ids, mask, **kwargs)


def test_stream_checks_arguments_before_iterating(llama, batch):
    ids, mask = batch
    with pytest.raises(MmwbInputError, match="num_beams"):
        stream(LlamaStepper(llama), ids, mask, num_beams=2)
    with pytest.raises(MmwbInputError, match="tokenizer"):
        stream(LlamaStepper(llama), ids, mask, stop_strings="ab")


@pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"),
    reason="pins transformers >= 5.24: before it, beam sampling kept the sampled candidates in draw order",
)
def test_beam_sampling_and_penalties_match_transformers(llama, batch):
    """transformers 5.24+ (the lock's 5.25 included) sorts the sampled candidates best first before choosing which
    may finish a hypothesis; 5.23 kept the draw order, and one token of this batch differed."""
    ids, mask = batch
    kwargs = {"num_beams": 3, "do_sample": True, "top_k": 10, "temperature": 0.7, "no_repeat_ngram_size": 3}
    torch.manual_seed(7)
    expected = _hf(llama, ids, mask, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(_ours(llama, ids, mask, **kwargs), expected)


def test_beam_search_with_repetition_penalty_matches_transformers(llama, batch):
    ids, mask = batch
    kwargs = {"num_beams": 3, "repetition_penalty": 1.5}
    assert torch.equal(_ours(llama, ids, mask, **kwargs), _hf(llama, ids, mask, do_sample=False, **kwargs))
