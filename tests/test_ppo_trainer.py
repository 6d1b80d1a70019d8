"""PPO trainer end to end on tiny random Llamas: full weights, LoRA, shared 4-bit base (QLoRA),
checkpoint resume, determinism, learning on a rule reward, and two-process DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from stages.core.models import keep_4bit_backward
from stages.ppo import PPOConfigError, PPOHyperparams, PPOTrainer, SeparateRoles, SharedBaseRoles
from stages.ppo.roles import causal_lm_response_logits

REPO = Path(__file__).resolve().parents[1]
PAD, EOS, VOCAB = 0, 1, 32
EXPECTED_METRICS = {
    "objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
    "objective/non_score_reward", "policy/approxkl", "policy/clipfrac", "policy/entropy",
    "loss/policy", "loss/value", "val/clipfrac", "val/mean", "response/length_mean",
    "response/eos_rate", "perf/tokens_per_s", "lr",
}  # fmt: skip


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> LlamaConfig:
    config = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaConfig(**{**config, **overrides})


def seeded(cls, seed: int, **extra):
    torch.manual_seed(seed)
    return cls(tiny_config(**extra))


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(
            3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n)
    ]


def hyperparams(**overrides) -> PPOHyperparams:
    base = dict(
        rollout_batch_size=4, num_ppo_epochs=2, num_minibatches=2, gradient_accumulation_steps=2,
        response_length=6, temperature=0.9, total_updates=2, learning_rate=1e-3, seed=0,
    )  # fmt: skip
    return PPOHyperparams(**{**base, **overrides})


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module, keys=None) -> list[str]:
    after = module.state_dict()
    return [k for k in keys or before if not torch.equal(before[k], after[k])]


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def assert_finite(metrics: dict[str, float]) -> None:
    assert metrics.keys() >= EXPECTED_METRICS, EXPECTED_METRICS - metrics.keys()
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, bad


def sequences(query: list[list[int]], response_width: int = 4):
    """A fixed left-padded batch to probe logits with."""
    width = max(len(q) for q in query) + response_width
    ids = torch.full((len(query), width), PAD)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, q in enumerate(query):
        full = q + [5, 6, 7, 8][:response_width]
        ids[row, width - len(full) :] = torch.tensor(full)
        mask[row, width - len(full) :] = True
    return ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0)


PROBE = sequences([[3, 4, 5], [9, 10]])


# ============================================================================ full weights


def full_weight_roles() -> SeparateRoles:
    return SeparateRoles(
        policy=seeded(LlamaForCausalLM, 0),
        value_model=seeded(LlamaForSequenceClassification, 1, num_labels=1),
        reward_model=seeded(LlamaForSequenceClassification, 1, num_labels=1),
        reference=seeded(LlamaForCausalLM, 0),
    )


def test_full_weights_two_updates_train_policy_and_value_only(tmp_path):
    roles = full_weight_roles()
    before = {
        name: snapshot(getattr(roles, name))
        for name in ("policy", "value_model", "reference", "reward_model")
    }
    logged: list[tuple[int, dict]] = []
    trainer = PPOTrainer(
        hyperparams(save_steps=1, save_total_limit=1), roles, prompts(),
        pad_token_id=PAD, eos_token_id=EOS, output_dir=tmp_path,
        on_log=lambda m, step: logged.append((step, m)),
    )  # fmt: skip
    trainer.train()

    assert [step for step, _ in logged] == [1, 2]
    # Linear schedule over 2 updates, stepped once per update (not per optimiser step).
    assert [m["lr"] for _, m in logged] == pytest.approx([1e-3, 5e-4])
    for _, metrics in logged:
        assert_finite(metrics)
    # Policy and reference start identical: the first rollout's KL is exactly zero.
    assert logged[0][1]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert logged[1][1]["objective/kl"] != 0.0  # ... and the policy moved after one update
    assert changed(before["policy"], roles.policy)
    assert changed(before["value_model"], roles.value_model)
    assert not changed(before["reference"], roles.reference)
    assert not changed(before["reward_model"], roles.reward_model)
    # save_steps=1, save_total_limit=1: only the newest checkpoint survives.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert trainer.latest_checkpoint() == tmp_path / "checkpoint-2"


def test_prompts_are_fit_to_a_short_learned_position_context(caplog):
    """A GPT-2-shaped policy has learned positions: prompt + response past n_positions is an
    IndexError inside the embedding. The trainer keeps each prompt's end so both fit."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    def gpt2(cls, seed: int, **extra):
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=12,
            pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, **extra,
        )  # fmt: skip
        return cls(config)

    roles = SeparateRoles(
        policy=gpt2(GPT2LMHeadModel, 0),
        value_model=gpt2(GPT2ForSequenceClassification, 1, num_labels=1),
        reward_model=gpt2(GPT2ForSequenceClassification, 1, num_labels=1),
        reference=gpt2(GPT2LMHeadModel, 0),
    )
    long_prompts = [[3 + (i + j) % (VOCAB - 3) for j in range(10)] for i in range(8)]
    with caplog.at_level("WARNING"):
        trainer = PPOTrainer(
            hyperparams(response_length=6), roles, long_prompts, pad_token_id=PAD,
            eos_token_id=EOS,
        )  # fmt: skip
    # 12 positions - 6 response tokens: each prompt keeps its last 6 tokens.
    assert trainer.prompts == [p[-6:] for p in long_prompts]
    assert "keep only their last 6 tokens" in caplog.text
    metrics = trainer.train()
    assert_finite(metrics)

    with pytest.raises(PPOConfigError, match=r"stage\.response_length=12"):
        PPOTrainer(hyperparams(response_length=12), roles, long_prompts, pad_token_id=PAD)


def test_same_seed_same_run_and_exact_resume(tmp_path):
    def make() -> PPOTrainer:
        return PPOTrainer(
            hyperparams(total_updates=3), full_weight_roles(), prompts(), pad_token_id=PAD,
            eos_token_id=EOS,
        )  # fmt: skip

    uninterrupted = make()
    first = uninterrupted.train(num_updates=1)
    uninterrupted.save_checkpoint(tmp_path / "ck")
    second = uninterrupted.update()
    third = uninterrupted.update()

    again = make()
    assert comparable(again.train(num_updates=1)) == comparable(first)

    resumed = make()
    resumed.load_checkpoint(tmp_path / "ck")
    assert resumed.step == 1
    assert comparable(resumed.update()) == comparable(second)
    assert comparable(resumed.update()) == comparable(third)
    for name, value in uninterrupted.roles.trainable_state_dict().items():
        assert torch.equal(value, resumed.roles.trainable_state_dict()[name]), name

    # A fresh trainer that does NOT load the checkpoint diverges (the test can fail).
    fresh = make()
    fresh.step = 1
    assert comparable(fresh.update()) != comparable(second)


# ============================================================================ LoRA policy


@pytest.mark.parametrize("reference", ["adapters_disabled", "frozen_copy"])
def test_lora_policy_two_updates(tmp_path, reference):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if reference == "adapters_disabled":
        # SFT merged into the base; a fresh PPO adapter; reference = base without adapters.
        policy = get_peft_model(seeded(LlamaForCausalLM, 0), lora)
        ref_model = None
    else:
        # Continue a (non-trivial) SFT adapter; reference = a frozen merged copy of SFT.
        sft = get_peft_model(seeded(LlamaForCausalLM, 0), LoraConfig(**{**lora.to_dict(),
                             "init_lora_weights": False}))  # fmt: skip
        sft.save_pretrained(tmp_path / "sft")
        policy = PeftModel.from_pretrained(
            seeded(LlamaForCausalLM, 0), tmp_path / "sft", is_trainable=True
        )
        ref_model = PeftModel.from_pretrained(
            seeded(LlamaForCausalLM, 0), tmp_path / "sft"
        ).merge_and_unload()
    roles = SeparateRoles(
        policy,
        value_model=seeded(LlamaForSequenceClassification, 1, num_labels=1),
        reward_model=seeded(LlamaForSequenceClassification, 1, num_labels=1),
        reference=ref_model,
    )
    with torch.no_grad():
        ref_before = roles.reference_logits(*PROBE, 4)
        policy_before = causal_lm_response_logits(policy, *PROBE, 4)
    torch.testing.assert_close(ref_before, policy_before, atol=1e-5, rtol=0)
    base_before = {k: v.clone() for k, v in policy.get_base_model().state_dict().items()
                   if "lora_" not in k}  # fmt: skip
    lora_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}

    logged = []
    PPOTrainer(
        hyperparams(), roles, prompts(), pad_token_id=PAD, eos_token_id=EOS,
        on_log=lambda m, s: logged.append(m),
    ).train()  # fmt: skip

    for metrics in logged:
        assert_finite(metrics)
    after = policy.state_dict()
    assert [k for k in lora_before if not torch.equal(lora_before[k], after[k])]
    base_after = policy.get_base_model().state_dict()
    assert all(torch.equal(v, base_after[k]) for k, v in base_before.items())
    with torch.no_grad():
        torch.testing.assert_close(roles.reference_logits(*PROBE, 4), ref_before, atol=0, rtol=0)
        policy_after = causal_lm_response_logits(policy, *PROBE, 4)
    assert not torch.allclose(policy_after, policy_before)


# ============================================================================ shared 4-bit base


def quantization() -> BitsAndBytesConfig:
    # bf16 compute: fp32 compute mixes dtypes in the 4-bit path on CPU.
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared_base")
    # Hidden 64: bitsandbytes' CPU inference repack (which silently drops gradients, see
    # roles.keep_4bit_backward) needs it; at hidden 32 it would crash instead and hide the bug.
    seeded(LlamaForCausalLM, 0, hidden_size=64, intermediate_size=128).save_pretrained(
        root / "base"
    )
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    sft = get_peft_model(
        LlamaForCausalLM.from_pretrained(root / "base"), LoraConfig(task_type="CAUSAL_LM", **lora)
    )
    sft.save_pretrained(root / "sft")
    torch.manual_seed(2)
    rm_model = LlamaForSequenceClassification.from_pretrained(root / "base", num_labels=1)
    rm = get_peft_model(rm_model, LoraConfig(task_type="SEQ_CLS", **lora))
    rm.save_pretrained(root / "rm")
    return {"base": root / "base", "sft": root / "sft", "rm": root / "rm"}


def load_4bit(path: Path, cls=AutoModelForCausalLM, **kwargs):
    """A 4-bit model to compare the roles against, computing with the same (autograd-capable)
    kernel as the roles' base so logits match exactly."""
    model = raw_4bit(path, cls, **kwargs)
    keep_4bit_backward(model)
    return model


def raw_4bit(path: Path, cls=AutoModelForCausalLM, **kwargs):
    return cls.from_pretrained(
        path, quantization_config=quantization(), dtype=torch.bfloat16, **kwargs
    )


def shared_roles(dirs: dict[str, Path]) -> SharedBaseRoles:
    # A raw base: protecting it from bitsandbytes' CPU repack is the roles' job.
    return SharedBaseRoles.from_adapters(
        raw_4bit(dirs["base"]), sft_adapter=dirs["sft"], reward_adapter=dirs["rm"]
    )


def test_shared_base_roles_reproduce_the_adapters_they_were_built_from(adapter_dirs):
    roles = shared_roles(adapter_dirs)
    assert set(roles.model.peft_config) == {"policy", "ref", "reward", "value"}
    assert type(roles.model.get_base_model().model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    trainable = roles.named_trainable_parameters()
    assert trainable and all((".policy." in n or ".value." in n or n.startswith("value_head"))
                             for n in trainable)  # fmt: skip
    ids, mask, positions = PROBE
    with torch.no_grad():
        scores = roles.reward_scores(ids, mask, positions, torch.tensor([ids.shape[1] - 1] * 2))
        # The RM the usual way: 4-bit SEQ_CLS model + its adapter (score via modules_to_save).
        rm = PeftModel.from_pretrained(
            load_4bit(adapter_dirs["base"], AutoModelForSequenceClassification, num_labels=1),
            adapter_dirs["rm"],
        )
        expected = [rm(input_ids=ids[r, mask[r]][None]).logits.float().item() for r in range(2)]
        # Reference = the SFT adapter = the policy at the start.
        torch.testing.assert_close(
            roles.reference_logits(ids, mask, positions, 4),
            causal_lm_response_logits(roles.model, ids, mask, positions, 4),
        )
        # The value starts as a copy of the RM: the value of the state before the last
        # response token (column L-2) is the RM score read at that column.
        value_init = roles.values(ids, mask, positions, 4)[:, -1]
        rm_there = roles.reward_scores(ids, mask, positions, torch.tensor([ids.shape[1] - 2] * 2))
    torch.testing.assert_close(scores, torch.tensor(expected), atol=2e-3, rtol=0)
    torch.testing.assert_close(value_init, rm_there, atol=1e-6, rtol=0)
    assert not torch.allclose(rm_there, scores)  # different columns, different scores


def test_shared_base_two_updates_and_exact_resume(adapter_dirs, tmp_path):
    roles = shared_roles(adapter_dirs)
    ids, mask, positions = PROBE
    last = torch.tensor([ids.shape[1] - 1] * 2)
    state = roles.model.state_dict()
    frozen_before = {
        k: v.clone() for k, v in state.items() if ".policy." not in k and ".value." not in k
    }
    trained_before = roles.trainable_state_dict()
    with torch.no_grad():
        ref_before = roles.reference_logits(ids, mask, positions, 4)
        reward_before = roles.reward_scores(ids, mask, positions, last)
    head_before = roles.reward_head.weight.clone()

    def make(r: SharedBaseRoles) -> PPOTrainer:
        return PPOTrainer(hyperparams(total_updates=3), r, prompts(), pad_token_id=PAD,
                          eos_token_id=EOS)  # fmt: skip

    trainer = make(roles)
    first = trainer.train(num_updates=1)
    trainer.save_checkpoint(tmp_path / "ck")
    second = trainer.update()
    assert_finite(first)
    assert_finite(second)

    trained_after = roles.trainable_state_dict()
    for role in (".policy.", ".value.", "value_head"):
        names = [n for n in trained_before if role in n]
        assert names and any(not torch.equal(trained_before[n], trained_after[n]) for n in names)
    state = roles.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen_before.items())  # base, ref, reward
    assert torch.equal(roles.reward_head.weight, head_before)
    with torch.no_grad():
        torch.testing.assert_close(roles.reference_logits(ids, mask, positions, 4), ref_before,
                                   atol=0, rtol=0)  # fmt: skip
        torch.testing.assert_close(roles.reward_scores(ids, mask, positions, last), reward_before,
                                   atol=0, rtol=0)  # fmt: skip

    resumed = make(shared_roles(adapter_dirs))
    resumed.load_checkpoint(tmp_path / "ck")
    assert comparable(resumed.update()) == comparable(second)


def test_shared_base_policy_saves_as_a_plain_adapter(adapter_dirs, tmp_path):
    roles = shared_roles(adapter_dirs)
    with torch.no_grad():  # make the policy differ from the SFT adapter
        for name, param in roles.named_trainable_parameters().items():
            if ".policy." in name:
                param.add_(0.05)
    roles.save_policy(tmp_path / "policy")
    assert (tmp_path / "policy" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(load_4bit(adapter_dirs["base"]), tmp_path / "policy")
    with torch.no_grad():
        with roles.generation_policy() as policy:
            expected = causal_lm_response_logits(policy, *PROBE, 4)
        actual = causal_lm_response_logits(reloaded, *PROBE, 4)
    torch.testing.assert_close(actual, expected)


def test_shared_base_with_merged_sft_uses_disabled_adapters_as_reference(adapter_dirs):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    roles = SharedBaseRoles.from_adapters(
        raw_4bit(adapter_dirs["base"]), reward_adapter=adapter_dirs["rm"], policy_lora=lora
    )
    assert roles.reference_adapter is None and "ref" not in roles.model.peft_config
    ids, mask, positions = PROBE
    with torch.no_grad():
        ref = roles.reference_logits(ids, mask, positions, 4)
        base = causal_lm_response_logits(load_4bit(adapter_dirs["base"]), ids, mask, positions, 4)
    torch.testing.assert_close(ref, base)
    metrics = PPOTrainer(hyperparams(total_updates=1), roles, prompts(), pad_token_id=PAD,
                         eos_token_id=EOS).train()  # fmt: skip
    assert_finite(metrics)


# ============================================================================ learning


class TokenRuleRoles(SeparateRoles):
    """Reward = share of sampled tokens equal to TARGET (prompts never contain it)."""

    TARGET = 7

    def reward_scores(self, input_ids, attention_mask, position_ids, last_index):
        hits = ((input_ids == self.TARGET) & attention_mask).sum(-1).float()
        return hits / 8.0


@pytest.mark.slow
def test_mean_score_rises_on_a_rule_reward():
    torch.manual_seed(0)
    roles = TokenRuleRoles(
        policy=seeded(LlamaForCausalLM, 0),
        value_model=seeded(LlamaForSequenceClassification, 1, num_labels=1),
        reward_model=seeded(LlamaForSequenceClassification, 1, num_labels=1),
        reference=seeded(LlamaForCausalLM, 0),
    )
    pool = [[t for t in p if t != TokenRuleRoles.TARGET] or [3] for p in prompts(64)]
    scores: list[float] = []
    config = hyperparams(
        rollout_batch_size=16, num_ppo_epochs=4, num_minibatches=2, gradient_accumulation_steps=1,
        response_length=8, stop_token=None, missing_eos_penalty=None, kl_coef=0.01,
        learning_rate=3e-3, total_updates=20, temperature=1.0,
    )  # fmt: skip
    PPOTrainer(config, roles, pool, pad_token_id=PAD, eos_token_id=EOS,
               on_log=lambda m, s: scores.append(m["objective/scores"])).train()  # fmt: skip
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert end > start + 0.15, scores


# ============================================================================ distributed


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from accelerate import Accelerator
    from test_ppo_trainer import full_weight_roles, hyperparams, prompts, PAD, EOS
    from stages.ppo import PPOTrainer

    accelerator = Accelerator(cpu=True)
    roles = full_weight_roles()
    logged = []
    trainer = PPOTrainer(hyperparams(rollout_batch_size=8), roles, prompts(), pad_token_id=PAD,
                         eos_token_id=EOS, accelerator=accelerator,
                         on_log=lambda m, s: logged.append(m))
    trainer.train()
    trainer.save_checkpoint({out!r} + "/ck")
    digest = float(sum(p.detach().double().sum() for p in roles.named_trainable_parameters().values()))
    with open({out!r} + f"/rank{{accelerator.process_index}}.json", "w") as f:
        json.dump({{"digest": digest, "metrics": logged, "world": accelerator.num_processes,
                    "local_batch": trainer.local_batch}}, f)
    """
)


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(tmp_path):
    script = tmp_path / "ddp_ppo.py"
    script.write_text(
        DDP_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(tmp_path))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with socket.socket() as sock:  # a free port: parallel test runs must not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `--multi_gpu` on a machine without GPUs launches torchrun workers on CPU (gloo). Note
    # that `accelerate launch --cpu --num_processes 2` (accelerate 1.15) starts ONE process.
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(port), str(script)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["local_batch"] == 4
    # Gradients are all-reduced: both ranks end with identical weights ...
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # ... and metrics are averaged over ranks, so both report the same numbers.
    assert ranks[0]["metrics"][-1]["objective/kl"] == ranks[1]["metrics"][-1]["objective/kl"]
    for metrics in ranks[0]["metrics"]:
        assert_finite(metrics)
    assert len(torch.load(tmp_path / "ck" / "rng_state.pt", weights_only=True)) == 2
