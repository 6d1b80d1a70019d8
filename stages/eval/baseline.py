"""The eval stage's baselines: the experiment's base model, plain or few-shot prompted.

`stage.against=base` compares the target with the pretrained base it was trained from (the
identity its manifest records under ``base_model.id``), loaded the way every stage loads it
(`models.resolve_base_model`, then `models.load_pretrained` with the target's own 4-bit
settings, so a QLoRA target is compared with the 4-bit base it was trained on).

`stage.against=base_fewshot` prompts that base with ``stage.num_shots`` demonstrations from
the experiment's SFT data, put before each held-out prompt as earlier user / assistant turns
of the same chat template ("compare with the original model + prompting"). Shots never use a
held-out prompt; where the task knows the good reply to a prompt (the embedded task), only
demonstrations that give it are shots, since the toy SFT data also holds wrong and evasive
replies on purpose.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data_recipes.prompts import prompt_key
from data_recipes.sft_data import load_sft_rows
from stages.core import handoff
from stages.core.adapters import stage_peft_config
from stages.core.generation import prompt_ids
from stages.core.handoff import HandoffError, ParentStage
from stages.core.models import BaseModelRef, load_pretrained, resolve_base_model
from stages.core.schema import Config, ConfigError, ModelConfig
from stages.core.task import Task

Messages = list[dict[str, str]]


class BaseMismatchError(HandoffError):
    """The experiment's model.name_or_path is not the base the target was trained from."""


class FewShotError(ConfigError):
    """stage.against=base_fewshot cannot be built from this SFT data / model context."""


def resolve_target_base(c: Config, target: ParentStage) -> BaseModelRef:
    """The experiment's base model, checked to be the one ``target`` was trained from."""
    base = resolve_base_model(c.model, c.paths)
    recorded = target.base_model.get("id")
    if recorded == base.id:
        return base
    # The model keys that make the base (name, revision, the tiny model's spec), as the target
    # was trained with them: the fix sets them back.
    trained = _base_keys(target.manifest.get("config", {}).get("model") or {})
    now = _base_keys(dataclasses.asdict(c.model))
    fixes = [f"model.{k}={_override_value(v)}" for k, v in trained.items() if now.get(k) != v]
    differ = ", ".join(f"model.{k}: {now.get(k)!r} (trained: {trained[k]!r})" for k in trained
                       if now.get(k) != trained[k])  # fmt: skip
    fix = handoff.make_target("eval", c.experiment_name, *fixes)
    raise BaseMismatchError(
        f"stage.against={c.stage.against}: model.name_or_path={c.model.name_or_path} "
        f"resolves to base {base.id!r}, but '{target.stage}' ({target.run_dir}) was trained "
        f"from {recorded!r} (its manifest's base_model.id)"
        + (f"; this config differs in {differ}" if differ else "")
        + f". Compare it under the model config it was trained with: `{fix}`."
    )


def _base_keys(model: dict[str, Any]) -> dict[str, Any]:
    keys = {k: model.get(k) for k in ("name_or_path", "revision")}
    keys.update({f"tiny.{k}": v for k, v in (model.get("tiny") or {}).items()})
    return keys


def _override_value(value: Any) -> str:
    return "null" if value is None else str(value)


def load_base_model(
    c: Config, target: ParentStage, base: BaseModelRef, precision: Any
) -> PreTrainedModel:
    """The base as a frozen causal LM in eval mode, in the target's precision and 4-bit
    settings (what the target's adapter sits on); no adapter."""
    model = load_pretrained(
        base.path,
        task="causal_lm",
        model_cfg=c.model,
        peft_cfg=stage_peft_config(target, None),
        precision=precision,
        revision=base.revision,
        pad_token_id=None,
    )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@dataclass(frozen=True)
class FewShot:
    """Demonstrations shown before every prompt the base sees."""

    shots: tuple[tuple[Messages, str], ...]  # (prompt turns, reply)

    def turns(self) -> Messages:
        out: Messages = []
        for prompt, reply in self.shots:
            out += [*prompt, {"role": "assistant", "content": reply}]
        return out

    def view(self, prompt: Messages) -> Messages:
        """``prompt`` with the shots as earlier turns (a system turn stays first)."""
        system = [m for m in prompt[:1] if m.get("role") == "system"]
        return [*system, *self.turns(), *prompt[len(system) :]]

    def as_manifest(self) -> list[dict[str, Any]]:
        return [{"prompt": prompt, "reply": reply} for prompt, reply in self.shots]


def choose_shots(data_cfg: Any, task: Task | None, num_shots: int, seed: int) -> FewShot:
    """``num_shots`` demonstrations from the SFT data, chosen by ``seed`` (see the module
    docstring for which demonstrations qualify)."""
    heldout = {prompt_key(p.messages) for p in task.heldout_prompts()} if task else set()
    candidates: list[tuple[Messages, str]] = []
    for row in load_sft_rows(data_cfg).dataset:
        turns = [m for m in row["messages"] if m["role"] != "system"]
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            continue
        prompt, reply = turns[:-1], turns[-1]["content"]
        if prompt_key(prompt) in heldout:
            continue  # a held-out prompt's answer must not be shown
        candidates.append((prompt, reply))
    known = [(p, r) for p, r in candidates if task and task.reference_reply(p) is not None]
    if known:  # the task knows good replies: only demonstrations that give them
        candidates = [(p, r) for p, r in known if r == task.reference_reply(p)]  # type: ignore[union-attr]
    if len(candidates) < num_shots:
        reply = "the task's good reply" if known else "an assistant reply"
        raise FewShotError(
            f"stage.num_shots={num_shots}: the SFT data ({data_cfg.sft.source}) has only "
            f"{len(candidates)} usable demonstrations (a prompt that is not held out, then "
            f"{reply}). Lower it, e.g. stage.num_shots={max(len(candidates), 1)}."
        )
    picked = random.Random(seed).sample(candidates, num_shots)
    return FewShot(tuple(picked))


def fewshot_prompt_length(
    c: Config, fewshot: FewShot, task: Task | None, tokenizer: PreTrainedTokenizerBase
) -> int:
    """Tokens of the longest few-shot prompt; fails when it and model.max_new_tokens do not
    fit the base's context (the shots would be cut off the front)."""
    prompts = [p.messages for p in task.heldout_prompts()] if task else []
    longest = max((len(prompt_ids(tokenizer, fewshot.view(p))) for p in prompts), default=0)
    context = _context_of(c)
    if context is not None and longest + c.model.max_new_tokens > context:
        raise FewShotError(
            f"stage.num_shots={c.stage.num_shots}: the longest few-shot prompt is {longest} "
            f"tokens, and with model.max_new_tokens={c.model.max_new_tokens} it does not fit "
            f"the base's context of {context} positions. Lower stage.num_shots."
        )
    return longest


def _context_of(c: Config) -> int | None:
    if c.model.name_or_path.startswith("builtin:"):
        return int(c.model.tiny.max_position_embeddings)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        c.model.name_or_path, revision=c.model.revision, trust_remote_code=c.model.trust_remote_code
    )
    return getattr(config, "max_position_embeddings", None)


def fewshot_model_cfg(c: Config, longest_prompt: int) -> ModelConfig:
    """model.* with max_prompt_length raised to hold the few-shot prompts whole (the policy's
    own prompts are shorter than the configured limit, so its replies do not change)."""
    # A copy, not dataclasses.replace: its checks are for training (max_prompt_length <
    # max_length), and a few-shot prompt is only generated from, never trained on.
    model_cfg = copy.copy(c.model)
    model_cfg.max_prompt_length = max(c.model.max_prompt_length, longest_prompt)
    return model_cfg
