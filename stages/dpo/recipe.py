"""DPO stage: direct preference optimisation from the SFT policy with TRL's DPOTrainer.

Recipe: resolve the SFT parent (through its manifest) -> build TRL args (validated before any
weights load) -> load the frozen SFT policy -> preference pairs (sampled from that policy and
judged, cached under the run dir; or a local file) -> load the trainable policy (continuing
the SFT adapter, or the SFT full weights) -> train against the reference -> save final/ ->
compare with the SFT parent on held-out prompts and pairs -> manifest, DONE. A pairs file is read before any
weights load; a rerun after a failure past training loads final/ and only compares.

``stage.rounds=K > 1`` is iterative DPO (``stages.dpo.rounds``): K rounds of sample from the
current policy -> judge -> DPO, each round's policy compared with SFT and recorded in the
manifest's ``rounds``; final/ is the last round's.

The reference is always the SFT policy, never the bare base (`stages.core.reference_policy`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import datasets
from omegaconf import DictConfig
from trl import DPOConfig, DPOTrainer

from data_recipes.validation_split import preference_row_prompt
from stages.core.lifecycle import StageRun
from stages.core.models import load_tokenizer
from stages.core.reference_policy import (
    describe_reference,
    reference_model_arg,
    save_without_reference,
)
from stages.core.replay import stage_replay, with_replay
from stages.core.stage_pairs import stage_preference_pairs
from stages.core.stage_steps import (
    HELDOUT_PAIRS,
    compare_and_report,
    frozen_policy,
    preference_task,
    trainable_model,
)
from stages.core.trainer_args import trainer_arguments
from stages.core.validation import best_checkpoint_reloaded, hold_out_validation
from stages.dpo.rounds import RoundInputs, finish_rounds, train_dpo, train_rounds

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = StageRun.begin(cfg, "dpo")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage
    parent = stage.parent
    assert parent is not None  # the schema requires a parent for dpo
    task = preference_task(stage)  # its RM judges exist before any weights load

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

        # data.mix: SFT demonstrations replayed as an NLL term next to the DPO loss.
        trainer_class = with_replay(DPOTrainer, stage_replay(stage, tokenizer), c.data.mix.coef)

        # 2. Preference pairs from a file are read and validated before any weights load.
        from_file = c.data.pairs.source == "file"
        pair_set = stage_preference_pairs(stage, tokenizer, task=task) if from_file else None

        # 3. The frozen SFT policy: it samples the on-policy pairs, is the full-weight
        #    reference, and is the parent in the final comparison.
        sft_policy = frozen_policy(stage, parent)
        if pair_set is None:  # on-policy: the SFT policy's own samples, judged by rule or RM
            pair_set = stage_preference_pairs(stage, tokenizer, policy=sft_policy, task=task)
        log.info("dpo: %d train pairs, %d held out", len(pair_set.train), len(pair_set.heldout))

        # stage.validation_fraction of the train pairs' prompts held out (rounds=1 only):
        # evaluated every eval_steps, the best checkpoint becomes final/.
        train_pairs, validation_pairs = hold_out_validation(
            stage, pair_set.train, preference_row_prompt
        )
        pair_set = dataclasses.replace(pair_set, train=train_pairs)

        rounds: list[dict[str, Any]] = []
        if knobs.rounds > 1:
            # 4-6. Iterative DPO: every round not trained yet, the last one saved as final/.
            inputs = RoundInputs(tokenizer, dpo_args, sft_policy, task, pair_set, trainer_class)
            policy, rounds = train_rounds(stage, inputs)
        elif stage.final_record is None:
            # 4. Policy: the SFT adapter continued (LoRA/QLoRA) or the SFT full weights.
            loaded = trainable_model(stage)
            with stage.phase("data"):
                trainer = trainer_class(
                    model=loaded.model,
                    ref_model=reference_model_arg(loaded, sft_policy),
                    args=args,
                    train_dataset=pair_set.train_dataset(),
                    eval_dataset=validation_pairs and datasets.Dataset.from_list(validation_pairs),
                    processing_class=tokenizer,
                )

            # 5. Train against the reference (checked: the SFT policy, never the bare base).
            train_metrics = train_dpo(stage, trainer, pair_set)

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
            stage, policy, sft_policy, tokenizer, task, metrics, heldout_pairs=pair_set.heldout
        )
        if rounds:  # the last round's record gets this comparison; round<r>/* metrics
            finish_rounds(stage, rounds, metrics)

        # 8. Hand off: metrics.json, manifest.json, DONE.
        stage.finish(
            metrics=metrics,
            data={**pair_set.info, "heldout_path": str(stage.run_dir / HELDOUT_PAIRS)},
            eval_samples=comparison.samples,
        )
    return stage.metrics
