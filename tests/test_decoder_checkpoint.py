"""Checkpoint round trips, sharded imports and the errors a broken checkpoint gets."""

from __future__ import annotations

import json

import pytest
import torch
from decoder_fixtures import VOCAB, deepseek_v3, measure_load, mixtral, qwen3_moe, randomize
from safetensors.torch import load_file, save_file

from mmwb.errors import MmwbCheckpointError, MmwbConfigError
from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM, load_decoder
from mmwb.models.loading import from_pretrained

CFG = DecoderConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    attention="mla",
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    intermediate_size=48,
    moe_intermediate_size=16,
    n_routed_experts=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    expert_bias=True,
    scoring_func="sigmoid",
)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_mmwb_round_trip(tmp_path, shard_bytes):
    model = DecoderForCausalLM(CFG).eval()
    model.routers()[0].e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mmwb_decoder"
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_bytes is not None)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == CFG
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


def test_saving_again_over_a_folder_replaces_every_weight_file(tmp_path):
    """A sharded save, then a single-file save of other weights (and back): the folder loads the newest save."""
    ids = torch.randint(0, VOCAB, (1, 6))
    first, second = DecoderForCausalLM(CFG).eval(), DecoderForCausalLM(CFG).eval()
    first.save_pretrained(tmp_path, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(_logits(from_pretrained(tmp_path), ids), _logits(second, ids))
    first.save_pretrained(tmp_path, max_shard_bytes=20_000)
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors")) == shards
    assert torch.equal(_logits(from_pretrained(tmp_path), ids), _logits(first, ids))


def _column_major(t: torch.Tensor) -> bool:
    return t.transpose(-1, -2).is_contiguous() and not t.is_contiguous()


def test_decode_layout_keeps_names_shapes_and_values(tmp_path):
    """Projection weights are stored column-major (faster batch-1 decode on CPU), checkpoints stay row-major
    and equal, and a model in that layout still trains."""
    model = DecoderForCausalLM(CFG)
    params = dict(model.named_parameters())
    routers_and_embeddings = (
        "mlp.gate.weight",
        "embed_tokens.weight",
    )  # fp32 routing, row lookups: row-major
    projections = [n for n, p in params.items() if p.dim() >= 2 and not n.endswith(routers_and_embeddings)]
    assert projections and all(_column_major(params[n]) for n in projections)
    assert params["model.embed_tokens.weight"].is_contiguous()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert all(saved[n].is_contiguous() and torch.equal(saved[n], p) for n, p in params.items())
    loaded = load_decoder(tmp_path)
    assert all(_column_major(dict(loaded.named_parameters())[n]) for n in projections)
    ids = torch.randint(0, VOCAB, (2, 6))
    assert torch.equal(_logits(model.eval(), ids), _logits(loaded, ids))

    loaded.train()
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    loaded(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trained = dict(loaded.named_parameters())
    assert all(
        not torch.equal(trained[n], params[n])
        for n in ("lm_head.weight", "model.layers.1.mlp.experts.down_proj")
    )


def test_dtype_and_fp32_bias_on_load(tmp_path):
    DecoderForCausalLM(CFG).save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.routers()[0].e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("build", [deepseek_v3, qwen3_moe, mixtral])
def test_sharded_transformers_checkpoint_loads(tmp_path, build):
    reference = randomize(build())
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = from_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert (_logits(model, ids) - reference(input_ids=ids).logits).abs().max() <= 1e-4


def _edit_checkpoint(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    randomize(qwen3_moe()).save_pretrained(tmp_path)

    def break_it(tensors):
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
        tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
        tensors["model.norm.weight"] = torch.zeros(63)

    _edit_checkpoint(tmp_path, break_it)
    with pytest.raises(MmwbCheckpointError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    assert "missing (1): model.layers.1.mlp.experts.3.up_proj.weight" in message
    assert "unexpected (1): model.layers.1.mlp.extra.weight" in message
    assert "mis-shaped (1): model.norm.weight (63,) (expected (64,))" in message


def test_mmwb_checkpoint_with_wrong_shape_is_named(tmp_path):
    DecoderForCausalLM(CFG).save_pretrained(tmp_path)
    _edit_checkpoint(
        tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.down_proj": torch.zeros(4, 32, 15)})
    )
    with pytest.raises(MmwbCheckpointError, match=r"model\.layers\.1\.mlp\.experts\.down_proj \(4, 32, 15\)"):
        from_pretrained(tmp_path)


def test_deepseek_mtp_layers_are_ignored(tmp_path):
    reference = randomize(deepseek_v3())
    reference.save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(4, 4)}))
    from_pretrained(tmp_path)


def test_unknown_model_type_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MmwbCheckpointError, match="'gpt2'"):
        from_pretrained(tmp_path)
    with pytest.raises(MmwbCheckpointError, match="nowhere: not a checkpoint folder"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").unlink()
    with pytest.raises(MmwbCheckpointError, match="no config.json"):
        from_pretrained(tmp_path)
    DecoderForCausalLM(CFG).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MmwbCheckpointError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_quantized_config_is_rejected():
    with pytest.raises(MmwbConfigError, match="quantization_config"):
        DecoderConfig.from_hf_config(
            {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}
        )


def test_loading_does_not_hold_the_checkpoint_twice(tmp_path):
    """Peak private memory of a fresh process loading a checkpoint stays well under two copies of the weights."""
    cfg = DecoderConfig(
        vocab_size=16000,
        hidden_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=512,
        moe_intermediate_size=256,
        n_routed_experts=8,
    )
    model = DecoderForCausalLM(cfg)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path)
    added, _ = measure_load(tmp_path)
    assert 0.5 * weight_bytes < added < 1.5 * weight_bytes  # one copy (measured ~0.95x), never two


MOONLIGHT_CONFIG = {  # Moonlight-16B-A3B's config.json (remote-code era: rope_theta + rope_scaling, no rope_interleave)
    "model_type": "deepseek_v3",
    "vocab_size": 163840,
    "hidden_size": 2048,
    "intermediate_size": 11264,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 6,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 50000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def test_moonlight_config_reads_and_its_latent_cache_size():
    from mmwb.models.decoder import cache_bytes_per_token

    cfg = DecoderConfig.from_hf_config(MOONLIGHT_CONFIG)
    assert (cfg.attention, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_theta) == ("mla", None, 512, 50000.0)
    assert (cfg.scoring_func, cfg.expert_bias, cfg.n_routed_experts, cfg.n_shared_experts) == (
        "sigmoid",
        True,
        64,
        2,
    )
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert cfg.softmax_scale == pytest.approx(192**-0.5)
    # (512 latent + 64 rope) values per layer in bf16 vs 2 * 16 heads * 192 for an expanded K/V cache
    assert cache_bytes_per_token(cfg, torch.bfloat16) == (512 + 64) * 27 * 2


def test_greedy_routing_configs_select_without_the_bias(tmp_path):
    """topk_method greedy (Moonshot's remote code offers it): plain top-k of the scores, no selection bias (a
    bias that transformers' class saved anyway is ignored), no groups; other methods are refused by name."""
    cfg = DecoderConfig.from_hf_config(
        {**MOONLIGHT_CONFIG, "topk_method": "greedy", "n_group": 8, "topk_group": 4}
    )
    assert not cfg.expert_bias and (cfg.n_group, cfg.topk_group) == (1, 1)
    assert DecoderConfig.from_hf_config(MOONLIGHT_CONFIG).expert_bias
    with pytest.raises(MmwbConfigError, match="topk_method 'group_limited_greedy'"):
        DecoderConfig.from_hf_config({**MOONLIGHT_CONFIG, "topk_method": "group_limited_greedy"})
    reference = randomize(deepseek_v3())
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "topk_method": "greedy"}))
    model = from_pretrained(tmp_path)  # the saved e_score_correction_bias is not an unexpected tensor
    assert model.routers()[0].e_score_correction_bias is None


def test_reading_rows_past_a_tensor_is_a_clear_error(tmp_path):
    from mmwb.models.decoder.checkpoint import TensorSource

    save_file({"w": torch.arange(12.0).view(4, 3)}, tmp_path / "model.safetensors")
    source = TensorSource(tmp_path)
    assert torch.equal(source.get_rows("w", 1, 3), torch.arange(3.0, 9.0).view(2, 3))
    assert torch.equal(source.get_row("w", 3), torch.tensor([9.0, 10.0, 11.0]))
    assert source.dtype("w") == torch.float32
    with pytest.raises(MmwbCheckpointError, match=r"has no rows 4:5"):
        source.get_row("w", 4)


def test_a_folder_under_home_loads_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    DecoderForCausalLM(CFG).save_pretrained(tmp_path / "models" / "tiny")
    assert isinstance(from_pretrained("~/models/tiny", device="cpu"), DecoderForCausalLM)
