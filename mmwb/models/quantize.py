"""Weight-only quantization: every linear layer, the stacked MoE experts and a decoder's token table of a model in
int8 or int4.

``int8``: one symmetric scale per output channel, ``w ≈ q * scale`` with ``q`` in [-127, 127].
``int4``: groups of ``group_size`` inputs per output channel, asymmetric: levels ``q`` in [0, 15] (the group's
range mapped onto the 16 levels, rounded to nearest), applied as ``w ≈ (q - 8) * scale + zero`` with ``scale`` and
``zero`` in bf16, the numbers torch's kernel reads.
mmwb decoders' token tables are int8 rows in both modes (``QuantizedEmbedding``); towers' embeddings, norms,
convolutions and routers stay as they are.

Products, on CPUs with AVX-512 VNNI: mmwb's kernels (kernels/quantized.c: the input quantized to int8 per block,
VNNI dot products on the weight bytes; a token's chosen experts in one call). int8 up to 4 rows (decode): 25 GB/s
on a cold 2816 x 2048 expert here where torch's ``_weight_int8pack_mm`` reached 13-17; int4 up to 127 rows, its
weight laid out in panels of 16 rows (``to_panels``) so that a product streams each panel once with no horizontal
sums: 25 GB/s on a token's six cold Kimi-VL-sized experts where torch's ``_weight_int4pack_mm_for_cpu`` (torch's
CPU packing, a call per product) reached 13. Elsewhere torch's own kernels (``_weight_int8pack_mm``, and for int4
on CPUs without VNNI, where int4 weights take torch's layout, ``_weight_int4pack_mm_for_cpu``), which read the
packed weights directly and take bf16 activations (with fp32 ones the int8 kernel runs at 0.4x an fp32 GEMV,
measured in issue 20), so activations are cast to bf16 for the product and the result back to the input's dtype.

Memory: a layer holds one copy of its weight, in the layout of the kernel that runs it (int4: panels, or torch's
CPU packing, half a byte a weight; panels for layers of at most 16384 inputs, the kernel's widest). Its state dict
is the portable form (int4: ``pack_int4``'s order), made when saved and turned back into the kernel's layout when
loaded. Weights are quantized a few million at a time, so quantizing never needs more than a few MB beyond the
float weight it reads (``from_float``), which is what lets a loader quantize tensor by tensor while it reads a
checkpoint (mmwb.models.decoder.checkpoint).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmwb.errors import MmwbConfigError
from mmwb.models.decoder.decode_plan import Operand
from mmwb.models.decoder.embedding import TokenEmbedding
from mmwb.models.decoder.kernels.cpu import (
    INT4_MAX_ROWS,
    INT4_PANEL,
    QUANTIZED_MAX_INPUTS,
    int4_experts,
    int4_linear,
    int8_experts,
    int8_linear,
    vnni,
)
from mmwb.models.decoder.linear import Linear
from mmwb.models.decoder.moe import Experts

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# from this many rows on, product() dequantizes the weight for a bf16 GEMM
GEMM_ROWS = {"int8": 32, "int4": INT4_MAX_ROWS + 1}
INT8_KERNEL_INPUTS = 16  # _weight_int8pack_mm is right only for input widths that are a multiple of this
FEW_TOKENS = 4  # QuantizedExperts: up to this many tokens (decode) take the host-side path
CHUNK_WEIGHTS = 1 << 20  # weights quantized (or re-laid out) per step: a 4 MB fp32 temporary
_BLOCK = 64  # torch's CPU int4 packing lays out the outputs in blocks of 64 (see to_torch_int4)
PANELS, TORCH = "panels", "torch"  # int4 layouts: mmwb's kernel's (to_panels), torch's (to_torch_int4)
_COMPUTE = torch.bfloat16
_FLOAT_LINEARS = (nn.Linear, Linear)  # exactly these: MultiheadAttention reads its out_proj, peft its factors


@dataclass(frozen=True)
class Quantization:
    """What a loader is asked for: ``mode`` int8/int4 and the int4 ``group_size``."""

    mode: str
    group_size: int = 64


# --- formats ---


def _row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of about CHUNK_WEIGHTS weights, every start a multiple of _BLOCK."""
    step = max(_BLOCK, CHUNK_WEIGHTS // max(cols, 1) // _BLOCK * _BLOCK)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scale (N,) fp32."""
    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    for a, b in _row_chunks(rows, cols):
        w = weight[a:b].detach().to("cpu", torch.float32, copy=True)  # the one temporary, worked in place
        scale[a:b] = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[a:b] = w.div_(scale[a:b, None]).round_().clamp_(-127, 127)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> levels (N, K) uint8 in [0, 15], scale and low (N, K / group_size) fp32 (one chunk's worth:
    ``QuantizedLinear.from_float`` calls it a few million weights at a time)."""
    rows, cols = weight.shape
    _check_int4_shape(weight.shape, group_size)
    groups = weight.detach().to("cpu", torch.float32, copy=True).reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low).clamp(min=1e-12) / 15
    levels = groups.sub_(low[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return levels.view(rows, cols), scale, low


def _check_int4_shape(shape: torch.Size | tuple[int, ...], group_size: int) -> None:
    rows, cols = shape
    if group_size not in GROUP_SIZES or cols % group_size or rows % 16:
        raise MmwbConfigError(
            f"int4 quantization: a layer of {rows} outputs x {cols} inputs cannot be packed (the kernel wants the "
            f"outputs in blocks of 16 and the inputs in groups of {group_size}, one of {GROUP_SIZES}); "
            "use int8 or another group_size"
        )


def pack_int4(levels: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) levels -> (N, K / 2) bytes, mmwb's portable order (the stored ``qweight``): byte u of a group holds
    input u in its low nibble and input u + group_size / 2 in its high one."""
    rows = levels.shape[0]
    first, second = levels.view(rows, -1, group_size).chunk(2, dim=-1)
    return (first | (second << 4)).reshape(rows, -1).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """``pack_int4``'s bytes back to (N, K) levels."""
    rows = packed.shape[0]
    groups = packed.view(rows, -1, group_size // 2)
    return torch.cat([groups & 15, groups >> 4], dim=-1).reshape(rows, -1)


def to_torch_int4(levels: torch.Tensor) -> torch.Tensor:
    """(N, K) levels -> (N, K / 2) bytes in the layout of ``torch.ops.aten._convert_weight_to_int4pack_for_cpu``
    (equal to it, tested), without its int32 input: outputs in blocks of 64, each block stored input by input
    (K, 32) with output j in the low nibble and j + 32 in the high one; a last block of r < 64 outputs the same
    way with outputs 2j and 2j + 1. A row range starting at a multiple of 64 maps onto the same rows of the
    result, so large weights are laid out in chunks."""
    rows, cols = levels.shape
    full = rows // _BLOCK * _BLOCK
    parts = []
    if full:
        blocks = levels[:full].view(full // _BLOCK, _BLOCK, cols).transpose(1, 2)  # (blocks, K, 64)
        parts.append((blocks[..., : _BLOCK // 2] | (blocks[..., _BLOCK // 2 :] << 4)).reshape(-1))
    if rows > full:
        tail = levels[full:].t()  # (K, r)
        parts.append((tail[:, 0::2] | (tail[:, 1::2] << 4)).reshape(-1))
    return torch.cat(parts).view(rows, cols // 2)


def from_torch_int4(packed: torch.Tensor) -> torch.Tensor:
    """``to_torch_int4``'s bytes (N, K / 2) back to (N, K) levels."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    full = rows // _BLOCK * _BLOCK
    flat = packed.reshape(-1)
    parts = []
    if full:
        blocks = flat[: full * cols // 2].view(full // _BLOCK, cols, _BLOCK // 2)
        parts.append(torch.cat([blocks & 15, blocks >> 4], dim=2).transpose(1, 2).reshape(full, cols))
    if rows > full:
        tail = flat[full * cols // 2 :].view(cols, (rows - full) // 2)
        parts.append(torch.stack([tail & 15, tail >> 4], dim=2).reshape(cols, rows - full).t())
    return torch.cat(parts)


def to_panels(levels: torch.Tensor) -> torch.Tensor:
    """(N, K) levels -> (N, K / 2) bytes in the panels of mmwb's int4 kernel (kernels/quantized.c): 16 outputs a
    panel, each panel stored input by input, 64 bytes for every 8 inputs: output r's 4 bytes hold inputs 0-3 in
    their low nibbles and 4-7 in the high ones. Rows of a range starting at a multiple of 16 map onto the same rows
    of the result."""
    rows, cols = levels.shape
    octets = levels.view(rows // INT4_PANEL, INT4_PANEL, cols // 8, 2, 4)
    return (octets[..., 0, :] | (octets[..., 1, :] << 4)).transpose(1, 2).reshape(rows, cols // 2)


def from_panels(packed: torch.Tensor) -> torch.Tensor:
    """``to_panels``' bytes (N, K / 2) back to (N, K) levels."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    loads = packed.reshape(rows // INT4_PANEL, cols // 8, INT4_PANEL, 4)
    return torch.stack([loads & 15, loads >> 4], dim=-2).transpose(1, 2).reshape(rows, cols)


def to_panel_table(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale and zero (N, groups) -> the kernel's (N / 16, groups, 2, 16) table: a panel's 16 scales, then its 16
    zeros, group by group."""
    rows, groups = scale.shape
    table = torch.stack([scale, zero], dim=-1).view(rows // INT4_PANEL, INT4_PANEL, groups, 2)
    return table.permute(0, 2, 3, 1)


@functools.cache
def _torch_kernel(name: str):  # noqa: ANN202 (an OpOverload)
    """torch's weight-only kernel ``name``, resolved once (a decode token calls them ~500 times), and only when used:
    older torch releases lack the CPU int4 one."""
    return getattr(torch.ops.aten, name).default


# --- modules ---


class _QuantizedBuffers(nn.Module):
    """A module whose buffers hold a quantized form: a move (``_apply``) takes them along, a cast
    (``model.to(torch.float16)``) leaves them as they are; ``_applied(fn)`` then does what a subclass needs."""

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._applied(fn)
        return self

    def _applied(self, fn) -> None:  # noqa: ANN001 (_apply's fn)
        pass


class QuantizedLinear(_QuantizedBuffers):
    """``nn.Linear`` with an int8 or int4 weight (bias kept in float); ``dequantize()`` gives the weight it applies.

    Made empty (for a state dict to fill) or by ``from_float``. Buffers: int8 ``qweight`` (N, K), ``scale`` (N,)
    fp32 (what mmwb's int8 kernel reads) and its bf16 copy for torch's; int4 ``packed`` (N, K / 2) and a bf16
    scale-and-zero table in the ``layout`` of the kernel that runs it (``PANELS``: mmwb's, with a (N / 16, groups,
    2, 16) table; ``TORCH``: torch's CPU packing, a (groups, N, 2) table), stored as ``qweight`` (portable order),
    ``scale`` and ``zero`` (N, groups) whatever the layout.
    """

    def __init__(
        self, in_features: int, out_features: int, mode: str, group_size: int = 64, bias: bool = False
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise MmwbConfigError(f"quantize: {mode!r} is not one of {', '.join(MODES)}")
        if mode == "int4":
            _check_int4_shape((out_features, in_features), group_size)
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size = mode, group_size
        # see derived(); emptied when the weight changes
        self._derived: dict[object, torch.Tensor | tuple] = {}
        # storage is allocated, not written: from_float or a state dict fills it (untouched pages cost no memory)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(out_features))
            self.register_buffer("scale_compute", torch.empty(out_features, dtype=_COMPUTE), persistent=False)
        else:
            groups = in_features // group_size
            # panels where mmwb's kernel runs them; wider layers (a 18432-input MLP) keep torch's kernel
            self.layout = PANELS if vnni() and in_features <= QUANTIZED_MAX_INPUTS else TORCH
            table = (
                (out_features // INT4_PANEL, groups, 2, INT4_PANEL)
                if self.layout == PANELS
                else (groups, out_features, 2)
            )
            self.register_buffer(
                "packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8), persistent=False
            )
            self.register_buffer("scale_zero", torch.empty(table, dtype=_COMPUTE), persistent=False)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 64
    ) -> QuantizedLinear:
        """A layer applying ``weight`` (N, K) rounded to ``mode`` (plus ``bias``), quantized chunk by chunk.
        ``weight`` may be anything with a ``shape`` whose ``[a:b]`` gives those rows as a tensor: a loader hands a
        checkpoint matrix that is read a few rows at a time."""
        rows, cols = weight.shape
        layer = cls(cols, rows, mode, group_size, bias=bias is not None)
        if bias is not None:
            layer.bias.data = bias.detach().to("cpu", copy=True)
        if mode == "int8":
            layer.qweight, layer.scale = quantize_int8(weight)
            layer.scale_compute = layer.scale.to(_COMPUTE)
            return layer
        for a, b in _row_chunks(rows, cols):
            levels, scale, low = quantize_int4(weight[a:b], group_size)
            layer.packed[a:b] = layer._lay_out(levels)
            layer._put_table(a, b, scale, low + 8 * scale)
        return layer

    def _lay_out(self, levels: torch.Tensor) -> torch.Tensor:
        """int4 levels (rows, K) -> those rows' bytes in this layer's layout."""
        return to_panels(levels) if self.layout == PANELS else to_torch_int4(levels)

    def _levels(self, packed: torch.Tensor) -> torch.Tensor:
        """Rows of ``packed`` back to their (rows, K) levels."""
        return from_panels(packed) if self.layout == PANELS else from_torch_int4(packed)

    def _put_table(self, start: int, stop: int, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Rows [start, stop)'s scales and zeros (rows, groups) into the table, rounded to bf16."""
        scale, zero = scale.to(_COMPUTE), zero.to(_COMPUTE)
        if self.layout == PANELS:
            self.scale_zero[start // INT4_PANEL : stop // INT4_PANEL] = to_panel_table(scale, zero)
        else:
            self.scale_zero[:, start:stop] = torch.stack([scale.t(), zero.t()], dim=-1)

    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bf16 scales and zeros, (N, groups) each."""
        if self.layout == PANELS:
            table = self.scale_zero.permute(0, 3, 1, 2).reshape(self.out_features, -1, 2)
            return table[..., 0], table[..., 1]
        return self.scale_zero[..., 0].t(), self.scale_zero[..., 1].t()

    def derived(self, key: object, make: Callable[[], torch.Tensor | tuple]) -> torch.Tensor | tuple:
        """``make()``'s result, made once per ``key`` and kept until this layer's weight is loaded again or cast
        or moved: what a caller computes from the weight (MLA's absorbed kv_b) without going stale."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001 (nn.Module's signature)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.mode == "int4":
            destination[prefix + "qweight"] = self.portable_qweight()
            scale, zero = self._table()
            destination[prefix + "scale"] = scale.contiguous()
            destination[prefix + "zero"] = zero.contiguous()

    def _load_from_state_dict(  # noqa: PLR0913 (nn.Module's signature)
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._derived.clear()
        if self.mode == "int8":
            self.scale_compute = self.scale.to(_COMPUTE)
            return
        if prefix + "low" in state_dict:  # the first int4 format (fp32 scale and low): no longer read
            error_msgs.append(
                f"{prefix}: int4 tensors in an earlier format of mmwb (scale and low); export the model again"
            )
            unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(prefix)]
            return
        groups = self.in_features // self.group_size
        stored = {
            "qweight": self.packed.shape,
            "scale": (self.out_features, groups),
            "zero": (self.out_features, groups),
        }
        for name in stored:  # nn.Module does not know these names: they are this method's
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)
        missing = [prefix + name for name in stored if prefix + name not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        misshaped = [
            f"size mismatch for {prefix + name}: stored {tuple(state_dict[prefix + name].shape)}, "
            f"the layer takes {tuple(shape)}"
            for name, shape in stored.items()
            if tuple(state_dict[prefix + name].shape) != tuple(shape)
        ]
        if misshaped:
            error_msgs.extend(misshaped)
            return
        qweight = state_dict[prefix + "qweight"]
        for a, b in _row_chunks(self.out_features, self.in_features):
            self.packed[a:b] = self._lay_out(
                unpack_int4(qweight[a:b].to(self.packed.device), self.group_size)
            )
        self._put_table(0, self.out_features, state_dict[prefix + "scale"], state_dict[prefix + "zero"])

    def _applied(self, fn) -> None:  # noqa: ANN001 (_apply's fn)
        """What was derived from the weight is made again from the moved one."""
        self._derived.clear()

    def portable_qweight(self) -> torch.Tensor:
        """int4: the stored (N, K / 2) bytes in ``pack_int4``'s order, made from the kernel's layout."""
        out = torch.empty_like(self.packed)
        for a, b in _row_chunks(self.out_features, self.in_features):
            out[a:b] = pack_int4(self._levels(self.packed[a:b]), self.group_size)
        return out

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight this layer applies (int8: torch's kernel applies the scale rounded to bf16)."""
        if self.mode == "int8":
            return self.qweight.float() * self.scale[:, None]
        levels = self._levels(self.packed).float().view(self.out_features, -1, self.group_size)
        scale, zero = (t.float() for t in self._table())  # (N, groups) each
        return ((levels - 8) * scale[..., None] + zero[..., None]).view(self.out_features, self.in_features)

    def bf16_weight(self) -> torch.Tensor:
        """The (N, K) weight in bf16, made from the stored form (int8: q * scale; int4: (q - 8) * scale + zero,
        each rounded to bf16)."""
        if self.mode == "int8":
            return self.qweight.to(_COMPUTE).mul_(self.scale_compute[:, None])
        levels = self._levels(self.packed).to(_COMPUTE).view(self.out_features, -1, self.group_size)
        scale, zero = self._table()
        return levels.sub_(8).mul_(scale[..., None]).add_(zero[..., None]).view(self.out_features, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = self._vnni_product(flat)
        if out is None:  # the kernel declined: not again in product()
            out = self.product(flat.to(_COMPUTE).contiguous(), kernel=False).to(x.dtype)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _vnni_product(self, flat: torch.Tensor) -> torch.Tensor | None:
        """flat (M, K) fp32 or bf16 -> (M, N) in its dtype from mmwb's kernels, or None where they do not apply
        (more rows, no VNNI, a NaN in the input)."""
        if self.mode == "int8":
            return int8_linear(flat, self.qweight, self.scale)
        if self.layout == PANELS and flat.shape[0] <= INT4_MAX_ROWS:
            return int4_linear(flat, self.packed, self.scale_zero, self.group_size)
        return None

    def product(self, flat: torch.Tensor, kernel: bool = True) -> torch.Tensor:
        """flat (M, K) contiguous bf16 -> (M, N) bf16, without the bias: the kernel call alone, or for many rows
        (a prefill) a bf16 GEMM on the weight dequantized for the call (torch's kernels take one row at a time:
        ~73 us a row on a 2816 x 2048 expert, where dequantizing costs 0.9 ms (int8) / 5.8 ms (int4) once and
        the GEMM ~30 us a row). That bf16 weight exists for the call only (for an LM head asked for every
        position's logits: 2 bytes a weight, for a moment). int4 panels: mmwb's kernel (``kernel=False``: the
        caller already saw it decline), else the GEMM, whatever the rows."""
        if flat.shape[0] >= GEMM_ROWS[self.mode]:
            return flat @ self.bf16_weight().t()
        if self.mode == "int4" and self.layout == PANELS:  # no torch kernel reads panels
            out = self._vnni_product(flat) if kernel else None
            return out if out is not None else flat @ self.bf16_weight().t()
        if self.mode == "int8" and self.in_features % INT8_KERNEL_INPUTS:
            # torch's kernel reads inputs 16 at a time (other widths give wrong sums, or crash): the few layers of
            # other widths (small latent ranks) multiply the levels, exact in bf16, and scale the result
            return (flat @ self.qweight.to(_COMPUTE).t()) * self.scale_compute
        if self.mode == "int8":
            return _torch_kernel("_weight_int8pack_mm")(flat, self.qweight, self.scale_compute)
        return _torch_kernel("_weight_int4pack_mm_for_cpu")(
            flat, self.packed, self.group_size, self.scale_zero
        )

    def kernel_bytes(self) -> int:
        """Bytes a decode product reads: the weight (1 or 1/2 byte each) and its scales (int8: mmwb's kernel, fp32;
        int4: bf16 scales and zeros, in either layout)."""
        int8 = self.mode == "int8"
        weight, scales = (self.qweight, self.scale) if int8 else (self.packed, self.scale_zero)
        return weight.numel() * weight.element_size() + scales.numel() * scales.element_size()

    def kernel_operand(self) -> Operand | None:
        """The weight as mmwb's kernels read it (a decode plan's, mmwb.models.decoder.decode_plan), or None where
        this layer runs torch's int4 kernel."""
        if self.mode == "int8":
            return Operand("int8", self.qweight, self.scale)
        if self.layout == PANELS:
            return Operand("int4", self.packed, self.scale_zero, self.group_size)
        return None

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}, layout={self.layout}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}"


class QuantizedEmbedding(_QuantizedBuffers):
    """A decoder's token table (``TokenEmbedding``) in int8, one symmetric scale a row (``quantize_int8``'s rows): a
    lookup widens the rows it reads to ``dtype``, the table's float dtype. Half the bytes of a bf16 table (Kimi-VL's
    163840 x 2048: 0.34 GB less), in any mode: the table is read a row a token, so int4 would save little time and
    its rounding would touch every input the model sees."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(num_embeddings))

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: torch.dtype) -> QuantizedEmbedding:
        """``weight`` (V, D), or anything whose ``[a:b]`` gives those rows (a loader's checkpoint reader)."""
        layer = cls(*weight.shape, dtype=dtype)
        layer.qweight, layer.scale = quantize_int8(weight)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"token id out of range for a table of {self.num_embeddings} rows"
            )  # as nn.Embedding
        return (self.qweight[ids].float() * self.scale[ids, None]).to(self.dtype)

    def _load_from_state_dict(  # noqa: PLR0913 (nn.Module's signature)
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """A float ``weight`` (a quantized export made before tables were quantized) is quantized as it loads."""
        if prefix + "weight" in state_dict and prefix + "qweight" not in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "qweight"], state_dict[prefix + "scale"] = quantize_int8(
                state_dict.pop(prefix + "weight")
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def kernel_operand(self) -> Operand:
        """The int8 rows and their scales (a decode plan looks a token's row up in them)."""
        return Operand("int8", self.qweight, self.scale)

    def _applied(self, fn) -> None:  # noqa: ANN001 (_apply's fn)
        """A cast (``model.to(torch.bfloat16)``) changes what lookups return."""
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, mode=int8, dtype={self.dtype}"


class QuantizedExperts(nn.Module):
    """mmwb's stacked SwiGLU experts (gate_up (E, 2I, C), down (E, C, I)) as one quantized pair per expert; same
    call and result as ``Experts`` (only the experts a token chose run, each on its own tokens). Made empty or
    by ``from_weights``, one expert at a time."""

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, mode: str, group_size: int = 64
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up = nn.ModuleList(
            QuantizedLinear(hidden, 2 * intermediate, mode, group_size) for _ in range(num_experts)
        )
        self.down = nn.ModuleList(
            QuantizedLinear(intermediate, hidden, mode, group_size) for _ in range(num_experts)
        )

    @classmethod
    def from_weights(
        cls,
        num_experts: int,
        expert: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        mode: str,
        group_size: int = 64,
    ) -> QuantizedExperts:
        """``expert(j)`` gives expert j's gate_up (2I, C) and down (C, I); each is quantized as it comes."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.num_experts = num_experts
        layer.gate_up, layer.down = nn.ModuleList(), nn.ModuleList()
        for j in range(num_experts):
            gate_up, down = expert(j)
            layer.gate_up.append(QuantizedLinear.from_float(gate_up, None, mode, group_size))
            layer.down.append(QuantizedLinear.from_float(down, None, mode, group_size))
        return layer

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C), indices/weights (N, k) -> weighted sum of expert outputs (N, C), counts (E,)."""
        tokens, top_k = indices.shape
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        if tokens <= FEW_TOKENS:
            return self._few_tokens(x, indices, weights), counts
        out = torch.zeros_like(x, dtype=torch.float32)
        for expert in counts.nonzero().flatten().tolist():
            rows, slots = (indices == expert).nonzero(as_tuple=True)
            gate, up = self.gate_up[expert](x[rows]).float().chunk(2, dim=-1)
            y = self.down[expert](F.silu(gate) * up).float()  # (n_e, C)
            out.index_add_(0, rows, y * weights[rows, slots, None].float())
        return out.to(x.dtype), counts

    def _few_tokens(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode: each token's chosen experts read from the host (free on a CPU): in one call a token of mmwb's
        kernels (quantized.c) where they apply, else in bf16 from kernel to kernel; a handful of ops per expert
        instead of the grouped path's bookkeeping."""
        chosen, coefs = indices.tolist(), weights.tolist()
        rows = [
            self._one_call(x[n : n + 1].contiguous(), experts, coefs[n]) for n, experts in enumerate(chosen)
        ]
        if all(row is not None for row in rows):
            return torch.cat(rows)
        rows = []
        flat = x.to(_COMPUTE)
        for n, experts in enumerate(chosen):
            xn, total = flat[n : n + 1], x.new_zeros(1, x.shape[-1], dtype=torch.float32)
            for expert, coef in zip(experts, coefs[n], strict=True):
                gate, up = self.gate_up[expert].product(xn).chunk(2, dim=-1)  # one row: each half contiguous
                total.add_(self.down[expert].product(F.silu(gate) * up), alpha=coef)  # bf16 into fp32
            rows.append(total)
        return torch.cat(rows).to(x.dtype)

    def kernel_operands(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """The experts' gate_up and down layers (a decode plan reads their ``kernel_operand``)."""
        return self.gate_up, self.down

    def _one_call(self, x: torch.Tensor, experts: list[int], coefs: list[float]) -> torch.Tensor | None:
        """One token's chosen experts in one call of mmwb's kernels, or None where they do not apply."""
        first = self.gate_up[0]
        if first.mode == "int8":
            gate_up = [(self.gate_up[e].qweight, self.gate_up[e].scale) for e in experts]
            down = [(self.down[e].qweight, self.down[e].scale) for e in experts]
            return int8_experts(x, gate_up, down, coefs)
        if first.layout == PANELS:
            gate_up = [(self.gate_up[e].packed, self.gate_up[e].scale_zero) for e in experts]
            down = [(self.down[e].packed, self.down[e].scale_zero) for e in experts]
            return int4_experts(x, gate_up, down, coefs, first.group_size)
        return None


def quantize_module(module: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """The quantized form of one float linear layer, ``Experts`` or token table (its values rounded, its storage
    new)."""
    if isinstance(module, TokenEmbedding):
        return QuantizedEmbedding.from_float(module.weight, module.weight.dtype)
    if isinstance(module, Experts):
        gate_up, down = module.gate_up_proj, module.down_proj
        return QuantizedExperts.from_weights(
            gate_up.shape[0], lambda j: (gate_up[j], down[j]), mode, group_size
        )
    return QuantizedLinear.from_float(module.weight, module.bias, mode, group_size)


def empty_quantized(module: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """A quantized layer of ``module``'s shape with nothing in it yet (a state dict fills it); reads no values, so
    ``module`` may be on the meta device."""
    if isinstance(module, TokenEmbedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, module.weight.dtype)
    if isinstance(module, Experts):
        experts, double_intermediate, hidden = module.gate_up_proj.shape
        return QuantizedExperts(experts, hidden, double_intermediate // 2, mode, group_size)
    return QuantizedLinear(
        module.in_features, module.out_features, mode, group_size, bias=module.bias is not None
    )


def quantization_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The float layers ``quantize_model`` replaces, by their names in ``model``: every ``nn.Linear`` (mmwb's,
    transformers', towers', projectors'), mmwb's stacked experts and mmwb decoders' token tables
    (``TokenEmbedding``, into ``QuantizedEmbedding``), not those inside a peft adapter (merge adapters before
    quantizing)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name
        and (type(module) in _FLOAT_LINEARS or isinstance(module, Experts | TokenEmbedding))
        and not _in_adapter(model, name)
    }


def _in_adapter(model: nn.Module, name: str) -> bool:
    parent_name = name.rpartition(".")[0]
    return hasattr(model.get_submodule(parent_name), "base_layer")


def check_shapes(targets: dict[str, nn.Module], mode: str, group_size: int) -> None:
    """int4: every layer's shape checked before anything changes (a half-quantized model is no use)."""
    if mode != "int4":
        return
    for module in targets.values():
        if isinstance(module, TokenEmbedding):
            continue  # int8 in every mode
        if isinstance(module, Experts):
            shapes = [module.gate_up_proj.shape[1:], module.down_proj.shape[1:]]
        else:
            shapes = [(module.out_features, module.in_features)]
        for shape in shapes:
            _check_int4_shape(tuple(shape), group_size)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def quantization_settings(model: nn.Module) -> dict[str, object] | None:
    """``{"mode", "group_size"}`` of a model ``quantize_model`` changed (what its config.json records), else None."""
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    return None if layer is None else {"mode": layer.mode, "group_size": layer.group_size}


def check_request(mode: str, group_size: int, device: torch.device | str | None) -> None:
    """A clear error for a mode, group size or device these kernels do not serve."""
    if mode not in MODES:
        raise MmwbConfigError(f"quantize: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise MmwbConfigError(f"quantize int4: group_size {group_size} is not one of {GROUP_SIZES}")
    if device is not None and torch.device(device).type != "cpu":
        raise MmwbConfigError(
            f"quantize {mode}: runs on the CPU (mmwb's and torch's CPU kernels), not on {device}"
        )


def quantize_model(model: nn.Module, mode: str, group_size: int = 64, empty: bool = False) -> nn.Module:
    """Replace every float layer of ``quantization_targets`` by its quantized form, in place, one at a time (each
    float layer is freed as its quantized form takes its place); ``empty``: by empty quantized layers of the same
    shapes, for a stored quantized state dict to fill (the model may then be on the meta device: materialise it
    with ``to_empty(device="cpu")`` before loading, as loaders copy into the layers' buffers). CPU only (the
    kernels are CPU kernels); returns ``model``."""
    device = next((p.device for p in model.parameters()), None)
    check_request(mode, group_size, None if empty and device == torch.device("meta") else device)
    targets = quantization_targets(model)
    check_shapes(targets, mode, group_size)
    make = empty_quantized if empty else quantize_module
    while targets:
        name, module = targets.popitem()
        replace_module(model, name, make(module, mode, group_size))
        del module
    return model
