"""Quiet, readable logs: step lines, no false warnings on resume, narrow third-party filters.

The whole console of a CLI run is checked in test_tracking.py (first run without W&B login).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

from stages.core.console import NOISE, NOISY_WARNINGS, quiet_console
from stages.core.models import load_pretrained, resolve_base_model
from stages.core.runtime import resolve_precision
from stages.core.schema import validate_config
from stages.core.trainer_args import StepLines


def test_step_line_is_one_readable_line() -> None:
    lines = StepLines("sft")
    lines._last = (0.0, 100)
    logs = {
        "loss": 0.5123, "grad_norm": 0.812, "learning_rate": 0.00293,
        "mean_token_accuracy": 0.73, "num_tokens": 2000.0, "epoch": 0.5, "entropy": 2.3,
    }  # fmt: skip
    line = lines.format_line(200, 800, logs)
    head = "sft step 200/800 | loss 0.5123 | lr 2.93e-03 | grad_norm 0.812 | token_acc 0.73 | "
    assert line.startswith(head) and line.endswith(" steps/s"), line
    assert "epoch" not in line and "num_tokens" not in line and "{" not in line
    summary = lines.format_line(800, 800, {"train_runtime": 62.13, "train_loss": 0.81})
    assert summary == "sft trained 800/800 steps in 62.1 s | mean loss 0.81"


def test_resuming_a_tied_embedding_model_does_not_warn_about_lm_head(
    compose_cfg, tmp_path, caplog
) -> None:
    """Trainer's resume used to log `missing keys ['lm_head.weight']`: save_pretrained leaves
    out the tied copy. The weights were right; the warning was false. Now it re-ties."""
    cfg = validate_config(compose_cfg())
    base = resolve_base_model(cfg.model, cfg.paths)
    load = dict(
        task="causal_lm", model_cfg=cfg.model, peft_cfg=cfg.peft,
        precision=resolve_precision("fp32"), revision=None, pad_token_id=None,
    )  # fmt: skip
    trained = load_pretrained(base.path, **load)
    with torch.no_grad():
        trained.get_input_embeddings().weight.add_(0.5)  # "training" moved the tied weights
    checkpoint = tmp_path / "checkpoint-1"
    trained.save_pretrained(checkpoint)

    model = load_pretrained(base.path, **load)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = Trainer(model=model, args=args)
    with caplog.at_level(logging.WARNING):
        trainer._load_from_checkpoint(str(checkpoint))  # what train(resume_from_checkpoint=) runs
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
    assert model.lm_head.weight is model.get_input_embeddings().weight  # still tied
    assert torch.equal(model.lm_head.weight, trained.lm_head.weight)  # and resumed


@pytest.fixture
def quiet(monkeypatch):
    """quiet_console() in this process, undone afterwards (filters, warnings, env)."""
    for key in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with warnings.catch_warnings():
        quiet_console()
        yield
    for noise in NOISE:
        logger = logging.getLogger(noise.logger)
        logger.filters = [f for f in logger.filters if type(f).__name__ != "DropMessages"]
    for key in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.pop(key, None)
    os.environ.pop("TQDM_MININTERVAL", None)


def test_third_party_noise_is_dropped_by_logger_and_message_only(quiet, caplog) -> None:
    noise = NOISE[0]
    logger = logging.getLogger(noise.logger)
    with caplog.at_level(logging.WARNING, logger=noise.logger):
        logger.warning(noise.message_start + ": No module named 'kernels'.")
        logger.warning("Some other bitsandbytes warning")
        logging.getLogger("somebody.else").warning(noise.message_start)
    kept = [(r.name, r.getMessage()) for r in caplog.records]
    assert kept == [
        (noise.logger, "Some other bitsandbytes warning"),
        ("somebody.else", noise.message_start),
    ]


def test_noisy_warnings_are_ignored_only_from_their_module(quiet) -> None:
    noisy = NOISY_WARNINGS[0]
    with warnings.catch_warnings(record=True) as seen:
        for module in (noisy.module, "stages.sft.recipe"):
            warnings.warn_explicit(
                noisy.message_start + " and will be removed in v6.",
                noisy.category,
                filename=module.replace(".", "/") + ".py",
                lineno=1,
                module=module,
            )
    assert [w.filename for w in seen] == ["stages/sft/recipe.py"]


def test_reward_head_on_a_causal_lm_loads_without_a_missing_keys_report(
    compose_cfg, tmp_path, caplog
) -> None:
    """A reward model starts as the LM plus a new score head: transformers' LOAD REPORT
    ("score.weight MISSING") is expected there, so it is held back; a real gap is not."""
    cfg = validate_config(compose_cfg())
    base = resolve_base_model(cfg.model, cfg.paths)
    load = dict(
        task="seq_cls", model_cfg=cfg.model, peft_cfg=cfg.peft,
        precision=resolve_precision("fp32"), revision=None, pad_token_id=0,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        load_pretrained(base.path, **load)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert any("new score head" in r.getMessage() for r in caplog.records)

    # A checkpoint that lacks a base weight: the report must still reach the user.
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(base.path, broken)
    weights = load_file(str(broken / "model.safetensors"))
    dropped = next(key for key in weights if key.endswith("layers.0.mlp.up_proj.weight"))
    del weights[dropped]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_pretrained(broken, **load)
    reports = [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "up_proj" in reports[0]
