"""KTO stage: Kahneman-Tversky optimisation from the SFT policy with TRL's KTOTrainer.

Recipe: resolve the SFT parent (through its manifest) -> build TRL args (validated before any
weights load) -> read a pairs / labelled-reply file (before any weights load) -> load the
frozen SFT policy -> on-policy pairs sampled from it and judged (as DPO's, cached under the
experiment) -> unpaired rows (`stages.kto.data`) -> load the trainable policy (continuing the
SFT adapter, or the SFT full weights) -> train against the reference -> save final/ ->
compare with the SFT parent on held-out prompts and pairs -> manifest, DONE. A rerun after a
failure past training loads final/ and only compares.

The reference is always the SFT policy, never the bare base (`stages.core.reference_policy`):
KTOTrainer builds it as DPOTrainer does, and its reference pass runs with the frozen "ref"
adapter active (``use_adapter``), not with adapters disabled.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import datasets
from omegaconf import DictConfig
from trl import KTOConfig, KTOTrainer

from data_recipes.validation_split import preference_row_prompt
from stages.core.lifecycle import StageRun
from stages.core.models import load_tokenizer
from stages.core.reference_policy import (
    check_reference,
    describe_reference,
    reference_model_arg,
    save_without_reference,
)
from stages.core.replay import stage_replay, with_replay
from stages.core.stage_steps import (
    HELDOUT_PAIRS,
    compare_and_report,
    frozen_policy,
    preference_task,
    trainable_model,
)
from stages.core.trainer_args import first_and_last, trainer_arguments
from stages.core.training import train_resumably
from stages.core.validation import best_checkpoint_reloaded, hold_out_validation
from stages.kto.data import kto_rows, with_heldout_path

log = logging.getLogger(__name__)

# Logged by KTOTrainer -> our metric names (first and last logged value of each).
LOGGED_TRENDS = {
    "rewards/margins": "train/reward_margin",
    "rewards/chosen": "train/reward_desirable",
    "rewards/rejected": "train/reward_undesirable",
    "kl": "train/kl",
}


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = StageRun.begin(cfg, "kto")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage
    parent = stage.parent
    assert parent is not None  # the schema requires a parent for kto
    task = preference_task(stage)  # its RM judges exist before any weights load

    with stage:
        # 1. Tokenizer (with its chat template) from the parent, and TRL args: both fail fast.
        tokenizer = load_tokenizer(parent.final_dir, c.model)
        kto_args = {
            "beta": knobs.beta,
            "desirable_weight": knobs.desirable_weight,
            "undesirable_weight": knobs.undesirable_weight,
            "loss_type": knobs.loss_type,
            "precompute_ref_log_probs": knobs.precompute_ref_log_probs,
            "max_length": c.model.max_length,
            "dataset_num_proc": None,
        }
        args = KTOConfig(**{**kto_args, **trainer_arguments(stage)})
        # data.mix: SFT demonstrations replayed as an NLL term next to the KTO loss.
        trainer_class = with_replay(KTOTrainer, stage_replay(stage, tokenizer), c.data.mix.coef)

        # 2. A pairs or labelled-reply file is read and validated before any weights load.
        from_file = c.data.pairs.source == "file"
        data = kto_rows(stage, tokenizer, task=task) if from_file else None

        # 3. The frozen SFT policy: it samples the on-policy pairs, is the full-weight
        #    reference, and is the parent in the final comparison.
        sft_policy = frozen_policy(stage, parent)
        if data is None:  # on-policy: the SFT policy's own samples, judged by rule or RM
            data = kto_rows(stage, tokenizer, policy=sft_policy, task=task)
        # stage.validation_fraction of the train replies' prompts held out: evaluated every
        # eval_steps, the best checkpoint becomes final/.
        train_replies, validation_replies = hold_out_validation(
            stage, data.train, preference_row_prompt
        )
        data = dataclasses.replace(data, train=train_replies)
        counts = data.info["unpaired"]
        log.info(
            "kto: %d train replies (%d desirable, %d undesirable), %d held-out pairs",
            counts["rows"], counts["desirable"], counts["undesirable"], len(data.heldout_pairs),
        )  # fmt: skip

        if stage.final_record is None:
            # 4. Policy: the SFT adapter continued (LoRA/QLoRA) or the SFT full weights.
            loaded = trainable_model(stage)
            with stage.phase("data"):
                trainer = trainer_class(
                    model=loaded.model,
                    ref_model=reference_model_arg(loaded, sft_policy),
                    args=args,
                    train_dataset=data.train_dataset(),
                    eval_dataset=validation_replies
                    and datasets.Dataset.from_list(validation_replies),
                    processing_class=tokenizer,
                )
            check_reference(trainer.model, "KTOTrainer")

            # 5. Train.
            train_metrics = train_resumably(stage, trainer, expected_rows=len(data.train))
            history = trainer.state.log_history
            # rewards/* at the first log are 0 (reference = policy); at the end they show how
            # far KTO raised desirable and lowered undesirable replies.
            for logged, name in LOGGED_TRENDS.items():
                train_metrics.update(first_and_last(history, logged, name))

            # 6. final/ (with the reference in the manifest) now, before the comparison: if
            #    that fails, the rerun loads final/ and only compares.
            stage.manifest_extra["reference"] = describe_reference(loaded, parent)
            stage.save_final(
                kind=loaded.kind,
                base_model=loaded.base.as_dict(),
                train_metrics=train_metrics,
                save=save_without_reference(loaded, tokenizer, trainer),
            )
            # The best checkpoint reloaded into the trainer can differ from final/: use final/.
            reload = best_checkpoint_reloaded(stage)
            policy = frozen_policy(stage, stage.final_stage()) if reload else trainer.model
        else:  # an earlier attempt trained and saved final/, then failed
            policy = frozen_policy(stage, stage.final_stage())
        metrics: dict[str, Any] = dict(stage.final_record["train_metrics"])

        # 7. Compare with the SFT parent on held-out prompts and pairs.
        comparison = compare_and_report(
            stage, policy, sft_policy, tokenizer, task, metrics, heldout_pairs=data.heldout_pairs
        )
        heldout_path = stage.run_dir / HELDOUT_PAIRS

        # 8. Hand off: metrics.json, manifest.json, DONE.
        stage.finish(
            metrics=metrics,
            data=with_heldout_path(data, heldout_path),
            eval_samples=comparison.samples,
        )
    return stage.metrics
