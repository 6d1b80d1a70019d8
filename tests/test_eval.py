"""Comparison of a stage with its parent: the metrics, the table, and the eval stage."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from data_recipes import toy
from stages.core import generation
from stages.core.comparison import (
    compare_with_parent,
    kl_per_token,
    preference_logps,
    response_logprobs,
    tokenize_completion,
)
from stages.core.generation import context_length, fit_to_context, generate_ids
from stages.core.handoff import DONE, MANIFEST, HandoffError, file_sha256
from stages.core.models import load_tokenizer, resolve_base_model
from stages.core.reward_scoring import RewardScorer
from stages.core.schema import ModelConfig, PathsConfig, TinyModelSpec, ToyTaskConfig
from stages.core.task_eval import task_metrics
from stages.dpo import recipe as dpo
from stages.eval import recipe as eval_stage
from stages.sft import recipe as sft
from stages.tasks.addition import AdditionTask

from .test_dpo import PAIRS_FAST


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model_cfg = ModelConfig(
        name="tiny",
        name_or_path="builtin:tiny",
        tiny=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        max_new_tokens=6,
    )
    paths = PathsConfig(builtin_models=str(tmp_path_factory.mktemp("builtin")))
    base = resolve_base_model(model_cfg, paths)
    return (
        AutoModelForCausalLM.from_pretrained(base.path),
        load_tokenizer(base.path, model_cfg),
        model_cfg,
    )


def _pairs(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        p = toy.AdditionProblem(20 + i, 31)
        rows.append(
            {
                "prompt": p.messages(),
                "chosen": [{"role": "assistant", "content": f"{p.answer}."}],
                "rejected": [{"role": "assistant", "content": "i do not know."}],
            }
        )
    return rows


def test_completion_tokens_match_trl(tiny) -> None:
    _, tokenizer, _ = tiny
    prompt_ids, completion = tokenize_completion(
        tokenizer, [{"role": "user", "content": "What is 1 + 2?"}], "3."
    )
    assert tokenizer.decode(prompt_ids).endswith("<|assistant|>")
    assert tokenizer.decode(completion) == "3.<|end|>"  # the reply and the stop token


def test_logprobs_do_not_depend_on_padding(tiny) -> None:
    model, tokenizer, _ = tiny
    rows = _pairs(3)
    alone = [preference_logps(model, tokenizer, [r]) for r in rows]
    batched_c, batched_r = preference_logps(model, tokenizer, rows)
    assert torch.allclose(torch.cat([a[0] for a in alone]), batched_c, atol=1e-5)
    assert torch.allclose(torch.cat([a[1] for a in alone]), batched_r, atol=1e-5)
    # Summed log-probs of a multi-token reply are a sum of negative per-token terms.
    per_token = response_logprobs(model, [[5, 6, 7]], [[8, 9]], pad_token_id=0)[0]
    assert per_token.shape == (2,) and bool((per_token < 0).all())


def test_a_model_compared_with_itself(tiny) -> None:
    model, tokenizer, model_cfg = tiny
    result = compare_with_parent(
        model,
        copy.deepcopy(model),
        tokenizer,
        task=AdditionTask(ToyTaskConfig(num_eval=12)),
        model_cfg=model_cfg,
        heldout_pairs=_pairs(),
        num_kl_samples=16,
    )
    m = result.metrics
    assert m["compare/kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert m["compare/kl_tokens"] > 0
    assert m["compare/tie_rate"] == 1.0 and m["compare/win_rate"] == m["compare/loss_rate"] == 0
    assert m["compare/policy_accuracy"] == m["compare/parent_accuracy"]
    assert m["compare/policy_logp_margin"] == pytest.approx(m["compare/parent_logp_margin"])
    assert m["compare/implicit_reward_accuracy"] == 0.0  # no pair gained anything
    assert len(result.samples) == 12
    lines = result.table.splitlines()
    assert lines[0].split("|")[0].strip() == "metric"
    assert any(line.startswith("KL(policy||parent)") for line in lines)
    assert any(line.startswith("win / tie / loss") and "0 / 12 / 0" in line for line in lines)


def test_a_changed_model_has_positive_kl_and_win_rates_add_up(tiny) -> None:
    model, tokenizer, model_cfg = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m = compare_with_parent(
        other,
        model,
        tokenizer,
        task=AdditionTask(ToyTaskConfig(num_eval=12)),
        model_cfg=model_cfg,
        heldout_pairs=_pairs(),
        num_kl_samples=32,
    ).metrics
    assert m["compare/kl_per_token"] > 0.01
    total = m["compare/win_rate"] + m["compare/tie_rate"] + m["compare/loss_rate"]
    assert total == pytest.approx(1.0)
    assert m["compare/policy_logp_margin"] != pytest.approx(m["compare/parent_logp_margin"])


def test_eval_stage_compares_dpo_with_sft(compose_cfg, tmp_path, capsys) -> None:
    sft.run(compose_cfg())
    trained = dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST))
    metrics = eval_stage.run(compose_cfg("stage=eval", "stage.num_kl_samples=8"))
    runs = tmp_path / "runs" / "toy"
    eval_dir = runs / "eval"
    assert (eval_dir / DONE).is_file()
    assert "dpo" in capsys.readouterr().out  # the table was printed
    manifest = json.loads((eval_dir / MANIFEST).read_text())
    assert manifest["target"]["manifest_sha256"] == file_sha256(runs / "dpo" / MANIFEST)
    assert manifest["compared_with"]["stage"] == "sft"
    assert json.loads((eval_dir / "metrics.json").read_text()) == metrics
    assert (eval_dir / "comparison.txt").is_file()

    # Reloaded from final/, the DPO model scores what it scored in memory at stage end.
    for key in ("policy_accuracy", "parent_accuracy", "win_rate", "heldout_pairs"):
        assert metrics[f"compare/{key}"] == trained[f"compare/{key}"], key
    for key in ("policy_logp_margin", "parent_logp_margin"):
        assert metrics[f"compare/{key}"] == pytest.approx(trained[f"compare/{key}"], abs=1e-3)

    # Same target: a no-op. A re-trained target: evaluated again.
    stamp = (eval_dir / MANIFEST).stat().st_mtime_ns
    eval_stage.run(compose_cfg("stage=eval", "stage.num_kl_samples=8"))
    assert (eval_dir / MANIFEST).stat().st_mtime_ns == stamp
    dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST, "force=true", "stage.max_steps=4"))
    eval_stage.run(compose_cfg("stage=eval", "stage.num_kl_samples=8"))
    manifest = json.loads((eval_dir / MANIFEST).read_text())
    assert manifest["target"]["manifest_sha256"] == file_sha256(runs / "dpo" / MANIFEST)


def test_eval_of_a_stage_without_parent_fails_clearly(compose_cfg) -> None:
    sft.run(compose_cfg())
    with pytest.raises(HandoffError, match="no parent"):
        eval_stage.run(compose_cfg("stage=eval", "stage.target=sft"))


# ------------------------------------------------------------- the model's context length

SHORT_CONTEXT = 24  # toy prompts render to ~19-23 tokens; model.max_new_tokens is 16


@pytest.fixture(scope="module")
def short_context_gpt2(tiny, tmp_path_factory: pytest.TempPathFactory):
    """A random-init GPT-2-shaped model saved and reloaded like a local checkpoint, with the
    project's tokenizer: its learned position table has only SHORT_CONTEXT rows."""
    _, tokenizer, _ = tiny
    directory = tmp_path_factory.mktemp("gpt2_short_context")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=SHORT_CONTEXT, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model_cfg = ModelConfig(name="gpt2-short", name_or_path=str(directory), max_new_tokens=16)
    return AutoModelForCausalLM.from_pretrained(directory), load_tokenizer(directory, model_cfg)


@pytest.fixture
def fresh_log_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "_already_logged", set())


def test_context_length_comes_from_the_model_config(tiny, short_context_gpt2) -> None:
    assert context_length(short_context_gpt2[0]) == SHORT_CONTEXT  # GPT-2: n_positions
    assert context_length(tiny[0]) == tiny[0].config.max_position_embeddings  # Llama
    assert context_length(torch.nn.Linear(2, 2)) is None


def test_fit_to_context_truncates_the_prompt_first_and_caps_the_reply() -> None:
    assert fit_to_context(20, 16, None) == (20, 16)  # no known limit
    assert fit_to_context(20, 16, 36) == (20, 16)  # fits exactly
    assert fit_to_context(40, 16, 48) == (32, 16)  # the prompt gives way
    assert fit_to_context(40, 32, 32) == (16, 16)  # then both share the context
    assert fit_to_context(10, 200, 100) == (10, 90)  # a short prompt leaves the reply the rest
    with pytest.raises(ValueError, match="no room for a reply"):
        fit_to_context(5, 5, 1)


def test_the_short_context_model_really_fails_past_its_positions(short_context_gpt2) -> None:
    """Guards the tests below: what they run would crash without fitting to the context."""
    model, _ = short_context_gpt2
    with pytest.raises(IndexError):
        model(input_ids=torch.zeros((1, SHORT_CONTEXT + 1), dtype=torch.long))


def test_generation_fits_prompt_and_reply_into_the_context(
    short_context_gpt2, caplog, fresh_log_once
) -> None:
    model, tokenizer = short_context_gpt2
    problems = toy.eval_prompts(ToyTaskConfig(num_eval=8))
    prompts = [p.messages() for p in problems]
    full = generation.render_prompts(tokenizer, prompts, 64)
    assert max(map(len, full)) + 16 > SHORT_CONTEXT
    with caplog.at_level(logging.WARNING, logger="stages.core.generation"):
        for do_sample in (False, True, True):
            prompt_ids, responses = generate_ids(
                model, tokenizer, prompts, max_new_tokens=16, max_prompt_length=64,
                do_sample=do_sample, seed=1, num_return_sequences=2 if do_sample else 1,
            )  # fmt: skip
            for p, whole, rows in zip(prompt_ids, full, responses):
                assert whole[-len(p) :] == p  # left-truncated: the end of the prompt is kept
                assert all(max(map(len, prompt_ids)) + len(r) <= SHORT_CONTEXT for r in rows)
            assert max(len(r) for rows in responses for r in rows) > 0
    said = [r for r in caplog.records if "context is 24 positions" in r.getMessage()]
    assert len(said) == 1, caplog.text  # once, not once per call
    assert "model.max_prompt_length + model.max_new_tokens <= 24" in said[0].getMessage()


def test_comparison_and_eval_run_within_a_short_context(
    short_context_gpt2, caplog, fresh_log_once
) -> None:
    model, tokenizer = short_context_gpt2
    model_cfg = ModelConfig(name="gpt2-short", max_new_tokens=16, max_prompt_length=64)
    toy_cfg = ToyTaskConfig(num_eval=8)
    long_pair = {  # a held-out pair longer than the context: prompt and reply both
        "prompt": [{"role": "user", "content": "What is 12 + 30? " * 3}],
        "chosen": [{"role": "assistant", "content": "42. " * 8}],
        "rejected": [{"role": "assistant", "content": "i do not know."}],
    }
    prompt_ids, reply_ids = tokenize_completion(tokenizer, long_pair["prompt"], "42. " * 8)
    assert len(prompt_ids) > SHORT_CONTEXT and len(reply_ids) > SHORT_CONTEXT
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with caplog.at_level(logging.WARNING, logger="stages.core.generation"):
        m = compare_with_parent(
            other, model, tokenizer, task=AdditionTask(toy_cfg), model_cfg=model_cfg,
            heldout_pairs=[*_pairs(2), long_pair], num_kl_samples=8,
        ).metrics  # fmt: skip
        kl = kl_per_token(other, model, tokenizer, [p.messages() for p in toy.eval_prompts(toy_cfg)],
                          model_cfg)  # fmt: skip
        metrics, samples = task_metrics(model, tokenizer, AdditionTask(toy_cfg), model_cfg)
    assert m["compare/kl_tokens"] > 0 and math.isfinite(m["compare/kl_per_token"])
    assert m["compare/kl_per_token"] > 0  # a different model: the KL is really measured
    assert m["compare/heldout_pairs"] == 3 and math.isfinite(m["compare/policy_logp_margin"])
    assert kl["kl_tokens"] > 0 and math.isfinite(kl["kl_per_token"])
    assert metrics["eval/num_prompts"] == 8 and len(samples) == 8
    messages = [r.getMessage() for r in caplog.records]
    assert any("context is 24 positions" in msg for msg in messages)
    assert sum("longer than the model's context of 24" in msg for msg in messages) == 1
    # The long pair was scored on what fits: at most the context minus one prompt token.
    chosen, rejected = preference_logps(model, tokenizer, [long_pair])
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    # A long prompt gives way to the response; a long response keeps one prompt token and
    # the response tokens that fit after it.
    long_prompt, long_reply = response_logprobs(
        model, [[5] * 30, [5] * 5], [[6] * 10, [6] * 40], pad_token_id=0
    )
    assert long_prompt.shape == (10,) and long_reply.shape == (SHORT_CONTEXT - 1,)


def test_reward_scoring_keeps_within_a_short_context(short_context_gpt2) -> None:
    _, tokenizer = short_context_gpt2
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=SHORT_CONTEXT, n_embd=32, n_layer=1, n_head=2,
        num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    scorer = RewardScorer(GPT2ForSequenceClassification(config).eval(), tokenizer, max_length=128)
    assert scorer.max_length == SHORT_CONTEXT  # model.max_length 128 lowered to the context
    long_row = list(range(10, 10 + 2 * SHORT_CONTEXT))
    long_score, end_score = scorer.score_ids([long_row, long_row[-SHORT_CONTEXT:]])
    assert long_score == pytest.approx(end_score)  # the RM read the row's last tokens
