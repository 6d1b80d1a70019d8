"""The work of `make sft dpo`, written as a plain TRL script: the yardstick of
bench/stage_overhead.py.

Every knob comes from the stages' own composed Hydra config (conf/, the same overrides), so the
two sides cannot drift apart. Stage code supplies only the *inputs*: the tiny model and
tokenizer builders, the toy rows and prompts (data_recipes), and the rule judges. The work
(training, pair sampling, evaluation, saving) is plain transformers / TRL here.

    python bench/plain_trl_sft_dpo.py --out /tmp/plain --report /tmp/plain.json -- \
        experiment=toy tracking=none [overrides...]

Writes ``--report``: per-phase wall seconds (load, data, train, eval, save), the total, the
metrics, and where the models were saved.
"""

from __future__ import annotations

import time

_IMPORT_START = time.perf_counter()  # before the heavy imports: they count as start-up

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, set_seed  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from data_recipes import pairs as pair_recipes  # noqa: E402
from data_recipes import toy  # noqa: E402
from data_recipes.sft_data import load_sft_rows  # noqa: E402
from data_recipes.validation_split import (  # noqa: E402
    preference_row_prompt,
    sft_row_prompt,
    split_validation,
)
from stages.core.phase_timing import PhaseClock  # noqa: E402  (a timer, the stages' own)
from stages.core.schema import validate_config  # noqa: E402
from stages.core.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402
from stages.registry import register_configs  # noqa: E402

Messages = list[dict[str, str]]


def compose_stage(stage: str, overrides: Sequence[str]) -> Any:
    """The typed config `python -m stages stage=<stage> <overrides>` runs with."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw: DictConfig = compose(config_name="config", overrides=[f"stage={stage}", *overrides])
    return validate_config(raw)


def common_args(cfg: Any, output_dir: Path) -> dict[str, Any]:
    """TrainingArguments shared by SFT and DPO, from the stage knobs (fp32 on CPU)."""
    k = cfg.stage
    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "learning_rate": k.learning_rate,
        "max_steps": k.max_steps,
        "per_device_train_batch_size": k.per_device_batch_size,
        "gradient_accumulation_steps": k.gradient_accumulation_steps,
        "lr_scheduler_type": k.lr_scheduler,
        "warmup_steps": int(k.warmup_ratio * k.max_steps),
        "weight_decay": k.weight_decay,
        "max_grad_norm": k.max_grad_norm,
        "logging_steps": k.logging_steps,
        "save_strategy": "steps",
        "save_steps": k.save_steps,
        "save_total_limit": k.save_total_limit,
        "report_to": "none",
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "fp16": False,
        "dataloader_num_workers": 0,
        # As the stages: TRL defaults activation checkpointing on, ~20-30% slower at this size.
        "activation_checkpointing": False,
    }
    if getattr(k, "validation_fraction", 0):  # as stage.validation_fraction does it
        steps = k.eval_steps if k.eval_steps is not None else k.save_steps
        args.update(
            eval_strategy="steps",
            eval_steps=steps,
            save_steps=steps,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            per_device_eval_batch_size=k.per_device_batch_size,
            prediction_loss_only=True,
        )
    args.update(dict(k.trainer_overrides))
    return args


def validation_split(cfg: Any, rows: Any, prompt_of: Callable[[Any], str]) -> tuple[Any, Any]:
    fraction = getattr(cfg.stage, "validation_fraction", 0)
    if not fraction:
        return rows, None
    train_idx, val_idx = split_validation(rows, fraction, cfg.seed, prompt_of)
    if isinstance(rows, list):
        return [rows[i] for i in train_idx], [rows[i] for i in val_idx]
    return rows.select(train_idx), rows.select(val_idx)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Messages],
    cfg: Any,
    *,
    batch_size: int,
    sample: bool = False,
    temperature: float = 1.0,
    n: int = 1,
    seed: int = 0,
) -> list[list[str]]:
    """model.generate on left-padded chat prompts: n replies per prompt."""
    model.eval()
    tokenizer.padding_side = "left"
    config = GenerationConfig(
        max_new_tokens=cfg.model.max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_k=0 if sample else None,
        top_p=1.0 if sample else None,
        num_return_sequences=n,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    texts = tokenizer.apply_chat_template(list(prompts), add_generation_prompt=True, tokenize=False)
    replies: list[list[str]] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=cfg.model.max_prompt_length,
            add_special_tokens=False,
        )
        out = model.generate(**batch, generation_config=config)
        decoded = tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        replies += [decoded[i : i + n] for i in range(0, len(decoded), n)]
    tokenizer.padding_side = "right"
    return replies


def evaluate(model: torch.nn.Module, tokenizer: Any, cfg: Any, prefix: str) -> dict[str, float]:
    """Greedy held-out accuracy by the rule judge on both skills the SFT teaches."""
    metrics: dict[str, float] = {}
    addition = [p.messages() for p in toy.eval_prompts(cfg.data.toy)]
    replies = [r[0] for r in generate(model, tokenizer, addition, cfg, batch_size=128)]
    scores = pair_recipes.toy_judge().score_all(addition, replies)
    metrics[f"{prefix}/accuracy"] = sum(s == 1.0 for s in scores) / max(len(scores), 1)
    reversal = [p.messages() for p in toy.reversal_problems(cfg.data.toy, "eval")]
    if reversal and cfg.data.toy.num_reversal_train:
        replies = [r[0] for r in generate(model, tokenizer, reversal, cfg, batch_size=128)]
        scores = pair_recipes.toy_reversal_judge().score_all(reversal, replies)
        metrics[f"{prefix}/{toy.REVERSAL}_accuracy"] = sum(s == 1.0 for s in scores) / len(scores)
    return metrics


def run_sft(cfg: Any, out: Path, clock: PhaseClock) -> tuple[Path, dict[str, float]]:
    with clock.phase("load"):
        set_seed(cfg.seed)
        tokenizer = build_tokenizer()
        model = build_tiny_model(cfg.model.tiny, tokenizer)
    with clock.phase("data"):
        rows = load_sft_rows(cfg.data).dataset
        train_rows, validation_rows = validation_split(cfg, rows, sft_row_prompt)
    k = cfg.stage
    args = SFTConfig(
        **common_args(cfg, out / "sft"),
        max_length=cfg.model.max_length,
        assistant_only_loss=k.assistant_only_loss,
        packing=k.packing,
    )
    # Phases as the stages charge them: building the trainer tokenises the rows (data).
    with clock.phase("data"):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=validation_rows,
            processing_class=tokenizer,
        )
    with clock.phase("train"):
        trainer.train()
    final = out / "sft" / "final"
    with clock.phase("save"):
        trainer.save_model(str(final))
        tokenizer.save_pretrained(str(final))
    with clock.phase("eval"):
        metrics = evaluate(trainer.model, tokenizer, cfg, "sft")
    return final, metrics


def sample_pairs(
    model: torch.nn.Module, tokenizer: Any, cfg: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The SFT policy's samples on the task's training prompts, judged by the rule, paired."""
    p = cfg.data.pairs
    prompts = pair_recipes.toy_pair_prompts(cfg.data.toy, p.num_prompts, p.seed)
    samples = generate(
        model, tokenizer, prompts, cfg, batch_size=p.generation_batch_size, sample=True,
        temperature=p.temperature, n=p.samples_per_prompt, seed=p.seed,
    )  # fmt: skip
    judge = pair_recipes.toy_judge()
    flat = judge.score_all(
        [q for q, rs in zip(prompts, samples) for _ in rs], [r for rs in samples for r in rs]
    )
    n = p.samples_per_prompt
    scores = [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
    references = reference_scores = None
    if p.strategy == "ground_truth_vs_sample":  # the toy's correct reply is the reference
        references = [toy.correct_reply(toy.parse_prompt(q)) for q in prompts]
        reference_scores = judge.score_all(prompts, references)
    rows, _ = pair_recipes.build_pairs(
        prompts, samples, scores, strategy=p.strategy, min_margin=p.min_margin,
        max_length_ratio=p.max_length_ratio, seed=p.seed,
        eval_prompt_keys=pair_recipes.toy_eval_prompt_keys(cfg.data.toy),
        references=references, reference_scores=reference_scores,
    )  # fmt: skip
    return pair_recipes.split_heldout(rows, p.heldout_fraction, p.seed)


def run_dpo(cfg: Any, sft_dir: Path, out: Path, clock: PhaseClock) -> dict[str, Any]:
    k = cfg.stage
    with clock.phase("load"):
        set_seed(cfg.seed)
        tokenizer = build_tokenizer()  # the one saved with the SFT model
        model = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=torch.float32)
        ref_model = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=torch.float32)
    with clock.phase("data"):
        train_pairs, heldout = sample_pairs(model, tokenizer, cfg)
        train_pairs, validation_pairs = validation_split(cfg, train_pairs, preference_row_prompt)
        train_ds = datasets.Dataset.from_list(train_pairs)
        eval_ds = datasets.Dataset.from_list(validation_pairs) if validation_pairs else None
    losses = [k.loss_type, *(["sft"] if k.sft_weight > 0 else [])]
    args = DPOConfig(
        **common_args(cfg, out / "dpo"),
        beta=k.beta,
        loss_type=losses,
        loss_weights=[1.0, k.sft_weight][: len(losses)],
        label_smoothing=k.label_smoothing,
        precompute_ref_log_probs=k.precompute_ref_log_probs,
        max_length=cfg.model.max_length,
    )
    with clock.phase("data"):  # building the trainer tokenises the pairs
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
        )
    with clock.phase("train"):
        trainer.train()
    final = out / "dpo" / "final"
    with clock.phase("save"):
        trainer.save_model(str(final))
        tokenizer.save_pretrained(str(final))
    with clock.phase("eval"):
        metrics = evaluate(trainer.model, tokenizer, cfg, "dpo")
    metrics.update(train_pairs=len(train_pairs), heldout_pairs=len(heldout))
    return {"final": str(final), "metrics": metrics}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the models go")
    parser.add_argument("--report", type=Path, required=True, help="the JSON report")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to the stages")
    a = parser.parse_args(argv)
    started = time.perf_counter()
    register_configs()
    sft_cfg = compose_stage("sft", a.overrides)
    dpo_cfg = compose_stage("dpo", a.overrides)
    GlobalHydra.instance().clear()
    clock = PhaseClock()
    clock_started = time.perf_counter()
    clock.start()
    sft_final, sft_metrics = run_sft(sft_cfg, a.out, clock)
    dpo = run_dpo(dpo_cfg, sft_final, a.out, clock)
    times = clock.report()
    report = {
        "phases": {name: round(value, 3) for name, value in times.phases.items()},
        # from main() (imports done) to the end
        "seconds": round(times.seconds + clock_started - started, 3),
        "imports": round(started - _IMPORT_START, 3),
        "metrics": {**sft_metrics, **dpo["metrics"]},
        "models": {"sft": str(sft_final), "dpo": dpo["final"]},
    }
    report["other"] = round(report["seconds"] - sum(report["phases"].values()), 3)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    a.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
