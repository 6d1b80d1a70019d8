"""From a scored rollout to advantages: masked statistics, KL estimators, per-token rewards, GAE.

Everything here is pure tensor math on ``[batch, response_len]`` tensors plus a boolean
``mask`` of valid response tokens (the sampled tokens up to and including the stop token;
everything after it is padding). Values outside the mask never leak into a statistic, and
outputs are zero outside the mask.
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (all positions or along dim)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions; unbiased (Bessel-corrected) by default, like TRL."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(
                "unbiased variance needs at least 2 valid tokens; the minibatch is too small "
                "(raise rollout_batch_size or lower num_minibatches)"
            )
        var = var * count / (count - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True
) -> torch.Tensor:
    """(x - mean) / std over the masked positions; ``shift_mean=False`` keeps the mean.

    Keeping the mean matters for rewards: whitening should rescale them, not turn a good
    batch into a neutral one. Positions outside the mask are returned as 0.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(~mask, 0.0)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) on sampled tokens (Schulman's k1/k3).

    k1 = logp - ref_logp: unbiased, single tokens can be negative.
    k3 = (r - 1) - log r with r = exp(ref_logp - logp): unbiased, never negative, lower variance.
    """
    log_ratio = ref_logprobs - logprobs  # log r
    if estimator == "k1":
        kl = -log_ratio
    elif estimator == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")
    return kl.masked_fill(~mask, 0.0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (masks are prefixes: length - 1)."""
    return mask.long().sum(-1).clamp(min=1) - 1


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    whiten: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards r_t = -kl_coef * KL_t, plus the sequence score at the last valid token.

    Returns ``(rewards, non_score_rewards)``. trl 1.12.0 put the score one position *past* the
    last valid token (inside the value mask, outside the policy mask); we put it on the last
    token the policy actually emitted, as in Huang et al., so the value mask equals the
    policy mask.
    """
    non_score = (-kl_coef * kl).masked_fill(~mask, 0.0)
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    if whiten:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    return rewards, non_score


def generalized_advantage_estimation(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) over each row's valid tokens; returns ``(advantages, returns)``.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A
    zero past the last valid token (the episode ends there). returns = A + V are the value
    targets. Neither is whitened here.
    """
    rewards = rewards.masked_fill(~mask, 0.0)
    values = values.masked_fill(~mask, 0.0)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = advantages.masked_fill(~mask, 0.0)
    return advantages, advantages + values


def compute_advantages(
    *,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten_rewards: bool = False,
) -> dict[str, torch.Tensor]:
    """The whole rollout -> advantages step, as the trainer runs it.

    Returns ``kl``, ``non_score_rewards``, ``rewards``, ``advantages`` (whitened over the valid
    tokens of this process's rollout) and ``returns`` (from the raw advantages).
    """
    kl = kl_penalty(logprobs, ref_logprobs, mask, kl_estimator)
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef, whiten=whiten_rewards)
    advantages, returns = generalized_advantage_estimation(rewards, values, mask, gamma, lam)
    return {
        "kl": kl,
        "non_score_rewards": non_score,
        "rewards": rewards,
        "advantages": masked_whiten(advantages, mask),
        "returns": returns,
    }
