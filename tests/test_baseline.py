"""`stage.against=base|base_fewshot` of the eval stage: any stage compared with the base model,
plain or few-shot prompted, and how `make compare` shows those evals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from data_recipes.prompts import prompt_key
from stages import compare as cmp
from stages.core.generation import prompt_ids
from stages.core.handoff import DONE, EVAL_SAMPLES, MANIFEST, HandoffError
from stages.core.models import load_tokenizer, resolve_base_model
from stages.core.schema import ConfigError, validate_config
from stages.core.task import HeldoutPrompt
from stages.core.task_eval import greedy_replies, task_metrics
from stages.dpo import recipe as dpo
from stages.eval import recipe as eval_stage
from stages.eval.baseline import BaseMismatchError, choose_shots, fewshot_model_cfg
from stages.sft import recipe as sft
from stages.tasks.addition import AdditionTask

from .conftest import REPO
from .test_dpo import PAIRS_FAST

KL = "stage.num_kl_samples=8"


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / EVAL_SAMPLES).read_text().splitlines()]


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / MANIFEST).read_text())


def test_a_bad_against_fails_at_compose_naming_the_key(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"stage\.against='bse' is not one of \['parent', 'base'"):
        validate_config(compose_cfg("stage=eval", "stage.against=bse"))
    with pytest.raises(ConfigError, match=r"stage\.num_shots=0"):
        validate_config(
            compose_cfg("stage=eval", "stage.against=base_fewshot", "stage.num_shots=0")
        )


def test_the_cli_refuses_a_bad_against_with_exit_2(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [sys.executable, "-m", "stages", "stage=eval", "stage.against=bse",
         f"paths.runs_root={tmp_path / 'runs'}", "tracking=none"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=environ, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "stage.against='bse'" in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()  # nothing written


def test_a_baseline_eval_gets_its_own_run_dir(compose_cfg) -> None:
    typed = validate_config(compose_cfg("stage=eval", "stage.against=base"))
    assert typed.stage.run_variant("") == "vs_base"
    assert typed.stage.run_variant("mine") == "mine"  # an explicit variant is kept
    typed = validate_config(compose_cfg("stage=eval"))
    assert typed.stage.run_variant("") == ""  # the parent eval stays in runs/<exp>/eval/


def test_few_shot_demonstrations_are_good_training_demonstrations(compose_cfg) -> None:
    cfg = validate_config(compose_cfg("stage=eval", "stage.against=base_fewshot"))
    task = AdditionTask(cfg.data.toy)
    fewshot = choose_shots(cfg.data, task, 3, seed=cfg.seed)
    assert len(fewshot.shots) == 3
    heldout = {prompt_key(p.messages) for p in task.heldout_prompts()}
    for prompt, reply in fewshot.shots:
        assert prompt_key(prompt) not in heldout
        assert reply == task.reference_reply(prompt)  # a correct demonstration, not an evasion
    # Same seed, same shots; another seed, other shots.
    assert choose_shots(cfg.data, task, 3, seed=cfg.seed) == fewshot
    assert choose_shots(cfg.data, task, 3, seed=cfg.seed + 1) != fewshot
    # Before the held-out prompt, as earlier user / assistant turns of the same chat.
    question = task.heldout_prompts()[0].messages
    viewed = fewshot.view(question)
    assert viewed[-1] == question[-1]
    assert [m["role"] for m in viewed] == ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in viewed[1:6:2]] == [r for _, r in fewshot.shots]
    system = [{"role": "system", "content": "Be brief."}, *question]
    assert fewshot.view(system)[0] == system[0] and fewshot.view(system)[1:] == viewed


def test_eval_against_base_and_few_shot_base(compose_cfg, tmp_path: Path, capsys) -> None:
    sft.run(compose_cfg())
    trained = dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST))
    runs = tmp_path / "runs" / "toy"
    dpo_manifest = _manifest(runs / "dpo")

    # --- against=base: its own run dir, the report and the manifest name the base.
    metrics = eval_stage.run(compose_cfg("stage=eval", "stage.against=base", KL))
    vs_base = runs / "eval" / "vs_base"
    assert (vs_base / DONE).is_file() and not (runs / "eval" / DONE).exists()
    base_id = dpo_manifest["base_model"]["id"]
    out = capsys.readouterr().out
    assert f"toy: dpo vs the base model {base_id}" in out
    report = (vs_base / "comparison.txt").read_text()
    assert report.startswith(f"toy: dpo vs the base model {base_id}\n")
    assert report.splitlines()[1].split("|")[1].strip() == "base"  # the baseline's column
    manifest = _manifest(vs_base)
    assert manifest["compared_with"]["against"] == "base"
    assert manifest["compared_with"]["base_model"]["id"] == base_id
    assert manifest["target"]["stage"] == "dpo"
    # The target side is the DPO model as it scored itself at stage end.
    assert metrics["compare/policy_accuracy"] == trained["compare/policy_accuracy"]

    # The base side equals an independent greedy eval of the base, reply for reply.
    cfg = validate_config(compose_cfg("stage=eval"))
    base = resolve_base_model(cfg.model, cfg.paths)
    base_model = AutoModelForCausalLM.from_pretrained(base.path).eval()
    tokenizer = load_tokenizer(runs / "dpo" / "final", cfg.model)
    task = AdditionTask(cfg.data.toy)
    alone, alone_samples = task_metrics(base_model, tokenizer, task, cfg.model)
    assert metrics["compare/parent_accuracy"] == alone["eval/accuracy"]
    samples = _samples(vs_base)
    assert [s["parent_reply"] for s in samples] == [s["reply"] for s in alone_samples]
    assert metrics["compare/kl_tokens"] > 0 and metrics["compare/kl_per_token"] > 0

    # --- switching against: parent <-> base never returns the other's result.
    eval_stage.run(compose_cfg("stage=eval", KL))
    assert _manifest(runs / "eval")["compared_with"]["stage"] == "sft"
    assert _manifest(vs_base)["compared_with"]["against"] == "base"  # not replaced
    stamp = (vs_base / MANIFEST).stat().st_mtime_ns
    again = eval_stage.run(compose_cfg("stage=eval", "stage.against=base", KL))
    assert (vs_base / MANIFEST).stat().st_mtime_ns == stamp and again == metrics  # a no-op
    # One run dir for both (an explicit variant): each switch re-runs.
    mine = runs / "eval" / "mine"
    for against in ("parent", "base", "parent"):
        eval_stage.run(
            compose_cfg("stage=eval", f"stage.against={against}", "paths.variant=mine", KL)
        )
        recorded = _manifest(mine)["compared_with"]
        assert recorded["against"] == against
        assert recorded["stage"] == ("sft" if against == "parent" else None)

    # --- against=base_fewshot: the base sees the shots, then the held-out prompt.
    few = eval_stage.run(
        compose_cfg("stage=eval", "stage.against=base_fewshot", "stage.num_shots=2", KL)
    )
    vs_few = runs / "eval" / "vs_base_fewshot"
    manifest = _manifest(vs_few)
    shots = manifest["compared_with"]["shots"]
    assert manifest["compared_with"]["num_shots"] == 2 and len(shots) == 2
    assert "prompted with 2 SFT demonstrations" in (vs_few / "comparison.txt").read_text()
    fewshot = choose_shots(cfg.data, task, 2, seed=cfg.seed)
    assert [{"prompt": p, "reply": r} for p, r in fewshot.shots] == shots
    prompts = task.heldout_prompts()
    viewed = [HeldoutPrompt(fewshot.view(p.messages), p.text) for p in prompts]
    for v, p in zip(viewed, prompts):  # the shots, then the question, in one chat
        text = tokenizer.apply_chat_template(v.messages, add_generation_prompt=True, tokenize=False)
        assert all(s["prompt"][-1]["content"] in text and s["reply"] in text for s in shots)
        assert text.rindex(p.messages[-1]["content"]) > text.rindex(shots[-1]["reply"])
    longest = max(len(prompt_ids(tokenizer, v.messages)) for v in viewed)
    assert longest > cfg.model.max_prompt_length  # kept whole: not cut to the plain limit
    expected = greedy_replies(base_model, tokenizer, viewed, fewshot_model_cfg(cfg, longest))
    assert [s["parent_reply"] for s in _samples(vs_few)] == expected
    assert few["compare/policy_accuracy"] == metrics["compare/policy_accuracy"]

    # --- a config whose base is not the one the target was trained from: refused.
    with pytest.raises(
        BaseMismatchError,
        match=r"trained from 'builtin:tiny-llama-.*init_seed: 7 \(trained: 0\).*init_seed=0\"`",
    ):
        eval_stage.run(
            compose_cfg("stage=eval", "stage.against=base", "model.tiny.init_seed=7", KL)
        )

    assert (vs_base / DONE).is_file()  # refused before the finished eval there was reset

    # --- make compare: a row per eval, labelled by what it compared; not on the frontier.
    runs_found = cmp.find_runs([runs])
    labels = {r.label: r.stage_label for r in runs_found}
    assert labels["eval/vs_base"] == "dpo vs base"
    assert labels["eval/vs_base_fewshot"] == "dpo vs base 2-shot"
    assert labels["eval"] == "dpo vs sft"
    header, rows = cmp.table_rows(runs_found)
    row = rows[[r.label for r in runs_found].index("eval/vs_base")]
    assert row[header.index("accuracy")] == cmp._fmt(metrics["compare/policy_accuracy"])
    assert row[header.index("vs acc")] == cmp._fmt(metrics["compare/parent_accuracy"])
    points, missing = cmp.frontier_points(runs_found)
    assert [p.run for p in points] == ["dpo"] and not missing  # evals are never policy runs
    report = cmp.compare([runs], tmp_path / "cmp")
    assert "dpo vs base" in report.table and "dpo vs base 2-shot" in report.markdown


def test_a_stage_without_parent_can_be_compared_with_the_base(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())
    with pytest.raises(HandoffError, match=r"no parent.*stage\.target=sft stage\.against=base"):
        eval_stage.run(compose_cfg("stage=eval", "stage.target=sft", KL))
    metrics = eval_stage.run(
        compose_cfg("stage=eval", "stage.target=sft", "stage.against=base", KL)
    )
    run_dir = tmp_path / "runs" / "toy" / "eval" / "vs_base"
    assert _manifest(run_dir)["target"]["stage"] == "sft"
    sft_metrics = json.loads((tmp_path / "runs" / "toy" / "sft" / "metrics.json").read_text())
    assert metrics["compare/policy_accuracy"] == sft_metrics["eval/accuracy"]
