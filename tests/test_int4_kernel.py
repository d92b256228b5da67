"""mmwb's int4 decode kernels (kernels/quantized.c through cpu.int4_linear / cpu.int4_experts) and their panel
layout: equal to the product they define (the input quantized to int8 per weight group, integer dot products,
fp32 across groups) up to fp32 summation order, within the stated error of the exact product, taken by the
quantized layers where they apply; the stored form is the same whichever layout a layer holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmwb.models.quantize as quantize
from mmwb.models.decoder.kernels import cpu
from mmwb.models.quantize import (
    PANELS,
    TORCH,
    QuantizedExperts,
    QuantizedLinear,
    from_panels,
    quantize_module,
    to_panels,
)

pytestmark = pytest.mark.skipif(not cpu.vnni(), reason="the int4 kernel needs a C compiler and AVX-512 VNNI")


def _as_the_kernel_reads(x: torch.Tensor, group: int) -> torch.Tensor:
    """x (M, K) as quantized.c quantizes it, back in float64: per group the scale amax / 127 and each value times
    1 / scale rounded to nearest (even)."""
    blocks = x.float().view(x.shape[0], -1, group)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((blocks * (1 / scale)).round().double() * scale.double()).view(x.shape)


def _stored_weight(layer: QuantizedLinear) -> torch.Tensor:
    """The (N, K) float64 weight of a layer's stored (portable) form, read independently of its layout."""
    state = layer.state_dict()
    levels = quantize.unpack_int4(state["qweight"], layer.group_size).double()
    levels = levels.view(layer.out_features, -1, layer.group_size)
    scale, zero = state["scale"].double()[..., None], state["zero"].double()[..., None]
    return ((levels - 8) * scale + zero).view(layer.out_features, layer.in_features)


def _layer(outputs: int, inputs: int, group: int, seed: int) -> QuantizedLinear:
    torch.manual_seed(seed)
    layer = QuantizedLinear.from_float(torch.randn(outputs, inputs) * 0.05, None, "int4", group)
    assert layer.layout == PANELS
    return layer


@pytest.mark.parametrize(
    "rows, outputs, inputs, group",
    [(1, 16, 128, 32), (3, 48, 384, 64), (4, 208, 2048, 128), (5, 64, 1408, 64), (40, 32, 256, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_is_the_product_it_defines(rows, outputs, inputs, group, dtype):
    layer = _layer(outputs, inputs, group, rows)
    x = torch.randn(rows, inputs).to(dtype)
    out = cpu.int4_linear(x, layer.packed, layer.scale_zero, group)
    assert out is not None and out.dtype == dtype and out.shape == (rows, outputs)
    weight = _stored_weight(layer)
    defined = _as_the_kernel_reads(x, group) @ weight.t()
    # fp32 across groups (and bf16 output: one rounding, 2^-8 relative)
    tolerance = (1e-5 if dtype == torch.float32 else 2**-8) * defined.abs().max()
    assert (out.double() - defined).abs().max() <= tolerance
    # against the exact product: the input's int8 rounding, at most half a step (amax / 254) a value
    exact = x.double() @ weight.t()
    assert (out.double() - exact).norm() / exact.norm() < 0.01


def test_int4_experts_are_the_swiglu_sum_they_define():
    hidden, inter, group, chosen, coefs = 256, 192, 64, [4, 0, 2], [0.5, 0.2, 0.3]
    gate_up = [_layer(2 * inter, hidden, group, 10 + e) for e in range(5)]
    down = [_layer(hidden, inter, group, 20 + e) for e in range(5)]
    x = torch.randn(1, hidden)
    out = cpu.int4_experts(
        x,
        [(gate_up[e].packed, gate_up[e].scale_zero) for e in chosen],
        [(down[e].packed, down[e].scale_zero) for e in chosen],
        coefs,
        group,
    )
    assert out is not None and out.shape == (1, hidden)
    defined = exact = 0
    for e, coef in zip(chosen, coefs, strict=True):
        g, u = (_as_the_kernel_reads(x, group) @ _stored_weight(gate_up[e]).t()).chunk(2, dim=-1)
        h = (F.silu(g) * u).float()  # the kernel quantizes the fp32 activation for the down product
        defined = defined + coef * (_as_the_kernel_reads(h, group) @ _stored_weight(down[e]).t())
        g, u = (x.double() @ _stored_weight(gate_up[e]).t()).chunk(2, dim=-1)
        exact = exact + coef * ((F.silu(g) * u) @ _stored_weight(down[e]).t())
    # a value of the fp32 activation on a rounding edge may land one level apart from the float64 reference
    assert (out.double() - defined).abs().max() <= 2**-8 * defined.abs().max()
    assert (out.double() - exact).norm() / exact.norm() < 0.02


def test_panels_hold_sixteen_rows_input_by_input():
    torch.manual_seed(0)
    levels = torch.randint(0, 16, (48, 128), dtype=torch.uint8)
    packed = to_panels(levels)
    assert packed.shape == (48, 64) and torch.equal(from_panels(packed), levels)
    # panel 1, inputs 24-31 (the fourth 64 bytes), output row 16 + 5, byte 2: inputs 26 (low) and 30 (high)
    byte = packed.view(3, 16, 16, 4)[1, 3, 5, 2].item()
    assert byte == levels[21, 26].item() | (levels[21, 30].item() << 4)


def test_quantized_int4_layers_take_the_kernel_where_it_applies():
    torch.manual_seed(0)
    layer = quantize_module(nn.Linear(256, 96, bias=True), "int4", 64)
    with torch.no_grad():
        for rows in (1, 4, 127):  # decode and short prefills: quantized.c, four rows a pass
            x = torch.randn(rows, 256)
            kernel = cpu.int4_linear(x, layer.packed, layer.scale_zero, 64)
            assert torch.equal(layer(x), kernel + layer.bias)
        x = torch.randn(128, 256)  # a prefill: a bf16 GEMM on the weight dequantized for the call
        assert torch.equal(layer(x), (x.bfloat16() @ layer.bf16_weight().t()).float() + layer.bias)
    # the dequantized weight, read back from the panels: (q - 8) * scale + zero, each step rounded to bf16
    state = layer.state_dict()
    levels = quantize.unpack_int4(state["qweight"], 64).bfloat16().view(96, -1, 64)
    expected = levels.sub(8).mul(state["scale"][..., None]).add(state["zero"][..., None]).view(96, 256)
    assert torch.equal(layer.bf16_weight(), expected)


def test_quantized_int4_experts_decode_through_one_kernel_call_a_token():
    torch.manual_seed(0)
    experts = QuantizedExperts.from_weights(
        4, lambda j: (torch.randn(2 * 128, 256), torch.randn(256, 128)), "int4", 32
    )
    x, indices, weights = torch.randn(2, 256), torch.tensor([[3, 1], [0, 3]]), torch.rand(2, 2)
    with torch.no_grad():
        out, counts = experts(x, indices, weights)
    for n in range(2):
        chosen = indices[n].tolist()
        pairs = [(experts.gate_up[e].packed, experts.gate_up[e].scale_zero) for e in chosen]
        downs = [(experts.down[e].packed, experts.down[e].scale_zero) for e in chosen]
        one_call = cpu.int4_experts(x[n : n + 1], pairs, downs, weights[n].tolist(), 32)
        assert torch.equal(out[n : n + 1], one_call)
    assert counts.tolist() == [1, 1, 0, 2]


def test_both_layouts_store_and_load_the_same_form(monkeypatch):
    """Without VNNI a layer takes torch's layout and kernel: the same stored tensors, loadable either way, the same
    weight applied."""
    torch.manual_seed(0)
    weight = torch.randn(80, 128)
    panels = QuantizedLinear.from_float(weight, None, "int4", 32)
    monkeypatch.setattr(quantize, "vnni", lambda: False)
    torch_layout = QuantizedLinear.from_float(weight, None, "int4", 32)
    assert (panels.layout, torch_layout.layout) == (PANELS, TORCH)
    saved = panels.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in torch_layout.state_dict().items())
    loaded = QuantizedLinear(128, 80, "int4", 32)
    loaded.load_state_dict(saved)
    assert loaded.layout == TORCH and torch.equal(loaded.packed, torch_layout.packed)
    assert torch.equal(loaded.dequantize(), panels.dequantize())
    x = torch.randn(2, 128)
    with torch.no_grad():  # torch's kernel on bf16 activations, mmwb's on int8 ones
        reference = x.double() @ _stored_weight(panels).t()
        for layer in (panels, loaded):
            assert (layer(x).double() - reference).abs().max() <= 2**-6 * reference.abs().max()


def test_inputs_with_nan_or_infinity_take_a_float_product():
    """The kernel's int8 rounding of the input cannot carry a NaN or an infinity: it declines, and the layer's bf16
    product carries them through."""
    layer = quantize_module(nn.Linear(256, 64), "int4", 64)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 256)
        x[0, 7] = bad
        assert cpu.int4_linear(x, layer.packed, layer.scale_zero, 64) is None
        with torch.no_grad():
            assert not torch.isfinite(layer(x)).all()


def test_layers_wider_than_the_kernel_keep_torchs_layout_and_kernel():
    """The kernel takes at most QUANTIZED_MAX_INPUTS inputs: a wider layer (DeepSeek-V3's 18432-input dense MLP)
    is laid out for torch's kernel, not dequantized on every call."""
    torch.manual_seed(0)
    wide = cpu.QUANTIZED_MAX_INPUTS + 64
    layer = QuantizedLinear.from_float(torch.randn(16, wide), None, "int4", 64)
    assert layer.layout == TORCH and layer.scale_zero.shape == (wide // 64, 16, 2)
    x = torch.randn(1, wide)
    with torch.no_grad():
        torch_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), layer.packed, 64, layer.scale_zero
        )
        assert torch.equal(layer(x), torch_kernel.float())


def test_experts_in_torchs_layout_decode_as_in_panels(monkeypatch):
    torch.manual_seed(0)
    weights = [(torch.randn(2 * 128, 256) * 0.05, torch.randn(256, 128) * 0.05) for _ in range(4)]
    panels = QuantizedExperts.from_weights(4, lambda j: weights[j], "int4", 64)
    monkeypatch.setattr(quantize, "vnni", lambda: False)
    torch_layout = QuantizedExperts.from_weights(4, lambda j: weights[j], "int4", 64)
    assert torch_layout.gate_up[0].layout == TORCH
    x, indices, weights_ = torch.randn(2, 256), torch.tensor([[3, 1], [0, 3]]), torch.rand(2, 2)
    with torch.no_grad():  # bf16 activations (torch's kernel) against int8 ones (mmwb's): within 2 %
        ours, _ = panels(x, indices, weights_)
        theirs, _ = torch_layout(x, indices, weights_)
    assert (ours - theirs).norm() / theirs.norm() < 0.02
