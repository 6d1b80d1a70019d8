"""The four PPO roles behind one small interface: policy, reference, reward and value.

The trainer never touches models directly; it asks a ``PPORoles`` for

* ``generation_policy()``: the causal LM to sample from (a context manager, because with a
  shared base the policy adapter must be the active one while sampling);
* ``score_rollout(...)``: reference log-probs, values and reward scores of a rollout, without
  gradients;
* ``train_module``: an ``nn.Module`` whose forward returns policy logits and values over the
  response positions *with* gradients. It is what ``accelerator.prepare`` wraps (DDP needs the
  trained forward to go through one wrapped module);
* ``named_trainable_parameters()``: what the optimiser updates and checkpoints save.

Two implementations:

``SeparateRoles``
    Four models: a policy (``AutoModelForCausalLM`` or ``PeftModel``), a frozen reference
    (another causal LM, or ``None`` = the policy with its adapters disabled, for a LoRA policy
    on a merged SFT base), a frozen reward model and a trainable value model (both
    ``AutoModelForSequenceClassification`` with ``num_labels=1``).

``SharedBaseRoles``
    One base causal LM (typically 4-bit NF4) carrying LoRA adapters ``policy`` (trainable, from
    the SFT adapter), ``ref`` (the same SFT adapter, frozen; or no adapter at all when SFT was
    merged into the base), ``reward`` (frozen, from the RM's SEQ_CLS adapter) and ``value``
    (trainable, initialised from the RM adapter), plus two score heads: the RM's (frozen) and a
    trainable copy for the value. Llama-style causal-LM and sequence-classification models
    both keep the backbone at ``.model``, so the RM adapter's LoRA keys land on the same
    modules; its score head is read from the adapter's safetensors into its own ``nn.Linear``.

Position convention: for a sequence of prompt width Q and response width R, "response
positions" are the R positions Q-1 .. Q+R-2, whose outputs predict (logits) or evaluate
(values) response tokens 0 .. R-1. The last input token is never needed there, so the
policy/value/reference forwards drop it and keep only the last R outputs (no lm_head work on
prompt positions). The reward reads the hidden state of the last real token.

Every role runs with dropout off (modules in eval mode and every Dropout at p=0), during the
rollout and the update alike: dropout would make the PPO ratio noisy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from peft import PeftConfig as AdapterConfig
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from trl.trainer.utils import disable_dropout_in_model

from stages.core.adapters import (
    add_adapter_with_weights,
    causal_lm_copy,
    read_seq_cls_adapter,
    save_adapter,
)
from stages.core.models import keep_4bit_backward
from stages.ppo.losses import logprobs_from_logits

POLICY, REFERENCE, REWARD, VALUE = "policy", "ref", "reward", "value"


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good: p=0 on every Dropout (incl. LoRA dropout) and eval mode."""
    disable_dropout_in_model(model)
    model.eval()


def _freeze(model: nn.Module) -> None:
    model.requires_grad_(False)
    disable_dropout(model)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def split_sequence_classifier(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, score head) of an ``AutoModelForSequenceClassification`` (or a PeftModel of
    one): the value needs the head on *every* position, which the model's forward does not
    give."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = getattr(inner, "score", None)
    if backbone is None or head is None:
        raise TypeError(
            f"{type(inner).__name__} is not a sequence-classification model with a `.score` "
            "head on a `.{base_model_prefix}` backbone (load it with "
            "AutoModelForSequenceClassification, num_labels=1)"
        )
    return backbone, head


def causal_lm_response_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_width: int,
) -> torch.Tensor:
    """Logits at the response positions ``[B, R, V]`` (see the module docstring)."""
    return model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1].long(),
        position_ids=position_ids[:, :-1],
        use_cache=False,
        logits_to_keep=response_width,
    ).logits


def backbone_hidden(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Final (normed) hidden states ``[B, L, H]`` of a decoder backbone."""
    return backbone(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state


def head_on(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A 1-output score head on hidden states, in the head's dtype; drops the last dim."""
    return head(hidden.to(_dtype_of(head))).squeeze(-1)


class PPORoles(ABC):
    """What the trainer needs from the four roles. See the module docstring."""

    train_module: nn.Module

    # ----------------------------------------------------------------- rollout (no grad)
    @abstractmethod
    def generation_policy(self) -> AbstractContextManager[nn.Module]:
        """Context manager yielding the causal LM to sample from."""

    @abstractmethod
    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        response_width: int,
    ) -> torch.Tensor:  # fmt: skip
        """Reference logits at the response positions ``[B, R, V]``."""

    @abstractmethod
    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        response_width: int,
    ) -> torch.Tensor:  # fmt: skip
        """Values at the response positions ``[B, R]``."""

    @abstractmethod
    def reward_scores(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        last_index: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Reward-model score ``[B]`` read at column ``last_index`` of each row."""

    @torch.no_grad()
    def score_rollout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        response_ids: torch.Tensor,
        last_index: torch.Tensor,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reference log-probs at T, values, reward scores) of prompt + truncated response."""
        width = response_ids.shape[1]
        ref_logits = self.reference_logits(input_ids, attention_mask, position_ids, width)
        ref_logprobs = logprobs_from_logits(ref_logits, response_ids, temperature)
        del ref_logits
        values = self.values(input_ids, attention_mask, position_ids, width)
        scores = self.reward_scores(input_ids, attention_mask, position_ids, last_index)
        return ref_logprobs, values, scores

    # ----------------------------------------------------------------- training
    @abstractmethod
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters the optimiser updates, by stable name (checkpoint keys)."""

    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Modules that must never change (for checks and device placement)."""

    @abstractmethod
    def save_policy(self, directory: str | Path) -> None:
        """save_pretrained-style output of the trained policy (full model or adapter)."""

    def to(self, device: torch.device | str) -> PPORoles:
        """Move the roles not covered by ``train_module`` (accelerate moves that one)."""
        for module in self.frozen_modules().values():
            module.to(device)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in self.named_trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainable_parameters()
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        if missing or unexpected:
            raise KeyError(
                f"trainable state does not match the roles: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])


# =============================================================================== separate


class _SeparatePolicyValue(nn.Module):
    """Policy logits and values at the response positions, with gradients."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        response_width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        logits = causal_lm_response_logits(
            self.policy, input_ids, attention_mask, position_ids, response_width
        )
        backbone, head = split_sequence_classifier(self.value_model)
        hidden = backbone_hidden(
            backbone, input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
        )
        return logits, head_on(head, hidden[:, -response_width:])


class SeparateRoles(PPORoles):
    """Policy, reference, reward and value as separate models (full weights or LoRA).

    Args:
        policy: the causal LM to train (full weights, or a PeftModel whose adapter trains).
        value_model: ``AutoModelForSequenceClassification`` (num_labels=1), trained; usually
            loaded from the reward model's weights.
        reward_model: ``AutoModelForSequenceClassification`` (num_labels=1), frozen here.
        reference: frozen causal LM (typically a second load of the SFT model), or ``None``
            when the policy is a PeftModel whose base *is* the reference (SFT merged into the
            base, fresh PPO adapter): the reference is then the policy with adapters disabled.
    """

    def __init__(
        self,
        policy: nn.Module,
        value_model: nn.Module,
        reward_model: nn.Module,
        reference: nn.Module | None = None,
    ) -> None:
        if reference is None and not isinstance(policy, PeftModel):
            raise ValueError(
                "reference=None means 'the policy with its adapters disabled', which needs a "
                "PeftModel policy; pass a frozen copy of the SFT model as the reference"
            )
        if reference is policy or reward_model is value_model:
            raise ValueError(
                "the reference must not be the policy object, nor the reward model the value "
                "model object: load a second copy (the trained one changes)"
            )
        self.policy = policy
        self.reference = reference
        self.reward_model = reward_model
        self.value_model = value_model
        for frozen in (reference, reward_model):
            if frozen is not None:
                _freeze(frozen)
        for trained in (policy, value_model):
            disable_dropout(trained)
            keep_4bit_backward(trained)
        self._reward_parts = split_sequence_classifier(reward_model)
        self._value_parts = split_sequence_classifier(value_model)
        self.train_module = _SeparatePolicyValue(policy, value_model)
        if not self.named_trainable_parameters():
            raise ValueError("neither the policy nor the value model has trainable parameters")

    @contextmanager
    def generation_policy(self) -> Iterator[nn.Module]:
        yield self.policy

    def reference_logits(self, input_ids, attention_mask, position_ids, response_width):
        if self.reference is not None:
            return causal_lm_response_logits(
                self.reference, input_ids, attention_mask, position_ids, response_width
            )
        with self.policy.disable_adapter():
            return causal_lm_response_logits(
                self.policy, input_ids, attention_mask, position_ids, response_width
            )

    def values(self, input_ids, attention_mask, position_ids, response_width):
        backbone, head = self._value_parts
        hidden = backbone_hidden(
            backbone, input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
        )
        return head_on(head, hidden[:, -response_width:])

    def reward_scores(self, input_ids, attention_mask, position_ids, last_index):
        backbone, head = self._reward_parts
        hidden = backbone_hidden(backbone, input_ids, attention_mask, position_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return head_on(head, hidden[rows, last_index])

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        named: dict[str, nn.Parameter] = {}
        seen: set[int] = set()  # tied weights appear once
        for prefix, model in (("policy", self.policy), ("value", self.value_model)):
            for name, param in model.named_parameters():
                if param.requires_grad and id(param) not in seen:
                    seen.add(id(param))
                    named[f"{prefix}.{name}"] = param
        return named

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {"reward": self.reward_model}
        if self.reference is not None:
            frozen["reference"] = self.reference
        return frozen

    def save_policy(self, directory: str | Path) -> None:
        self.policy.save_pretrained(str(directory))


# =============================================================================== shared base


class _SharedPolicyValue(nn.Module):
    """The shared-base model plus the value head; switches adapters between roles.

    ``peft``'s ``set_adapter`` also flips ``requires_grad`` (active adapter trainable, the others
    frozen). PPO trains two adapters at once, so after every switch the trainable set is
    restored: the policy and value adapters and the value head always require grad, the
    reference and reward adapters never.
    """

    def __init__(self, model: PeftModel, value_head: nn.Linear) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head
        self._active: str | None = None
        self._trainable: list[nn.Parameter] = []

    def mark_trainable(self) -> None:
        self.model.requires_grad_(False)
        for name, param in self.model.named_parameters():
            if f".{POLICY}." in name or f".{VALUE}." in name:
                param.requires_grad_(True)
        self.value_head.requires_grad_(True)
        self._trainable = [p for p in self.parameters() if p.requires_grad]

    def activate(self, adapter: str) -> None:
        if adapter == self._active:
            return
        self.model.set_adapter(adapter, inference_mode=adapter not in (POLICY, VALUE))
        for param in self._trainable:
            param.requires_grad_(True)
        self._active = adapter

    @property
    def backbone(self) -> nn.Module:
        return self.model.get_base_model().model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        response_width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        self.activate(POLICY)
        logits = causal_lm_response_logits(
            self.model, input_ids, attention_mask, position_ids, response_width
        )
        self.activate(VALUE)
        hidden = backbone_hidden(
            self.backbone, input_ids[:, :-1], attention_mask[:, :-1], position_ids[:, :-1]
        )
        return logits, head_on(self.value_head, hidden[:, -response_width:])


class SharedBaseRoles(PPORoles):
    """All four roles on one base model with LoRA adapters (QLoRA: one 4-bit copy in memory).

    Build it with :meth:`from_adapters`; the constructor takes the assembled pieces.
    """

    def __init__(
        self,
        model: PeftModel,
        *,
        value_head: nn.Linear,
        reward_head: nn.Linear,
        reference_adapter: str | None,
    ) -> None:
        adapters = set(model.peft_config)
        needed = {POLICY, VALUE, REWARD} | ({reference_adapter} if reference_adapter else set())
        if needed - adapters:
            raise ValueError(f"shared-base model lacks adapters {sorted(needed - adapters)}")
        self.model = model
        self.reference_adapter = reference_adapter
        self.reward_head = reward_head
        _freeze(reward_head)
        disable_dropout(model)
        keep_4bit_backward(model)
        self.train_module = _SharedPolicyValue(model, value_head)
        self.train_module.mark_trainable()
        self.train_module.activate(POLICY)

    # ----------------------------------------------------------------- building
    @classmethod
    def from_adapters(
        cls,
        base_model: nn.Module,
        *,
        reward_adapter: str | Path,
        sft_adapter: str | Path | None = None,
        policy_lora: AdapterConfig | None = None,
        value_init: str = "reward",
    ) -> SharedBaseRoles:
        """Assemble the shared-base roles from adapter directories.

        Args:
            base_model: the causal LM every adapter sits on, e.g. a 4-bit NF4
                ``AutoModelForCausalLM`` (prepared with ``prepare_model_for_kbit_training``
                if you like). With ``sft_adapter=None`` it must already contain the SFT
                weights (SFT merged into it).
            reward_adapter: directory of the RM's LoRA adapter, trained on the same base with
                ``task_type="SEQ_CLS"`` (its score head saved through ``modules_to_save``).
            sft_adapter: directory of the SFT LoRA adapter. It initialises the trainable
                ``policy`` adapter and is loaded a second time, frozen, as ``ref``. ``None``:
                SFT was merged into the base, the policy is a fresh ``policy_lora`` adapter and
                the reference is the base with adapters disabled.
            policy_lora: LoRA / DoRA config of the fresh policy adapter (only with
                sft_adapter=None).
            value_init: "reward" (value adapter + head start as copies of the RM's, the usual
                choice) or "policy" (value adapter starts as the policy adapter, fresh head).
        """
        if value_init not in ("reward", "policy"):
            raise ValueError(f"value_init must be 'reward' or 'policy', got {value_init!r}")
        if sft_adapter is not None:
            model = PeftModel.from_pretrained(
                base_model, str(sft_adapter), adapter_name=POLICY, is_trainable=True
            )
            model.load_adapter(str(sft_adapter), adapter_name=REFERENCE, is_trainable=False)
            reference_adapter: str | None = REFERENCE
        else:
            if policy_lora is None:
                raise ValueError(
                    "sft_adapter=None (merged SFT) needs policy_lora for a fresh adapter"
                )
            model = get_peft_model(base_model, causal_lm_copy(policy_lora), adapter_name=POLICY)
            reference_adapter = None

        rm_config, rm_weights, rm_head = read_seq_cls_adapter(Path(reward_adapter))
        add_adapter_with_weights(model, REWARD, rm_config, rm_weights)
        reward_head = _linear_from_state(rm_head)
        if value_init == "reward":
            add_adapter_with_weights(model, VALUE, rm_config, rm_weights)
            value_head = _linear_from_state(rm_head)
        else:
            policy_state = get_peft_model_state_dict(model, adapter_name=POLICY)
            add_adapter_with_weights(model, VALUE, model.peft_config[POLICY], policy_state)
            value_head = nn.Linear(reward_head.in_features, 1, bias=False)
            std = getattr(model.get_base_model().config, "initializer_range", 0.02)
            nn.init.normal_(value_head.weight, std=std)
        return cls(
            model,
            value_head=value_head,
            reward_head=reward_head,
            reference_adapter=reference_adapter,
        )

    # ----------------------------------------------------------------- roles
    @property
    def value_head(self) -> nn.Linear:
        return self.train_module.value_head

    @contextmanager
    def generation_policy(self) -> Iterator[nn.Module]:
        self.train_module.activate(POLICY)
        yield self.model

    def reference_logits(self, input_ids, attention_mask, position_ids, response_width):
        if self.reference_adapter is not None:
            self.train_module.activate(self.reference_adapter)
            return causal_lm_response_logits(
                self.model, input_ids, attention_mask, position_ids, response_width
            )
        with self.model.disable_adapter():
            return causal_lm_response_logits(
                self.model, input_ids, attention_mask, position_ids, response_width
            )

    def values(self, input_ids, attention_mask, position_ids, response_width):
        self.train_module.activate(VALUE)
        hidden = backbone_hidden(
            self.train_module.backbone, input_ids[:, :-1], attention_mask[:, :-1],
            position_ids[:, :-1],
        )  # fmt: skip
        return head_on(self.value_head, hidden[:, -response_width:])

    def reward_scores(self, input_ids, attention_mask, position_ids, last_index):
        self.train_module.activate(REWARD)
        hidden = backbone_hidden(
            self.train_module.backbone, input_ids, attention_mask, position_ids
        )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return head_on(self.reward_head, hidden[rows, last_index])

    # ----------------------------------------------------------------- training
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.train_module.named_parameters() if p.requires_grad}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"reward_head": self.reward_head}

    def save_policy(self, directory: str | Path) -> None:
        """Write the policy adapter as a standalone *default* adapter (adapter_config.json +
        adapter_model.safetensors at the top of ``directory``), loadable with
        ``PeftModel.from_pretrained(base, directory)`` like any SFT/DPO output."""
        save_adapter(self.model, POLICY, directory)


def _linear_from_state(state: dict[str, torch.Tensor]) -> nn.Linear:
    """A float32 1-output head holding a score head's weights (a separate module per role)."""
    weight = state["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    with torch.no_grad():
        head.weight.copy_(weight.float())
        if "bias" in state:
            head.bias.copy_(state["bias"].float())
    return head
