"""mmwb's int8 decode kernels (kernels/quantized.c through cpu.int8_linear / cpu.int8_experts): equal to the product
they define (the input quantized to int8 in blocks of 128, integer dot products, fp32 across blocks) up to fp32
summation order, within the stated error of the exact product, and taken by the quantized layers where they
apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmwb.models.decoder.kernels import cpu
from mmwb.models.quantize import QuantizedExperts, QuantizedLinear, quantize_int8, quantize_module

BLOCK = cpu.INT8_BLOCK


pytestmark = pytest.mark.skipif(
    not cpu.vnni(),
    reason="the int8 kernel needs a C compiler and AVX-512 VNNI",
)


def _as_the_kernel_reads(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as quantized.c quantizes it, back in float64: per block of 128 the scale amax / 127 and each value
    times 1 / scale rounded to nearest (even)."""
    blocks = x.float().view(x.shape[0], -1, BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = (blocks * (1 / scale)).round()
    return (levels.double() * scale.double()).view(x.shape)


def _weight(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return quantize_int8(torch.randn(rows, cols))


@pytest.mark.parametrize("rows, outputs, inputs", [(1, 7, 128), (2, 130, 384), (3, 64, 2048), (4, 517, 1408)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_product_it_defines(rows, outputs, inputs, dtype):
    q, scale = _weight(outputs, inputs, rows)
    x = torch.randn(rows, inputs).to(dtype)
    out = cpu.int8_linear(x, q, scale)
    assert out is not None and out.dtype == dtype and out.shape == (rows, outputs)
    exact_input = x.double() @ (q.double() * scale.double()[:, None]).t()
    defined = _as_the_kernel_reads(x) @ (q.double() * scale.double()[:, None]).t()
    # fp32 across blocks (and bf16 output: one rounding, 2^-8 relative)
    tolerance = (1e-5 if dtype == torch.float32 else 2**-8) * defined.abs().max()
    assert (out.double() - defined).abs().max() <= tolerance
    # against the exact product: the input's int8 rounding, at most half a step (amax / 254) a value
    error = (out.double() - exact_input).norm() / exact_input.norm()
    assert error < 0.01


def test_int8_experts_are_the_swiglu_sum_they_define():
    hidden, inter, chosen, coefs = 256, 384, [4, 0, 2], [0.5, 0.2, 0.3]
    gate_up = [_weight(2 * inter, hidden, 10 + e) for e in range(5)]
    down = [_weight(hidden, inter, 20 + e) for e in range(5)]
    x = torch.randn(1, hidden)
    out = cpu.int8_experts(x, [gate_up[e] for e in chosen], [down[e] for e in chosen], coefs)
    assert out is not None

    def weight(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return pair[0].double() * pair[1].double()[:, None]

    defined = exact = 0
    for e, coef in zip(chosen, coefs, strict=True):
        g, u = (_as_the_kernel_reads(x) @ weight(gate_up[e]).t()).chunk(2, dim=-1)
        h = (F.silu(g) * u).float()  # the kernel quantizes the fp32 activation for the down product
        defined = defined + coef * (_as_the_kernel_reads(h) @ weight(down[e]).t())
        g, u = (x.double() @ weight(gate_up[e]).t()).chunk(2, dim=-1)
        exact = exact + coef * ((F.silu(g) * u) @ weight(down[e]).t())
    # the down product's input is the kernel's own fp32 activation rounded to int8: a value on a rounding edge may
    # land one level (half a step of its block) apart from the float64 reference
    assert (out.double() - defined).abs().max() <= 2**-8 * defined.abs().max()
    assert (out.double() - exact).norm() / exact.norm() < 0.02


def test_quantized_layers_take_the_kernel_where_it_applies():
    torch.manual_seed(0)
    layer = quantize_module(nn.Linear(256, 96, bias=True), "int8")
    assert isinstance(layer, QuantizedLinear)
    with torch.no_grad():
        for rows in (1, 4):  # decode: quantized.c
            x = torch.randn(rows, 256)
            assert torch.equal(layer(x), cpu.int8_linear(x, layer.qweight, layer.scale) + layer.bias)
        x = torch.randn(5, 256)  # more rows: torch's kernel on bf16 activations
        torch_kernel = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.qweight, layer.scale_compute)
        assert torch.equal(layer(x), torch_kernel.float() + layer.bias)
    assert cpu.int8_linear(torch.randn(1, 200), *_weight(8, 200, 0)) is None  # not whole blocks of 128
    assert cpu.int8_linear(torch.randn(5, 128), *_weight(8, 128, 0)) is None  # more than MAX_ROWS rows


def test_quantized_experts_decode_through_one_kernel_call_a_token():
    torch.manual_seed(0)
    experts = QuantizedExperts.from_weights(
        4, lambda j: (torch.randn(2 * 128, 256), torch.randn(256, 128)), "int8"
    )
    x, indices, weights = torch.randn(2, 256), torch.tensor([[3, 1], [0, 3]]), torch.rand(2, 2)
    with torch.no_grad():
        out, counts = experts(x, indices, weights)
    for n in range(2):
        chosen = indices[n].tolist()
        pairs = [(experts.gate_up[e].qweight, experts.gate_up[e].scale) for e in chosen]
        downs = [(experts.down[e].qweight, experts.down[e].scale) for e in chosen]
        assert torch.equal(out[n : n + 1], cpu.int8_experts(x[n : n + 1], pairs, downs, weights[n].tolist()))
    assert counts.tolist() == [1, 1, 0, 2]


def test_inputs_with_nan_or_infinity_go_to_torchs_kernel():
    """The kernel's int8 rounding of the input cannot carry a NaN or an infinity: it declines, and the layer's
    product (torch's kernel) carries them through."""
    layer = quantize_module(nn.Linear(256, 64), "int8")
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, 256)
        x[0, 7] = bad
        assert cpu.int8_linear(x, layer.qweight, layer.scale) is None
        with torch.no_grad():
            assert not torch.isfinite(layer(x)).all()
    tiny = torch.full((1, 256), 1e-38)  # below the kernel's floor: a block of zeros
    assert torch.equal(cpu.int8_linear(tiny, layer.qweight, layer.scale), torch.zeros(1, 64))
