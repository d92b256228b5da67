"""Sharded data parallelism with torch's FSDP2 (``fully_shard``): ZeRO-3 and ZeRO-2 for the training engine.

``train.sharding: full`` (ZeRO-3) keeps 1/N of every parameter, gradient and AdamW moment on each of N processes
and gathers a unit's parameters only while it runs forward or backward; ``grad_op`` (ZeRO-2, FSDP's
``SHARD_GRAD_OP``) keeps the gathered parameters from forward to backward instead of gathering them twice, for
more memory at the peak and less communication. A *unit* is what is gathered at once: every decoder layer and
vision block (the classes a model lists in ``_no_split_modules``, the convention transformers and accelerate use),
and the root for everything else (embeddings, norms, projector, LM head).

Why mmwb applies FSDP2 itself rather than through accelerate's FSDP mode: accelerate 1.16 selects that mode only
for accelerator devices (every CPU launch is MULTI_CPU, ``accelerate/state.py``), so the path the CPU tests prove
would not be the path GPUs run. ``fully_shard`` is torch's public API and runs alike over gloo (CPU) and NCCL;
accelerate still launches the processes and owns the process group, devices and gradient accumulation.

Checkpoints: every rank writes its shards of the model and the optimizer state with ``torch.distributed.checkpoint``
(``sharded/`` in the checkpoint folder), and rank 0 writes the consolidated ``model.safetensors`` that
``mmwb.from_pretrained`` and every non-sharded tool read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mmwb.errors import MmwbConfigError

SHARDINGS = ("none", "full", "grad_op")
SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint folder (model + optimizer shards)


def unit_classes(model: nn.Module, extra: Iterable[str] = ()) -> set[str]:
    """Class names gathered as one unit: every ``_no_split_modules`` declared in ``model`` plus ``extra``."""
    names = set(extra)
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_units(model: nn.Module, classes: set[str], required: Iterable[str] = ()) -> list[nn.Module]:
    """The sub-modules of ``model`` whose class is in ``classes``, each after its descendants (fully_shard's order);
    a name in ``required`` (the config's ``shard_units``) that matches nothing is an error.

    A unit must run forward on every rank whenever it runs on one (its gather is a collective), so experts are never
    units: an MoE layer is one, and its stacked experts receive zero gradients when a rank routes them no token."""
    found = [m for m in model.modules() if m is not model and type(m).__name__ in classes]
    missing = set(required) - {type(m).__name__ for m in found}
    if missing:
        raise MmwbConfigError(
            f"train.shard_units: no module of class {', '.join(sorted(missing))} in the model"
        )
    return list(
        reversed(found)
    )  # modules() is pre-order: reversed, every unit comes after the units inside it


def shard_model(
    model: nn.Module, strategy: str, units: list[nn.Module], param_dtype: torch.dtype | None
) -> None:
    """Shard ``model`` in place across the default process group (``strategy`` is ``full`` or ``grad_op``).

    ``param_dtype`` (bf16, say) is what parameters are gathered and computed in; gradients are reduced and the
    optimizer steps in fp32 on the fp32 shards. Every trainable tensor of a unit takes part in every gradient
    reduction (zeros where this rank did not use it), which keeps ranks' collectives matched and gives the same
    AdamW update as one process."""
    if strategy not in ("full", "grad_op"):
        raise MmwbConfigError(f"train.sharding: {strategy!r} is not one of {', '.join(SHARDINGS)}")
    with torch.no_grad():  # FSDP2 shards row-major storage (the decoder keeps a column-major decode layout)
        for param in model.parameters():
            if not param.is_contiguous():
                param.data = param.data.contiguous()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = strategy == "full"
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)
    assert isinstance(model, FSDPModule)
    model.set_reduce_scatter_unused_params(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated ``model.state_dict()`` on CPU in rank 0 (empty elsewhere); a collective: call on all ranks.

    Tied parameters keep their first name only, as safetensors and accelerate's ``save_model`` want."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names_of: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), name)
    first = set(names_of.values())
    return {name: tensor.contiguous() for name, tensor in state.items() if name in first}


def _torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model's state dict and the optimizer state (a collective)."""
    model_state, optimizer_state = get_state_dict(model, _torch_optimizer(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the shards ``save_sharded`` wrote back into ``model`` and ``optimizer`` (any number of processes that
    shard the same model; a collective). Keys are those of ``model.state_dict()``: a missing one is an error."""
    torch_optimizer = _torch_optimizer(optimizer)
    model_state, optimizer_state = get_state_dict(model, torch_optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        torch_optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # trainer modules' state_dict keeps trainable tensors only
    )


def planned_state_bytes(parameters: int, trainable: int, processes: int, sharding: str) -> dict[str, float]:
    """The fp32 AdamW training state one rank holds between steps (what ``state_bytes`` measures), padding aside:
    4 bytes per parameter, 4 + 8 per trainable one (gradient, two moments); a 1/N share of each when sharded.
    On top come activations and, while a unit runs, its gathered parameters: one or two units under ``full``,
    every unit from forward to backward under ``grad_op``."""
    share = 1.0 if sharding == "none" else 1.0 / processes
    return {
        "parameters": 4 * parameters * share,
        "gradients": 4 * trainable * share,
        "optimizer": 8 * trainable * share,
    }


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (the local shards under sharding)."""

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    params = list(model.parameters())
    moments = [
        local(value)
        for state in _torch_optimizer(optimizer).state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    ]
    return {
        "parameters": sum(local(p).numel() * p.element_size() for p in params),
        "gradients": sum(local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None),
        "optimizer": sum(m.numel() * m.element_size() for m in moments),
    }
