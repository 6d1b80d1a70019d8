"""Reward models after training: loading a finished RM stage and scoring replies with it.

Owns three things every consumer of a reward model needs (the RM stage's own held-out eval,
the ``reward_model`` judge of on-policy pair generation, and PPO's reward and value roles):

- **loading** a finished RM stage's ``final/`` (`load_reward_model`): full weights are an
  ``AutoModelForSequenceClassification`` (num_labels=1); a LoRA/QLoRA RM is a ``SEQ_CLS``
  adapter (score head inside it via ``modules_to_save``) on the base recorded in the manifest,
  quantised to 4-bit NF4 again for QLoRA. ``trainable=True`` gives an independent copy whose
  weights (or adapter + head) train: PPO's value model initialised from the RM;
- **tokenising** a (prompt, reply) pair exactly as trl 1.16's RewardTrainer tokenises a
  preference row (`encode_reply`), so a score here is what the RM was trained to output;
- **batched scoring** (`RewardScorer`), also wrapped as a `data_recipes.pairs.Judge`.

The reward is read at the last non-pad token (right padding; the tokenizer's pad token
differs from EOS), which for chat data is the ``<|end|>`` closing the assistant turn.

Without alignpipe, a final/ reloads as ``AutoModelForSequenceClassification.from_pretrained
(final)`` (full) or ``AutoPeftModelForSequenceClassification.from_pretrained(final,
num_labels=1)`` (LoRA/QLoRA: the adapter's base is a causal LM whose config does not say
num_labels=1; a QLoRA adapter's base is the saved 4-bit copy it was trained on).

For PPO: ``load_reward_model(rm_stage, ...)`` is the frozen reward role and
``load_reward_model(rm_stage, ..., trainable=True)`` the value role initialised from it (two
independent copies). To share one 4-bit base between roles, the RM's SEQ_CLS adapter in
``rm_stage.final_dir`` sits on ``rm_stage.base_model["path"]``: by default (RM
``parent_adapter=continue``) the base the SFT adapter sits on, so policy, reference and RM
are adapters on one base; with ``parent_adapter=merge`` the SFT weights merged in full
precision (``runs/<exp>/rm/merged_parent``), so the policy must be merged onto it too
(reference = adapters off). `resolve_reward_stage` finds the RM and checks it was trained
on the SFT output at hand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stages.core.adapters import ADAPTER_CONFIG, stage_peft_config
from stages.core.generation import chat_ids, context_length, right_pad
from stages.core.handoff import HandoffError, ParentStage, make_target, resolve_parent
from stages.core.models import BASE_MODEL_FILE, load_pretrained, load_tokenizer
from stages.core.runtime import Precision
from stages.core.schema import ModelConfig, PeftConfig, method_of_kind

if TYPE_CHECKING:
    from data_recipes.pairs import Judge

Messages = list[dict[str, str]]
Prompt = Messages | str
Reply = Messages | str


# -------------------------------------------------------------------------- tokenising


def encode_reply(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, reply: Reply) -> list[int]:
    """Token ids of prompt + reply, as trl 1.16's RewardTrainer builds ``chosen_ids``.

    Conversational (prompt = messages): the whole conversation through the chat template,
    the reply as one assistant turn (a string) or given as assistant message(s).
    Standard (prompt = string): plain text ``prompt + reply`` with EOS appended when missing.
    """
    if isinstance(prompt, str):
        if not isinstance(reply, str):
            raise ValueError(
                "a string prompt needs a string reply (standard format); got reply "
                f"{type(reply).__name__}. Pass the prompt as chat messages to score messages"
            )
        text = prompt + reply
        if not text.endswith(tokenizer.eos_token):
            text += tokenizer.eos_token  # TRL appends EOS to non-conversational rows
        return list(tokenizer(text=text)["input_ids"])
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise ValueError(f"prompt must be chat messages or a string, got {prompt!r:.80}")
    turns = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else list(reply)
    return chat_ids(tokenizer, [*prompt, *turns])


# ----------------------------------------------------------------------------- scoring


@dataclass
class RewardScorer:
    """Scores (prompt, reply) pairs with a sequence-classification reward model, in batches.

    ``model`` is any 1-label sequence classifier (plain, PeftModel, 4-bit); it is used in eval
    mode without gradients and its train/eval mode is restored afterwards. Rows longer than
    ``max_length`` keep their *last* ``max_length`` tokens (the reply and its end token are
    what the RM reads); None keeps everything. ``max_length`` never exceeds the model's
    context (its config's positions): a longer one is lowered to it.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    batch_size: int = 64
    max_length: int | None = None
    name: str = "reward_model"

    def __post_init__(self) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the reward model's tokenizer has no pad token")
        config = self.model.config.get_text_config()
        if getattr(self.model.config, "num_labels", 1) != 1:
            raise ValueError(
                f"a reward model has one output, this one has num_labels="
                f"{self.model.config.num_labels}"
            )
        context = context_length(self.model)
        if context is not None and (self.max_length is None or self.max_length > context):
            self.max_length = context  # more positions than the model has would crash it
        # The classifier finds each row's last real token through config.pad_token_id.
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        elif config.pad_token_id != self.tokenizer.pad_token_id:
            raise ValueError(
                f"model pad_token_id={config.pad_token_id} differs from the tokenizer's "
                f"({self.tokenizer.pad_token_id}): rewards would be read at the wrong token"
            )

    @classmethod
    def from_stage(
        cls,
        stage: ParentStage,
        model_cfg: ModelConfig,
        precision: Precision,
        *,
        peft_cfg: PeftConfig | None = None,
        batch_size: int = 64,
    ) -> RewardScorer:
        """Scorer over a finished RM stage, named ``reward_model:<manifest sha256>``."""
        tokenizer = load_tokenizer(stage.final_dir, model_cfg)
        model = load_reward_model(stage, model_cfg, precision, peft_cfg=peft_cfg)
        return cls(
            model,
            tokenizer,
            batch_size=batch_size,
            max_length=model_cfg.max_length,
            name=f"reward_model:{stage.manifest_sha256}",
        )

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """One reward per token sequence (already tokenised), in input order."""
        if any(len(ids) == 0 for ids in sequences):
            raise ValueError("cannot score an empty token sequence")
        rows = [
            list(ids)[-self.max_length :] if self.max_length else list(ids) for ids in sequences
        ]
        # Longest first: batches of similar length waste little compute on padding.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        scores = [0.0] * len(rows)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                batch = [rows[i] for i in order[start : start + self.batch_size]]
                input_ids, attention = right_pad(batch, pad)
                logits = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    use_cache=False,
                ).logits
                for i, value in zip(order[start : start + self.batch_size], logits[:, 0].float()):
                    scores[i] = float(value)
        finally:
            self.model.train(was_training)
        return scores

    def score(self, prompts: Sequence[Prompt], replies: Sequence[Reply]) -> list[float]:
        """Rewards of ``replies[i]`` to ``prompts[i]``; prompts are chat messages or strings."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        return self.score_ids(
            [encode_reply(self.tokenizer, p, r) for p, r in zip(prompts, replies)]
        )

    def score_pairs(self, rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """(chosen rewards, rejected rewards) of preference rows with prompt/chosen/rejected."""
        for i, row in enumerate(rows):
            missing = {"prompt", "chosen", "rejected"} - row.keys()
            if missing:
                raise ValueError(f"preference row {i} lacks {sorted(missing)}")
        prompts = [r["prompt"] for r in rows]
        both = self.score(
            [*prompts, *prompts], [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        )
        return both[: len(rows)], both[len(rows) :]

    def as_judge(self) -> Judge:
        """This scorer as a judge: of on-policy pairs (`stages.core.on_policy_pairs`) and of
        a user's task (`stages.tasks.prompt_file`)."""
        from data_recipes.pairs import Judge

        return Judge(
            name=self.name,
            score=lambda prompt, reply: self.score([prompt], [reply])[0],
            score_batch=self.score,
        )


# ----------------------------------------------------------------------------- loading


def resolve_reward_stage(
    runs_root: str, experiment: str, reward_stage: str, sft: ParentStage, *, child: str
) -> ParentStage:
    """The finished RM stage ``reward_stage`` of ``experiment``, checked to be trained on
    ``sft`` (the parent the consumer starts from): a stale RM fails naming the command."""
    rm = resolve_parent(runs_root, experiment, reward_stage, child=child)
    rm_parent = rm.manifest.get("parent") or {}
    if rm_parent.get("manifest_sha256") != sft.manifest_sha256:
        raise HandoffError(
            f"the reward model in {rm.run_dir} was trained on another SFT output than "
            f"{sft.run_dir} (its parent manifest sha {rm_parent.get('manifest_sha256')!r} vs "
            f"{sft.manifest_sha256!r}): re-run it with "
            f"`{make_target(reward_stage, experiment, 'force=true')}`"
        )
    return rm


def _check_reward_checkpoint(final_dir: Path, kind: str) -> None:
    """Fail with a clear message when final/ is not a 1-output sequence classifier."""
    if kind == "full":
        config = json.loads((final_dir / "config.json").read_text())
        architectures = config.get("architectures") or []
        labels = len(config.get("id2label") or {"0": 0})
        if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
            raise HandoffError(
                f"{final_dir} is not a reward model ({architectures}, {labels} labels): point "
                "at an RM stage (`make rm`)"
            )
        return
    adapter_config = final_dir / ADAPTER_CONFIG
    if not adapter_config.is_file():
        raise HandoffError(f"{final_dir} has no {ADAPTER_CONFIG} although its kind is {kind}")
    task = json.loads(adapter_config.read_text()).get("task_type")
    if task != "SEQ_CLS":
        raise HandoffError(
            f"{adapter_config}: task_type={task!r}, a reward model adapter is SEQ_CLS: point "
            "at an RM stage (`make rm`)"
        )


def load_reward_model_dir(
    final_dir: Path,
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    precision: Precision,
    *,
    trainable: bool = False,
    pad_token_id: int | None = None,
) -> PreTrainedModel | PeftModel:
    """A reward model from an RM ``final/`` directory (kind and base from the
    ``alignpipe_base_model.json`` saved next to the weights). See `load_reward_model`."""
    meta_file = final_dir / BASE_MODEL_FILE
    if not meta_file.is_file():
        raise HandoffError(f"{meta_file} is missing: {final_dir} is not an alignpipe stage output")
    meta = json.loads(meta_file.read_text())
    kind, base = meta["kind"], meta["base_model"]
    if pad_token_id is None:  # the classifier needs it to find each row's last real token
        pad_token_id = load_tokenizer(final_dir, model_cfg).pad_token_id
    _check_reward_checkpoint(final_dir, kind)
    if kind != "full" and method_of_kind(kind)[0] != peft_cfg.method:
        raise ValueError(f"{final_dir} is a {kind} adapter but peft.method={peft_cfg.method!r}")
    load = dict(
        task="seq_cls", model_cfg=model_cfg, peft_cfg=peft_cfg, precision=precision,
        pad_token_id=pad_token_id,
    )  # fmt: skip
    if kind == "full":
        model = load_pretrained(final_dir, revision=None, **load)
    else:
        # The adapter was trained on this base: for an RM after a LoRA SFT, the SFT adapter
        # merged into the pretrained base (runs/<exp>/rm/merged_parent).
        model = load_pretrained(base["path"], revision=base.get("revision"), **load)
        model = PeftModel.from_pretrained(model, str(final_dir), is_trainable=trainable)
    if trainable:
        if kind == "full":
            model.requires_grad_(True)
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()
    return model


def load_reward_model(
    stage: ParentStage,
    model_cfg: ModelConfig,
    precision: Precision,
    *,
    peft_cfg: PeftConfig | None = None,
    trainable: bool = False,
) -> PreTrainedModel | PeftModel:
    """A finished RM stage as a 1-label sequence classifier.

    full -> ``AutoModelForSequenceClassification`` from ``final/``; an adapter -> the RM's
    base (``stage.base_model["path"]``, 4-bit NF4 for a 4-bit kind) + the SEQ_CLS adapter. The 4-bit
    settings default to the RM's own (its manifest), which reproduces its scores.

    ``trainable=False``: frozen, eval mode (the reward role). ``trainable=True``: a fresh,
    independent copy in train mode whose full weights, or adapter + score head, require grad
    (the value role, initialised from the RM). Call twice for reward + value.
    """
    peft = stage_peft_config(stage, peft_cfg)
    return load_reward_model_dir(stage.final_dir, model_cfg, peft, precision, trainable=trainable)


def reward_model_judge(
    stage: ParentStage, model_cfg: ModelConfig, precision: Precision, *, batch_size: int = 64
) -> Judge:
    """The ``data.pairs.judge=reward_model`` judge: this RM stage's scores, named by its
    manifest sha256 so pairs cached under an older RM are never reused."""
    return RewardScorer.from_stage(stage, model_cfg, precision, batch_size=batch_size).as_judge()
