"""PPO losses and the per-token quantities they are built from.

Owns: log-probs of chosen tokens at a sampling temperature (trl's ``selective_log_softmax`` on
fp32 logits), the clipped policy-ratio loss and the clipped value loss, each reduced over valid
response tokens only (``mask``) and returned with the diagnostics trl 1.12.0 logged (clip
fractions, approx KL). Entropy is trl's ``entropy_from_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import selective_log_softmax

from stages.ppo.advantages import masked_mean


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / T)[token] for each position; computed in fp32 for stability.

    The temperature must be the sampling temperature: the ratio in the PPO loss compares the
    policy that *sampled* the tokens (at T) with the policy being trained (at T). The fp32 cast
    is ours: trl's bf16 path is a different (per-row log_softmax) computation, and on fp32 its
    result and gradient are bit-identical to the gather - logsumexp we had
    (tests/test_ppo_math.py pins that).
    """
    return selective_log_softmax(logits.float(), tokens, temperature)


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # masked mean of max(-A * ratio, -A * clip(ratio))
    clipfrac: torch.Tensor  # share of valid tokens where the clipped branch was taken
    approxkl: torch.Tensor  # 0.5 * mean((new - old logp)^2): KL(old || new) to 2nd order
    ratio: torch.Tensor  # mean probability ratio new/old


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLossOutput:
    """PPO-clip surrogate (pessimistic max of the unclipped and clipped losses)."""
    log_ratio = (new_logprobs - old_logprobs).masked_fill(~mask, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLossOutput(loss, clipfrac, approxkl, mean_ratio)


@dataclass
class ValueLossOutput:
    loss: torch.Tensor  # 0.5 * masked mean of max(unclipped, clipped) squared errors
    clipfrac: torch.Tensor  # share of valid tokens where the clipped error was larger


def clipped_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> ValueLossOutput:
    """Value regression to the GAE returns, clipped around the rollout-time values."""
    clipped_values = torch.clamp(
        new_values, old_values - cliprange_value, old_values + cliprange_value
    )
    unclipped_err = (new_values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return ValueLossOutput(loss, clipfrac)
