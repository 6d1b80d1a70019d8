"""Process-level runtime: seeding, precision per device, and main-process checks.

Everything that depends on *where* a stage runs (CPU or GPU, rank 0 or not) is decided here,
so stage recipes stay device-agnostic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import get_cpu_distributed_information
from transformers import set_seed

# Rank and world size are accelerate's reading of the launcher's variables (torchrun /
# `accelerate launch` / MPI / our submitit export), the one PartialState itself uses for
# them, not `PartialState()`: constructing that joins the process group, a rendezvous every
# rank must reach, which a rank check before the trainer or on one rank's error path must
# not do. `main_process_first` below does build PartialState, at a point every rank reaches.


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job, or a plain single process."""
    return get_cpu_distributed_information().rank == 0


def process_rank() -> int:
    """This process's rank (0 for a plain single process)."""
    return get_cpu_distributed_information().rank


def world_size() -> int:
    """Processes in this job (1 for a plain single process)."""
    return get_cpu_distributed_information().world_size


def adopt_submitit_ranks() -> None:
    """Under Hydra's submitit (Slurm) launcher with several tasks per job, export the
    torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) for this
    task, so the trainers run data-parallel and only rank 0 writes: the same path as
    `accelerate launch`. A no-op anywhere else (no submitit job, one task, or RANK already
    set by a launcher)."""
    if "RANK" in os.environ:
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        job = JobEnvironment()  # raises outside a submitit job
    except (ImportError, RuntimeError):
        return
    if job.num_tasks > 1:
        # Every task sees all GPUs of its node and picks cuda:LOCAL_RANK, like torchrun.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def sharded_parameters() -> str | None:
    """The launcher's name for it when model weights are sharded over processes, else None.

    Set by `accelerate launch` from conf/accelerate/fsdp.yaml or zero3.yaml. A sharded model
    needs a collective gather to be saved; see `StageRun.begin`.
    """
    if world_size() <= 1:
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def sharding_refusal(stage: str) -> str | None:
    """Why this job cannot train ``stage`` with weights sharded over processes, or None.

    The gather that saving final/ needs is wired (``stages.core.sharded_weights``: every
    rank joins it, rank 0 writes; tested with torch's FSDP2 on 2 CPU ranks over gloo), but a
    whole stage under accelerate's FSDP has not run anywhere yet, for the reasons below.
    """
    sharded = sharded_parameters()
    if sharded is None:
        return None
    ranks = f"{sharded} with {world_size()} processes"
    if sharded != "FSDP":
        return (
            f"{ranks} is not supported: DeepSpeed is not installed here and needs CUDA, so "
            "its gather of final/ (ZeRO-3 16-bit consolidation) is neither wired nor tested. "
            "Use ACC=ddp or ACC=zero2 (with peft=lora/qlora the frozen base is small enough "
            "to replicate)."
        )
    if stage == "ppo":
        return (
            f"{ranks} is not supported by our PPO: each rank samples its own prompts to its "
            "own reply lengths and scores them with reference / reward models outside the "
            "prepared module, while FSDP needs every rank to run the same forwards (each "
            "all-gathers the shards). Use ACC=ddp (with peft=qlora the four roles share one "
            "4-bit base)."
        )
    if use_cpu():
        return (
            f"{ranks} cannot shard on CPU: accelerate 1.15 builds FSDP only on GPUs (its "
            "AcceleratorState keeps MULTI_CPU), so this would silently train plain DDP with "
            "a full copy per process. Use ACC=ddp, which is what would run."
        )
    return (
        f"{ranks} is not verified yet: the gather of final/ is wired and tested with torch's "
        "FSDP2 on CPU ranks, but a stage under accelerate's FSDP needs 2 or more GPUs and "
        "has not run on them. Use ACC=ddp, or ACC=zero2 (with peft=lora/qlora the frozen base "
        "is small enough to replicate)."
    )


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first; the other ranks enter it only after rank 0 has left it.

    For files only rank 0 writes and every rank then reads (a built base model, a merged
    parent, a reset run dir). Every rank must reach it (it is a collective barrier). A
    no-op in a single process, where no process group is created. ``cpu=use_cpu()`` matches
    what transformers' TrainingArguments asks for: a CPU job must get the gloo group
    (MULTI_CPU), not a non-distributed state that the trainer would then inherit.
    """
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState(cpu=use_cpu()).main_process_first():
        yield


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. Call *before* building a model: on CPU that makes two
    runs of the same command bit-identical, across processes and across a resume."""
    set_seed(seed)


@dataclass(frozen=True)
class Precision:
    """Training precision resolved for this machine."""

    name: str  # fp32 | bf16 | fp16
    torch_dtype: torch.dtype

    @property
    def trainer_flags(self) -> dict[str, bool]:
        """bf16/fp16 flags for transformers TrainingArguments (TRL defaults bf16=True)."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str) -> Precision:
    """auto -> fp32 on CPU (CPU bf16 autocast measured ~8x slower), bf16 on GPUs that
    support it, fp16 on older GPUs."""
    name = requested
    if requested == "auto":
        if not torch.cuda.is_available():
            name = "fp32"
        elif torch.cuda.is_bf16_supported():
            name = "bf16"
        else:
            name = "fp16"
    return Precision(name=name, torch_dtype=_DTYPES[name])


def use_cpu() -> bool:
    return not torch.cuda.is_available()
