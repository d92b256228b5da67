"""One-call decode tokens (mmwb.models.decoder.decode_plan, kernels/step.c): equal to the modules' decode steps,
planned only where they apply, and every decline runs the modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmwb.errors import MmwbInputError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM, generate
from mmwb.models.decoder import model as model_module
from mmwb.models.decoder.decode_plan import DecodePlan
from mmwb.models.decoder.kernels import cpu as cpu_kernels
from mmwb.models.quantize import quantize_model

SMALL = dict(
    vocab_size=53, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=64, moe_intermediate_size=24,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
)  # fmt: skip
MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=16, rope_mscale=1.0)
GQA = dict(attention="gqa", num_kv_heads=2, head_dim=12)
DEEPSEEK_ROUTER = dict(
    scoring_func="sigmoid", expert_bias=True, n_group=2, topk_group=1, routed_scaling_factor=2.5
)
# widths at which mmwb's int8 and int4 kernels take every layer (inputs in blocks of 128)
QUANTIZABLE = dict(
    vocab_size=96, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, moe_intermediate_size=128,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
)  # fmt: skip
QUANTIZABLE_GQA = dict(attention="gqa", num_kv_heads=2, head_dim=32)
QUANTIZABLE_MLA = dict(
    attention="mla", kv_lora_rank=128, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32
)


@pytest.fixture
def one_calls(monkeypatch):
    """Counts of mmwb_decode_token calls (they still run)."""
    kernels = cpu_kernels._kernels()
    if kernels is None:
        pytest.skip("kernels unavailable")
    count = {"calls": 0}
    function = kernels.decode_token

    def counted(*args):
        count["calls"] += 1
        return function(*args)

    monkeypatch.setattr(kernels, "decode_token", counted)
    return count


def _model(config: dict, seed: int = 0) -> DecoderForCausalLM:
    torch.manual_seed(seed)
    model = DecoderForCausalLM(DecoderConfig(**config)).eval()
    model.init_weights(std=0.1)
    with torch.no_grad():
        for router in model.routers():
            if router.e_score_correction_bias is not None:
                router.e_score_correction_bias.normal_(0, 0.1)
    return model


def _decode(model: DecoderForCausalLM, ids: torch.Tensor, prompt: int, plan: bool):
    """The prompt's first ``prompt`` tokens in one step, then the rest a token a step (teacher forced): the decode
    steps' logits (1, T, V) and the cache's buffers, flat."""
    cache = model.allocate_cache(1, ids.shape[1] + 2)
    if not plan:
        cache.decode_plan = False
    steps = []
    with torch.no_grad():
        model.step(ids[:, :prompt], cache=cache, cache_position=0, position_ids=torch.arange(prompt)[None],
                   attention_mask=None)  # fmt: skip
        for t in range(prompt, ids.shape[1]):
            logits = model.step(ids[:, t : t + 1], cache=cache, cache_position=t,
                                position_ids=torch.tensor([[t]]), attention_mask=None)  # fmt: skip
            steps.append(logits)
    buffers = torch.cat([b.flatten() for layer in cache.layers for b in layer.buffers()])
    return torch.cat(steps, dim=1), buffers, cache


@pytest.mark.parametrize(
    "variant",
    [
        {**GQA, "qk_norm": True, "attention_bias": True},
        {**MLA, **YARN},
        {**MLA, "q_lora_rank": 20, **DEEPSEEK_ROUTER},
        {**GQA, "tie_word_embeddings": True, "first_k_dense_replace": 0},
    ],
    ids=["gqa-qk-norm-bias", "mla-yarn", "mla-q-lora-sigmoid-groups", "gqa-tied"],
)
def test_an_fp32_decode_token_in_one_call_equals_the_modules(one_calls, variant):
    model = _model({**SMALL, **variant})
    ids = torch.randint(0, 53, (1, 12))
    got, got_cache, cache = _decode(model, ids, 5, plan=True)
    assert isinstance(cache.decode_plan, DecodePlan)
    assert one_calls["calls"] == 7
    want, want_cache, _ = _decode(model, ids, 5, plan=False)
    assert one_calls["calls"] == 7
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.allclose(got_cache, want_cache, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant", [QUANTIZABLE_GQA, QUANTIZABLE_MLA], ids=["gqa", "mla"])
def test_a_quantized_decode_token_in_one_call_equals_the_modules(one_calls, mode, variant):
    """The same kernels in the same order: equal up to the rounding of the activations' int8 blocks, which an
    fp32 difference in the last bit can move by one level."""
    model = quantize_model(_model({**QUANTIZABLE, **variant}), mode, 64)
    ids = torch.randint(0, 96, (1, 10))
    got, got_cache, cache = _decode(model, ids, 6, plan=True)
    assert isinstance(cache.decode_plan, DecodePlan) and one_calls["calls"] == 4
    want, want_cache, _ = _decode(model, ids, 6, plan=False)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got_cache - want_cache).abs().max() <= 1e-4 * want_cache.abs().max()


def test_generation_takes_the_one_call_step_and_makes_the_same_tokens(one_calls, monkeypatch):
    model = _model({**SMALL, **MLA})
    prompt = torch.randint(0, 53, (1, 6))
    got = generate(model, prompt, max_new_tokens=16)
    assert one_calls["calls"] == 15  # every token after the prefill's
    monkeypatch.setattr(model_module, "plan_decode", lambda *args: None)
    want = generate(model, prompt, max_new_tokens=16)
    assert one_calls["calls"] == 15
    assert torch.equal(got, want)


def _hooked(model: DecoderForCausalLM) -> DecoderForCausalLM:
    model.model.layers[0].register_forward_pre_hook(lambda module, args: None)
    return model


def _wrapped(model: DecoderForCausalLM) -> DecoderForCausalLM:
    """A projection replaced by a plain nn.Linear (as an adapter's wrapper would be): the plan does not know it."""
    attn = model.model.layers[1].self_attn
    plain = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    plain.weight.data = attn.o_proj.weight.data
    attn.o_proj = plain
    return model


@pytest.mark.parametrize(
    "change",
    [_hooked, _wrapped, lambda m: m.to(torch.bfloat16)],
    ids=["a forward hook", "an unknown module", "a bf16 model"],
)
def test_what_the_plan_does_not_know_runs_through_the_modules(one_calls, change):
    model = change(_model({**SMALL, **GQA}))
    ids = torch.randint(0, 53, (1, 8))
    got, _, cache = _decode(model, ids, 5, plan=True)
    assert cache.decode_plan is False and one_calls["calls"] == 0
    want, _, _ = _decode(model, ids, 5, plan=False)
    assert torch.equal(got, want)


def test_int4_in_torchs_layout_is_not_planned(one_calls, monkeypatch):
    """Without VNNI int4 layers take torch's layout and kernel, which step.c does not read."""
    monkeypatch.setattr("mmwb.models.quantize.vnni", lambda: False)
    model = quantize_model(_model({**QUANTIZABLE, **QUANTIZABLE_GQA}), "int4", 64)
    _, _, cache = _decode(model, torch.randint(0, 96, (1, 8)), 6, plan=True)
    assert cache.decode_plan is False and one_calls["calls"] == 0


def test_batches_and_padding_are_not_planned(one_calls):
    model = _model({**SMALL, **GQA})
    ids = torch.randint(0, 53, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    generate(model, ids, attention_mask=mask, max_new_tokens=4)
    generate(model, ids[:1], attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]), max_new_tokens=4)
    assert one_calls["calls"] == 0


def test_a_declining_kernel_hands_the_token_to_the_modules(one_calls):
    """An int8 kernel declines an input holding a NaN: the modules run the token (and carry the NaN)."""
    model = quantize_model(_model({**QUANTIZABLE, **QUANTIZABLE_GQA}), "int8")
    with torch.no_grad():
        model.model.embed_tokens.scale[7] = float("nan")
    ids = torch.tensor([[1, 2, 3, 4, 5, 7]])
    got, _, cache = _decode(model, ids, 5, plan=True)
    assert isinstance(cache.decode_plan, DecodePlan) and one_calls["calls"] == 1
    assert got.isnan().all()


def test_a_token_outside_the_table_gets_the_embeddings_error(one_calls):
    model = _model({**SMALL, **GQA})
    cache = model.allocate_cache(1, 4)
    with torch.no_grad(), pytest.raises(IndexError):
        model.step(torch.tensor([[53]]), cache=cache, cache_position=0, position_ids=torch.tensor([[0]]),
                   attention_mask=None)  # fmt: skip
    assert one_calls["calls"] == 1


def test_a_cache_handed_to_another_model_is_planned_for_it(one_calls):
    first, second = _model({**SMALL, **GQA}, seed=0), _model({**SMALL, **GQA}, seed=1)
    ids = torch.randint(0, 53, (1, 6))
    cache = first.allocate_cache(1, 8)
    with torch.no_grad():
        first.step(
            ids[:, :5], cache=cache, cache_position=0, position_ids=torch.arange(5)[None], attention_mask=None
        )
        first.step(
            ids[:, 5:], cache=cache, cache_position=5, position_ids=torch.tensor([[5]]), attention_mask=None
        )
        second.step(
            ids[:, :5], cache=cache, cache_position=0, position_ids=torch.arange(5)[None], attention_mask=None
        )
        got = second.step(ids[:, 5:], cache=cache, cache_position=5, position_ids=torch.tensor([[5]]),
                          attention_mask=None)  # fmt: skip
    assert one_calls["calls"] == 2
    want, _, _ = _decode(second, ids, 5, plan=False)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_logits_are_fp32_cpu_whatever_torchs_default_dtype(one_calls):
    model = _model({**SMALL, **GQA})
    ids = torch.randint(0, 53, (1, 8))
    want, _, _ = _decode(model, ids, 5, plan=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got, _, _ = _decode(model, ids, 5, plan=True)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_input_ids_and_embeddings_together_are_still_refused():
    model = _model({**SMALL, **GQA})
    cache = model.allocate_cache(1, 4)
    with torch.no_grad(), pytest.raises(MmwbInputError, match="exactly one"):
        model.step(torch.tensor([[3]]), cache=cache, cache_position=0, position_ids=torch.tensor([[0]]),
                   attention_mask=None, inputs_embeds=torch.zeros(1, 1, 48))  # fmt: skip
