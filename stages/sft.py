"""SFT stage: supervised instruction tuning on demonstrations with TRL's SFTTrainer.

Recipe: load demonstrations -> build TRL args (validated before any weights load) -> load the
base (full / LoRA / QLoRA) -> train (resuming from the last complete checkpoint) -> greedy
accuracy on held-out toy prompts -> save final/, manifest, DONE.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from trl import SFTConfig, SFTTrainer

from data_recipes.sft_data import load_sft_rows
from stages.core.lifecycle import StageRun
from stages.core.models import load_tokenizer, load_trainable_model, resolve_base_model, save_final
from stages.core.task_eval import toy_task_metrics
from stages.core.trainer_args import loss_curve, trainer_arguments

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
        train_rows, data_info = load_sft_rows(c.data)

        # 2. Trainer arguments: TRL validates them (and trainer_overrides) before weights load.
        args = SFTConfig(
            **trainer_arguments(stage),
            max_length=c.model.max_length,
            assistant_only_loss=knobs.assistant_only_loss,
            packing=knobs.packing,
            dataset_num_proc=None,
        )

        # 3. Model: full weights, a LoRA adapter, or LoRA on a 4-bit base.
        loaded = load_trainable_model(
            model_cfg=c.model,
            peft_cfg=c.peft,
            paths=c.paths,
            precision=stage.precision,
            run_dir=stage.run_dir,
            stage="sft",
            parent=stage.parent,
            parent_adapter=knobs.parent_adapter,
        )

        # 4. Train.
        trainer = SFTTrainer(
            model=loaded.model,
            args=args,
            train_dataset=train_rows,
            processing_class=tokenizer,
        )
        resume = str(stage.resume_checkpoint) if stage.resume_checkpoint else None
        train_output = trainer.train(resume_from_checkpoint=resume)

        # 5. Held-out accuracy on the toy task, with a few samples in the log.
        metrics: dict[str, Any] = {
            "train/loss": train_output.training_loss,
            **loss_curve(trainer.state.log_history),
            "train/steps": trainer.state.global_step,
            "train/runtime_s": train_output.metrics.get("train_runtime"),
        }
        samples: list[dict[str, Any]] = []
        if c.data.sft.source == "toy":
            toy_metrics, samples = toy_task_metrics(
                trainer.model,
                tokenizer,
                c.data.toy,
                c.model,
                num_samples_logged=knobs.num_eval_samples_logged,
            )
            metrics.update(toy_metrics)
            log.info("sft held-out greedy accuracy: %.3f", metrics["eval/accuracy"])

        # 6. Hand off: final/, metrics.json, manifest.json, DONE.
        def save(final_dir: Path) -> None:
            save_final(loaded, tokenizer, final_dir, model=trainer.model)

        stage.finish(
            kind=loaded.kind,
            base_model=loaded.base.as_dict(),
            metrics=metrics,
            data=data_info,
            save=save,
            eval_samples=samples,
        )
    return stage.metrics
