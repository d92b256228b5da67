"""CPU decode kernels: equal to their torch definitions, taken only where they apply, built once and cached."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from mmwb.models.decoder import DecoderConfig, DecoderForCausalLM, attention, mla, moe
from mmwb.models.decoder.kernels import cpu as cpu_kernels
from mmwb.models.decoder.model import _column_major

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture
def calls(monkeypatch):
    """Counts of each kernel's calls (the kernels still run)."""
    kernels = cpu_kernels._kernels()
    if kernels is None:
        pytest.skip("kernels unavailable")
    names = (
        "rows_times_matrix", "rms_norm", "rms_norm_bf16", "swiglu_sum", "latent_attention", "gqa_attention", "route"
    )  # fmt: skip
    counts = dict.fromkeys(names, 0)
    for name in counts:
        function = getattr(kernels, name)

        def counted(*args, _name=name, _function=function):
            counts[_name] += 1
            return _function(*args)

        monkeypatch.setattr(kernels, name, counted)
    return counts


def _weight(out_features: int, in_features: int, pad: int = 0) -> torch.Tensor:
    """An (out, in) weight stored column-major, rows ``out + pad`` floats apart (a slice of a wider storage)."""
    scale = in_features**-0.5  # outputs of order one, so one tolerance fits every shape
    return (torch.randn(in_features, out_features + pad) * scale)[:, :out_features].t()


@needs_compiler
def test_kernels_build_where_a_compiler_exists():
    assert cpu_kernels._kernels() is not None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize(
    "shape", [(256, 512), (7, 3), (4096, 64), (160, 512), (1024, 1024)]
)  # the last one: threaded
def test_linear_equals_f_linear(calls, threads, rows, shape):
    torch.set_num_threads(threads)
    weight, bias = _weight(*shape, pad=5), torch.randn(shape[0])
    x = torch.randn(1, rows, shape[1])
    with torch.no_grad():
        got, want = cpu_kernels.linear(x, weight, bias), F.linear(x, weight, bias)
    assert got.shape == want.shape == (1, rows, shape[0])
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert calls["rows_times_matrix"] == 1


def test_linear_falls_back_where_the_kernel_does_not_apply(calls):
    col, row = _weight(64, 32), torch.randn(64, 32)
    x = torch.randn(5, 32)
    with torch.no_grad():
        for args in [
            (x[:1], row),
            (x, col),
            (x[:1].bfloat16(), col.bfloat16()),
            (x[:, :16].t()[:1], col[:, :5]),
        ]:
            assert torch.allclose(cpu_kernels.linear(*args).float(), F.linear(*args).float(), atol=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_kernels.linear(x[:1], col).dtype == torch.bfloat16
    trained = col.clone().requires_grad_()
    cpu_kernels.linear(x[:1], trained).sum().backward()
    assert torch.allclose(trained.grad, x[:1].expand(64, 32))
    assert calls["rows_times_matrix"] == 0


def test_mismatched_shapes_get_torchs_error_not_the_kernels_memory(calls):
    """The kernels trust their shapes: a mismatch must go to torch, which names it (instead of reading or
    writing past a buffer)."""
    col = _weight(4, 8)  # (out 4, in 8)
    experts_gate_up = (
        torch.randn(2, 8, 16).transpose(1, 2).contiguous().transpose(1, 2)
    )  # (E, 2I, C), decode layout
    experts_down = torch.randn(2, 4, 16).transpose(1, 2)  # (E, C, I)
    with torch.no_grad():
        for x in (
            torch.randn(2, 4),
            torch.randn(1, 16),
        ):  # 16 = two rows of 8 for a kernel reading flat memory
            with pytest.raises(RuntimeError, match="cannot be multiplied"):
                cpu_kernels.linear(x, col)
        with pytest.raises(RuntimeError, match="size of tensor"):
            cpu_kernels.rms_norm(torch.randn(2, 8), torch.ones(6), 1e-6)
        # the rest answer None, and their callers' torch code raises
        assert (
            cpu_kernels.route(torch.randn(1, 6), torch.randn(4, 8), None, 2, "softmax", (1, 1), True, 1.0)
            is None
        )
        assert cpu_kernels.swiglu(torch.randn(1, 6), _weight(4, 8), _weight(4, 8), _weight(8, 4)) is None
        assert cpu_kernels.experts_sum(torch.randn(1, 6), experts_gate_up, experts_down, [0], [1.0]) is None
    assert sum(calls.values()) == 0


@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm_equals_torch(calls, rows):
    x, weight = torch.randn(rows, 1, 48) * 3, torch.randn(48)
    with torch.no_grad():
        got = cpu_kernels.rms_norm(x, weight, 1e-6)
    assert torch.allclose(got, weight * F.rms_norm(x, (48,), eps=1e-6), rtol=1e-5, atol=1e-6)
    assert calls["rms_norm"] == 1


@pytest.mark.parametrize("width", [2048, 4096, 7168])  # Kimi-VL-A3B's hidden size, ..., DeepSeek-V3's
def test_rms_norm_of_a_bf16_model_equals_torch(calls, width):
    """bf16 rows and weight, rounded where the torch path (w * rms_norm(x.float()).bf16()) rounds: equal to it but
    for the order of the sum of squares, which can move an element by a bf16 step before and after the weight."""
    torch.manual_seed(0)
    x, weight = (torch.randn(64, 1, width) * 3).bfloat16(), (torch.rand(width) + 0.5).bfloat16()
    with torch.no_grad():
        got = cpu_kernels.rms_norm(x, weight, 1e-5)
    want = weight * F.rms_norm(x.float(), (width,), eps=1e-5).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got != want).float().mean() < 1e-3  # measured: none at 2048 and 7168, 1.1e-4 of them at 4096
    assert ((got.float() - want.float()).abs() <= 2**-6 * want.float().abs()).all()  # two bf16 steps at most
    assert calls["rms_norm_bf16"] == 1 and calls["rms_norm"] == 0
    with torch.no_grad():  # a weight of another dtype: torch's path, neither kernel
        cpu_kernels.rms_norm(x, weight.float(), 1e-5)
    assert calls["rms_norm_bf16"] == 1 and calls["rms_norm"] == 0


def _swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 4])
def test_swiglu_equals_torch(calls, threads, rows):
    torch.set_num_threads(threads)
    x = torch.randn(rows, 40)
    weights = _weight(24, 40), _weight(24, 40), _weight(40, 24)
    with torch.no_grad():
        got = cpu_kernels.swiglu(x, *weights)
    assert got is not None
    assert torch.allclose(got, _swiglu(x, *weights), rtol=1e-5, atol=1e-5)
    assert calls["swiglu_sum"] == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_experts_sum_reads_the_stacked_experts_in_place(calls, threads):
    torch.set_num_threads(threads)
    x = torch.randn(1, 40)
    gate_up = _column_major(torch.randn(3, 48, 40) / 40**0.5)  # (E, 2I, C) as the decoder's experts
    down = _column_major(torch.randn(3, 40, 24) / 24**0.5)
    want = sum(c * _swiglu(x, gate_up[e, :24], gate_up[e, 24:], down[e]) for e, c in [(2, 0.7), (0, 0.3)])
    with torch.no_grad():
        got = cpu_kernels.experts_sum(x, gate_up, down, [2, 0], [0.7, 0.3])
        assert cpu_kernels.experts_sum(x, gate_up.contiguous(), down, [2, 0], [0.7, 0.3]) is None  # row-major
        assert cpu_kernels.experts_sum(x, gate_up, down, [3, 0], [0.7, 0.3]) is None  # no expert 3
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert calls["swiglu_sum"] == 1


def test_moe_decode_step_through_the_kernel_equals_the_torch_path(calls):
    block = moe.MoEBlock(
        DecoderConfig(
            hidden_size=32,
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
        )
    )
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
        want, _ = block(torch.ones(1, 1, 32))  # row-major weights: the torch path
        assert calls["swiglu_sum"] == 0
        for p in (block.experts.gate_up_proj, block.experts.down_proj):
            p.data = _column_major(p.data)
        for linear in (
            block.shared_experts.gate_proj,
            block.shared_experts.up_proj,
            block.shared_experts.down_proj,
        ):
            linear.weight.data = _column_major(linear.weight.data)
        got, routing = block(torch.ones(1, 1, 32))
    assert calls["swiglu_sum"] == 2  # routed experts, then the shared expert
    assert torch.allclose(got, want, atol=1e-5)
    assert routing.counts.sum() == 2


MLA = dict(attention="mla", kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=16, rope_mscale=1.0)


@pytest.mark.parametrize(
    ("variant", "kernel", "batch", "dtype"),
    [
        (MLA, "latent_attention", 1, torch.float32),
        ({**MLA, **YARN, "q_lora_rank": 20}, "latent_attention", 1, torch.float32),
        (MLA, "latent_attention", 3, torch.float32),  # left-padded rows: the kernel masks their padding
        (MLA, "latent_attention", 1, torch.bfloat16),  # a bf16 model: bf16 cache and kv_b, fp32 inside
        (MLA, "latent_attention", 3, torch.bfloat16),
        (dict(attention="gqa", num_kv_heads=2, head_dim=12, qk_norm=True), "gqa_attention", 1, torch.float32),
    ],
)
def test_attention_decode_through_the_kernel_equals_the_torch_path(
    calls, monkeypatch, variant, kernel, batch, dtype
):
    """Decode steps: logits and the cache written by the kernel equal the torch path's (bf16: up to the
    roundings of the torch path's bf16 ops, which the kernel does in fp32)."""
    config = DecoderConfig(
        vocab_size=53, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=64, moe_intermediate_size=24,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, **variant,
    )  # fmt: skip
    model = DecoderForCausalLM(config).eval()
    model.init_weights(std=0.1)
    model.to(dtype)
    ids = torch.randint(0, 53, (batch, 9))
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # every row but the first is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        cache = model.allocate_cache(batch, 12)
        # the modules' kernels (a batch-1 token in one call is tests/test_decode_plan.py's)
        cache.decode_plan = False
        logits = []
        for start, end in [(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:
            step = model.step(
                ids[:, start:end], cache=cache, cache_position=start, position_ids=positions[:, start:end],
                attention_mask=mask[:, :end] if batch > 1 else None,
            )  # fmt: skip
            logits.append(step)
        buffers = [b.flatten() for layer in cache.layers for b in layer.buffers()]
        return torch.cat(logits, dim=1)[mask.bool()], torch.cat(buffers)

    got, got_cache = decode()
    assert calls[kernel] == 4 * config.num_layers
    with monkeypatch.context() as torch_path:
        torch_path.setattr(attention if kernel == "gqa_attention" else mla, "applies", lambda *tensors: False)
        want, want_cache = decode()
    assert calls[kernel] == 4 * config.num_layers
    if dtype == torch.float32:
        assert (got - want).abs().max() <= 1e-5
        assert torch.allclose(got_cache, want_cache, rtol=1e-5, atol=1e-6)
    else:
        assert got_cache.dtype == torch.bfloat16
        assert (got - want).abs().max() <= 2**-5 * want.abs().max()
        first = got_cache.numel() // config.num_layers  # the first layer's latents: one bf16 rounding apart
        assert torch.allclose(got_cache[:first], want_cache[:first], rtol=2**-7, atol=2**-7)
        assert (got_cache - want_cache).abs().max() <= 2**-5 * want_cache.abs().max()  # later: their inputs


@pytest.fixture
def rebuilt():
    """The kernels are looked up afresh (under the test's environment) and again after the test."""
    cpu_kernels._kernels.cache_clear()
    yield
    cpu_kernels._kernels.cache_clear()


@pytest.mark.parametrize("reason", ["switched off", "unwritable cache", "no source file"])
def test_without_the_kernels_everything_runs_on_torch_ops(monkeypatch, tmp_path, rebuilt, reason):
    if reason == "switched off":
        monkeypatch.setenv("MMWB_CPU_KERNELS", "0")
    elif reason == "no source file":  # an install that lost its package data
        monkeypatch.setenv("MMWB_CACHE", str(tmp_path))
        monkeypatch.setattr(cpu_kernels, "SOURCES", (*cpu_kernels.SOURCES[:-1], tmp_path / "missing.c"))
    else:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        monkeypatch.setenv("MMWB_CACHE", str(blocker))
    assert cpu_kernels._kernels() is None
    x, weight = torch.randn(1, 32), _weight(16, 32)
    with torch.no_grad():
        assert torch.equal(cpu_kernels.linear(x, weight), F.linear(x, weight))
        assert cpu_kernels.swiglu(x, weight, weight, weight.t()) is None


@needs_compiler
def test_library_is_built_once_into_the_cache(monkeypatch, tmp_path, rebuilt):
    monkeypatch.setenv("MMWB_CACHE", str(tmp_path))
    assert cpu_kernels._kernels() is not None
    (built,) = (tmp_path / "kernels").glob("cpu_kernels-*.so")
    stamp = built.stat().st_mtime_ns
    cpu_kernels._kernels.cache_clear()
    assert cpu_kernels._kernels() is not None
    assert built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]  # no leftovers


@pytest.mark.parametrize(
    "router",
    [
        dict(),  # softmax, Mixtral / Qwen3
        dict(norm_topk_prob=True),
        dict(scoring_func="sigmoid", expert_bias=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_through_the_kernel_equals_the_torch_path(calls, monkeypatch, router, dtype):
    """fp32 and bf16 models: a bf16 model's router widens x and its weight to fp32 (exactly), as the torch path."""
    config = DecoderConfig(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3, **router)
    block = moe.MoEBlock(config).to(dtype)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.3)
        if block.gate.e_score_correction_bias is not None:
            block.gate.e_score_correction_bias.normal_(0, 0.1)
        x = torch.randn(4, 32).to(dtype)
        got = block.gate(x)
        with monkeypatch.context() as torch_path:
            torch_path.setattr(moe, "route", lambda *args: None)
            want = block.gate(x)
    assert calls["route"] == 1
    assert torch.equal(got[1], want[1])
    assert got[0].dtype == got[2].dtype == want[0].dtype == want[2].dtype == torch.float32
    for g, w in zip(got[::2], want[::2]):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "dims", [(16, 12, 32), (14, 10, 40)]
)  # (nope, v_dim, rank); the second leaves rows and columns over from bf16's four-row, 16-wide passes
def test_latent_attention_reads_kv_b_in_either_layout(dtype, dims):
    """Column-major kv_b (the fp32 decode layout) and row-major (a quantized kv_b's dequantized copy) give the
    same attention and the same cache row."""
    if cpu_kernels._kernels() is None:
        pytest.skip("kernels unavailable")
    torch.manual_seed(0)
    (nope, v_dim, rank), (batch, heads, rope_dim, slots, position) = dims, (2, 4, 8, 10, 6)
    weight = torch.randn(heads * (nope + v_dim), rank).to(dtype)
    q = torch.randn(batch, heads * (nope + rope_dim)).to(dtype)
    kv = torch.randn(batch, rank + rope_dim).to(dtype)
    norm = torch.rand(rank).to(dtype) + 0.5
    rope = torch.randn(batch, rope_dim // 2).cos(), torch.randn(batch, rope_dim // 2).sin()
    mask = torch.ones(batch, 1, 1, position + 1, dtype=torch.bool)
    mask[1, ..., :2] = False
    start = torch.randn(batch, 1, slots, rank + rope_dim).to(dtype)
    results = []
    for layout in (weight, _column_major(weight)):
        cache = start.clone()
        out = cpu_kernels.latent_attention(
            q, kv, norm, 1e-6, rope, cache, position, mask, layout, (heads, nope, rope_dim, v_dim), 0.3
        )
        assert out is not None and out.dtype == dtype
        results.append((out.float(), cache.float()))
    (row_out, row_cache), (column_out, column_cache) = results
    assert torch.equal(row_cache, column_cache) and not torch.equal(row_cache, start.float())
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert (row_out - column_out).abs().max() <= tolerance * column_out.abs().max()
