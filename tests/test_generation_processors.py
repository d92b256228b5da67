"""Each mmwb logits processor equals the transformers processor of the same name on the same inputs."""

import pytest
import torch
import transformers as hf  # the logits processors are exported at the top level

from mmwb.models.decoder import logits_processors as lp


def _scores(rows: int = 4, vocab: int = 50) -> torch.Tensor:
    scores = torch.randn(rows, vocab)
    scores[0, :5] = scores[0, 5]  # ties: kept/removed the same way as transformers
    return scores


def _ids(rows: int = 4, length: int = 12, vocab: int = 50) -> torch.Tensor:
    ids = torch.randint(0, 6, (rows, length))  # small alphabet so n-grams repeat
    ids[1, -1] = vocab + 3  # an id beyond the output vocabulary must be ignored, not crash
    return ids


@pytest.mark.parametrize("value", [0.3, 1.7])
def test_temperature(value):
    scores = _scores()
    assert torch.equal(
        lp.temperature(scores, value), hf.TemperatureLogitsWarper(value)(_ids(), scores.clone())
    )


@pytest.mark.parametrize(("k", "keep"), [(1, 1), (5, 1), (3, 7), (80, 1)])
def test_top_k(k, keep):
    scores = _scores()
    expected = hf.TopKLogitsWarper(k, min_tokens_to_keep=keep)(_ids(), scores.clone())
    assert torch.equal(lp.top_k(scores, k, keep), expected)


@pytest.mark.parametrize(("p", "keep"), [(0.05, 1), (0.5, 1), (0.9, 3), (1.0, 1), (0.0, 2)])
def test_top_p(p, keep):
    scores = _scores() * 3
    expected = hf.TopPLogitsWarper(p, min_tokens_to_keep=keep)(_ids(), scores.clone())
    assert torch.equal(lp.top_p(scores, p, keep), expected)


@pytest.mark.parametrize(("p", "keep"), [(0.0, 1), (0.1, 1), (0.5, 4), (1.0, 1), (1.0, 100)])
def test_min_p(p, keep):
    scores = _scores() * 3
    expected = hf.MinPLogitsWarper(p, min_tokens_to_keep=keep)(_ids(), scores.clone())
    assert torch.equal(lp.min_p(scores, p, keep), expected)


@pytest.mark.parametrize("penalty", [0.5, 1.3])
def test_repetition_penalty(penalty):
    scores, ids = _scores(), _ids()
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    assert torch.equal(lp.repetition_penalty(scores, ids, penalty), expected)
    assert not torch.equal(expected, scores)


def test_repetition_penalty_ignores_left_padding():
    scores, ids = _scores(), _ids()
    ignore = torch.tensor([0, 3, 12, 5])
    expected = hf.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=ignore)(ids, scores.clone())
    assert torch.equal(lp.repetition_penalty(scores, ids, 1.5, ignore), expected)


@pytest.mark.parametrize(("n", "length"), [(1, 12), (2, 12), (3, 12), (4, 3), (12, 12)])
def test_no_repeat_ngram(n, length):
    scores, ids = _scores(), _ids(length=length)
    ids[1, -1] = 2
    expected = hf.NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
    got = lp.no_repeat_ngram(scores, ids, n)
    assert torch.equal(got, expected)
    if n == 2:
        assert torch.isinf(got).any()  # the test must exercise a ban


def test_processors_do_not_modify_their_input():
    scores, ids = _scores(), _ids()
    before = scores.clone()
    lp.top_k(scores, 3)
    lp.top_p(scores, 0.5)
    lp.min_p(scores, 0.2)
    lp.repetition_penalty(scores, ids, 1.2)
    lp.no_repeat_ngram(scores, ids, 2)
    assert torch.equal(scores, before)
