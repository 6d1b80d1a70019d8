"""SFT stage: supervised instruction tuning on demonstrations with TRL's SFTTrainer.

Recipe: load demonstrations -> build TRL args (validated before any weights load) -> load the
base (full / LoRA / QLoRA) -> train (resuming from the last complete checkpoint) ->
save final/ -> greedy accuracy on the task's held-out prompts -> manifest, DONE. A rerun after a
failure past training loads final/ and only evaluates.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig
from trl import SFTConfig, SFTTrainer

from data_recipes.sft_data import load_sft_rows
from data_recipes.validation_split import sft_row_prompt
from stages.core.data_accounting import sft_rows_to_train
from stages.core.forgetting import skill_metrics
from stages.core.lifecycle import StageRun
from stages.core.models import (
    load_tokenizer,
    require_training_template,
    resolve_base_model,
    save_final,
)
from stages.core.stage_steps import frozen_policy, trainable_model
from stages.core.task import resolve_task
from stages.core.task_eval import task_metrics
from stages.core.trainer_args import trainer_arguments
from stages.core.training import train_resumably
from stages.core.validation import best_checkpoint_reloaded, hold_out_validation

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = StageRun.begin(cfg, "sft")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage

    with stage:
        # 1. Data and tokenizer (cheap, and they fail fast on bad input).
        base = resolve_base_model(c.model, c.paths)
        tokenizer = load_tokenizer(base.path, c.model)
        if knobs.assistant_only_loss:  # a template without {% generation %}: fail before weights
            require_training_template(tokenizer, base.path)
        with stage.phase("data"):
            sft_rows = load_sft_rows(c.data)

        # 2. Trainer arguments: TRL validates them (and trainer_overrides) before weights load.
        args = SFTConfig(
            **trainer_arguments(stage),
            max_length=c.model.max_length,
            assistant_only_loss=knobs.assistant_only_loss,
            packing=knobs.packing,
            dataset_num_proc=None,
        )
        with stage.phase("data"):
            # Rows too long for max_length counted and dropped here, so the manifest is true.
            train_rows, data_info = sft_rows_to_train(
                sft_rows, tokenizer, args, c.data.max_dropped_fraction
            )
            # stage.validation_fraction of those prompts held out (written to validation.jsonl):
            # evaluated every eval_steps, the best checkpoint becomes final/.
            train_rows, validation_rows = hold_out_validation(stage, train_rows, sft_row_prompt)

        if stage.final_record is None:
            # 3. Model: full weights, a LoRA adapter, or LoRA on a 4-bit base.
            loaded = trainable_model(stage)

            # 4. Train (building the trainer tokenizes the rows: data time).
            with stage.phase("data"):
                trainer = SFTTrainer(
                    model=loaded.model,
                    args=args,
                    train_dataset=train_rows,
                    eval_dataset=validation_rows,
                    processing_class=tokenizer,
                )
            train_metrics = train_resumably(
                stage, trainer, expected_rows=len(train_rows), args=args
            )

            # 5. final/ now, before the evaluation: if that fails, the rerun only evaluates.
            stage.save_final(
                kind=loaded.kind,
                base_model=loaded.base.as_dict(),
                train_metrics=train_metrics,
                save=lambda final_dir: save_final(
                    loaded, tokenizer, final_dir, model=trainer.model
                ),
            )
            # The best checkpoint reloaded into the trainer can differ from final/: use final/.
            reload = best_checkpoint_reloaded(stage)
            model = frozen_policy(stage, stage.final_stage()) if reload else trainer.model
        else:  # an earlier attempt trained and saved final/, then failed
            model = frozen_policy(stage, stage.final_stage())

        # 6. Held-out accuracy on the task, with a few samples in the log. A task judged by
        #    a reward model waits for the stages after the RM (none exists yet).
        metrics: dict[str, Any] = dict(stage.final_record["train_metrics"])
        samples: list[dict[str, Any]] = []
        task = resolve_task(c)
        if task is not None and not task.judge_needs_checkpoint:
            with stage.phase("eval"):
                eval_metrics, samples = task_metrics(
                    model,
                    tokenizer,
                    task,
                    c.model,
                    num_samples_logged=knobs.num_eval_samples_logged,
                )
                metrics.update(eval_metrics)
                # The other skills taught here: later stages' forgetting is measured from these.
                metrics.update(skill_metrics(model, tokenizer, task, c.model))
            if "eval/accuracy" in metrics:
                log.info("sft held-out greedy accuracy: %.3f", metrics["eval/accuracy"])

        # 7. Hand off: metrics.json, manifest.json, DONE.
        stage.finish(metrics=metrics, data=data_info, eval_samples=samples)
    return stage.metrics
