"""Comparison of a stage with its parent: the metrics, the table, and the eval stage."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_recipes import toy
from stages import dpo, sft
from stages import eval as eval_stage
from stages.core.comparison import (
    compare_with_parent,
    preference_logps,
    response_logprobs,
    tokenize_completion,
)
from stages.core.handoff import DONE, MANIFEST, HandoffError, file_sha256
from stages.core.models import load_tokenizer, resolve_base_model
from stages.core.schema import ModelConfig, PathsConfig, TinyModelSpec, ToyTaskConfig

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
        toy_cfg=ToyTaskConfig(num_eval=12),
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
        toy_cfg=ToyTaskConfig(num_eval=12),
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
