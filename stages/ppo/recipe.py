"""PPO stage: optimise the SFT policy against the RM's reward, KL-penalised to the SFT policy.

Recipe: resolve the SFT parent and the RM stage (both through their manifests; the RM must
have been trained on this SFT) -> PPO knobs (validated with the config) -> tokenised training
prompts (the task's: the toy train pool or your prompt file; else a pairs file's; held-out
prompts never) -> the four roles -> our PPOTrainer under accelerate, resuming from the last
checkpoint -> save final/ -> compare the policy with the SFT parent on the task's held-out
prompts -> manifest, DONE. A rerun after a failure past training loads final/ and only
compares.

Roles (``stages.ppo.roles``), by ``peft``:

- none: policy = SFT full weights (trained); reference = a frozen second copy; reward =
  the RM; value = a trainable copy of the RM (``stage.value_from=reward``) or the SFT weights
  with a fresh head (``policy``).
- lora / dora (and peft.quantize=4bit with ``share_base=false``): the same four models, the policy continuing the
  SFT adapter (``parent_adapter=continue``, reference = a frozen load of the SFT adapter) or
  a fresh adapter on the merged SFT weights (``merge``, reference = adapters disabled).
- peft.quantize=4bit (qlora) with ``share_base=true``: ONE 4-bit base and four adapters. With the default RM
  (its SEQ_CLS adapter started from the SFT adapter, on the same base): policy = the SFT
  adapter (trained), ref = a frozen copy of it, reward = the RM adapter (frozen), value = a
  trained copy of the RM adapter. With an RM on the merged SFT (``rm`` with
  ``parent_adapter=merge``) the base is that merge, the policy a fresh adapter and the
  reference the base with adapters disabled.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import resource
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from omegaconf import DictConfig
from peft import PeftModel

from data_recipes import pairs as pair_recipes
from stages.core.adapters import build_peft_config
from stages.core.generation import prompt_ids
from stages.core.handoff import ParentStage
from stages.core.lifecycle import StageRun
from stages.core.models import (
    BASE_MODEL_FILE,
    BaseModelRef,
    LoadedModel,
    load_pretrained,
    load_stage_model,
    load_tokenizer,
    load_trainable_model,
    quantization_config,
    quantized_base_copy,
    resolve_base_model,
)
from stages.core.models import save_final as save_model
from stages.core.replay import stage_replay
from stages.core.reward_scoring import load_reward_model
from stages.core.reward_scoring import resolve_reward_stage as reward_stage_of
from stages.core.runtime import is_main_process, use_cpu
from stages.core.schema import Config, ConfigError
from stages.core.stage_steps import compare_and_report, frozen_policy
from stages.core.task import Task, stage_task
from stages.ppo.config import PPOHyperparams, PPOStageConfig
from stages.ppo.roles import PPORoles, SeparateRoles, SharedBaseRoles
from stages.ppo.trainer import PPOTrainer

log = logging.getLogger(__name__)


def ppo_hyperparams(knobs: PPOStageConfig, seed: int) -> PPOHyperparams:
    """The PPOHyperparams part of the stage config; the stage seed defaults to the run's."""
    names = {f.name for f in dataclasses.fields(PPOHyperparams)}
    values = {name: getattr(knobs, name) for name in names}
    values["seed"] = seed if knobs.seed is None else knobs.seed
    return PPOHyperparams(**values)


def resolve_reward_stage(c: Config, sft: ParentStage) -> ParentStage:
    """The RM stage, trained on this very SFT output with this peft kind (roles share a base)."""
    rm = reward_stage_of(
        c.paths.runs_root, c.experiment_name, c.stage.reward_stage, sft, child="ppo"
    )
    if rm.kind != c.peft.checkpoint_kind():
        raise ConfigError(
            f"peft.method={c.peft.method} peft.quantize={c.peft.quantize} but the reward "
            f"model in {rm.run_dir} is {rm.kind}: run every stage of an experiment with the "
            f"same peft (make sft rm ppo EXP=...)"
        )
    return rm


def training_prompts(c: Config, tokenizer: Any, task: Task | None) -> list[list[int]]:
    """Token ids of the PPO prompts, chat-templated with the generation prompt; left-truncated
    to ``model.max_prompt_length``. The task's held-out prompts are never among them.

    From the prompts of a pairs file (``data.pairs.source=file``, no prompt file), else from
    the task's training prompts (the toy train pool, or the user's prompt file).
    """
    pairs_cfg, knobs = c.data.pairs, c.stage
    if pairs_cfg.source == "file" and c.data.task_source() != "file":
        held = task.heldout_keys() if task is not None else set()
        rows = pair_recipes.file_pairs(pairs_cfg, held).train
        seen: dict[str, Any] = {}
        for row in rows:
            seen.setdefault(pair_recipes.prompt_key(row["prompt"]), row["prompt"])
        prompts = list(seen.values())[: knobs.num_prompts]
    elif task is not None:
        prompts = task.training_prompts(knobs.num_prompts, c.seed)
    else:
        raise ConfigError(
            "PPO needs training prompts: set data.prompts.path=<your prompt file>, or "
            "data.pairs.source=file with data.pairs.path=<a preference file>"
        )
    return [prompt_ids(tokenizer, prompt)[-c.model.max_prompt_length :] for prompt in prompts]


@dataclasses.dataclass
class BuiltRoles:
    """The roles plus what the final save and the manifest need to know about the policy."""

    roles: PPORoles
    policy: LoadedModel  # model = the trained policy module; base = what its weights sit on
    description: dict[str, Any]


def build_roles(stage: StageRun, sft: ParentStage, rm: ParentStage) -> BuiltRoles:
    c, knobs = stage.cfg, stage.cfg.stage
    if c.peft.quantize == "4bit" and knobs.share_base:
        return _shared_base_roles(stage, sft, rm)
    loaded = load_trainable_model(
        model_cfg=c.model, peft_cfg=c.peft, paths=c.paths, precision=stage.precision,
        run_dir=stage.run_dir, stage="ppo", parent=sft, parent_adapter=knobs.parent_adapter,
    )  # fmt: skip
    fresh_on_merged = (
        isinstance(loaded.model, PeftModel) and loaded.provenance.get("parent_adapter") == "merged"
    )
    # A fresh adapter on the merged SFT weights: switching the adapter off *is* the SFT policy.
    reference = None if fresh_on_merged else load_stage_model(sft, c.model, c.peft, stage.precision)
    reward = load_reward_model(rm, c.model, stage.precision, peft_cfg=c.peft)
    if knobs.value_from == "reward":
        value = load_reward_model(rm, c.model, stage.precision, peft_cfg=c.peft, trainable=True)
    else:
        value = load_trainable_model(
            model_cfg=c.model, peft_cfg=c.peft, paths=c.paths, precision=stage.precision,
            run_dir=stage.run_dir, stage="ppo", task="seq_cls", parent=sft,
            parent_adapter="merge", pad_token_id=reward.config.pad_token_id,
        ).model  # fmt: skip
    roles = SeparateRoles(loaded.model, value, reward, reference)
    description = {
        "layout": "separate",
        "policy": loaded.provenance,
        "reference": "policy_adapters_disabled" if reference is None else "sft_frozen_copy",
        "reward": rm.as_manifest_ref(),
        "value_from": knobs.value_from,
    }
    return BuiltRoles(roles, loaded, description)


def _shared_base_roles(stage: StageRun, sft: ParentStage, rm: ParentStage) -> BuiltRoles:
    """QLoRA: one 4-bit base (the RM's base) carrying policy, reference, reward and value.

    RM trained on the SFT adapter (``rm`` with ``parent_adapter=continue``, the default): the
    base is the pretrained one; policy = the SFT adapter (trained), reference = a frozen copy
    of it. RM trained on the merged SFT: the base is that merge; policy = a fresh adapter,
    reference = the base with adapters disabled.
    """
    c, knobs = stage.cfg, stage.cfg.stage
    if rm.kind != c.peft.checkpoint_kind():
        raise ConfigError(
            f"stage.share_base=true needs a {c.peft.checkpoint_kind()} reward model (a 4-bit "
            f"base); {rm.run_dir} is {rm.kind}"
        )
    rm_base = rm.base_model
    on_sft_base = sft.kind != "full" and rm_base["path"] == sft.base_model["path"]
    base = load_pretrained(
        rm_base["path"], revision=rm_base.get("revision"), task="causal_lm",
        model_cfg=c.model, peft_cfg=c.peft, precision=stage.precision, pad_token_id=None,
    )  # fmt: skip
    roles = SharedBaseRoles.from_adapters(
        base,
        reward_adapter=rm.final_dir,
        sft_adapter=sft.final_dir if on_sft_base else None,
        policy_lora=None if on_sft_base else build_peft_config(c.peft, "causal_lm"),
        value_init=knobs.value_from,
    )
    ref = BaseModelRef(
        id=resolve_base_model(c.model, c.paths).id, path=rm_base["path"],
        revision=rm_base.get("revision"),
    )  # fmt: skip
    provenance = {"parent_adapter": "continued" if on_sft_base else "merged"}
    loaded = LoadedModel(roles.model, ref, c.peft.checkpoint_kind(), provenance)
    description = {
        "layout": "shared_4bit_base",
        "base": rm_base["path"],
        "adapters": sorted(roles.model.peft_config),
        "policy": "sft_adapter_continued" if on_sft_base else "fresh_adapter_on_merged_sft",
        "reference": "sft_adapter_frozen_copy" if on_sft_base else "base_adapters_disabled",
        "reward": rm.as_manifest_ref(),
        "value_from": knobs.value_from,
    }
    return BuiltRoles(roles, loaded, description)


def save_policy(
    built: BuiltRoles, tokenizer: Any, final_dir: Path, peft_cfg: Any, precision: Any
) -> None:
    """final/ loads with plain transformers / peft, like every other stage's output."""
    roles, loaded = built.roles, built.policy
    if not isinstance(roles, SharedBaseRoles):
        save_model(loaded, tokenizer, final_dir, model=roles.policy)
        return
    roles.save_policy(final_dir)  # the policy adapter alone, as a plain "default" adapter
    quant = quantization_config(peft_cfg, precision)
    config_file = final_dir / "adapter_config.json"
    adapter_cfg = json.loads(config_file.read_text())
    adapter_cfg["base_model_name_or_path"] = str(
        quantized_base_copy(loaded.base, quant, final_dir.parent.parent)
    )
    config_file.write_text(json.dumps(adapter_cfg, indent=2))
    tokenizer.save_pretrained(final_dir)
    (final_dir / BASE_MODEL_FILE).write_text(
        json.dumps({"kind": loaded.kind, "base_model": loaded.base.as_dict()}, indent=2)
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now (VmRSS; the peak where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def role_weights_mb(roles: PPORoles) -> float:
    """Bytes of every distinct parameter and buffer the four roles hold (a shared base counts
    once; 4-bit weights count as packed bytes)."""
    seen: set[int] = set()
    total = 0
    for module in (roles.train_module, *roles.frozen_modules().values()):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total / 2**20


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = StageRun.begin(cfg, "ppo")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage
    sft = stage.parent
    assert sft is not None  # the schema requires a parent for ppo
    with stage.guard():
        rm = resolve_reward_stage(c, sft)
        stage.add_upstream(rm)  # checked like the parent on resume and for staleness
    hyper = ppo_hyperparams(knobs, c.seed)

    with stage:
        # 1. Tokenizer (with its chat template) from the SFT output, and the prompts.
        tokenizer = load_tokenizer(sft.final_dir, c.model)
        task = stage_task(stage, sft)  # a user's task is judged by the same RM
        with stage.phase("data"):
            prompts = training_prompts(c, tokenizer, task)
        log.info("ppo: %d training prompts, %d updates", len(prompts), hyper.num_updates)

        built: BuiltRoles | None = None
        if stage.final_record is None:
            # 2. The four roles, before any eval forward (4-bit CPU layers must keep autograd).
            # The runtime's memory (torch, transformers, ...) before any weights load, so
            # perf/peak_rss_mb can be read as runtime + roles (bench/ppo_memory.py).
            rss_before_roles = current_rss_mb()
            with stage.phase("load"):
                built = build_roles(stage, sft, rm)
            stage.manifest_extra["roles"] = built.description

            # 3. Train, resuming from the newest complete checkpoint-N (its log history too,
            #    so the first/last trends cover the whole run).
            def on_log(metrics: dict[str, float], update: int) -> None:
                stage.tracker.log(metrics, step=update)
                if is_main_process() and (update % 10 == 0 or update == hyper.num_updates):
                    log.info(
                        "update %d: score %.3f kl %.3f rlhf_reward %.3f eos %.2f len %.1f",
                        update, metrics["objective/scores"], metrics["objective/kl"],
                        metrics["objective/rlhf_reward"], metrics["response/eos_rate"],
                        metrics["response/length_mean"],
                    )  # fmt: skip

            trainer = PPOTrainer(
                hyper, built.roles, prompts, tokenizer=tokenizer,
                accelerator=Accelerator(cpu=use_cpu()), output_dir=stage.run_dir, on_log=on_log,
                replay=stage_replay(stage, tokenizer), ptx_coef=c.data.mix.coef,
            )  # fmt: skip
            checkpoint = trainer.latest_checkpoint()
            if checkpoint is not None:
                log.info("ppo: resuming from %s", checkpoint)
                trainer.load_checkpoint(checkpoint)
            with stage.phase("train"):
                trainer.train()
            train_metrics: dict[str, Any] = {
                "train/updates": trainer.step,
                **_trends(trainer.log_history),
                "perf/peak_rss_mb": peak_rss_mb(),  # before the comparison loads SFT again
                "perf/rss_before_roles_mb": rss_before_roles,
                "perf/role_weights_mb": role_weights_mb(built.roles),
            }

            # 4. final/ (the policy alone) now, before the comparison: if that fails, the
            #    rerun loads final/ and only compares.
            roles = built
            stage.save_final(
                kind=built.policy.kind,
                base_model=built.policy.base.as_dict(),
                train_metrics=train_metrics,
                save=lambda final_dir: save_policy(
                    roles, tokenizer, final_dir, c.peft, stage.precision
                ),
            )
        metrics: dict[str, Any] = dict(stage.final_record["train_metrics"])

        # 5. Compare with the SFT parent on held-out prompts (greedy accuracy, KL, ...).
        sft_policy = frozen_policy(stage, sft)
        with (
            built.roles.generation_policy()
            if built is not None  # else an earlier attempt trained and saved final/, then failed
            else nullcontext(frozen_policy(stage, stage.final_stage()))
        ) as policy:
            comparison = compare_and_report(stage, policy, sft_policy, tokenizer, task, metrics)
        del sft_policy
        gc.collect()

        # 6. Hand off: metrics.json, manifest.json, DONE.
        stage.finish(
            metrics=metrics,
            data={"prompts": len(prompts), "source": c.data.pairs.source},
            eval_samples=comparison.samples,
        )
    return stage.metrics


_TREND_KEYS = (
    "objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
    "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac",
    "response/length_mean", "response/eos_rate", "perf/tokens_per_s", "perf/update_s",
)  # fmt: skip


def _trends(history: list[dict[str, float]]) -> dict[str, float]:
    """Each logged PPO metric at the first logged update (the SFT policy's rollout) and
    averaged over the last tenth of the run: the trend, e.g. of objective/scores."""
    out: dict[str, float] = {}
    if not history:
        return out
    tenth = max(len(history) // 10, 1)
    for key in _TREND_KEYS:
        values = [h[key] for h in history if key in h]
        if values:
            name = key.replace("/", "_")
            out[f"train/{name}_first"] = values[0]
            out[f"train/{name}_last"] = sum(values[-tenth:]) / len(values[-tenth:])
    return out
