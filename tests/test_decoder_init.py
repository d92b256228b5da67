"""A decoder trained from scratch starts as its config's ``init`` says, and its saved config keeps the scheme."""

from __future__ import annotations

import pytest
import torch

from mmwb.errors import MmwbConfigError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM

SMALL = dict(vocab_size=300, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
             intermediate_size=384, tie_word_embeddings=True)  # fmt: skip
MOE = dict(
    SMALL, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1
)


def _matrices(model: DecoderForCausalLM) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_normal_init_draws_every_matrix_at_the_initializer_range(std):
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(**MOE, initializer_range=std))
    # attention, SwiGLU, experts, router, the tied embedding table
    for name, param in _matrices(model).items():
        assert abs(param.std().item() - std) < 0.1 * std, name
        assert abs(param.mean().item()) < 0.1 * std, name
    for name, param in model.named_parameters():
        if param.dim() == 1:  # norms
            assert torch.equal(param, torch.ones_like(param)), name


def test_fan_in_init_bounds_each_matrix_by_its_inputs_like_nn_linear():
    torch.manual_seed(0)
    model = DecoderForCausalLM(DecoderConfig(**MOE, init="fan_in"))
    matrices = _matrices(model)
    fan_in = {"experts.down_proj": 64, "mlp.down_proj": 384}  # every other matrix reads the 128-wide stream
    for name, param in matrices.items():
        inputs = next((n for key, n in fan_in.items() if name.removesuffix(".weight").endswith(key)), 128)
        bound = inputs**-0.5
        assert param.abs().max().item() <= bound, name
        assert abs(param.std().item() - bound / 3**0.5) < 0.05 * bound, name  # uniform: std = bound / sqrt(3)
    reference = torch.nn.Linear(128, 128)  # PyTorch's own init of a layer of the same shape
    q = matrices["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - reference.weight.std().item()) < 0.05 * q.std().item()


def test_the_scheme_survives_a_config_round_trip_and_older_folders_keep_normal():
    config = DecoderConfig(**SMALL, init="fan_in", initializer_range=0.05)
    again = DecoderConfig.from_dict(config.to_dict())
    assert (again.init, again.initializer_range) == ("fan_in", 0.05)
    older = DecoderConfig.from_dict(dict(SMALL))
    assert (older.init, older.initializer_range) == ("normal", 0.02)


@pytest.mark.parametrize(("key", "value"), [("initializer_range", 0.0), ("init", "xavier")])
def test_a_scheme_that_does_not_exist_is_a_config_error(key, value):
    with pytest.raises(MmwbConfigError, match=key):
        DecoderConfig(**SMALL, **{key: value})
