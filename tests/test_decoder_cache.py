"""Cached inference (prefill + decode steps through `step`) equals one full forward pass."""

from __future__ import annotations

import pytest
import torch

from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM
from mmwb.models.decoder.cache import cache_bytes_per_token

VOCAB = 89
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    num_layers=3,
    num_heads=4,
    intermediate_size=64,
    moe_intermediate_size=24,
    n_routed_experts=6,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
)
CONFIGS = {
    "mla": DecoderConfig(
        **COMMON,
        attention="mla",
        q_lora_rank=20,
        kv_lora_rank=16,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        n_shared_experts=1,
        scoring_func="sigmoid",
        expert_bias=True,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.0,
    ),
    "mla-expanded": DecoderConfig(
        **COMMON,
        attention="mla",
        kv_lora_rank=16,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        decode_max_tokens=0,
    ),
    "gqa": DecoderConfig(**COMMON, num_kv_heads=2, head_dim=12, qk_norm=True),
}


def _model(name: str) -> DecoderForCausalLM:
    model = DecoderForCausalLM(CONFIGS[name]).eval()
    model.init_weights(std=0.1)
    return model


def _cached_logits(model, ids, mask, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest one at a time; positions come from the mask."""
    batch, total = ids.shape
    cache = model.allocate_cache(batch, total + 3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = [
        model.step(
            ids[:, :prefill],
            cache=cache,
            cache_position=0,
            position_ids=positions[:, :prefill],
            attention_mask=mask[:, :prefill],
        )
    ]
    for t in range(prefill, total):
        out.append(
            model.step(
                ids[:, t : t + 1],
                cache=cache,
                cache_position=t,
                position_ids=positions[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
            )
        )
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(name):
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    cached = _cached_logits(model, ids, mask, prefill=5)
    assert cached.dtype == torch.float32
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_chunked_prefill_through_both_paths_equals_full_forward(name):
    """A 10-token chunk takes the prefill path (SDPA / expanded MLA), a 3-token chunk the decode path."""
    model = _model(name)
    ids = torch.randint(0, VOCAB, (1, 15))
    cache = model.allocate_cache(1, 15)
    positions = torch.arange(15)[None]
    mask = torch.ones_like(ids)
    chunks = []
    for start, end in [(0, 10), (10, 13), (13, 14), (14, 15)]:
        chunks.append(
            model.step(
                ids[:, start:end],
                cache=cache,
                cache_position=start,
                position_ids=positions[:, start:end],
                attention_mask=mask[:, :end],
            )
        )
    with torch.no_grad():
        full = model(input_ids=ids).logits
    assert (torch.cat(chunks, 1) - full).abs().max() <= 1e-4


def test_reorder_cache_selects_beams():
    model = _model("mla")
    ids = torch.randint(0, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    positions = torch.arange(6).expand(3, -1)
    cache = model.allocate_cache(3, 8)
    model.step(
        ids[:, :5], cache=cache, cache_position=0, position_ids=positions[:, :5], attention_mask=mask[:, :5]
    )
    model.reorder_cache(cache, torch.tensor([2, 2, 0]))
    picked = ids[[2, 2, 0]]
    got = model.step(
        picked[:, 5:], cache=cache, cache_position=5, position_ids=positions[:, 5:], attention_mask=mask
    )
    with torch.no_grad():
        full = model(input_ids=picked).logits[:, -1:]
    assert (got - full).abs().max() <= 1e-4


def test_cache_bytes_per_token_mla_is_latent_sized():
    mla, gqa = _model("mla"), _model("gqa")
    assert mla.allocate_cache(1, 4).bytes_per_token() == (16 + 8) * 3 * 4
    assert gqa.allocate_cache(2, 4).bytes_per_token() == 2 * 2 * 12 * 3 * 4
    assert cache_bytes_per_token(CONFIGS["mla"], torch.bfloat16) == (16 + 8) * 3 * 2


def test_step_past_cache_end_is_rejected():
    from mmwb.errors import MmwbInputError

    model = _model("gqa")
    cache = model.allocate_cache(1, 4)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(MmwbInputError, match="cache holds 4"):
        model.step(
            ids,
            cache=cache,
            cache_position=0,
            position_ids=torch.arange(5)[None],
            attention_mask=torch.ones_like(ids),
        )


def test_dynamic_rope_past_its_trained_length_is_refused():
    """Dynamic NTK equals plain RoPE only up to max_position_embeddings; past it mmwb would silently differ."""
    from dataclasses import replace

    from mmwb.errors import MmwbInputError

    model = DecoderForCausalLM(
        replace(CONFIGS["gqa"], rope_type="dynamic", rope_factor=2.0, max_position_embeddings=16)
    )
    assert model.allocate_cache(1, 16).max_length == 16
    with pytest.raises(MmwbInputError, match="17 positions: .* up to max_position_embeddings=16"):
        model.allocate_cache(1, 17)


def _greedy_with_step(model, ids, mask, new_tokens):
    """The minimal StepModel driver: prefill, then one token per step, positions derived from the mask."""
    batch, prompt = ids.shape
    cache = model.allocate_cache(batch, prompt + new_tokens)
    mask = torch.cat((mask, mask.new_ones(batch, new_tokens)), dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model.step(
        ids,
        cache=cache,
        cache_position=0,
        position_ids=positions[:, :prompt],
        attention_mask=mask[:, :prompt],
        logits_to_keep=1,
    )
    out = [logits[:, -1].argmax(-1, keepdim=True)]
    for t in range(prompt, prompt + new_tokens - 1):
        logits = model.step(
            out[-1],
            cache=cache,
            cache_position=t,
            position_ids=positions[:, t : t + 1],
            attention_mask=mask[:, : t + 1],
        )
        out.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_step_driven_greedy_decode_matches_transformers_generate(tmp_path, family):
    import decoder_fixtures

    from mmwb.models.loading import from_pretrained

    reference = decoder_fixtures.randomize(getattr(decoder_fixtures, family)())
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids = torch.randint(2, decoder_fixtures.VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = reference.generate(
            ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0
        )
    assert torch.equal(_greedy_with_step(model, ids, mask, 16), want[:, -16:])


def test_greedy_generation_matches_transformers(tmp_path):
    """16 greedy tokens from a left-padded batch equal transformers' generate on the same DeepSeek-V3 weights."""
    pytest.importorskip("mmwb.models.decoder.generate")
    from decoder_fixtures import VOCAB as HF_VOCAB
    from decoder_fixtures import deepseek_v3, randomize

    from mmwb.models.loading import from_pretrained

    reference = randomize(deepseek_v3())
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    ids = torch.randint(2, HF_VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = reference.generate(
            ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0
        )
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(got[:, -16:], want[:, -16:])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_last_layer_runs_only_the_kept_positions(name):
    """logits_to_keep=k: the last layer computes only the last k queries (keys and values from every position);
    the logits equal the full forward's last k, padded or not, in forward and in a cached step (a 3-token step
    takes the decode path, an 11-token one the prefill path)."""
    model = _model(name)
    ids = torch.randint(0, VOCAB, (2, 11))
    padded = torch.ones_like(ids)
    padded[1, :4] = 0
    for mask in (None, padded):
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits
            for keep in (1, 3, 11):
                kept = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                assert kept.shape[1] == keep and (kept - full[:, -keep:]).abs().max() <= 1e-5
        for length, keep in ((3, 2), (11, 3)):
            step_mask = None if mask is None else mask[:, -length:]
            cache = model.allocate_cache(2, length)
            positions = torch.arange(length).expand(2, -1)
            if step_mask is not None:
                positions = (step_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                expected = model(input_ids=ids[:, -length:], attention_mask=step_mask).logits[:, -keep:]
            stepped = model.step(ids[:, -length:], cache=cache, cache_position=0, position_ids=positions,
                                 attention_mask=step_mask, logits_to_keep=keep)  # fmt: skip
            assert (stepped - expected).abs().max() <= 1e-5


def test_kept_positions_are_cheaper():
    """The last layer's MoE sees only the kept tokens: its expert counts add up to keep x top-k per row."""
    model = _model("gqa")
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        counts = model(input_ids=ids, logits_to_keep=2).expert_counts  # (MoE layers, E)
    assert counts[:-1].sum(1).tolist() == [2 * 11 * 2] * (len(counts) - 1)
    assert counts[-1].sum().item() == 2 * 2 * 2


@pytest.mark.parametrize("kernels", [True, False])
def test_cached_decode_keeps_an_unmerged_lora_on_kv_b_proj(monkeypatch, kernels):
    """Absorbed decode folds kv_b into the query and output; with an adapter on kv_b (as stage-2 LoRA puts one)
    it must fold the adapted weight, or decode would disagree with the forward that training saw."""
    from peft import LoraConfig, inject_adapter_in_model

    from mmwb.models.decoder import mla

    if not kernels:
        monkeypatch.setattr(mla, "applies", lambda *tensors: False)
    model = _model("mla")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj"], init_lora_weights=False)
    model = inject_adapter_in_model(config, model).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = model.allocate_cache(1, 9)
        steps = [model.step(ids[:, :5], cache=cache, cache_position=0, position_ids=torch.arange(5)[None],
                            attention_mask=None)]  # fmt: skip
        for t in range(5, 9):
            steps.append(
                model.step(
                    ids[:, t : t + 1],
                    cache=cache,
                    cache_position=t,
                    position_ids=torch.tensor([[t]]),
                    attention_mask=None,
                )  # fmt: skip
            )
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4
