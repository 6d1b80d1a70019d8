"""The PPO training loop: updates, optimiser and schedule, metrics, checkpoints, resume.

One *update* is: take this update's prompts -> rollout (no grad) -> per-token rewards and GAE
-> ``num_ppo_epochs`` passes over shuffled minibatches (one optimiser step per minibatch,
gradients accumulated over micro-batches, clipped) -> one LR-scheduler step. The loop runs on
``accelerate.Accelerator``: under ``accelerate launch`` each process samples its own share of
the prompts and gradients are all-reduced through the prepared ``roles.train_module`` (DDP).

Determinism: the prompt order is a pure function of (seed, update index), sampling and
minibatch shuffles use the trainer's own generators (seed + rank), and checkpoints carry those
generators plus the global torch / numpy / python RNG states of every rank, so a run resumed
from ``checkpoint-N`` produces the same updates as one that never stopped (CPU, same world
size).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler
from trl.trainer.utils import entropy_from_logits

from stages.core.generation import context_length
from stages.core.handoff import (
    HandoffError,
    fsync_dir,
    is_complete_checkpoint,
    mark_checkpoint_complete,
)
from stages.core.replay import ReplayBatches, masked_nll, replay_layout
from stages.ppo.advantages import compute_advantages, masked_mean
from stages.ppo.config import PPOConfigError, PPOHyperparams
from stages.ppo.losses import clipped_policy_loss, clipped_value_loss, logprobs_from_logits
from stages.ppo.roles import PPORoles
from stages.ppo.rollout import (
    Rollout,
    RolloutSettings,
    collect_rollout,
    fit_prompts_to_context,
    left_pad_prompts,
)

LogCallback = Callable[[dict[str, float], int], None]

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
_RANK_SEED_STRIDE = 100_003  # a prime: per-rank seeds never collide with seed + small offsets


class UnsafeCheckpointError(HandoffError):
    """A checkpoint file holds more than tensors and plain values (tampered or foreign)."""


def load_tensors_only(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain Python values (``weights_only=True``).

    A checkpoint under runs/ may come from someone else (a shared runs/ dir, a copied run):
    a full unpickle would run whatever code a crafted file names. Everything we save here
    (optimizer/scheduler state dicts, RNG states as tensors) loads this way.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path} holds Python objects other than tensors and plain values, so it was not "
            f"loaded (torch.load(weights_only=True) refused: {str(err).splitlines()[0]}). "
            "It was not written by this PPO trainer: it may have been tampered with. Delete "
            f"{path.parent} to resume from the previous checkpoint, or start over with "
            "`make ppo ARGS=force=true`."
        ) from None


def _numpy_state_to_tensors(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """np.random.get_state() with its key array as a tensor (loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return (
        str(name),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached_gaussian),
    )


def _numpy_state_from_tensors(state: tuple[Any, ...]) -> tuple[Any, ...]:
    name, keys, pos, has_gauss, cached_gaussian = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian)


def normalize_prompts(prompts: Any) -> list[list[int]]:
    """Token-id prompts from a list of id lists, a list of {"input_ids": ...} rows, or a
    ``datasets.Dataset`` with an ``input_ids`` column."""
    if hasattr(prompts, "column_names"):  # datasets.Dataset
        if "input_ids" not in prompts.column_names:
            raise ValueError(
                f"prompt dataset needs an 'input_ids' column, has {prompts.column_names}"
            )
        rows = prompts["input_ids"]
    else:
        rows = [p["input_ids"] if isinstance(p, dict) else p for p in prompts]
    out = [[int(t) for t in row] for row in rows]
    if not out:
        raise ValueError("PPO needs at least one prompt")
    empty = [i for i, row in enumerate(out) if not row]
    if empty:
        raise ValueError(f"prompts {empty[:5]} are empty (no tokens)")
    return out


def resolve_stop_token_id(
    stop_token: str | None, tokenizer: Any, eos_token_id: int | None
) -> int | None:
    """'eos' -> the EOS id; another string -> its (single) token id; None -> no stop token."""
    if stop_token is None:
        return None
    if stop_token == "eos":
        if eos_token_id is None:
            raise PPOConfigError("stage.stop_token='eos' but the tokenizer has no EOS token")
        return eos_token_id
    if tokenizer is None:
        raise PPOConfigError(f"stage.stop_token={stop_token!r} needs a tokenizer to resolve it")
    token_id = tokenizer.convert_tokens_to_ids(stop_token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise PPOConfigError(f"stage.stop_token={stop_token!r} is not a single token of the vocab")
    return int(token_id)


def _fused_adamw_ok(params: list[torch.nn.Parameter], accelerator: Accelerator) -> bool:
    """Whether AdamW can take torch's fused kernel: one pass over each tensor instead of the
    default per-op loop on CPU (~6x faster steps, equal up to float rounding; at 40M+
    parameters the optimizer step is several % of an update). Only for plain or DDP runs
    (FSDP / DeepSpeed manage their own parameters) of float parameters on CPU or CUDA."""
    if accelerator.distributed_type not in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
    ):
        return False
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class PromptSchedule:
    """Which prompts each update uses: a pure function of (seed, update, rank).

    The prompts are read as an endless stream of epochs, each a fresh permutation seeded by
    (seed, epoch); update u takes stream positions [u*G, (u+1)*G) for a global batch G, and
    rank r the r-th slice of those. Nothing to checkpoint: resuming at update u gives the
    same prompts as never stopping.
    """

    def __init__(self, num_prompts: int, global_batch: int, seed: int) -> None:
        self.num_prompts, self.global_batch, self.seed = num_prompts, global_batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(
                self.num_prompts, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)
            )}  # fmt: skip
        return self._cache[epoch]

    def indices(self, update: int, rank: int, world_size: int) -> list[int]:
        local = self.global_batch // world_size
        start = update * self.global_batch + rank * local
        out = []
        for position in range(start, start + local):
            epoch, offset = divmod(position, self.num_prompts)
            out.append(int(self._epoch(epoch)[offset]))
        return out


class PPOTrainer:
    """PPO on a ``PPORoles`` (see roles.py), following trl 1.12.0 / Huang et al.

    Args:
        config: the PPO knobs.
        roles: policy / reference / reward / value behind the ``PPORoles`` interface.
        prompts: tokenized prompts (see ``normalize_prompts``); chat prompts should be
            rendered with ``apply_chat_template(add_generation_prompt=True)``. Not padded:
            the trainer left-pads each batch.
        tokenizer: used for pad/EOS ids and to resolve a non-'eos' ``stop_token``.
        pad_token_id, eos_token_id: override (or replace) the tokenizer's ids.
        accelerator: defaults to a fresh ``Accelerator()`` (picks up ``accelerate launch``).
        output_dir: where ``checkpoint-N`` directories go (None: no automatic checkpoints).
        on_log: called as ``on_log(metrics, update)`` every ``logging_steps`` updates, on
            every process (metrics are already averaged over processes).
        replay, ptx_coef: PPO-ptx (``data.mix``): each micro-batch's loss adds ``ptx_coef``
            times the NLL of one batch of replayed SFT demonstrations.
    """

    def __init__(
        self,
        config: PPOHyperparams,
        roles: PPORoles,
        prompts: Any,
        *,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        accelerator: Accelerator | None = None,
        output_dir: str | Path | None = None,
        on_log: LogCallback | None = None,
        replay: ReplayBatches | None = None,
        ptx_coef: float = 0.0,
    ) -> None:
        config.validate_ppo()
        self.config = config
        self.roles = roles
        self.accelerator = accelerator or Accelerator()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.on_log = on_log
        self.replay = replay if ptx_coef > 0 else None
        self.ptx_coef = ptx_coef
        self._micro_index = 0  # micro-batches of this update so far: picks the replay rows
        with roles.generation_policy() as policy:
            context = context_length(policy)
        self.prompts = fit_prompts_to_context(
            normalize_prompts(prompts), config.response_length, context
        )

        pad_token_id = (
            pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        )
        eos_token_id = (
            eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        )
        if pad_token_id is None:
            raise ValueError("a pad token id is needed (tokenizer.pad_token_id or pad_token_id=)")
        self.pad_token_id = int(pad_token_id)
        self.rollout_settings = RolloutSettings(
            response_length=config.response_length,
            temperature=config.temperature,
            stop_token_id=resolve_stop_token_id(config.stop_token, tokenizer, eos_token_id),
            pad_token_id=self.pad_token_id,
            eos_token_id=eos_token_id,
            missing_eos_penalty=config.missing_eos_penalty,
            forward_batch_size=config.rollout_forward_batch_size,
        )

        acc = self.accelerator
        self.world_size, self.rank = acc.num_processes, acc.process_index
        self.local_batch = config.local_batch_size(self.world_size)
        self.minibatch = self.local_batch // config.num_minibatches
        self.microbatch = self.minibatch // config.gradient_accumulation_steps
        self.num_updates = config.num_updates
        self.schedule = PromptSchedule(len(self.prompts), config.rollout_batch_size, config.seed)

        params = list(roles.named_trainable_parameters().values())
        optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, eps=config.adam_epsilon,
            weight_decay=config.weight_decay, fused=_fused_adamw_ok(params, self.accelerator),
        )  # fmt: skip
        self.train_module, self.optimizer = acc.prepare(roles.train_module, optimizer)
        roles.to(acc.device)
        self.trainable_params = params
        # Stepped once per update (as TRL), so the LR is constant within an update's epochs.
        self.scheduler = get_scheduler(
            _SCHEDULERS[config.lr_scheduler], self.optimizer,
            num_warmup_steps=config.warmup_steps, num_training_steps=self.num_updates,
        )  # fmt: skip

        local_seed = config.seed + self.rank * _RANK_SEED_STRIDE
        self.sample_generator = torch.Generator(device=acc.device).manual_seed(local_seed)
        self.shuffle_generator = torch.Generator().manual_seed(local_seed + 1)
        self.step = 0  # completed updates
        # Every logged update's metrics; saved in checkpoints, so after a resume it covers
        # the whole run, as if it had never stopped.
        self.log_history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ the loop
    def train(self, num_updates: int | None = None) -> dict[str, float]:
        """Run updates until ``num_updates`` (default: the config's total) are done.

        Writes ``checkpoint-N`` every ``save_steps`` updates and at the end when
        ``output_dir`` is set. Returns the last update's metrics.
        """
        target = self.num_updates if num_updates is None else min(num_updates, self.num_updates)
        bar = tqdm(
            total=target, initial=self.step, desc="ppo", unit="update",
            disable=not self.accelerator.is_main_process,
        )  # fmt: skip
        metrics: dict[str, float] = {}
        while self.step < target:
            metrics = self.update()
            bar.update(1)
            bar.set_postfix(
                score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}"
            )
            if self.step % self.config.logging_steps == 0 or self.step == target:
                self.log_history.append({"update": self.step, **metrics})
                if self.on_log is not None:
                    self.on_log(metrics, self.step)
            save_steps = self.config.save_steps
            if self.output_dir is not None and (
                (save_steps and self.step % save_steps == 0) or self.step == self.num_updates
            ):
                self.save_checkpoint(self.output_dir / f"{CHECKPOINT_PREFIX}{self.step}")
                self._rotate_checkpoints()
        bar.close()
        return metrics

    def update(self) -> dict[str, float]:
        """One PPO update (rollout, advantages, epochs of minibatch steps); returns metrics."""
        cfg = self.config
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]

        # Rollout: this rank's prompts, one sample each, scored by the frozen roles.
        rows = self.schedule.indices(self.step, self.rank, self.world_size)
        query_ids, query_mask = left_pad_prompts([self.prompts[i] for i in rows], self.pad_token_id)
        device = self.accelerator.device
        rollout = collect_rollout(
            self.roles, query_ids.to(device), query_mask.to(device), self.rollout_settings,
            self.sample_generator,
        )  # fmt: skip
        rollout_seconds = time.perf_counter() - started

        with torch.no_grad():
            targets = compute_advantages(
                logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs,
                values=rollout.values, scores=rollout.scores, mask=rollout.response_mask,
                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, gamma=cfg.gamma,
                lam=cfg.lam, whiten_rewards=cfg.whiten_rewards,
            )  # fmt: skip

        step_stats: dict[str, list[torch.Tensor]] = {}
        self._micro_index = 0
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(self.local_batch, generator=self.shuffle_generator).to(device)
            for start in range(0, self.local_batch, self.minibatch):
                self._optimizer_step(
                    rollout, targets, order[start : start + self.minibatch], step_stats
                )
        self.scheduler.step()
        self.step += 1
        return self._update_metrics(rollout, targets, step_stats, lr, started, rollout_seconds)

    def _optimizer_step(
        self,
        rollout: Rollout,
        targets: dict[str, torch.Tensor],
        rows: torch.Tensor,
        stats: dict[str, list[torch.Tensor]],
    ) -> None:
        """One minibatch: accumulate gradients over micro-batches, clip, step."""
        cfg, acc = self.config, self.accelerator
        accumulation = cfg.gradient_accumulation_steps
        for index in range(accumulation):
            micro_rows = rows[index * self.microbatch : (index + 1) * self.microbatch]
            # Only the last micro-batch all-reduces gradients (DDP); the others accumulate.
            last = index == accumulation - 1
            with nullcontext() if last else acc.no_sync(self.train_module):
                loss, micro_stats = self._micro_loss(
                    rollout.select(micro_rows), targets, micro_rows
                )
                acc.backward(loss / accumulation)
            for key, value in micro_stats.items():
                stats.setdefault(key, []).append(value)
        if cfg.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(self.trainable_params, cfg.max_grad_norm)
            stats.setdefault("policy/grad_norm", []).append(torch.as_tensor(norm).detach().float())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _micro_loss(
        self, batch: Rollout, targets: dict[str, torch.Tensor], rows: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        # Drop columns that are padding in every row of this micro-batch: the rollout pads
        # to the longest completion of the whole batch, and prompts to the longest prompt.
        width = int(batch.response_mask.sum(-1).max())
        query_cols = batch.query_mask.any(0)
        first_query_col = int(query_cols.int().argmax())
        mask = batch.response_mask[:, :width]
        response_ids = batch.response_ids[:, :width]
        ids = torch.cat([batch.query_ids[:, first_query_col:], response_ids], dim=1)
        attention = torch.cat([batch.query_mask[:, first_query_col:], mask], dim=1)
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)

        logits, values = self.train_module(ids, attention, positions, width)
        new_logprobs = logprobs_from_logits(logits, response_ids, cfg.temperature)
        policy = clipped_policy_loss(
            new_logprobs, batch.logprobs[:, :width], targets["advantages"][rows, :width], mask,
            cfg.cliprange,
        )  # fmt: skip
        value = clipped_value_loss(
            values.float(), batch.values[:, :width], targets["returns"][rows, :width], mask,
            cfg.cliprange_value,
        )  # fmt: skip
        loss = policy.loss + cfg.vf_coef * value.loss
        ptx = self._ptx_loss() if self.replay is not None else None
        if ptx is not None:
            loss = loss + self.ptx_coef * ptx
        with torch.no_grad():
            scaled = logits.detach().float() / cfg.temperature
            entropy = masked_mean(entropy_from_logits(scaled), mask)
        stats = {
            "policy/approxkl": policy.approxkl,
            "policy/clipfrac": policy.clipfrac,
            "policy/entropy": entropy,
            "policy/ratio": policy.ratio,
            "loss/policy": policy.loss.detach(),
            "loss/value": value.loss.detach(),
            "val/clipfrac": value.clipfrac,
        }
        if ptx is not None:
            stats["loss/ptx"] = ptx.detach()
        return loss, stats

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: NLL per reply token of this micro-batch's replayed demonstrations, through
        the same train module (a function of update and micro-batch index, so resumable)."""
        assert self.replay is not None
        batch = self.replay.batch(self.step, self._micro_index).to(self.accelerator.device)
        self._micro_index += 1
        ids, attention, positions = replay_layout(batch)
        logits, _ = self.train_module(ids, attention, positions, batch.response_ids.shape[1])
        return masked_nll(logits, batch)

    def _update_metrics(
        self,
        rollout: Rollout,
        targets: dict[str, torch.Tensor],
        step_stats: dict[str, list[torch.Tensor]],
        lr: float,
        started: float,
        rollout_seconds: float,
    ) -> dict[str, float]:
        """Per-update metrics, averaged over processes in one collective."""
        mask = rollout.response_mask
        kl_sum = targets["kl"].sum(1).mean()
        non_score = targets["non_score_rewards"].sum(1).mean()
        local = {
            "objective/kl": kl_sum,
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
            "objective/non_score_reward": non_score,
            "objective/scores": rollout.scores.mean(),
            "objective/raw_scores": rollout.raw_scores.mean(),
            "objective/rlhf_reward": non_score + rollout.scores.mean(),
            "val/mean": masked_mean(rollout.values, mask),
            "val/returns": masked_mean(targets["returns"], mask),
            "response/length_mean": mask.sum(1).float().mean(),
            "response/eos_rate": rollout.contains_eos.float().mean(),
            "response/tokens": mask.sum().float(),
        }
        for key, values in step_stats.items():
            local[key] = torch.stack(values).mean()
        keys = list(local)
        stacked = torch.stack([local[k].detach().float().to(self.accelerator.device) for k in keys])
        averaged = (
            self.accelerator.reduce(stacked, reduction="mean") if self.world_size > 1 else stacked
        )
        metrics = dict(zip(keys, averaged.cpu().tolist()))
        seconds = time.perf_counter() - started
        total_tokens = metrics.pop("response/tokens") * self.world_size
        metrics.update({
            "perf/tokens_per_s": total_tokens / seconds,
            "perf/update_s": seconds,
            "perf/rollout_s": rollout_seconds,
            "lr": lr,
            "episode": float(self.step * self.config.rollout_batch_size),
        })  # fmt: skip
        return metrics

    # ------------------------------------------------------------------ checkpoints
    # Ours, not Accelerator.save_state / load_state + ProjectConfiguration(total_limit=...):
    # save_state writes in place (a crash mid-save leaves a directory load_state accepts; ours
    # stages, writes checkpoint_complete.json last, then renames), its total_limit rotation
    # only works with its own `checkpoints/checkpoint_<i>` names (the run-dir contract is
    # `checkpoint-<update>/`), it saves every prepared model's full state dict (the frozen,
    # possibly 4-bit base too, not only the trainable weights) and it loads registered objects
    # (our sample / shuffle generators) with a full unpickler, where resume loads tensors only.
    def _rng_state(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),  # (version, tuple of ints, None): plain types
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "sample_generator": self.sample_generator.get_state(),
            "shuffle_generator": self.shuffle_generator.get_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Trainable weights, optimizer, scheduler, update count and every rank's RNG states.

        Collective: every process must call it; only the main process writes.
        """
        directory = Path(directory)
        rng_states = (
            gather_object([self._rng_state()]) if self.world_size > 1 else [self._rng_state()]
        )
        if self.accelerator.is_main_process:
            staging = directory.with_name(directory.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            weights = {k: v.contiguous() for k, v in self.roles.trainable_state_dict().items()}
            save_file(weights, str(staging / TRAINABLE_FILE))
            torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), staging / SCHEDULER_FILE)
            torch.save(rng_states, staging / RNG_FILE)
            (staging / STATE_FILE).write_text(json.dumps({
                "step": self.step,
                "num_updates": self.num_updates,
                "world_size": self.world_size,
                "episode": self.step * self.config.rollout_batch_size,
                "log_history": self.log_history,
            }, indent=2))  # fmt: skip
            # Completeness marker (file sizes, everything fsynced) last in the staging dir,
            # then rename: a crash or a full disk mid-save never leaves a checkpoint that
            # resume would take for complete.
            mark_checkpoint_complete(staging)
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
            fsync_dir(directory.parent)
        self.accelerator.wait_for_everyone()
        return directory

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a ``save_checkpoint`` directory; the next update continues exactly."""
        directory = Path(directory)
        state = json.loads((directory / STATE_FILE).read_text())
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"{directory} was written by {state['world_size']} processes, this run has "
                f"{self.world_size}: per-rank sampling would not continue the same way"
            )
        self.roles.load_trainable_state_dict(load_file(str(directory / TRAINABLE_FILE)))
        self.optimizer.load_state_dict(load_tensors_only(directory / OPTIMIZER_FILE))
        self.scheduler.load_state_dict(load_tensors_only(directory / SCHEDULER_FILE))
        rng = load_tensors_only(directory / RNG_FILE)[self.rank]
        random.setstate(rng["python"])
        np.random.set_state(_numpy_state_from_tensors(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sample_generator.set_state(rng["sample_generator"])
        self.shuffle_generator.set_state(rng["shuffle_generator"])
        self.step = int(state["step"])
        self.log_history = list(state.get("log_history", []))

    def latest_checkpoint(self) -> Path | None:
        """The newest complete ``checkpoint-N`` (with its completeness marker) under
        output_dir, if any (to resume from)."""
        if self.output_dir is None or not self.output_dir.is_dir():
            return None
        found = [
            p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*")
            if p.name[len(CHECKPOINT_PREFIX):].isdigit() and is_complete_checkpoint(p)
        ]  # fmt: skip
        return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)

    def _rotate_checkpoints(self) -> None:
        limit = self.config.save_total_limit
        if limit is None or self.output_dir is None or not self.accelerator.is_main_process:
            return
        found = sorted(
            (p for p in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
            key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
        )  # fmt: skip
        for old in found[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
