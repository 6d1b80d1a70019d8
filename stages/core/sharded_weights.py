"""Saving a model whose weights are sharded over processes (FSDP): the collective gather.

Under FSDP each rank holds a shard of every parameter, so ``save_pretrained`` on rank 0 alone
would write a partial model (or hang). Every rank must take part in gathering the full state
dict; rank 0 then writes it. ``full_state_dict_for_save`` is that gather, and a no-op (no
communication) for an ordinary model, so save helpers call it unconditionally.

The gather is torch's distributed-checkpoint API, the call accelerate 1.15
(``Accelerator.get_state_dict`` for FSDP2) and transformers 5 (``gather_full_state_dict``)
make themselves; we call it directly because accelerate only takes its FSDP branch when its
state says FSDP, which it never does on CPU (there ``accelerate launch`` with an FSDP config
runs plain DDP, see ``runtime.sharding_refusal``), and the CPU tests shard with torch's
``fully_shard`` directly.
"""

from __future__ import annotations

import torch


def holds_sharded_weights(model: torch.nn.Module) -> bool:
    """True when some parameter of ``model`` (or of a module inside it, e.g. the base of a
    PeftModel) is an FSDP shard: FSDP2 (``fully_shard``, parameters are DTensors) or FSDP1
    (``FullyShardedDataParallel`` modules)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, FSDPModule | FullyShardedDataParallel) for m in model.modules())


def full_state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective under FSDP: every rank must call it. Returns the full (unsharded) state dict
    on CPU on rank 0, ``{}`` on the other ranks; None for a model that is not sharded (then
    ``save_pretrained`` reads the weights itself)."""
    if not holds_sharded_weights(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: only rank 0 materialises the full tensors, on CPU (GPU memory stays sharded).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
