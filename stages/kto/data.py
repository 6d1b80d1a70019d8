"""KTO's training rows: single replies labelled desirable (True) or undesirable (False).

Two sources, both through ``data.pairs``:
- preference pairs (on-policy samples of the SFT policy, judged; or a pairs file in any
  preference format), exactly as DPO gets them, then unpaired with TRL's
  ``unpair_preference_dataset``: each pair gives its chosen reply as desirable and its
  rejected one as undesirable;
- a file of labelled replies (``prompt``, ``completion``, ``label``: TRL's unpaired format,
  `data_recipes.unpaired`), detected from its first row or named by
  ``data.pairs.format=labelled``.

Rows are shuffled once (seeded): TRL reads KTO data in order (its KL baseline pairs each row
with its neighbour's reply), and unpaired pairs come out all-desirable then all-undesirable.
Held-out rows stay preference pairs, for the comparison's preference margins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_recipes import pairs as pair_recipes
from data_recipes.preference_formats import content_hash
from data_recipes.prompts import prompt_key
from data_recipes.unpaired import (
    LABELLED_FORMAT,
    is_labelled_file,
    label_counts,
    load_labelled_file,
    pairs_from_labelled,
)
from stages.core.data_accounting import report_account
from stages.core.stage_pairs import stage_preference_pairs

if TYPE_CHECKING:
    import datasets
    import torch

    from stages.core.lifecycle import StageRun
    from stages.core.task import Task

_BATCH = 1000  # rows per batched tokenizer call


@dataclass
class KTOData:
    """Shuffled unpaired train rows, held-out pairs, and what the manifest records."""

    train: list[dict[str, Any]]
    heldout_pairs: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def train_dataset(self) -> datasets.Dataset:
        import datasets

        return datasets.Dataset.from_list(self.train)


def reads_labelled_file(stage: StageRun) -> bool:
    """True when ``data.pairs`` points at a labelled-reply file (not preference pairs)."""
    pairs_cfg = stage.cfg.data.pairs
    return pairs_cfg.source == "file" and is_labelled_file(pairs_cfg.path, pairs_cfg.format)


def kto_rows(
    stage: StageRun,
    tokenizer: Any,
    policy: torch.nn.Module | None = None,
    task: Task | None = None,
) -> KTOData:
    """KTO's rows from ``data.pairs``. Files need no ``policy`` (call before weights load);
    on-policy pairs sample the SFT ``policy`` on ``task``'s training prompts, as DPO's do. No
    row has one of ``task``'s held-out prompts."""
    if reads_labelled_file(stage):
        return _labelled_rows(stage, tokenizer, task)
    pair_set = stage_preference_pairs(stage, tokenizer, policy=policy, task=task)
    return _unpaired_rows(pair_set, seed=stage.cfg.seed)


def _unpaired_rows(pair_set: pair_recipes.PairSet, seed: int) -> KTOData:
    import datasets
    from trl.data_utils import unpair_preference_dataset

    # margin is a reward-model column; KTO has no use for it.
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pair_set.train]
    unpaired = unpair_preference_dataset(datasets.Dataset.from_list(pairs)).shuffle(seed=seed)
    train = unpaired.to_list()
    info = {
        **pair_set.info,
        "unpaired": {
            "from": "pairs",
            "pairs": len(pairs),
            **label_counts(train),
            "rows": len(train),
            "shuffle_seed": seed,
        },
        "kto_content_hash": content_hash(train),
    }
    return KTOData(train, list(pair_set.heldout), info)


def _labelled_rows(stage: StageRun, tokenizer: Any, task: Task | None) -> KTOData:
    import random

    c = stage.cfg
    pairs_cfg = c.data.pairs
    data = load_labelled_file(pairs_cfg.path)
    account = data.account
    eval_keys = task.heldout_keys() if task is not None else set()
    rows = [r for r in data.rows if prompt_key(r["prompt"]) not in eval_keys]
    account.drop("decontaminated", len(data.rows) - len(rows))
    train, heldout = pair_recipes.split_heldout(rows, pairs_cfg.heldout_fraction, pairs_cfg.seed)
    # The trainer's limit: stage.trainer_overrides win over model.max_length, as in its args.
    max_length = c.stage.trainer_overrides.get("max_length", c.model.max_length)
    longest = None
    if max_length is not None and rows:
        lengths = reply_lengths(train + heldout, tokenizer)
        fits = [n <= max_length for n in lengths]
        account.drop("too_long", fits.count(False))
        n_train = len(train)
        train = [r for r, ok in zip(train, fits) if ok]
        heldout = [r for r, ok in zip(heldout, fits[n_train:]) if ok]
        longest = max(lengths)
    report_account(account, stage.name, c.data.max_dropped_fraction, longest=longest,
                   max_length=max_length)  # fmt: skip
    if not train:
        raise account.no_rows_left(
            "every row left is held out: lower data.pairs.heldout_fraction (rows are split by "
            "prompt), or add rows"
        )
    random.Random(c.seed).shuffle(train)  # the file may be sorted by label
    heldout_pairs = pairs_from_labelled(heldout)
    info = {
        "recipe": "file",
        "path": str(pairs_cfg.path),
        "format": LABELLED_FORMAT,
        "file_content_hash": data.content_hash,
        **account.as_manifest(),
        "rows_train": len(train),
        "rows_heldout": len(heldout),
        "max_length": max_length,
        "stats": {
            "kept": account.kept,
            "train": len(train),
            "heldout": len(heldout),
            "heldout_pairs": len(heldout_pairs),
            "too_long_dropped": account.dropped.get("too_long", 0),
        },
        "unpaired": {
            "from": "labelled_file",
            **label_counts(train),
            "rows": len(train),
            "shuffle_seed": c.seed,
        },
        "content_hash": content_hash(train),
        "kto_content_hash": content_hash(train),
        "heldout_content_hash": content_hash(heldout),
    }
    return KTOData(train, heldout_pairs, info)


def reply_lengths(rows: list[dict[str, Any]], tokenizer: Any) -> list[int]:
    """Tokens of prompt + completion per labelled row, tokenised as KTOTrainer does (chat
    template for messages; plain text plus EOS for strings)."""
    lengths: list[int] = []
    for start in range(0, len(rows), _BATCH):
        batch = rows[start : start + _BATCH]
        if batch and isinstance(batch[0]["prompt"], str):
            eos = tokenizer.eos_token or ""
            texts = [
                r["prompt"] + r["completion"] + ("" if r["completion"].endswith(eos) else eos)
                for r in batch
            ]
            ids = tokenizer(texts)["input_ids"]
        else:
            conversations = [r["prompt"] + r["completion"] for r in batch]
            ids = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        lengths += [len(x) for x in ids]
    return lengths


def with_heldout_path(data: KTOData, path: Path) -> dict[str, Any]:
    """The manifest's data record: the account plus where the held-out pairs were written."""
    return {**data.info, "heldout_path": str(path)}
