"""The task interface: a user's own task end to end (no toy), prompt files, the layering of
data_recipes and core, and the toy's comparison metrics kept as they were."""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_recipes import toy
from data_recipes.prompts import load_prompt_file
from data_recipes.rows import DataFormatError
from stages.compare import KL_KEY, REWARD_KEY
from tests.conftest import FIXTURES, REPO

USER_SFT = FIXTURES / "user_sft.jsonl"
USER_PREFS = FIXTURES / "user_prefs.jsonl"
USER_PROMPTS = FIXTURES / "user_prompts.jsonl"
NUM_HELDOUT = 8

# ---------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_data_recipes_import_nothing_from_stages() -> None:
    offenders = {
        path.name: sorted(m for m in _imports(path) if m.split(".")[0] == "stages")
        for path in sorted((REPO / "data_recipes").glob("*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}
    # And at run time: importing every data recipe loads no stages module.
    names = ", ".join(f"data_recipes.{p.stem}" for p in (REPO / "data_recipes").glob("[!_]*.py"))
    code = f"import sys, {names}; print(sorted(m for m in sys.modules if m.startswith('stages')))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_core_imports_no_particular_task() -> None:
    for path in sorted((REPO / "stages" / "core").glob("*.py")):
        modules = _imports(path)
        assert "data_recipes.toy" not in modules, path.name
        assert not any(m.startswith("stages.tasks") for m in modules), path.name
        assert "toy" not in {
            alias.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module == "data_recipes"
            for alias in node.names
        }, path.name


# ------------------------------------------------------------------------- prompt files


def test_prompt_file_split_is_keyed_by_prompt_not_by_order(tmp_path: Path) -> None:
    prompts = load_prompt_file(USER_PROMPTS, num_heldout=NUM_HELDOUT, seed=0)
    texts = [json.loads(line)["prompt"] for line in USER_PROMPTS.read_text().splitlines()]
    assert prompts.format == "prompt"
    assert len(prompts.heldout) == NUM_HELDOUT and len(prompts.train) == len(texts) - NUM_HELDOUT
    held = {p[-1]["content"] for p in prompts.heldout}
    assert held <= set(texts) and not held & {p[-1]["content"] for p in prompts.train}
    # The same prompts in another order (plus a duplicate) hold out the same prompts.
    shuffled = [*texts, texts[0]]
    random.Random(1).shuffle(shuffled)
    other = tmp_path / "shuffled.jsonl"
    other.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in shuffled))
    again = load_prompt_file(other, num_heldout=NUM_HELDOUT, seed=0)
    assert again.heldout == prompts.heldout and again.account.dropped == {"duplicate": 1}
    assert load_prompt_file(USER_PROMPTS, num_heldout=NUM_HELDOUT, seed=1).heldout != (
        prompts.heldout
    )


def test_prompts_of_sft_and_preference_files() -> None:
    sft = load_prompt_file(FIXTURES / "sft_messages.jsonl", num_heldout=1, seed=0)
    assert sft.format == "messages"
    every = [[m["content"] for m in p] for p in sft.train + sft.heldout]
    # A multi-turn conversation's prompt is everything before its last reply.
    assert ["What is 30 + 40?", "70.", "And 70 + 12?"] in every
    assert ["You add numbers.", "What is 10 + 11?"] in every  # the system turn stays
    hh = load_prompt_file(FIXTURES / "pref_hh_rlhf.jsonl", num_heldout=4, seed=0)
    assert hh.format == "hh_rlhf" and len(hh.train) + len(hh.heldout) == 38  # 2 duplicates


def test_bad_prompt_files_name_file_and_row(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Greet Ana."}\n{"prompt": "Greet Bo."}\n{"prompt": 7}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl, row 3: 'prompt' is int"):
        load_prompt_file(bad, num_heldout=1, seed=0)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"prompt": "Greet Ana."}\n{"question": "Greet Bo."}\n')
    with pytest.raises(DataFormatError, match=r"unknown.jsonl, row 2: row fits no known format"):
        load_prompt_file(unknown, num_heldout=1, seed=0)
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "Greet Ana."}\n{"prompt": "Greet Bo."}\n')
    with pytest.raises(DataFormatError, match=r"lower it: data\.prompts\.num_heldout=1$"):
        load_prompt_file(few, num_heldout=2, seed=0)


def test_cli_fails_early_on_a_bad_prompt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Greet Ana."}\n{"question": "Greet Bo."}\n')
    result = subprocess.run(
        [sys.executable, "-m", "stages", "stage=ppo", "data=file", f"data.prompts.path={bad}",
         f"paths.runs_root={tmp_path / 'runs'}", "tracking=none", "dry_run=true"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{bad}, row 2: row fits no known format" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_config_names_the_prompt_keys(compose_cfg) -> None:
    from stages.core.schema import ConfigError, validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(
            compose_cfg("stage=dpo", "data.prompts.source=file", "data.prompts.num_heldout=0")
        )
    assert "data.prompts.source=file needs data.prompts.path" in str(err.value)
    assert "data.prompts.num_heldout=0" in str(err.value)
    with pytest.raises(ConfigError, match=r"use data\.pairs\.judge=reward_model"):
        validate_config(compose_cfg("stage=dpo", f"data.prompts.path={USER_PROMPTS}"))
    typed = validate_config(compose_cfg("stage=dpo"))
    assert typed.data.task_source() == "toy"  # the embedded default, as before
    typed = validate_config(compose_cfg("stage=dpo", "data=file", f"data.pairs.path={USER_PREFS}"))
    assert typed.data.task_source() == "none"  # only files, no prompts: no task metrics


# ---------------------------------------------------------------- the toy, as it was


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    from stages.core.models import load_tokenizer, resolve_base_model
    from stages.core.schema import ModelConfig, PathsConfig, TinyModelSpec

    model_cfg = ModelConfig(
        name="tiny",
        name_or_path="builtin:tiny",
        tiny=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        max_new_tokens=6,
    )
    paths = PathsConfig(builtin_models=str(tmp_path_factory.mktemp("builtin")))
    base = resolve_base_model(model_cfg, paths)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    return model, load_tokenizer(base.path, model_cfg), model_cfg


TOY_COMPARE_KEYS = {
    "policy_accuracy", "parent_accuracy", "accuracy_delta", "win_rate", "tie_rate", "loss_rate",
    "policy_evasive_rate", "parent_evasive_rate", "policy_response_chars",
    "parent_response_chars", "policy_response_tokens", "parent_response_tokens", "num_prompts",
    "kl_per_token", "kl_per_sequence", "kl_tokens",
}  # fmt: skip


def test_toy_comparison_keeps_its_metric_names_and_values(tiny) -> None:
    import torch

    from stages.core.comparison import compare_with_parent
    from stages.core.generation import generate_replies
    from stages.core.schema import ToyTaskConfig
    from stages.tasks.addition import AdditionTask

    model, tokenizer, model_cfg = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    toy_cfg = ToyTaskConfig(num_eval=12)
    result = compare_with_parent(
        other, model, tokenizer, task=AdditionTask(toy_cfg), model_cfg=model_cfg,
        num_kl_samples=8,
    )  # fmt: skip
    m = result.metrics
    # Every name the toy reported before (and `make compare` / the frontier read), plus the
    # judge's mean score, which for the rule judge is the accuracy.
    assert set(m) == {f"compare/{k}" for k in TOY_COMPARE_KEYS | {"policy_reward", "parent_reward"}}
    assert KL_KEY in m and REWARD_KEY == "eval/accuracy"  # recipes copy policy_accuracy there
    # The values, recomputed the way the toy comparison always did: greedy replies scored by
    # the toy's rule judge, per problem.
    problems = toy.eval_prompts(toy_cfg)

    def greedy(net) -> list[str]:
        replies = generate_replies(
            net, tokenizer, [p.messages() for p in problems],
            max_new_tokens=model_cfg.max_new_tokens, max_prompt_length=model_cfg.max_prompt_length,
        )  # fmt: skip
        return [r[0] for r in replies]

    mine, theirs = greedy(other), greedy(model)
    s_mine = [toy.judge(p, r) for p, r in zip(problems, mine)]
    s_theirs = [toy.judge(p, r) for p, r in zip(problems, theirs)]
    n = len(problems)
    assert m["compare/policy_accuracy"] == sum(s_mine) / n == m["compare/policy_reward"]
    assert m["compare/parent_accuracy"] == sum(s_theirs) / n == m["compare/parent_reward"]
    assert m["compare/win_rate"] == sum(a > b for a, b in zip(s_mine, s_theirs)) / n
    assert m["compare/tie_rate"] == sum(a == b for a, b in zip(s_mine, s_theirs)) / n
    evasive = sum(r.strip().startswith(toy.EVASIVE_REPLY[:8]) for r in mine) / n
    assert m["compare/policy_evasive_rate"] == evasive
    assert m["compare/policy_response_chars"] == sum(map(len, mine)) / n
    assert [s["prompt"] for s in result.samples] == [p.prompt for p in problems]
    assert list(result.samples[0]) == [
        "prompt", "answer", "reply", "correct", "parent_reply", "parent_correct",
    ]  # fmt: skip
    assert [s["reply"] for s in result.samples] == mine
    rows = [line.split(" | ")[0].strip() for line in result.table.splitlines()[2:]]
    assert rows == [
        "greedy accuracy", "evasive rate", "response length (chars)",
        "response length (tokens)", "win / tie / loss", "KL(policy||parent)/token @T=1",
    ]  # fmt: skip


# ------------------------------------------------------- the user's own task, end to end

USER = [
    "experiment_name=greet",
    "data=file",
    f"data.sft.path={USER_SFT}",
    f"data.pairs.path={USER_PREFS}",
    f"data.prompts.path={USER_PROMPTS}",
    f"data.prompts.num_heldout={NUM_HELDOUT}",
    "data.pairs.heldout_fraction=0.2",
]
PPO_FAST = [
    "stage.total_updates=2",
    "stage.rollout_batch_size=8",
    "stage.num_minibatches=2",
    "stage.num_ppo_epochs=2",
    "stage.response_length=8",
    "stage.num_prompts=64",
    "stage.save_steps=1",
]
GRPO_FAST = [
    "stage.max_steps=4",
    "stage.save_steps=2",
    "stage.num_generations=4",
    "stage.num_prompts=64",
]
DPO_ON_POLICY = [
    "data.pairs.source=on_policy",
    "data.pairs.judge=reward_model",
    "data.pairs.num_prompts=32",
    "data.pairs.samples_per_prompt=4",
    "data.pairs.min_margin=0.0",
    "stage.logging_steps=1",
]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_comparison(run_dir: Path, heldout_texts: list[str], rm_dir: Path) -> dict:
    """The stage's comparison with SFT: RM score, win rate and KL on the file's held-out
    prompts, no accuracy (the RM cannot tell correct from incorrect)."""
    import torch  # noqa: F401  (the scorer below runs the RM)

    from stages.core.models import load_tokenizer
    from stages.core.reward_scoring import RewardScorer, load_reward_model_dir
    from stages.core.runtime import resolve_precision
    from stages.core.schema import ModelConfig, PeftConfig, TinyModelSpec

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("policy_reward", "parent_reward", "win_rate", "tie_rate", "loss_rate"):
        assert math.isfinite(metrics[f"compare/{key}"]), key
    total = sum(metrics[f"compare/{k}_rate"] for k in ("win", "tie", "loss"))
    assert total == pytest.approx(1.0)
    assert metrics["compare/kl_tokens"] > 0 and math.isfinite(metrics["compare/kl_per_token"])
    assert metrics["compare/num_prompts"] == NUM_HELDOUT
    # The RM's scores say nothing of correct or incorrect: no task accuracy.
    assert not {"compare/policy_accuracy", "compare/parent_accuracy", "eval/accuracy"} & set(
        metrics
    )
    samples = _read_jsonl(run_dir / "eval_samples.jsonl")
    assert [s["prompt"] for s in samples] == heldout_texts
    mean = sum(s["score"] for s in samples) / len(samples)
    assert metrics["compare/policy_reward"] == pytest.approx(mean)
    # The judge is this experiment's RM: its final/ gives the recorded scores again.
    model_cfg = ModelConfig(name="tiny", name_or_path="builtin:tiny", tiny=TinyModelSpec())
    scorer = RewardScorer(
        load_reward_model_dir(rm_dir / "final", model_cfg, PeftConfig(), resolve_precision("auto")),
        load_tokenizer(rm_dir / "final", model_cfg),
    )
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in samples]
    rescored = scorer.score(prompts, [s["reply"] for s in samples])
    assert rescored == pytest.approx([s["score"] for s in samples], abs=1e-4)
    return metrics


def test_users_own_task_end_to_end(compose_cfg, tmp_path: Path) -> None:
    from stages.core.handoff import DONE, MANIFEST, file_sha256
    from stages.dpo import recipe as dpo
    from stages.ppo import recipe as ppo
    from stages.rm import recipe as rm
    from stages.sft import recipe as sft

    runs = tmp_path / "runs" / "greet"
    task_prompts = load_prompt_file(USER_PROMPTS, num_heldout=NUM_HELDOUT, seed=0)
    heldout_texts = [p[-1]["content"] for p in task_prompts.heldout]
    train_texts = {p[-1]["content"] for p in task_prompts.train}
    file_texts = [r["prompt"] for r in _read_jsonl(USER_PROMPTS)]
    assert set(heldout_texts) <= set(file_texts)

    # SFT on their SFT file: no held-out metric yet (their task is judged by an RM).
    sft.run(compose_cfg("stage=sft", *USER))
    sft_metrics = json.loads((runs / "sft" / "metrics.json").read_text())
    assert not any(k.startswith(("eval/", "compare/")) for k in sft_metrics)
    # RM on their preference file.
    rm_metrics = rm.run(compose_cfg("stage=rm", *USER))
    assert "eval/pairwise_accuracy" in rm_metrics and (runs / "rm" / DONE).is_file()
    assert not any(k.startswith("eval/probe") for k in rm_metrics)  # no toy probe

    # PPO on their prompt file: its training prompts are the file's train side.
    ppo.run(compose_cfg("stage=ppo", "tracking=none", *USER, *PPO_FAST, fast=False))
    ppo_manifest = json.loads((runs / "ppo" / MANIFEST).read_text())
    assert ppo_manifest["data"]["prompts"] == len(train_texts)
    _check_comparison(runs / "ppo", heldout_texts, runs / "rm")

    # DPO on on-policy pairs: SFT's samples on their train prompts, judged by their RM.
    dpo.run(compose_cfg("stage=dpo", *USER, *DPO_ON_POLICY))
    dpo_manifest = json.loads((runs / "dpo" / MANIFEST).read_text())
    assert dpo_manifest["data"]["judge"].startswith("reward_model:")
    # The RM that judged is recorded like a parent: re-training it makes this DPO stale.
    assert dpo_manifest["upstream"]["rm"]["manifest_sha256"] == file_sha256(runs / "rm" / MANIFEST)
    pairs = _read_jsonl(runs / "dpo" / "heldout_pairs.jsonl")
    cache = Path(dpo_manifest["data"]["cache"]["path"])
    pairs += _read_jsonl(cache / "train.jsonl")
    assert pairs and {r["prompt"][-1]["content"] for r in pairs} <= train_texts
    dpo_metrics = _check_comparison(runs / "dpo", heldout_texts, runs / "rm")

    # Forgetting on their data: the log-likelihood of SFT's held-out replies (its
    # validation.jsonl), for the stage and its parent.
    assert (runs / "sft" / "validation.jsonl").is_file()
    for metrics in (dpo_metrics, json.loads((runs / "ppo" / "metrics.json").read_text())):
        assert metrics["forgetting/sft_replies/count"] > 0
        assert metrics["forgetting/sft_replies"] == pytest.approx(
            metrics["forgetting/sft_replies/parent_loglik_per_token"]
            - metrics["forgetting/sft_replies/loglik_per_token"]
        )
    # Replay of their own SFT-format file, in DPO and as PPO-ptx.
    mix = ["data.mix.source=file", f"data.mix.path={USER_SFT}", "paths.variant=mix"]
    dpo.run(compose_cfg("stage=dpo", *USER, *DPO_ON_POLICY, *mix))
    ppo.run(compose_cfg("stage=ppo", "tracking=none", *USER, *PPO_FAST, *mix, fast=False))
    for stage in ("dpo", "ppo"):
        replay = json.loads((runs / stage / "mix" / MANIFEST).read_text())["replay"]
        assert replay["source"] == "file" and replay["path"] == str(USER_SFT)
        assert replay["tokenised"] == len(_read_jsonl(USER_SFT))

    # GRPO on their prompt file, rewarded by their task's judge: their RM.
    from stages.grpo import recipe as grpo

    grpo.run(compose_cfg("stage=grpo", *USER, *GRPO_FAST))
    grpo_manifest = json.loads((runs / "grpo" / MANIFEST).read_text())
    assert grpo_manifest["data"]["prompts"] == len(train_texts)
    assert grpo_manifest["reward"]["source"] == "task"
    assert grpo_manifest["upstream"]["rm"]["manifest_sha256"] == file_sha256(runs / "rm" / MANIFEST)
    _check_comparison(runs / "grpo", heldout_texts, runs / "rm")


def test_the_schema_and_the_task_resolver_know_the_same_task_sources() -> None:
    """PromptsConfig keeps its own list of sources (validating a config imports no task code);
    it must name exactly the resolver's tasks, plus auto and none."""
    from stages.core.schema import TASK_SOURCES as SCHEMA_SOURCES
    from stages.core.task import TASK_SOURCES

    assert set(SCHEMA_SOURCES) == {"auto", "none", *TASK_SOURCES}
