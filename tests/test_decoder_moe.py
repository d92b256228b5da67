"""MoE block: grouped dispatch vs a naive per-token loop, router losses, bias update, expert counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmwb.errors import MmwbConfigError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.decoder.moe import MoEBlock, Routing, load_balancing_loss, router_z_loss, update_expert_bias

CFG = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3)


def _block(**overrides) -> MoEBlock:
    block = MoEBlock(DecoderConfig(**{**CFG, **overrides}))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def _naive(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: the textbook definition."""
    flat = x.reshape(-1, x.shape[-1])
    _, indices, weights = block.gate(flat)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for slot in range(indices.shape[1]):
            e = indices[n, slot]
            gate, up = (block.experts.gate_up_proj[e] @ flat[n]).chunk(2)
            out[n] += weights[n, slot] * (block.experts.down_proj[e] @ (F.silu(gate) * up))
    out = out.view_as(x)
    return out if block.shared_experts is None else out + block.shared_experts(x)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "scoring_func": "sigmoid",
            "expert_bias": True,
            "n_group": 4,
            "topk_group": 2,
            "n_shared_experts": 2,
            "routed_scaling_factor": 2.5,
        },
        {"norm_topk_prob": False},
    ],
)
def test_grouped_dispatch_equals_naive_loop(overrides):
    block = _block(**overrides)
    if block.gate.e_score_correction_bias is not None:
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 7, 32)
    out, routing = block(x)
    assert torch.allclose(out, _naive(block, x), atol=1e-5)
    assert routing.counts.sum() == 2 * 7 * 3
    assert torch.equal(routing.counts, torch.bincount(routing.indices.flatten(), minlength=8))


@pytest.mark.parametrize("tokens", [1, 3])
def test_few_token_inference_dispatch_equals_naive_loop(tokens):
    """Decode-sized inputs under no_grad take Experts._few_tokens (per used expert, no sort/permute)."""
    block = _block(n_shared_experts=1)
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        out, routing = block(x)
        want = _naive(block, x)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.equal(routing.counts, torch.bincount(routing.indices.flatten(), minlength=8))


def test_group_limited_routing_stays_in_top_groups():
    block = _block(scoring_func="sigmoid", expert_bias=True, n_group=4, topk_group=1, num_experts_per_tok=2)
    _, indices, _ = block.gate(torch.randn(50, 32))
    groups = indices // 2  # 8 experts in 4 groups of 2
    assert torch.equal(groups[:, 0], groups[:, 1])  # topk_group=1: both experts from one group


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (dict(n_group=0), "n_group=0 must be >= 1"),
        (dict(n_group=3), "n_group=3 must divide n_routed_experts"),
        (dict(n_group=8, topk_group=4), "n_group=8 must leave at least 2 experts per group"),
        (dict(n_group=4, topk_group=5), "topk_group=5 must be in 1..n_group"),
        (
            dict(n_group=4, topk_group=1, num_experts_per_tok=3),
            "topk_group=1 must keep groups holding at least",
        ),
    ],
)
def test_impossible_group_routing_is_a_config_error(groups, message):
    """Each of these used to crash inside torch.topk, divide by zero, or (in the C router) pick one expert twice."""
    with pytest.raises(MmwbConfigError, match=f"decoder config: {message}"):
        DecoderConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, **groups)


def test_dispatch_backward_matches_naive():
    block = _block()
    x = torch.randn(1, 5, 32, requires_grad=True)
    block(x)[0].square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    _naive(block, x).square().sum().backward()
    for got, want in zip(grads, [p.grad for p in block.parameters()] + [x.grad]):
        assert torch.allclose(got, want, atol=1e-5)


def test_aux_loss_is_one_when_perfectly_balanced_and_grows_when_not():
    # 4 experts, top-1, uniform probabilities and an even split: E * sum(1/4 * 1/4) * 4 = 1
    logits = torch.zeros(8, 4)
    indices = torch.arange(8).remainder(4)[:, None]
    balanced = Routing(logits, indices, torch.ones(8, 1), torch.full((4,), 2))
    assert load_balancing_loss([balanced], 4, None).item() == pytest.approx(1.0)
    skewed_logits = torch.tensor([[4.0, 0, 0, 0]]).expand(8, -1)
    skewed = Routing(
        skewed_logits, torch.zeros(8, 1, dtype=torch.long), torch.ones(8, 1), torch.tensor([8, 0, 0, 0])
    )
    p0 = torch.softmax(skewed_logits[0], -1)[0].item()
    assert load_balancing_loss([skewed], 4, None).item() == pytest.approx(4 * p0)


def test_z_loss_value_and_padding_excluded():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    routing = Routing(logits, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.tensor([2, 0]))
    want = torch.logsumexp(logits, -1).square().mean().item()
    assert router_z_loss([routing], None).item() == pytest.approx(want)
    only_first = torch.logsumexp(logits[0], -1).square().item()
    assert router_z_loss([routing], torch.tensor([[1, 0]])).item() == pytest.approx(only_first)


def test_bias_update_favours_underloaded_experts():
    cfg = DecoderConfig(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=1,
        scoring_func="sigmoid",
        expert_bias=True,
    )
    model = DecoderForCausalLM(cfg)
    out = model(input_ids=torch.randint(0, 50, (2, 9)), labels=torch.randint(0, 50, (2, 9)))
    assert out.expert_counts.shape == (2, 4)
    assert out.expert_counts.sum(1).tolist() == [18, 18]
    counts = torch.tensor([[10, 0, 4, 4], [4, 4, 4, 6]])
    update_expert_bias(model.routers(), counts, rate=0.01)
    assert model.routers()[0].e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert model.routers()[1].e_score_correction_bias.tolist() == pytest.approx([0.01, 0.01, 0.01, -0.01])


def test_bias_stays_fp32_under_bf16_cast():
    cfg = DecoderConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4, expert_bias=True)
    block = MoEBlock(cfg)
    block.gate.e_score_correction_bias.fill_(1.0 + 1e-4)
    block.to(torch.bfloat16)
    assert block.gate.weight.dtype == torch.bfloat16
    assert block.gate.e_score_correction_bias.dtype == torch.float32
    assert block.gate.e_score_correction_bias[0].item() == pytest.approx(1.0 + 1e-4)


def test_rope_frequencies_stay_fp32_under_bf16_cast_and_meta_init_works():
    cfg = DecoderConfig(
        vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=128, moe_intermediate_size=16,
        n_routed_experts=4, expert_bias=True, first_k_dense_replace=0,
    )  # fmt: skip
    model = DecoderForCausalLM(cfg)
    positions = torch.tensor([[0, 2000]])
    cos, _ = model.model.rotary_emb(positions, torch.float32)
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    cos_bf16, _ = model.model.rotary_emb(positions, torch.float32)
    assert torch.equal(cos_bf16, cos)  # rounded frequencies were off by up to 1.6 at position 2000
    with torch.device("meta"):
        empty = DecoderForCausalLM(cfg)
    empty.to_empty(device="cpu")  # FSDP/accelerate-style init: the fp32 buffers have no values to keep
    assert empty.routers()[0].e_score_correction_bias.dtype == torch.float32


def test_training_losses_gradient_checkpointing_and_bf16_autocast():
    cfg = DecoderConfig(
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        moe_intermediate_size=16,
        n_routed_experts=4,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
    )
    model = DecoderForCausalLM(cfg).train()
    ids = torch.randint(0, 50, (2, 9))
    plain = model(input_ids=ids, labels=ids)
    want = plain.lm_loss + 0.01 * plain.aux_loss + 0.001 * plain.z_loss
    assert plain.loss.item() == pytest.approx(want.item())
    assert plain.lm_loss.item() == pytest.approx(math.log(50), rel=0.1)
    plain.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    again = model(input_ids=ids, labels=ids)
    again.loss.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(input_ids=ids, labels=ids)
    assert low.logits.dtype == torch.bfloat16
    assert abs(low.lm_loss.item() - plain.lm_loss.item()) < 0.05
    low.loss.backward()


def test_grouped_mm_offsets_match_looped_path():
    """The torch._grouped_mm call (used on CUDA bf16) and the looped fallback agree, empty groups included."""
    from mmwb.models.decoder.moe import grouped_linear

    x, weight = torch.randn(10, 16), torch.randn(3, 8, 16)
    counts = torch.tensor([4, 0, 6])
    looped = grouped_linear(x, weight, counts.tolist())
    want = torch.cat((x[:4] @ weight[0].T, x[4:] @ weight[2].T))
    assert torch.allclose(looped, want, atol=1e-5)
    assert torch.allclose(grouped_linear(x, weight, counts), want, atol=1e-5)
