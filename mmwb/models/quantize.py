"""Weight-only quantization of a loaded model: every linear layer and the stacked MoE experts in int8 or int4.

``int8``: one symmetric scale per output channel, ``w ≈ q * scale`` with ``q`` in [-127, 127].
``int4``: groups of ``group_size`` inputs per output channel, asymmetric, ``w ≈ q * scale + low`` with ``q`` in
[0, 15] (``low`` the group's minimum, so a group's range maps onto the 16 levels exactly).

The products run in torch's own kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), which read
the packed weights directly. Both take bf16 activations (with fp32 ones the int8 kernel runs at 0.4x an fp32
GEMV, measured in issue 20), so activations are cast to bf16 for the product and the result back to the input's
dtype. At batch 1 on a 4096 x 4096 weight they ran 6.0x (int8) and about 7x (int4) mmwb's fp32 streaming kernel
here; a first C kernel of ours from the same bytes reached 3.9x / 2.2x and was dropped. Embeddings, norms,
convolutions and routers stay as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmwb.errors import MmwbConfigError
from mmwb.models.decoder.linear import Linear
from mmwb.models.decoder.moe import Experts

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
FEW_TOKENS = 4  # QuantizedExperts: up to this many tokens (decode) take the host-side path
_COMPUTE = torch.bfloat16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scale (N,) fp32."""
    scale = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> levels (N, K) uint8 in [0, 15], scale and low (N, K / group_size) fp32."""
    rows, cols = weight.shape
    _check_int4_shape(weight.shape, group_size)
    groups = weight.detach().float().contiguous().view(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low).clamp(min=1e-12) / 15
    levels = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return levels.view(rows, cols), scale, low


def _check_int4_shape(shape: torch.Size, group_size: int) -> None:
    rows, cols = shape
    if group_size not in GROUP_SIZES or cols % group_size or rows % 16:
        raise MmwbConfigError(
            f"int4 quantization: a layer of {rows} outputs x {cols} inputs cannot be packed (the kernel wants the "
            f"outputs in blocks of 16 and the inputs in groups of {group_size}, one of {GROUP_SIZES}); "
            "use int8 or another group_size"
        )


def pack_int4(levels: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) levels -> (N, K / 2) bytes, mmwb's portable order (the module's persistent ``qweight``): byte u of a
    group holds input u in its low nibble and input u + group_size / 2 in its high one."""
    rows = levels.shape[0]
    first, second = levels.view(rows, -1, group_size).chunk(2, dim=-1)
    return (first | (second << 4)).reshape(rows, -1).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """``pack_int4``'s bytes back to (N, K) levels."""
    rows = packed.shape[0]
    groups = packed.view(rows, -1, group_size // 2)
    return torch.cat([groups & 15, groups >> 4], dim=-1).reshape(rows, -1)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with an int8 or int4 weight (bias kept in float); ``dequantize()`` gives the weight it applies.

    int8 keeps q (N, K) and a scale per output; int4 keeps the bytes (N, K / 2) in mmwb's order and a scale and low
    per group, and for the kernel the same levels in torch's CPU packing (whose layout depends on N, so it is made
    here, not stored) with its bf16 (groups, N, 2) scale-and-zero table (w = (q - 8) * scale + (low + 8 * scale)).
    That is two copies of the int4 weight (1 byte a weight in all) until a kernel reads mmwb's order itself."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 64) -> None:
        super().__init__()
        if mode not in MODES:
            raise MmwbConfigError(f"quantize: {mode!r} is not one of {', '.join(MODES)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.group_size = mode, group_size
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        if mode == "int8":
            q, scale = quantize_int8(linear.weight)
            self.register_buffer("qweight", q)
            self.register_buffer("low", None)
        else:
            levels, scale, low = quantize_int4(linear.weight, group_size)
            self.register_buffer("qweight", pack_int4(levels, group_size))
            self.register_buffer("low", low)
        self.register_buffer("scale", scale)
        self._derive_kernel_buffers()

    def _derive_kernel_buffers(self) -> None:
        """The kernels' forms of the stored weight: bf16 scales, and for int4 torch's packing with its bf16
        scale-and-zero table. Not saved; made again whenever the stored tensors are loaded."""
        self.register_buffer("scale_compute", self.scale.to(_COMPUTE), persistent=False)
        if self.mode == "int4":
            levels = unpack_int4(self.qweight, self.group_size).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
            self.register_buffer("packed", packed, persistent=False)
            table = torch.stack([self.scale.t(), (self.low + 8 * self.scale).t()], dim=-1)
            self.register_buffer("scale_zero", table.to(_COMPUTE).contiguous(), persistent=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (nn.Module's signature)
        super()._load_from_state_dict(*args, **kwargs)
        self._derive_kernel_buffers()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """``.to(dtype)`` / ``.float()`` cast every float buffer: the kernels' forms are made again in bf16."""
        super()._apply(fn, recurse)
        self._derive_kernel_buffers()
        return self

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight this layer applies (up to the bf16 rounding of the kernels' scales)."""
        if self.mode == "int8":
            return self.qweight.float() * self.scale[:, None]
        levels = unpack_int4(self.qweight, self.group_size).float()
        groups = levels.view(self.out_features, -1, self.group_size)
        return (groups * self.scale[..., None] + self.low[..., None]).view(
            self.out_features, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x.reshape(-1, self.in_features).to(_COMPUTE).contiguous())
        out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (M, K) contiguous bf16 -> (M, N) bf16, without the bias: the kernel call alone."""
        if self.mode == "int8":
            return torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale_compute)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_zero)

    def kernel_bytes(self) -> int:
        """Bytes the kernel reads for one product: the weight (1 or 1/2 byte each) and its bf16 scales (and zeros)."""
        scales = self.scale_compute if self.mode == "int8" else self.scale_zero
        weight = self.qweight if self.mode == "int8" else self.packed
        return weight.numel() * weight.element_size() + scales.numel() * scales.element_size()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}"


class QuantizedExperts(nn.Module):
    """mmwb's stacked SwiGLU experts (gate_up (E, 2I, C), down (E, C, I)) as one quantized pair per expert; same
    call and result as ``Experts`` (only the experts a token chose run, each on its own tokens)."""

    def __init__(self, experts: nn.Module, mode: str, group_size: int = 64) -> None:
        super().__init__()
        self.num_experts = experts.gate_up_proj.shape[0]
        self.gate_up = nn.ModuleList(_as_quantized(w, mode, group_size) for w in experts.gate_up_proj)
        self.down = nn.ModuleList(_as_quantized(w, mode, group_size) for w in experts.down_proj)

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
        """Decode: each token's chosen experts read from the host (free on a CPU) and run in bf16 from kernel to
        kernel; a handful of ops per expert instead of the grouped path's bookkeeping."""
        chosen, coefs, rows = indices.tolist(), weights.tolist(), []
        flat = x.to(_COMPUTE)
        for n, experts in enumerate(chosen):
            xn, total = flat[n : n + 1], None
            for expert, coef in zip(experts, coefs[n], strict=True):
                gate, up = self.gate_up[expert].product(xn).chunk(2, dim=-1)
                y = self.down[expert].product((F.silu(gate) * up).contiguous()).float() * coef
                total = y if total is None else total + y
            rows.append(total)
        return torch.cat(rows).to(x.dtype)


def _as_quantized(weight: torch.Tensor, mode: str, group_size: int) -> QuantizedLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return QuantizedLinear(linear, mode, group_size)


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
        raise MmwbConfigError(f"quantize {mode}: runs on the CPU (torch's packed kernels), not on {device}")


def quantize_model(model: nn.Module, mode: str, group_size: int = 64) -> nn.Module:
    """Replace every ``nn.Linear`` (mmwb's, transformers', towers', projectors') and mmwb's stacked experts by their
    quantized forms, in place; CPU only (torch's packed-weight kernels); returns ``model``."""
    check_request(mode, group_size, next((p.device for p in model.parameters()), None))
    # exactly these types: torch's MultiheadAttention reads its out_proj's weight, as peft reads its factors'
    linears = (nn.Linear, Linear)
    targets = [
        (parent, name, child)
        for parent in model.modules()
        if not hasattr(parent, "base_layer")  # a peft adapter's layers: merge adapters before quantizing
        for name, child in parent.named_children()
        if type(child) in linears or isinstance(child, Experts)
    ]
    if mode == "int4":  # every shape checked before anything changes
        for _, _, child in targets:
            for weight in (
                (child.weight,) if type(child) in linears else (child.gate_up_proj[0], child.down_proj[0])
            ):
                _check_int4_shape(weight.shape, group_size)
    while targets:  # popped: each float layer is freed as its quantized form takes its place
        parent, name, child = targets.pop()
        quantized = QuantizedExperts if isinstance(child, Experts) else QuantizedLinear
        setattr(parent, name, quantized(child, mode, group_size))
        del child
    return model
