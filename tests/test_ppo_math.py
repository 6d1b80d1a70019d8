"""PPO math against hand-computed numbers: GAE, whitening, KL, both clipped losses,
truncation at the stop token, score placement and the missing-EOS penalty."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
from trl.trainer.utils import entropy_from_logits

from stages.ppo.advantages import (
    compute_advantages,
    generalized_advantage_estimation,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
)
from stages.ppo.config import PPOConfigError, PPOHyperparams
from stages.ppo.losses import clipped_policy_loss, clipped_value_loss, logprobs_from_logits
from stages.ppo.roles import PPORoles, SeparateRoles, causal_lm_response_logits
from stages.ppo.rollout import (
    Rollout,
    RolloutSettings,
    apply_missing_eos_penalty,
    collect_rollout,
    left_pad_prompts,
    sample_completions,
    truncate_after_stop,
)
from stages.ppo.trainer import normalize_prompts

T = torch.tensor
PAD, EOS = 0, 1


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- advantages


def test_gae_full_row_by_hand():
    # gamma 0.9, lambda 0.8 (gamma * lambda = 0.72):
    # t2: delta = 3 - 1.5 = 1.5                    A2 = 1.5
    # t1: delta = 2 + 0.9 * 1.5 - 1.0 = 2.35       A1 = 2.35 + 0.72 * 1.5  = 3.43
    # t0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4        A0 = 1.4  + 0.72 * 3.43 = 3.8696
    adv, ret = generalized_advantage_estimation(
        T([[1.0, 2.0, 3.0]]), T([[0.5, 1.0, 1.5]]), T([[True, True, True]]), gamma=0.9, lam=0.8
    )
    close(adv, [[3.8696, 3.43, 1.5]], atol=1e-5)
    close(ret, [[4.3696, 4.43, 3.0]], atol=1e-5)


def test_gae_ignores_everything_after_the_last_valid_token():
    # The episode ends at t1: the garbage reward/value at t2 must not leak back.
    # t1: delta = 2 - 1 = 1 -> A1 = 1;  t0: delta = 1 + 0.9 * 1 - 0.5 = 1.4 -> A0 = 1.4 + 0.72
    adv, ret = generalized_advantage_estimation(
        T([[1.0, 2.0, 7.0]]), T([[0.5, 1.0, 9.0]]), T([[True, True, False]]), gamma=0.9, lam=0.8
    )
    close(adv, [[2.12, 1.0, 0.0]], atol=1e-6)
    close(ret, [[2.62, 2.0, 0.0]], atol=1e-6)


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards, values = T([[0.5, -1.0, 2.0, 0.0]]), T([[0.1, 0.2, 0.3, 0.0]])
    mask = T([[True, True, True, False]])
    adv, _ = generalized_advantage_estimation(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[1.5 - 0.1, 1.0 - 0.2, 2.0 - 0.3, 0.0]])


def test_masked_statistics_use_only_valid_positions_and_unbiased_variance():
    values, mask = T([1.0, 2.0, 3.0, 100.0]), T([True, True, True, False])
    close(masked_mean(values, mask), 2.0)
    close(masked_var(values, mask), 1.0)  # (1 + 0 + 1) / (3 - 1), not / 3
    close(masked_var(values, mask, unbiased=False), 2.0 / 3.0)
    close(masked_whiten(values, mask), [-1.0, 0.0, 1.0, 0.0], atol=1e-6)
    close(masked_whiten(values, mask, shift_mean=False), [1.0, 2.0, 3.0, 0.0], atol=1e-6)
    close(
        masked_mean(T([[1.0, 3.0], [5.0, 9.0]]), T([[True, True], [True, False]]), dim=1),
        [2.0, 5.0],
    )


def test_unbiased_variance_refuses_a_single_token():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(T([1.0, 2.0]), T([True, False]))


def test_kl_estimators_by_hand():
    logp, ref = T([[-1.0, -2.0, -3.0]]), T([[-1.5, -1.0, 0.0]])
    mask = T([[True, True, False]])
    close(kl_penalty(logp, ref, mask, "k1"), [[0.5, -1.0, 0.0]])
    # k3 = (r - 1) - log r, log r = ref - logp = -0.5 and 1.0
    close(
        kl_penalty(logp, ref, mask, "k3"),
        [[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]],
    )
    assert (kl_penalty(T([[-3.0, 0.0]]), T([[-0.1, -5.0]]), T([[True, True]]), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, mask, "k2")


def test_score_lands_on_the_last_valid_token_and_kl_is_scaled():
    kl = T([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
    mask = T([[True, True, True, False], [True, False, False, False]])
    rewards, non_score = per_token_rewards(T([2.0, -1.0]), kl, mask, kl_coef=0.5)
    close(non_score, [[-0.05, -0.1, -0.15, 0.0], [-0.05, 0.0, 0.0, 0.0]])
    close(rewards, [[-0.05, -0.1, 1.85, 0.0], [-1.05, 0.0, 0.0, 0.0]])


def test_reward_whitening_rescales_but_keeps_the_mean():
    kl = torch.zeros(2, 3)
    mask = T([[True, True, True], [True, True, False]])
    rewards, _ = per_token_rewards(T([3.0, -1.0]), kl, mask, kl_coef=0.1, whiten=True)
    raw = T([[0.0, 0.0, 3.0], [0.0, -1.0, 0.0]])
    expected = (raw - 0.4) / masked_var(raw, mask).sqrt() + 0.4
    close(rewards, expected.masked_fill(~mask, 0.0).tolist(), atol=1e-5)


def test_compute_advantages_whitens_advantages_and_keeps_raw_returns():
    torch.manual_seed(0)
    mask = T([[True, True, True, False], [True, True, False, False]])
    logp, ref, values = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    out = compute_advantages(
        logprobs=logp, ref_logprobs=ref, values=values, scores=T([1.0, -1.0]), mask=mask,
        kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95,
    )  # fmt: skip
    close(masked_mean(out["advantages"], mask), 0.0, atol=1e-6)
    close(masked_var(out["advantages"], mask), 1.0, atol=1e-5)
    assert (out["advantages"][~mask] == 0).all()
    raw, returns = generalized_advantage_estimation(
        out["rewards"], values.masked_fill(~mask, 0), mask, 1.0, 0.95
    )
    torch.testing.assert_close(out["returns"], returns)
    torch.testing.assert_close(out["returns"], raw + values.masked_fill(~mask, 0))


# ----------------------------------------------------------------------------- losses


def test_policy_loss_clipping_by_hand():
    # ratio, advantage -> max(-A r, -A clip(r, 0.8, 1.2)):
    #   1.5, +1 -> max(-1.5, -1.2) = -1.2  clipped
    #   0.5, +1 -> max(-0.5, -0.8) = -0.5  not clipped
    #   0.5, -1 -> max( 0.5,  0.8) =  0.8  clipped
    #   1.1, -2 -> max( 2.2,  2.2) =  2.2  not clipped (inside the range)
    #   3.0, +5 -> masked out
    ratios = [1.5, 0.5, 0.5, 1.1, 3.0]
    old = torch.full((1, 5), -2.0)
    new = old + T([[math.log(r) for r in ratios]])
    adv = T([[1.0, 1.0, -1.0, -2.0, 5.0]])
    mask = T([[True, True, True, True, False]])
    out = clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    close(out.loss, (-1.2 - 0.5 + 0.8 + 2.2) / 4)
    close(out.clipfrac, 0.5)
    close(out.approxkl, 0.5 * sum(math.log(r) ** 2 for r in ratios[:4]) / 4, atol=1e-6)
    close(out.ratio, sum(ratios[:4]) / 4, atol=1e-6)


def test_policy_loss_gradient_vanishes_only_on_the_clipped_side():
    old = torch.zeros(1, 2)
    new = T([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    out = clipped_policy_loss(new, old, T([[1.0, 1.0]]), T([[True, True]]), cliprange=0.2)
    out.loss.backward()
    # clipped token: no gradient; unclipped: d(-A r)/d logp / 2 tokens = -1.1 / 2
    close(new.grad, [[0.0, -0.55]], atol=1e-6)


def test_value_loss_clipping_by_hand():
    # old 1.0, clip 0.2 -> clipped prediction in [0.8, 1.2]
    #   new 1.5, ret 2 -> errs 0.25 vs (1.2-2)^2 = 0.64 -> 0.64 (clipped branch)
    #   new 1.1, ret 0 -> both 1.21                    -> 1.21 (inside the range)
    #   new 1.5, ret 0 -> errs 2.25 vs 1.44            -> 2.25 (clipping would help: not taken)
    #   masked
    new, old = T([[1.5, 1.1, 1.5, 9.0]]), T([[1.0, 1.0, 1.0, 1.0]])
    returns, mask = T([[2.0, 0.0, 0.0, -9.0]]), T([[True, True, True, False]])
    out = clipped_value_loss(new, old, returns, mask, cliprange_value=0.2)
    close(out.loss, 0.5 * (0.64 + 1.21 + 2.25) / 3, atol=1e-6)
    close(out.clipfrac, 1 / 3)


def test_logprobs_and_entropy_from_logits():
    logits = T([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    tokens = T([[0, 2]])
    lp = logprobs_from_logits(logits, tokens, temperature=0.5)
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(lp, expected)
    close(entropy_from_logits(logits)[0, 1], math.log(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_library_logprobs_and_entropy_equal_the_hand_written_ones(dtype, temperature):
    """trl's selective_log_softmax / entropy_from_logits replaced our own: log-probs and their
    gradients (what PPO trains on) stay bit-identical; entropy (logged only) to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 16, 259, generator=gen) * 3).to(dtype).requires_grad_(True)
    tokens = torch.randint(0, 259, (8, 16), generator=gen)

    def previous_logprobs(z: torch.Tensor) -> torch.Tensor:  # stages/ppo/losses.py before
        z = z.float() / temperature if temperature != 1.0 else z.float()
        return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    def previous_entropy(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)

    old = previous_logprobs(logits)
    (old_grad,) = torch.autograd.grad(old.sum(), logits)
    new = logprobs_from_logits(logits, tokens, temperature)
    (new_grad,) = torch.autograd.grad(new.sum(), logits)
    assert torch.equal(new, old) and torch.equal(new_grad, old_grad)
    scaled = logits.detach().float() / temperature  # as the trainer calls it
    torch.testing.assert_close(
        entropy_from_logits(scaled), previous_entropy(scaled), rtol=0, atol=5e-5
    )


# ----------------------------------------------------------------------------- rollout pieces


def test_rollout_chunks_of_different_lengths_concat_right_padded():
    def chunk(rows: int, width: int, start: float) -> Rollout:
        ids = torch.arange(rows * width).reshape(rows, width) + 2
        floats = torch.arange(rows * width, dtype=torch.float32).reshape(rows, width) + start
        return Rollout(
            query_ids=torch.full((rows, 3), 7), query_mask=torch.ones(rows, 3, dtype=torch.bool),
            response_ids=ids, response_mask=torch.ones(rows, width, dtype=torch.bool),
            logprobs=-floats, ref_logprobs=-2 * floats, values=floats,
            scores=torch.full((rows,), start), raw_scores=torch.full((rows,), start),
            contains_eos=torch.ones(rows, dtype=torch.bool),
        )  # fmt: skip

    merged = Rollout.concat([chunk(2, 3, 1.0), chunk(1, 5, 10.0)], pad_token_id=PAD)
    assert merged.response_ids.tolist() == [[2, 3, 4, PAD, PAD], [5, 6, 7, PAD, PAD],
                                            [2, 3, 4, 5, 6]]  # fmt: skip
    assert merged.response_mask.dtype == torch.bool
    assert merged.response_mask.sum(1).tolist() == [3, 3, 5]
    assert merged.values.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 0, 0], [10, 11, 12, 13, 14]]
    assert merged.ref_logprobs[0].tolist() == [-2, -4, -6, 0, 0]
    assert merged.scores.tolist() == [1, 1, 10] and merged.query_ids.shape == (3, 3)


def test_truncation_after_the_first_stop_token():
    tokens = T([[5, 1, 7, 8], [5, 6, 7, 8], [1, 1, 3, 4]])
    out, mask, has_stop = truncate_after_stop(tokens, stop_token_id=EOS, pad_token_id=PAD)
    assert out.tolist() == [[5, 1, 0, 0], [5, 6, 7, 8], [1, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_stop.tolist() == [True, False, True]
    out, mask, has_stop = truncate_after_stop(tokens, stop_token_id=None, pad_token_id=PAD)
    assert out.tolist() == tokens.tolist() and mask.all() and not has_stop.any()


def test_missing_eos_penalty():
    scores, has_eos = T([1.0, 1.0, 0.5]), T([True, False, True])
    close(apply_missing_eos_penalty(scores, has_eos, 1.0), [1.0, 0.0, 0.5])
    close(apply_missing_eos_penalty(scores, has_eos, 0.25), [1.0, 0.75, 0.5])
    close(apply_missing_eos_penalty(scores, has_eos, None), [1.0, 1.0, 0.5])


def test_prompts_accepted_as_id_lists_rows_or_a_dataset():
    from datasets import Dataset

    rows = [[4, 5], [6]]
    assert normalize_prompts(rows) == rows
    assert normalize_prompts([{"input_ids": r} for r in rows]) == rows
    assert normalize_prompts(Dataset.from_dict({"input_ids": rows})) == rows
    with pytest.raises(ValueError, match="input_ids"):
        normalize_prompts(Dataset.from_dict({"prompt": ["hi"]}))
    with pytest.raises(ValueError, match="empty"):
        normalize_prompts([[4], []])


def test_left_padding():
    ids, mask = left_pad_prompts([[4, 5, 6], [7]], pad_token_id=PAD)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="empty"):
        left_pad_prompts([[4], []], pad_token_id=PAD)


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, **extra,
    )  # fmt: skip


def test_sampler_logprobs_match_a_full_forward_at_temperature():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    query, qmask = left_pad_prompts([[4, 5, 6, 7], [8, 9]], PAD)
    tokens, logprobs = sample_completions(
        model, query, qmask, max_new_tokens=6, temperature=0.7, stop_token_id=EOS,
        pad_token_id=PAD, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    response, rmask, _ = truncate_after_stop(tokens, EOS, PAD)
    ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = causal_lm_response_logits(model, ids, mask, positions, response.shape[1])
    full = logprobs_from_logits(logits, response, 0.7).masked_fill(~rmask, 0)
    torch.testing.assert_close(logprobs.masked_fill(~rmask, 0), full, atol=1e-5, rtol=0)
    # Same generator seed -> same samples.
    again, _ = sample_completions(
        model, query, qmask, max_new_tokens=6, temperature=0.7, stop_token_id=EOS,
        pad_token_id=PAD, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert torch.equal(tokens, again)


class _LastTokenRoles(PPORoles):
    """Stub roles: a policy that never says pad/EOS, except that prompts ending in 7 get EOS
    as their 3rd sampled token; the reward is the id of the token it is read at, so the test
    sees *where* the score was read."""

    train_module = torch.nn.Identity()

    class _Policy(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, cache=None, **_):
            from types import SimpleNamespace

            if cache is None:  # the prompt pass
                self.stops, self.calls = input_ids[:, -1] == 7, 0
            self.calls += 1
            logits = torch.zeros(input_ids.shape[0], 1, 16)
            logits[:, :, :2] = -50.0
            if self.calls == 3:
                logits[self.stops] = -50.0
                logits[self.stops, :, EOS] = 50.0
            return SimpleNamespace(logits=logits, cache="cache")

    @contextmanager
    def generation_policy(self):
        yield self._Policy()

    def reference_logits(self, input_ids, attention_mask, position_ids, response_width):
        return torch.zeros(input_ids.shape[0], response_width, 16)

    def values(self, input_ids, attention_mask, position_ids, response_width):
        return torch.zeros(input_ids.shape[0], response_width)

    def reward_scores(self, input_ids, attention_mask, position_ids, last_index):
        return input_ids[torch.arange(input_ids.shape[0]), last_index].float()

    def named_trainable_parameters(self):
        return {}

    def frozen_modules(self):
        return {}

    def save_policy(self, directory):
        raise NotImplementedError


def test_rollout_reads_the_score_at_the_last_real_token_and_penalises_missing_eos():
    query, qmask = left_pad_prompts([[4, 5, 6, 7], [8, 9, 10, 11]], PAD)
    settings = RolloutSettings(
        response_length=5, temperature=1.0, stop_token_id=EOS, pad_token_id=PAD,
        missing_eos_penalty=100.0,
    )  # fmt: skip
    rollout = collect_rollout(
        _LastTokenRoles(), query, qmask, settings, torch.Generator().manual_seed(0)
    )
    assert rollout.response_ids.shape == (2, 5)
    assert rollout.response_ids[0, 2] == EOS and (rollout.response_ids[0, 3:] == PAD).all()
    assert rollout.response_lengths.tolist() == [3, 5]
    assert rollout.contains_eos.tolist() == [True, False]
    # row 0: read at its EOS (id 1); row 1: at its 5th token, minus the missing-EOS penalty.
    assert rollout.raw_scores.tolist() == [1.0, float(rollout.response_ids[1, 4])]
    assert rollout.scores.tolist() == [1.0, float(rollout.response_ids[1, 4]) - 100.0]
    assert (rollout.logprobs[0, 3:] == 0).all()


def test_reward_model_score_is_read_at_the_last_real_token():
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(tiny_config(num_labels=1))
    policy = LlamaForCausalLM(tiny_config())
    roles = SeparateRoles(policy, LlamaForSequenceClassification(tiny_config(num_labels=1)), rm,
                          LlamaForCausalLM(tiny_config()))  # fmt: skip
    query, qmask = left_pad_prompts([[4, 5, 6], [7, 8]], PAD)
    response = T([[9, 1, 0], [10, 11, 12]])
    rmask = T([[True, True, False], [True, True, True]])
    ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        scores = roles.reward_scores(ids, mask, positions, T([3 + 1, 3 + 2]))
        alone = [
            rm(input_ids=T([[4, 5, 6, 9, 1]])).logits,
            rm(input_ids=T([[7, 8, 10, 11, 12]])).logits,
        ]
    torch.testing.assert_close(scores, torch.cat(alone).squeeze(-1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- config


def test_config_rejects_bad_values_naming_the_key():
    for bad, key in [
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(lam=0.0), "lam"),
        (dict(lam=1.5), "lam"),
        (dict(cliprange=0.0), "cliprange"),
        (dict(cliprange_value=-1.0), "cliprange_value"),
        (dict(rollout_batch_size=10, num_minibatches=4), "rollout_batch_size"),
        (dict(lr_scheduler="step"), "lr_scheduler"),
        (dict(temperature=0.0), "temperature"),
    ]:
        with pytest.raises(PPOConfigError, match=key):
            PPOHyperparams(**bad)
    cfg = PPOHyperparams(rollout_batch_size=16, num_minibatches=2, total_episodes=100)
    assert cfg.num_updates == 7
    assert cfg.local_batch_size(2) == 8
    with pytest.raises(PPOConfigError, match="world_size"):
        cfg.local_batch_size(3)


def test_config_is_omegaconf_compatible():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(PPOHyperparams)
    merged = OmegaConf.merge(cfg, {"kl_coef": 0.1, "stop_token": None})
    assert merged.kl_coef == 0.1 and merged.stop_token is None
