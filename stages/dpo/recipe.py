"""DPO stage: direct preference optimisation from the SFT policy with TRL's DPOTrainer.

Recipe: resolve the SFT parent (through its manifest) -> build TRL args (validated before any
weights load) -> load the frozen SFT policy -> preference pairs (sampled from that policy and
judged, cached under the run dir; or a local file) -> load the trainable policy (continuing
the SFT adapter, or the SFT full weights) -> train against the reference -> save final/ ->
compare with the SFT parent on held-out prompts and pairs -> manifest, DONE. A pairs file is read before any
weights load; a rerun after a failure past training loads final/ and only compares.

The reference is always the SFT policy, never the bare base:
- LoRA/QLoRA continuing the SFT adapter: ``ref_model=None`` and TRL copies the adapter into a
  frozen "ref" adapter on the same base before the first step;
- full weights: the frozen SFT model loaded from the parent's final/ is passed as ref_model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from stages.core.comparison import compare_with_parent, task_config
from stages.core.handoff import ParentStage, write_jsonl_atomic
from stages.core.lifecycle import StageRun
from stages.core.models import LoadedModel, load_stage_model, load_tokenizer, load_trainable_model
from stages.core.models import save_final as save_model
from stages.core.runtime import is_main_process
from stages.core.stage_pairs import pair_judge_stage, stage_preference_pairs
from stages.core.trainer_args import (
    first_and_last,
    trainer_arguments,
)
from stages.core.training import train_resumably

log = logging.getLogger(__name__)

HELDOUT_PAIRS = "heldout_pairs.jsonl"


def describe_reference(loaded: LoadedModel, parent: ParentStage) -> dict[str, Any]:
    """What the DPO reference is, for the manifest (checked against the built model)."""
    if isinstance(loaded.model, PeftModel):
        if loaded.provenance.get("parent_adapter") == "continued":
            kind = "sft_adapter_frozen_copy"  # TRL's frozen "ref" copy of the SFT adapter
        else:
            kind = "sft_weights_fresh_adapter_frozen_copy"  # zero-init adapter on SFT weights
    else:
        kind = "sft_full_weights"
    ref = parent.as_manifest_ref()
    return {**ref, "kind": kind, "checkpoint_kind": ref["kind"]}


def _match_reference_dtype(model: PeftModel) -> None:
    """Give TRL's frozen "ref" adapter the dtype of the trained one.

    With a 4-bit base TRL casts the trainable adapter to bf16 (QLoRA paper) *after* copying it
    into "ref", which stays fp32: same values (the SFT adapter was saved in bf16) but a
    different compute path, so step-0 rewards would be ~1e-5 instead of exactly 0.
    """
    params = dict(model.named_parameters())
    for name, param in params.items():
        if ".ref." in name:
            policy_param = params.get(name.replace(".ref.", ".default."))
            if policy_param is not None and policy_param.dtype != param.dtype:
                param.data = param.data.to(policy_param.dtype)


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = StageRun.begin(cfg, "dpo")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage
    parent = stage.parent
    assert parent is not None  # the schema requires a parent for dpo
    with stage.guard():
        # A reward-model judge must exist (and match this SFT) before any weights load.
        judge_stage = pair_judge_stage(stage)
        if judge_stage is not None:
            stage.add_upstream(judge_stage)

    with stage:
        # 1. Tokenizer (with its chat template) from the parent, and TRL args: both fail fast.
        tokenizer = load_tokenizer(parent.final_dir, c.model)
        # sft_weight > 0 adds TRL's "sft" loss (NLL of the chosen replies) to the preference
        # loss: plain DPO can lower the likelihood of chosen and rejected replies together.
        losses = [knobs.loss_type, *(["sft"] if knobs.sft_weight > 0 else [])]
        dpo_args = {
            "beta": knobs.beta,
            "loss_type": losses,
            "loss_weights": [1.0, knobs.sft_weight][: len(losses)],
            "label_smoothing": knobs.label_smoothing,
            "precompute_ref_log_probs": knobs.precompute_ref_log_probs,
            "max_length": c.model.max_length,
            "dataset_num_proc": None,
        }
        # stage.trainer_overrides (inside trainer_arguments) win, e.g. a loss mix:
        # {loss_type: [sigmoid, sft], loss_weights: [1.0, 0.2]} (RPO-style).
        args = DPOConfig(**{**dpo_args, **trainer_arguments(stage)})

        # 2. Preference pairs from a file are read and validated before any weights load.
        from_file = c.data.pairs.source == "file"
        pair_set = stage_preference_pairs(stage, tokenizer) if from_file else None

        # 3. The frozen SFT policy: it samples the on-policy pairs, is the full-weight
        #    reference, and is the parent in the final comparison.
        sft_policy = load_stage_model(parent, c.model, c.peft, stage.precision)
        if pair_set is None:  # on-policy: the SFT policy's own samples, judged by rule or RM
            pair_set = stage_preference_pairs(stage, tokenizer, policy=sft_policy)
        log.info("dpo: %d train pairs, %d held out", len(pair_set.train), len(pair_set.heldout))

        if stage.final_record is None:
            # 4. Policy: the SFT adapter continued (LoRA/QLoRA) or the SFT full weights.
            loaded = load_trainable_model(
                model_cfg=c.model,
                peft_cfg=c.peft,
                paths=c.paths,
                precision=stage.precision,
                run_dir=stage.run_dir,
                stage="dpo",
                parent=parent,
                parent_adapter=knobs.parent_adapter,
            )
            reference = describe_reference(loaded, parent)
            trainer = DPOTrainer(
                model=loaded.model,
                # None with an adapter: TRL freezes a copy of it as "ref" (= the SFT policy).
                ref_model=None if isinstance(loaded.model, PeftModel) else sft_policy,
                args=args,
                train_dataset=pair_set.train_dataset(),
                processing_class=tokenizer,
            )
            if isinstance(loaded.model, PeftModel):
                if "ref" not in trainer.model.peft_config:
                    raise RuntimeError(
                        "DPOTrainer did not create a frozen 'ref' adapter: the reference would be "
                        "the bare base, not the SFT policy"
                    )
                _match_reference_dtype(trainer.model)

            # 5. Train.
            train_metrics = train_resumably(stage, trainer, expected_rows=len(pair_set.train))
            history = trainer.state.log_history
            # rewards/* at the first log are ~0 (reference = policy); at the end they show how
            # far DPO separated chosen from rejected.
            train_metrics.update(first_and_last(history, "rewards/margins", "train/reward_margin"))
            train_metrics.update(
                first_and_last(history, "rewards/accuracies", "train/reward_accuracy")
            )

            # 6. final/ (with the reference in the manifest) now, before the comparison: if
            #    that fails, the rerun loads final/ and only compares.
            stage.manifest_extra["reference"] = reference

            def save(final_dir: Path) -> None:
                model = trainer.model
                if isinstance(model, PeftModel) and "ref" in model.peft_config:
                    # The frozen reference is the parent's adapter, already saved by the
                    # parent; final/ holds only the trained one, a plain PEFT adapter.
                    model.delete_adapter("ref")
                save_model(loaded, tokenizer, final_dir, model=model)

            stage.save_final(
                kind=loaded.kind,
                base_model=loaded.base.as_dict(),
                train_metrics=train_metrics,
                save=save,
            )
            policy = trainer.model
        else:  # an earlier attempt trained and saved final/, then failed
            policy = load_stage_model(stage.final_stage(), c.model, c.peft, stage.precision)
        metrics: dict[str, Any] = dict(stage.final_record["train_metrics"])

        # 7. Compare with the SFT parent on held-out prompts and pairs.
        comparison = compare_with_parent(
            policy,
            sft_policy,
            tokenizer,
            toy_cfg=task_config(c.data),
            model_cfg=c.model,
            heldout_pairs=pair_set.heldout,
            seed=c.seed,
            policy_name="dpo",
            parent_name=parent.stage,
        )
        metrics.update(comparison.metrics)
        if "compare/policy_accuracy" in metrics:
            metrics["eval/accuracy"] = metrics["compare/policy_accuracy"]
        print(comparison.table, flush=True)
        if is_main_process():
            (stage.run_dir / "comparison.txt").write_text(comparison.table + "\n")
            write_jsonl_atomic(stage.run_dir / HELDOUT_PAIRS, pair_set.heldout)

        # 8. Hand off: metrics.json, manifest.json, DONE.
        stage.finish(
            metrics=metrics,
            data={**pair_set.info, "heldout_path": str(stage.run_dir / HELDOUT_PAIRS)},
            eval_samples=comparison.samples,
        )
    return stage.metrics
