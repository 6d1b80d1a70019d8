"""On-policy paired comparisons: pairing, filters, decontamination, split, determinism, cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from data_recipes import pairs, toy
from stages.core.models import load_tokenizer, resolve_base_model
from stages.core.on_policy_pairs import generate_pairs, resolve_judge
from stages.core.schema import ConfigError, ModelConfig, PairsConfig, PathsConfig, ToyTaskConfig
from stages.tasks.addition import AdditionTask

FIXTURES = Path(__file__).parent / "fixtures"


def ask(a: int, b: int) -> list[dict[str, str]]:
    return toy.AdditionProblem(a, b).messages()


def texts(row: dict, key: str) -> str:
    return row[key][0]["content"]


# ---- build_pairs: strategies and filters -----------------------------------------------------


def test_best_vs_worst_pairs_a_top_scored_with_a_bottom_scored_reply() -> None:
    rows, stats = pairs.build_pairs(
        [ask(23, 45), ask(10, 11)],
        [["67.", "68.", "i do not know.", "68"], ["21.", "21."]],
        [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0]],
    )
    assert len(rows) == 1 and stats["kept"] == 1
    row = rows[0]
    assert row["prompt"] == ask(23, 45)
    assert texts(row, "chosen") in {"68.", "68"}
    assert texts(row, "rejected") in {"67.", "i do not know."}
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    assert row["margin"] == 1.0
    assert stats["dropped"]["ties"] == 1  # the second prompt: every sample scored the same
    assert stats["mean_margin"] == 1.0


def test_same_inputs_and_seed_give_the_same_pairs_and_seed_changes_tie_breaks() -> None:
    prompts = [ask(a, a + 1) for a in range(10, 60)]
    samples = [[f"{i}.", f"{i + 1}.", f"{i + 2}.", "x", "y", "z"] for i in range(50)]
    scores = [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]] * 50
    first, _ = pairs.build_pairs(prompts, samples, scores, seed=3)
    again, _ = pairs.build_pairs(prompts, samples, scores, seed=3)
    assert first == again
    other, _ = pairs.build_pairs(prompts, samples, scores, seed=4)
    assert other != first  # ties are broken by the seeded RNG
    # Per-prompt RNG: the pair of a prompt does not depend on the other prompts or their order.
    reversed_rows, _ = pairs.build_pairs(prompts[::-1], samples[::-1], scores[::-1], seed=3)
    assert reversed_rows[::-1] == first


def test_margin_filter_drops_close_pairs() -> None:
    prompts = [ask(11, 12), ask(13, 14), ask(15, 16)]
    samples = [["a", "b"], ["c", "d"], ["e", "f"]]
    scores = [[0.9, 0.6], [1.0, 0.0], [0.7, 0.2]]
    rows, stats = pairs.build_pairs(prompts, samples, scores, min_margin=0.5)
    assert [texts(r, "chosen") for r in rows] == ["c", "e"]
    assert all(r["margin"] >= 0.5 - 1e-9 for r in rows)
    assert stats["dropped"]["margin"] == 1
    loose, _ = pairs.build_pairs(prompts, samples, scores, min_margin=0.1)
    assert len(loose) == 3


@pytest.mark.parametrize("strategy", pairs.STRATEGIES)
def test_never_pairs_identical_texts(strategy: str) -> None:
    # A noisy judge can score the same text differently: such a pair teaches nothing.
    prompts = [ask(20 + i, 30) for i in range(40)]
    samples = [["50.", "50.", "50."] for _ in prompts]
    scores = [[1.0, 0.0, 0.5] for _ in prompts]
    rows, stats = pairs.build_pairs(
        prompts,
        samples,
        scores,
        strategy=strategy,
        min_margin=0.0,
        references=["50."] * len(prompts),
        reference_scores=[1.0] * len(prompts),
    )
    assert rows == []
    assert stats["dropped"]["identical"] == len(prompts)


def test_best_vs_random_and_ground_truth_vs_sample() -> None:
    prompts = [ask(23, 45)]
    samples = [["68.", "67.", "i do not know.", "58."]]
    scores = [[1.0, 0.0, 0.0, 0.0]]
    rows, _ = pairs.build_pairs(prompts, samples, scores, strategy="best_vs_random")
    assert texts(rows[0], "chosen") == "68." and texts(rows[0], "rejected") != "68."

    rows, _ = pairs.build_pairs(
        prompts,
        samples,
        scores,
        strategy="ground_truth_vs_sample",
        references=["68."],
        reference_scores=[1.0],
    )
    # SPIN-like: chosen is the demonstration; a sample equal to it is never the rejected one.
    assert texts(rows[0], "chosen") == "68."
    assert texts(rows[0], "rejected") in {"67.", "i do not know.", "58."}
    with pytest.raises(ValueError, match="references"):
        pairs.build_pairs(prompts, samples, scores, strategy="ground_truth_vs_sample")
    with pytest.raises(ValueError, match="strategy"):
        pairs.build_pairs(prompts, samples, scores, strategy="best_of_all")


def test_length_ratio_drops_pairs_whose_chosen_is_much_longer() -> None:
    prompts = [ask(23, 45), ask(30, 40)]
    samples = [["68. because 3 + 5 = 8 and 2 + 4 = 6", "67."], ["70.", "i do not know."]]
    scores = [[1.0, 0.0], [1.0, 0.0]]
    rows, stats = pairs.build_pairs(prompts, samples, scores, max_length_ratio=2.0)
    assert [texts(r, "chosen") for r in rows] == ["70."]
    assert stats["dropped"]["length"] == 1
    assert len(pairs.build_pairs(prompts, samples, scores)[0]) == 2


def test_decontamination_and_duplicates() -> None:
    prompts = [ask(23, 45), ask(23, 45), ask(50, 50)]
    samples = [["68.", "67."], ["68.", "67."], ["100.", "10."]]
    scores = [[1.0, 0.0]] * 3
    eval_keys = {pairs.prompt_key("what is 50 +   50?")}  # normalised: case and spaces
    rows, stats = pairs.build_pairs(prompts, samples, scores, eval_prompt_keys=eval_keys)
    assert [r["prompt"] for r in rows] == [ask(23, 45)]
    assert stats["dropped"]["contaminated"] == 1
    assert stats["dropped"]["duplicates"] == 1


def test_pair_prompts_come_from_the_train_pool_only() -> None:
    cfg = ToyTaskConfig(num_eval=200)
    eval_pool = {p.prompt for p in toy.problems(dataclasses.replace(cfg, num_eval=10**9), "eval")}
    prompts = pairs.toy_pair_prompts(cfg, 3000, seed=0)
    keys = [m[0]["content"] for m in prompts]
    assert len(set(keys)) == 3000  # distinct while the pool lasts
    assert not set(keys) & eval_pool
    assert pairs.toy_pair_prompts(cfg, 3000, seed=0) == prompts
    assert pairs.toy_pair_prompts(cfg, 3000, seed=1) != prompts


def test_heldout_split_is_by_prompt_and_seeded() -> None:
    rows = [
        {"prompt": ask(a, b), "chosen": [], "rejected": [], "i": i}
        for i, (a, b) in enumerate((a, b) for a in range(10, 40) for b in range(10, 40))
    ]
    rows += [dict(r, i=-1) for r in rows[:100]]  # second pair for 100 prompts
    train, heldout = pairs.split_heldout(rows, 0.2, seed=0)
    assert len(train) + len(heldout) == len(rows)
    assert 0.15 < len(heldout) / len(rows) < 0.25
    train_prompts = {json.dumps(r["prompt"]) for r in train}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in heldout}
    assert pairs.split_heldout(rows, 0.2, seed=0) == (train, heldout)
    assert pairs.split_heldout(rows, 0.2, seed=1) != (train, heldout)
    assert pairs.split_heldout(rows, 0.0, seed=0) == (rows, [])


def test_toy_judge_and_unknown_judges() -> None:
    judge = resolve_judge("toy")
    assert judge.score(ask(23, 45), "68.") == 1.0
    assert judge.score_all([ask(23, 45)] * 2, ["68.", "i do not know."]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="toy judge"):
        judge.score([{"role": "user", "content": "hello"}], "hi")
    with pytest.raises(ConfigError, match="reward_model"):
        resolve_judge("reward_model")


def test_file_pairs_are_decontaminated_and_split(tmp_path: Path) -> None:
    cfg = PairsConfig(
        source="file", path=str(FIXTURES / "pref_hh_rlhf.jsonl"), heldout_fraction=0.3
    )
    every = pairs.file_pairs(cfg)
    assert every.info["stats"]["duplicates_dropped"] == 2  # the fixture repeats two rows
    assert len(every.train) + len(every.heldout) == 38 and every.heldout
    blocked = {pairs.prompt_key(every.train[0]["prompt"])}
    fewer = pairs.file_pairs(cfg, blocked)
    assert fewer.info["stats"]["contaminated_dropped"] == 1
    assert len(fewer.train) + len(fewer.heldout) == 37


# ---- generate_pairs: sampling, judging, caching ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    model_cfg = ModelConfig(
        name="tiny", name_or_path="builtin:tiny", tiny=_tiny_spec(), max_new_tokens=6
    )
    paths = PathsConfig(builtin_models=str(tmp_path_factory.mktemp("builtin")))
    base = resolve_base_model(model_cfg, paths)
    model = AutoModelForCausalLM.from_pretrained(base.path)
    return model, load_tokenizer(base.path, model_cfg), model_cfg


def _tiny_spec():
    from stages.core.schema import TinyModelSpec

    return TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def _length_judge() -> pairs.Judge:
    # Any callable scoring (prompt, reply) plugs in: here a stand-in for a reward model.
    return pairs.Judge(name="length-v1", score=lambda prompt, reply: float(len(reply)))


def test_generate_pairs_is_deterministic_and_cached(tiny_policy, tmp_path, monkeypatch) -> None:
    model, tokenizer, model_cfg = tiny_policy
    pairs_cfg = PairsConfig(num_prompts=24, samples_per_prompt=4, heldout_fraction=0.25)
    toy_cfg = ToyTaskConfig(num_eval=20)
    kwargs = dict(
        pairs_cfg=pairs_cfg,
        task=AdditionTask(toy_cfg),
        model_cfg=model_cfg,
        policy_id={"manifest_sha256": "abc"},
        judge=_length_judge(),
    )
    first = generate_pairs(model, tokenizer, cache_root=tmp_path / "a", **kwargs)
    fresh = generate_pairs(model, tokenizer, cache_root=tmp_path / "b", **kwargs)
    assert first.train and first.heldout
    assert (first.train, first.heldout) == (fresh.train, fresh.heldout)  # seeded sampling
    assert first.info["content_hash"] == fresh.info["content_hash"]
    assert first.info["cache"]["reused"] is False
    stats = first.info["stats"]
    assert stats["generated"] == 24 * 4
    assert stats["kept"] + sum(stats["dropped"].values()) == 24
    assert "pass_at_4" in stats and 0 <= stats["pass_at_4"] <= 1
    for row in first.train + first.heldout:
        assert texts(row, "chosen") != texts(row, "rejected")
        assert len(texts(row, "chosen")) > len(texts(row, "rejected"))  # the judge's preference

    # A re-run with the same inputs reuses the cached set without sampling.
    def no_sampling(*args, **kw):
        raise AssertionError("a cached set must not be regenerated")

    monkeypatch.setattr("stages.core.on_policy_pairs.generate_replies", no_sampling)
    again = generate_pairs(model, tokenizer, cache_root=tmp_path / "a", **kwargs)
    assert again.info["cache"]["reused"] is True
    assert (again.train, again.heldout) == (first.train, first.heldout)

    # Any changed input is a different set: a new key, so sampling runs again.
    changed = dict(kwargs, policy_id={"manifest_sha256": "def"})
    with pytest.raises(AssertionError, match="must not be regenerated"):
        generate_pairs(model, tokenizer, cache_root=tmp_path / "a", **changed)
    monkeypatch.undo()
    other_seed = dict(kwargs, pairs_cfg=dataclasses.replace(pairs_cfg, seed=1))
    reseeded = generate_pairs(model, tokenizer, cache_root=tmp_path / "a", **other_seed)
    assert reseeded.info["key"] != first.info["key"]
    assert reseeded.train != first.train
    assert len(list((tmp_path / "a").iterdir())) == 2
