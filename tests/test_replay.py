"""Replay mixing (data.mix): batches, the NLL term, its config checks, DPO and PPO-ptx."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from stages.core.handoff import MANIFEST, last_complete_checkpoint
from stages.core.replay import ReplayBatches, causal_lm_nll, replay_layout
from stages.core.schema import ConfigError, validate_config
from stages.dpo import recipe as dpo
from stages.ppo.config import PPOHyperparams
from stages.ppo.roles import SeparateRoles
from stages.ppo.trainer import PPOTrainer
from stages.sft import recipe as sft
from tests.conftest import saved_tensors

PAD, EOS, VOCAB = 0, 1, 40
ROWS = [([3, 4, 5], [6, 7, EOS]), ([8, 9], [10, EOS]), ([11, 12, 13, 14], [15, 16, 17, EOS])]


def _llama(seed: int, cls=LlamaForCausalLM, **extra):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False,
        **extra,
    )  # fmt: skip
    return cls(config)


def test_batches_are_a_function_of_seed_step_and_micro_batch() -> None:
    replay = ReplayBatches(ROWS, pad_token_id=PAD, rows_per_step=2, seed=3)
    first = replay.batch(5, 1)
    again = ReplayBatches(ROWS, pad_token_id=PAD, rows_per_step=2, seed=3).batch(5, 1)
    assert all(torch.equal(a, b) for a, b in zip(vars(first).values(), vars(again).values()))
    drawn = {tuple(replay.batch(s, m).response_ids[0].tolist()) for s in range(6) for m in range(2)}
    assert len(drawn) > 1  # other steps draw other rows
    # Layout: prompts end at the right edge, replies start at the left edge.
    assert first.query_mask[:, -1].all() and first.response_mask[:, 0].all()
    ids, attention, positions = replay_layout(first)
    for row in range(2):
        tokens = ids[row][attention[row].bool()].tolist()
        assert tuple(tokens) in {tuple(p + r) for p, r in ROWS}
        assert positions[row][attention[row].bool()].tolist() == list(range(len(tokens)))


def test_the_nll_term_equals_the_language_modelling_loss_on_the_replies() -> None:
    model = _llama(0)
    replay = ReplayBatches(ROWS, pad_token_id=PAD, rows_per_step=3, seed=0)
    batch = replay.batch(0)
    nll = causal_lm_nll(model, batch)
    # Hand-check: each row alone, unpadded, labels only on the reply, token-weighted mean.
    total, tokens = 0.0, 0
    for prompt, reply in ROWS:
        labels = [-100] * len(prompt) + reply
        out = model(input_ids=torch.tensor([prompt + reply]), labels=torch.tensor([labels]))
        total += float(out.loss) * len(reply)
        tokens += len(reply)
    assert float(nll) == pytest.approx(total / tokens, rel=1e-5)
    nll.backward()  # it carries gradients into the policy
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_mix_config_errors_name_the_key(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"data.mix.source=file needs data.mix.path"):
        validate_config(compose_cfg("stage=dpo", "data.mix.source=file"))
    with pytest.raises(ConfigError, match=r"data.mix.path='nowhere.jsonl': no such file"):
        validate_config(
            compose_cfg("stage=dpo", "data.mix.source=file", "data.mix.path=nowhere.jsonl")
        )
    with pytest.raises(ConfigError, match=r"works in \['dpo', 'kto', 'ppo'\], not in stage grpo"):
        validate_config(compose_cfg("stage=grpo", "data.mix.source=sft"))
    with pytest.raises(ConfigError, match=r"data.mix.source='sometimes' is not one of"):
        validate_config(compose_cfg("stage=dpo", "data.mix.source=sometimes"))
    # Stages before the replaying one take the same ARGS and ignore them.
    for stage in ("sft", "rm"):
        validate_config(compose_cfg(f"stage={stage}", "data.mix.source=sft"))


PAIRS_FAST = [
    "data.pairs.num_prompts=64",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "stage.logging_steps=1",
]


def test_dpo_with_replay_adds_the_nll_term_and_records_it(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())
    runs = tmp_path / "runs" / "toy"
    dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST, "paths.variant=plain"))
    dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST, "data.mix.source=sft", "data.mix.coef=2.0",
                        "paths.variant=mixed"))  # fmt: skip
    plain, mixed = runs / "dpo" / "plain", runs / "dpo" / "mixed"

    replay = json.loads((mixed / MANIFEST).read_text())["replay"]
    assert replay["source"] == "sft" and replay["coef"] == 2.0
    assert replay["tokenised"] > 0
    # SFT's held-out rows (what forgetting is measured on) are never replayed.
    sft_heldout = (runs / "sft" / "validation.jsonl").read_text().splitlines()
    assert 0 < replay["held_out_excluded"] <= len(sft_heldout)
    assert "replay" not in json.loads((plain / MANIFEST).read_text())
    state = json.loads((last_complete_checkpoint(mixed) / "trainer_state.json").read_text())
    nll = [entry["replay/nll"] for entry in state["log_history"] if "replay/nll" in entry]
    assert len(nll) >= 10 and all(value > 0 for value in nll)
    # Same seed, same pairs: only the replay term differs, and it moves the weights.
    a, b = saved_tensors(plain / "final"), saved_tensors(mixed / "final")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_ppo_ptx_pulls_the_policy_towards_the_replayed_demonstrations() -> None:
    def run(ptx_coef: float) -> tuple[LlamaForCausalLM, dict[str, float]]:
        torch.set_num_threads(1)
        roles = SeparateRoles(
            policy=_llama(0),
            value_model=_llama(1, LlamaForSequenceClassification, num_labels=1),
            reward_model=_llama(1, LlamaForSequenceClassification, num_labels=1),
            reference=_llama(0),
        )
        prompts = [p for p, _ in ROWS] * 4
        hyper = PPOHyperparams(
            rollout_batch_size=4, num_ppo_epochs=2, num_minibatches=2,
            gradient_accumulation_steps=2, response_length=4, temperature=0.9, total_updates=3,
            learning_rate=3e-3, seed=0,
        )  # fmt: skip
        replay = ReplayBatches(ROWS, pad_token_id=PAD, rows_per_step=3, seed=0)
        trainer = PPOTrainer(hyper, roles, prompts, pad_token_id=PAD, eos_token_id=EOS,
                             replay=replay, ptx_coef=ptx_coef)  # fmt: skip
        return roles.policy, trainer.train()

    plain_policy, plain = run(0.0)
    ptx_policy, with_ptx = run(5.0)
    assert "loss/ptx" not in plain and with_ptx["loss/ptx"] > 0
    replay = ReplayBatches(ROWS, pad_token_id=PAD, rows_per_step=3, seed=0).batch(0)
    with torch.no_grad():
        assert causal_lm_nll(ptx_policy, replay) < causal_lm_nll(plain_policy, replay) - 0.1


def test_data_mix_defines_only_the_stages_that_replay() -> None:
    from stages.core.handoff import config_sha256, defining_config

    def sha(stage: str, source: str) -> str:
        config = {"stage": {"name": stage}, "data": {"name": "toy", "mix": {"source": source}}}
        return config_sha256(defining_config(config))

    # `make sft dpo ARGS="data.mix.source=sft"` after a plain `make sft`: the SFT is not stale.
    assert sha("sft", "sft") == sha("sft", "none")
    assert sha("rm", "sft") == sha("rm", "none")
    assert sha("dpo", "sft") != sha("dpo", "none")
    assert sha("ppo", "sft") != sha("ppo", "none")
