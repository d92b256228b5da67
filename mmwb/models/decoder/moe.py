"""Mixture-of-experts block: top-k router, dropless grouped expert dispatch, router losses and balancing.

Dispatch sorts the (token, expert) assignments by expert so each used expert runs one matmul over a contiguous
slice (torch._grouped_mm on CUDA bf16, one F.linear per used expert elsewhere); unused experts cost nothing and no
token is dropped. On CPU the per-expert split needs the counts on the host, which is free there; decode-sized
inference on CPU skips the sort altogether (Experts._few_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmwb.errors import MmwbConfigError
from mmwb.models.decoder.config import DecoderConfig
from mmwb.models.decoder.fp32_buffers import Fp32Buffers
from mmwb.models.decoder.kernels.cpu import MAX_ROWS, experts_sum, linear, route
from mmwb.models.decoder.mlp import SwiGLU

# Inference with at most this many (token, expert) assignments (decode steps) takes Experts._few_tokens.
FEW_ASSIGNMENTS = 64


@dataclass
class Routing:
    """One MoE layer's routing of N tokens: fp32 logits (N, E), chosen experts (N, k), their weights (N, k)."""

    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor  # (E,) assignments per expert, for logging and the aux-loss-free bias update


class Router(Fp32Buffers):
    """Softmax (Mixtral, Qwen3) or sigmoid (DeepSeek-V3) scoring, optional group-limited top-k and bias (fp32 in
    every model dtype)."""

    fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.scoring, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.scaling, self.n_group, self.topk_group = cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.expert_bias:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
            )
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> logits (N, E) fp32, indices (N, k), weights (N, k) fp32."""
        groups = (self.n_group, self.topk_group)
        bias = self.e_score_correction_bias
        routed = route(
            x, self.weight, bias, self.top_k, self.scoring, groups, self.norm_topk_prob, self.scaling
        )
        # decode-sized CPU inference: one kernel call (mmwb.models.decoder.kernels.cpu)
        if routed is not None:
            return routed
        with torch.autocast(x.device.type, enabled=False):  # routing decisions are made in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1:
            choice = self._limit_groups(choice)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, indices, weights * self.scaling

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 node-limited routing: keep the topk_group groups whose best two experts score highest."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)  # (N, G, E/G)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj (E, 2I, C), down_proj (E, C, I)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        experts, hidden, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C), indices/weights (N, k) -> weighted sum of expert outputs (N, C), counts (E,)."""
        if indices.numel() <= FEW_ASSIGNMENTS and not torch.is_grad_enabled() and x.device.type == "cpu":
            return self._few_tokens(x, indices, weights)
        tokens, top_k = indices.shape
        flat = indices.reshape(-1)  # (N*k,) assignment a = n * k + slot
        order = flat.argsort(stable=True)  # assignments sorted by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync with the host on CUDA
        groups = counts if _grouped_mm_ok(x, self.gate_up_proj) else counts.tolist()
        assignments = x[:, None].expand(tokens, top_k, x.shape[-1]).reshape(-1, x.shape[-1])  # (N*k, C)
        sorted_x = _Permute.apply(assignments, order, inverse)  # (N*k, C), grouped by expert
        gate, up = grouped_linear(sorted_x, self.gate_up_proj, groups).chunk(2, dim=-1)  # (N*k, I) each
        y = grouped_linear(F.silu(gate) * up, self.down_proj, groups)  # (N*k, C), sorted by expert
        y = _Permute.apply(y, inverse, order).view(tokens, top_k, -1)  # back to (N, k, C)
        return (y * weights[..., None]).sum(1).to(x.dtype), counts

    def _few_tokens(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode-sized inference: run each chosen expert on its rows straight from its weight slice.

        With a handful of (token, expert) assignments the sort/permute bookkeeping of the grouped path costs more
        than the matmuls; here the host reads the few chosen ids (free on a CPU), and each used expert's weights
        are read once, with no copy. Same sum over slots, in the same order, as the grouped path.
        """
        tokens, top_k = indices.shape
        counts = torch.bincount(indices.reshape(-1), minlength=self.gate_up_proj.shape[0])
        flat = indices.reshape(-1).tolist()  # assignment a = n * k + slot
        if tokens <= MAX_ROWS:  # each token's experts in one kernel call, where the kernel applies
            coefs, weight_stacks = weights.tolist(), (self.gate_up_proj, self.down_proj)
            fused = [
                experts_sum(x[n : n + 1], *weight_stacks, flat[n * top_k : (n + 1) * top_k], coefs[n])
                for n in range(tokens)
            ]
            if all(f is not None for f in fused):
                return torch.cat(fused).to(x.dtype), counts
        rows: dict[int, list[int]] = {}
        for a, e in enumerate(flat):
            rows.setdefault(e, []).append(a)
        y = x.new_empty(tokens * top_k, x.shape[-1])  # (N*k, C) expert outputs per assignment
        for e, assigned in rows.items():
            xe = x if tokens == 1 else x[[a // top_k for a in assigned]]  # (n_e, C)
            gate, up = linear(xe, self.gate_up_proj[e]).chunk(2, dim=-1)
            y[assigned] = linear(F.silu(gate) * up, self.down_proj[e])
        out = (y.view(tokens, top_k, -1) * weights[..., None]).sum(1)
        return out.to(x.dtype), counts


class _Permute(torch.autograd.Function):
    """Row permutation whose backward is the inverse permutation (a gather), not a scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor | list[int]) -> torch.Tensor:
    """Rows of x sorted by expert, groups[e] rows for expert e -> x_e @ weight[e].T, same row order.

    groups as a device tensor runs torch._grouped_mm; as a host list, one mm per non-empty group.
    """
    if torch.is_autocast_enabled(x.device.type):  # a custom autograd Function is not autocast by itself
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if isinstance(groups, list):
        return _LoopedGroupedLinear.apply(x, weight, groups)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=groups.cumsum(0).to(torch.int32))


class _LoopedGroupedLinear(torch.autograd.Function):
    """Grouped matmul as one mm per used expert, writing straight into slices of one output.

    Indexing weight[e] under autograd would make every expert's backward allocate and zero a full (E, out, in)
    gradient; here the weight gradient is one tensor whose used-expert slices are written by mm(out=).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        out = x.new_empty(x.shape[0], weight.shape[1])
        for e, (rows, dst) in enumerate(zip(x.split(sizes), out.split(sizes))):
            # a handful of rows: the streaming kernel (mmwb.models.decoder.kernels.cpu)
            if 0 < sizes[e] <= MAX_ROWS:
                dst.copy_(linear(rows, weight[e]))
            elif sizes[e]:
                torch.mm(rows, weight[e].t(), out=dst)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        sizes = ctx.sizes
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for e, (g, dst) in enumerate(zip(grad_out.split(sizes), grad_x.split(sizes))):
                if sizes[e]:
                    torch.mm(g, weight[e], out=dst)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            for e, (g, rows) in enumerate(zip(grad_out.split(sizes), x.split(sizes))):
                if sizes[e]:
                    torch.mm(g.t(), rows, out=grad_w[e])
                else:
                    grad_w[e].zero_()
        return grad_x, grad_w, None


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch._grouped_mm is fast (and has a backward) on Hopper+ CUDA in bf16 with 16-byte aligned strides."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (
        x.is_cuda
        and hasattr(torch, "_grouped_mm")
        and dtype == torch.bfloat16
        and (autocast or x.dtype == weight.dtype)
        and x.shape[-1] * itemsize % 16 == 0
        and weight.shape[1] * itemsize % 16 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 9
    )


class MoEBlock(nn.Module):
    """Routed experts plus always-on shared experts (DeepSeek)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = SwiGLU(cfg.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        flat = x.reshape(-1, x.shape[-1])  # (N, C)
        logits, indices, weights = self.gate(flat)
        out, counts = self.experts(flat, indices, weights)
        out = out.view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, Routing(logits, indices, weights, counts)


def load_balancing_loss(
    routings: list[Routing], num_experts: int, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss E * sum_e f_e * P_e pooled over layers (transformers' formula).

    f_e: chosen-assignments per token for expert e, P_e: mean router probability of e; padding is excluded.
    """
    counts = torch.zeros(num_experts, device=routings[0].logits.device)
    prob_sum = torch.zeros(num_experts, device=routings[0].logits.device)
    rows = routings[0].logits.new_zeros(())
    for routing in routings:
        mask = _row_mask(routing, token_mask)
        probs = routing.logits.softmax(-1)
        counts = counts.scatter_add(
            0, routing.indices.reshape(-1), mask.repeat_interleave(routing.indices.shape[1])
        )
        prob_sum = prob_sum + (probs * mask[:, None]).sum(0)
        rows = rows + mask.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(routings: list[Routing], token_mask: torch.Tensor | None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens and layers of logsumexp(router logits)^2, keeps logits small."""
    losses = []
    for routing in routings:
        mask = _row_mask(routing, token_mask)
        losses.append((routing.logits.logsumexp(-1).square() * mask).sum() / mask.sum())
    return torch.stack(losses).mean()


def _row_mask(routing: Routing, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return routing.logits.new_ones(routing.logits.shape[0])
    return token_mask.reshape(-1).to(routing.logits.dtype)


@torch.no_grad()
def update_expert_bias(routers: list[Router], counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing: bias += rate * sign(mean load - load) per layer.

    counts (L, E) are the per-layer expert loads of a step (DecoderOutput.expert_counts); overloaded experts
    become less likely to be chosen, underloaded ones more. The bias only affects selection, not the weights.
    """
    for router, load in zip(routers, counts.float(), strict=True):
        if router.e_score_correction_bias is None:
            raise MmwbConfigError("update_expert_bias needs a decoder config with expert_bias=True")
        router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
