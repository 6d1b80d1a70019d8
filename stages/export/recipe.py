"""Export stage: write a finished stage (`stage.target`, default dpo) as one merged, plain model.

Recipe: resolve the target through its manifest -> refuse an adapter that cannot be merged
(prefix / prompt tuning) before any weights load -> build the plain model in `stage.dtype`:

=================  ======================================================================
target kind        what final/ of runs/<exp>/export/ holds
=================  ======================================================================
full               the target's weights, re-saved in the chosen dtype
lora, dora, ia3    the adapter merged (peft ``merge_and_unload``) into the base it was
                   trained on (the pretrained base, a full parent, or a merged parent), in
                   fp32, then cast
<method>-4bit      the 4-bit base dequantised (transformers ``dequantize``: the weights the
(qlora)            adapter was trained against), the adapter merged into it, then cast
=================  ======================================================================

-> save_pretrained (safetensors) with the tokenizer, its chat template and the generation
config -> reload final/ with plain transformers -> the self-check: greedy held-out accuracy
by the task's judge, and the logits of the export against the target loaded the normal way
(`load_stage_model`, the adapter on its base) on held-out conversations; a max |logit
difference| above `stage.logit_tolerance` fails the stage (no DONE) with both numbers ->
metrics.json, the manifest (target by manifest sha256, the check), DONE.

A finished export is a no-op only while it describes the same target checkpoint with the same
config; a re-trained target, another target or other settings export again.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from stages.core import handoff
from stages.core.adapters import stage_peft_config
from stages.core.handoff import HandoffError, ParentStage, StaleStageError
from stages.core.lifecycle import StageRun, finished_for_target
from stages.core.models import load_pretrained, load_stage_model, load_tokenizer
from stages.core.runtime import Precision, use_cpu
from stages.core.schema import ADAPTER_METHODS, ConfigError, method_of_kind
from stages.core.task import Messages, Task, resolve_task
from stages.core.task_eval import task_metrics

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# peft methods that add virtual tokens instead of weight deltas: nothing to merge.
UNMERGEABLE_METHODS = ("prefix", "prompt")
# Default stage.logit_tolerance, 2-6x the max the embedded default measures (numbers in
# docs/guards/export.md): an fp32 merge differs by float rounding only; bf16 / fp16 weights
# (measured 0.17 / 0.017) by their few significant digits; a 4-bit target's own model computes
# in bf16, which bounds any export's agreement with it (measured up to 0.23 in fp32).
DEFAULT_TOLERANCE = {"fp32": 1e-4, "bf16": 0.5, "fp16": 0.1}
FOUR_BIT_TOLERANCE = 0.5
CHECK_BATCH = 4  # conversations per forward pass of the logit check (logits are B x T x vocab)


class UnmergeableAdapterError(HandoffError):
    """The target's adapter adds virtual tokens (prefix / prompt tuning): no weights to merge."""


class ExportCheckError(HandoffError):
    """The export's logits differ from the target's own model by more than the tolerance."""


def _already_exported(cfg: DictConfig) -> bool:
    """True when the export dir is DONE for exactly the current target checkpoint and config."""
    return finished_for_target(cfg, "export") is not None


def refuse_unmergeable(target: ParentStage, experiment: str) -> None:
    """Prefix / prompt tuning prepend learned virtual tokens; no plain model computes that."""
    method = method_of_kind(target.kind)[0]
    if method in UNMERGEABLE_METHODS:
        retrain = handoff.make_target(target.stage, experiment, "peft=lora", "force=true")
        raise UnmergeableAdapterError(
            f"stage '{target.stage}' ({target.run_dir}) is a {method}-tuning adapter (kind "
            f"{target.kind!r}): it adds learned virtual tokens, not weight deltas, so it cannot "
            "be merged into a plain model. Serve final/ with peft "
            "(`AutoPeftModelForCausalLM.from_pretrained(final)`), or train the stage with a "
            f"mergeable method (lora, dora, ia3) and export that: `{retrain}`."
        )


def check_base_not_replaced(target: ParentStage, runs_root: str, experiment: str) -> None:
    """An adapter trained on its parent's full weights needs those very weights: a parent
    re-run since would merge the adapter into a base it was never trained on."""
    parent_ref = target.manifest.get("parent") or {}
    base_path = Path(target.base_model.get("path", ""))
    if target.kind == "full" or not parent_ref:
        return
    parent_dir = handoff.stage_dir(runs_root, experiment, parent_ref["stage"])
    if not base_path.resolve().is_relative_to(parent_dir.resolve()):
        return  # the pretrained base, or a merge saved under the target's own run dir
    parent = handoff.resolve_parent(runs_root, experiment, parent_ref["stage"], child="export")
    if parent.manifest_sha256 != parent_ref["manifest_sha256"]:
        fix = handoff.make_target(target.stage, experiment, "rerun_stale=true")
        raise StaleStageError(
            f"{target.run_dir} is STALE: its adapter sits on the weights of '{parent.stage}' "
            f"({parent.run_dir}), which was re-run after it was trained, so merging it would "
            f"build a model nobody trained. Re-run it first: `{fix}`."
        )


def export_dtype(knob: str, base_path: str, revision: str | None) -> tuple[str, torch.dtype]:
    """stage.dtype resolved: auto = fp32 on CPU (bf16 matmuls there are slow and coarse), else
    the dtype the base model's config declares (fp32 when it declares none)."""
    if knob != "auto":
        return knob, DTYPES[knob]
    if not use_cpu():
        declared = getattr(AutoConfig.from_pretrained(base_path, revision=revision), "dtype", None)
        for name, dtype in DTYPES.items():
            if declared in (dtype, str(dtype).removeprefix("torch."), name):
                return name, dtype
    return "fp32", torch.float32


def build_export(
    target: ParentStage, model_cfg: Any, precision: Precision, dtype: torch.dtype
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The plain model final/ will hold, and how it was built (for the manifest)."""
    fp32 = Precision("fp32", torch.float32)
    if target.kind == "full":
        model = AutoModelForCausalLM.from_pretrained(str(target.final_dir), dtype=dtype)
        return model, {"built": "full weights re-saved", "merged": False, "dequantized": False}
    method, quantize = method_of_kind(target.kind)
    if method not in ADAPTER_METHODS:
        raise HandoffError(f"{target.run_dir}: unknown model kind {target.kind!r} in its manifest")
    base = target.base_model
    peft_cfg = stage_peft_config(target)
    load = dict(task="causal_lm", model_cfg=model_cfg, peft_cfg=peft_cfg, pad_token_id=None)
    dequantized = quantize == "4bit"
    if dequantized:
        # The exact 4-bit weights the adapter was trained against (the target's own 4-bit
        # settings), dequantised before any forward pass and before the adapter goes on, so
        # the merge lands in full precision instead of being re-quantised by peft.
        model = load_pretrained(
            base["path"], revision=base.get("revision"), precision=precision, **load
        )
        model = model.dequantize(dtype=torch.float32).to(torch.float32)
    else:
        model = load_pretrained(base["path"], revision=base.get("revision"), precision=fp32, **load)
    merged = PeftModel.from_pretrained(model, str(target.final_dir)).merge_and_unload(
        safe_merge=True  # refuses a merge that produces NaNs instead of saving them
    )
    merged = merged.to(dtype)
    how = f"{method} adapter merged into the {'dequantised 4-bit' if dequantized else ''} base"
    return merged, {
        "built": " ".join(how.split()),
        "merged": True,
        "dequantized": dequantized,
        "base_model": base,
    }


def save_export(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, final_dir: Path
) -> None:
    """save_pretrained (safetensors) + tokenizer with its chat template + generation config."""
    generation = model.generation_config
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id  # else generate() warns on every call
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    model.generation_config.save_pretrained(final_dir)


def require_check_data(task: Task | None, data_cfg: Any) -> None:
    """Before any weights load: the logit check needs held-out prompts or SFT rows."""
    if task is None and data_cfg.sft.source != "toy" and not data_cfg.sft.path:
        raise ConfigError(
            "the export's logit check runs on held-out prompts or, with no task, on SFT "
            "demonstrations, and this config has neither: set data.prompts.path=<prompts file> "
            'or data.sft.path=<demonstrations file>, e.g. `make export ARGS="data=file '
            'data.sft.path=my_sft.jsonl"`'
        )


def check_conversations(
    task: Task | None, data_cfg: Any, samples: list[dict[str, Any]], count: int
) -> list[Messages]:
    """What the logit check runs on: the task's held-out prompts with the export's own greedy
    replies (so reply tokens are checked too), or, with no task, the first SFT demonstrations."""
    if task is not None:
        prompts = task.heldout_prompts()[:count]
        replies = [s["reply"] for s in samples[: len(prompts)]]
        return [
            [*p.messages, {"role": "assistant", "content": r}] if r else list(p.messages)
            for p, r in zip(prompts, replies + [""] * (len(prompts) - len(replies)))
        ]
    from data_recipes.sft_data import load_sft_rows

    rows = load_sft_rows(data_cfg).dataset
    return [
        list(row.get("messages") or [*(row.get("prompt") or []), *(row.get("completion") or [])])
        for row in rows.select(range(min(count, len(rows))))
    ]


def logit_difference(
    export: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Messages],
) -> tuple[float, float]:
    """(max, mean) |logit difference| over every real token position of ``conversations``."""
    worst, total, count = 0.0, 0.0, 0
    for start in range(0, len(conversations), CHECK_BATCH):
        batch = conversations[start : start + CHECK_BATCH]
        encoded = [
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            for messages in batch
        ]
        longest = max(len(ids) for ids in encoded)
        pad = tokenizer.pad_token_id
        # Right padding: pads come after the real tokens, so they cannot change them.
        ids = torch.tensor([seq + [pad] * (longest - len(seq)) for seq in encoded])
        mask = torch.tensor([[1] * len(seq) + [0] * (longest - len(seq)) for seq in encoded])
        with torch.no_grad():
            ours = export(input_ids=ids.to(export.device), attention_mask=mask.to(export.device))
            theirs = reference(
                input_ids=ids.to(reference.device), attention_mask=mask.to(reference.device)
            )
        diff = (ours.logits.float().cpu() - theirs.logits.float().cpu()).abs()
        real = diff[mask.bool()]  # (real tokens, vocab)
        worst = max(worst, real.max().item())
        total += real.sum().item()
        count += real.numel()
    return worst, total / max(count, 1)


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("force") and not _already_exported(cfg):
        cfg = cfg.copy()
        cfg.force = True  # a stale export of another (or an older) checkpoint is replaced
    stage = StageRun.begin(cfg, "export")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage

    with stage:
        # 1. The target, checked before any weights load.
        target = handoff.resolve_parent(
            c.paths.runs_root, c.experiment_name, knobs.target, child="export"
        )
        refuse_unmergeable(target, c.experiment_name)
        check_base_not_replaced(target, c.paths.runs_root, c.experiment_name)
        stage.add_upstream(target)
        base = target.base_model
        dtype_name, dtype = export_dtype(knobs.dtype, base["path"], base.get("revision"))
        four_bit = method_of_kind(target.kind)[1] == "4bit"
        tolerance = knobs.logit_tolerance
        if tolerance is None:
            tolerance = FOUR_BIT_TOLERANCE if four_bit else DEFAULT_TOLERANCE[dtype_name]
        task = resolve_task(c)  # held-out prompts; a judge that needs the RM is not used
        require_check_data(task, c.data)

        # 2. Build and save the plain model.
        tokenizer = load_tokenizer(target.final_dir, c.model)
        with stage.phase("load"):
            exported, built = build_export(target, c.model, stage.precision, dtype)
        save = functools.partial(save_export, exported, tokenizer)
        stage.save_final(kind="full", base_model=base, train_metrics={}, save=save)
        del exported, save  # the check reloads final/ from disk, as a user would

        # 3. The self-check, on what a user gets: final/ reloaded with plain transformers.
        with stage.phase("eval"):
            plain = AutoModelForCausalLM.from_pretrained(str(stage.final_dir)).eval()
            metrics: dict[str, Any] = {}
            samples: list[dict[str, Any]] = []
            if task is not None and not task.judge_needs_checkpoint:
                judged, samples = task_metrics(plain, tokenizer, task, c.model, prefix="export")
                metrics.update(judged)
            conversations = check_conversations(task, c.data, samples, knobs.check_prompts)
            reference = load_stage_model(target, c.model, None, stage.precision)
            worst, mean = logit_difference(plain, reference, tokenizer, conversations)
        target_accuracy = handoff.read_metrics(target.run_dir).get("eval/accuracy")
        metrics.update(
            {
                "export/max_abs_logit_diff": worst,
                "export/mean_abs_logit_diff": mean,
                "export/logit_tolerance": tolerance,
                "export/check_conversations": len(conversations),
            }
        )
        if target_accuracy is not None:
            metrics["target/eval_accuracy"] = target_accuracy
        check = {
            "against": f"{target.stage} final/ loaded as the stages load it (load_stage_model)",
            "conversations": len(conversations),
            "max_abs_logit_diff": worst,
            "mean_abs_logit_diff": mean,
            "tolerance": tolerance,
            "tolerance_from": "stage.logit_tolerance"
            if knobs.logit_tolerance is not None
            else f"default for {'a 4-bit target' if four_bit else dtype_name}",
            "passed": worst <= tolerance,
            "export_accuracy": metrics.get("export/accuracy"),
            "target_eval_accuracy": target_accuracy,
        }
        log.info(
            "export check: max |logit diff| %.3g, mean %.3g (tolerance %.3g); accuracy %s vs "
            "the target's %s",
            worst, mean, tolerance, metrics.get("export/accuracy"), target_accuracy,
        )  # fmt: skip
        if worst > tolerance:
            raise ExportCheckError(
                f"the export in {stage.final_dir} does not reproduce '{target.stage}': its logits "
                f"differ from the target's own model by max {worst:.4g} (mean {mean:.3g}) on "
                f"{len(conversations)} held-out conversations, above the tolerance "
                f"{tolerance:.4g} ({check['tolerance_from']}). The stage is not marked DONE. "
                "Export in full precision (stage.dtype=fp32), or accept the difference: "
                f"`{handoff.make_target('export', c.experiment_name, f'stage.logit_tolerance={worst * 1.5:.3g}')}`."
            )
        stage.manifest_extra.update(
            {
                "target": target.as_manifest_ref(),
                "export": {
                    **built,
                    "source_kind": target.kind,
                    "dtype": dtype_name,
                    "format": "safetensors",
                    "check": check,
                },
            }
        )
        stage.finish(
            metrics=metrics,
            data={"check": "task held-out prompts" if task is not None else "sft rows"},
            eval_samples=samples,
        )
    return stage.metrics
