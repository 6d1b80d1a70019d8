"""What a stage really trains on: rows too long for ``model.max_length``, the log line, the
warning past ``data.max_dropped_fraction``, and a clear error when no row is left.

The loaders in `data_recipes` count rows read and dropped for data reasons (empty, duplicate,
identical pair, decontaminated, judge filters). Length needs the tokenizer, so it is checked
here, tokenising each row the way TRL's trainers do, and the rows the trainer would drop are
dropped first, so the manifest's counts and content hash describe exactly the trained rows:

- SFT (TRL truncates to ``max_length``, then drops rows left with no trained token): a row
  whose trained tokens (the assistant replies under ``assistant_only_loss``) all lie past
  ``max_length`` is dropped as ``too_long``; a longer row that keeps some is kept and counted
  as truncated.
- DPO / RM: a pair whose prompt + chosen or prompt + rejected exceeds ``max_length`` is
  dropped as ``too_long`` (RewardTrainer drops these itself; DPOTrainer would cut both replies,
  possibly down to the same text, so the pair would say nothing about the preference), from
  the held-out pairs too, so held-out metrics judge pairs of the length trained on.

After the trainer is built, `check_trainer_rows` compares its dataset with the account, so a
TRL change that drops rows differently fails loudly instead of making the manifest wrong.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from collections.abc import Sequence
from typing import Any

from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from data_recipes.accounting import RowAccount
from data_recipes.pairs import PairSet
from data_recipes.preference_formats import content_hash
from data_recipes.sft_data import SftRows

log = logging.getLogger(__name__)

MAX_LENGTH_KEY = "model.max_length"
_BATCH = 1000  # rows per batched apply_chat_template call
# Tokenised columns `sft_rows_to_train` adds to the SFT rows for the trainer (not data: left
# out of the content hash and of validation.jsonl).
PRETOKENIZED = ("input_ids", "assistant_masks")


def rerun_command(override: str) -> str:
    """The command that was run, with ``override`` replacing the same key (or a template)."""
    key = override.split("=", 1)[0]
    try:
        from hydra.core.hydra_config import HydraConfig

        task = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0] != key]
    except ValueError:  # not under @hydra.main (tests, the Python API)
        return f"the same command with {override} added"
    return "`" + shlex.join(["alignpipe", *task, override]) + "`"


def _too_long_hint(longest: int, max_length: int) -> str:
    return (
        f"the longest row is {longest} tokens and {MAX_LENGTH_KEY}={max_length}: raise it, e.g. "
        f"{rerun_command(f'{MAX_LENGTH_KEY}={longest}')}, or shorten the rows"
    )


def report_account(
    account: RowAccount,
    stage: str,
    max_dropped_fraction: float,
    *,
    longest: int | None = None,
    max_length: int | None = None,
) -> None:
    """Log the account in one line, warn past the threshold, fail when nothing is left."""
    account.max_length = max_length
    log.info("%s data: %s", stage, account.summary())
    too_long = account.dropped.get("too_long", 0) + account.truncated
    hint = (
        _too_long_hint(longest, max_length)
        if too_long and longest is not None and max_length is not None
        else None
    )
    if account.kept == 0:
        raise account.no_rows_left(hint or "relax the filters named above, or add data")
    lost, truncated = account.lost_fraction(), account.truncated / account.read
    if lost > max_dropped_fraction or truncated > max_dropped_fraction:
        cut = f" and {truncated:.0%} truncated" if account.truncated else ""
        log.warning(
            "%s data: %.0f%% of the %s of %s were dropped%s, more than "
            "data.max_dropped_fraction=%s. Dropped: %s. What to do: %s",
            stage,
            100 * lost,
            account.unit,
            account.source,
            cut,
            max_dropped_fraction,
            account.describe_dropped(),
            hint or "check the data, or raise data.max_dropped_fraction to silence this",
        )


# -------------------------------------------------------------------------------- SFT


def _sft_trained_spans(
    messages: Sequence[list[dict[str, str]]], tokenizer: Any, assistant_only_loss: bool
) -> tuple[list[tuple[int, int, int]], dict[str, list[list[int]]]]:
    """(length, first, last) trained token index of each conversation, as TRL labels them,
    and the tokenised columns themselves (``input_ids``, ``assistant_masks`` under
    ``assistant_only_loss``), exactly what SFTTrainer's own tokenisation produces.

    Rows are conversational ``messages``: TRL's labels are every token, or with
    ``assistant_only_loss`` the tokens of the template's assistant mask. first = -1 when no
    token is trained (TRL raises on those itself: a template without generation markers).
    """
    # SFTTrainer swaps in TRL's training version of a template without generation markers
    # (e.g. Qwen2.5's): the masks must come from the template it really tokenises with.
    template = None
    if assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        template = get_training_chat_template(tokenizer)
    spans = []
    columns: dict[str, list[list[int]]] = {"input_ids": []}
    if assistant_only_loss:
        columns["assistant_masks"] = []
    for start in range(0, len(messages), _BATCH):
        out = tokenizer.apply_chat_template(
            list(messages[start : start + _BATCH]),
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=assistant_only_loss,
        )
        masks = out["assistant_masks"] if assistant_only_loss else None
        for i, ids in enumerate(out["input_ids"]):
            trained = [j for j, bit in enumerate(masks[i]) if bit] if masks else range(len(ids))
            spans.append((len(ids), trained[0], trained[-1]) if trained else (len(ids), -1, -1))
        columns["input_ids"] += [list(ids) for ids in out["input_ids"]]
        if masks is not None:
            columns["assistant_masks"] += [list(mask) for mask in masks]
    return spans, columns


def sft_rows_to_train(
    sft: SftRows, tokenizer: Any, args: Any, max_dropped_fraction: float
) -> tuple[Any, dict[str, Any]]:
    """The rows SFTTrainer (``args``: its SFTConfig) trains on, and the manifest's data info.

    Drops rows whose trained tokens truncation would remove entirely, counts truncated ones,
    logs the account, warns past ``max_dropped_fraction``, and fails when none is left.

    The rows come back with the ``PRETOKENIZED`` columns this check tokenised anyway:
    SFTTrainer sees ``input_ids`` and skips its own (per-row, slower) tokenisation of the same
    conversations with the same template, then builds labels and truncates as always. The
    content hash covers the conversations only.
    """
    rows, account = sft.dataset, sft.account
    max_length = args.max_length
    # Packing that splits or wraps rows loses no tokens: there is nothing to count.
    cuts = max_length is not None and not (args.packing and args.packing_strategy != "bfd")
    longest = None
    hashed = rows
    if cuts:
        spans, columns = _sft_trained_spans(rows["messages"], tokenizer, args.assistant_only_loss)
        # A row with no trained token: leave the tokenising to TRL, whose error names it.
        added = []
        if not set(PRETOKENIZED) & set(rows.column_names) and all(f >= 0 for _, f, _ in spans):
            for name, values in columns.items():
                rows = rows.add_column(name, values)
                added.append(name)
        keep_end = args.truncation_mode == "keep_end"
        keep = []
        for index, (length, first, last) in enumerate(spans):
            if length <= max_length:
                keep.append(index)
            elif (length - 1 - last if keep_end else first) < max_length:
                keep.append(index)
                account.truncated += 1
        account.drop("too_long", len(spans) - len(keep))
        longest = max((length for length, _, _ in spans), default=0)
        if len(keep) < len(rows):
            rows = rows.select(keep)
        hashed = rows.remove_columns(added)
    report_account(account, "sft", max_dropped_fraction, longest=longest, max_length=max_length)
    info = {
        **sft.info,
        **account.as_manifest(),
        "max_length": max_length,
        "content_hash": content_hash(hashed),  # the one row hasher, as for preference rows
    }
    return rows, info


# -------------------------------------------------------------------------- preference


def _pair_lengths(rows: Sequence[dict[str, Any]], tokenizer: Any) -> list[int]:
    """Tokens of the longer of prompt + chosen and prompt + rejected, tokenised as TRL does."""
    lengths = []
    for start in range(0, len(rows), _BATCH):
        batch = rows[start : start + _BATCH]
        per_side = []
        for side in ("chosen", "rejected"):
            if batch and isinstance(batch[0]["prompt"], str):  # standard: TRL appends EOS
                eos = tokenizer.eos_token or ""
                texts = [
                    r["prompt"] + r[side] + ("" if r[side].endswith(eos) else eos) for r in batch
                ]
                per_side.append(tokenizer(texts)["input_ids"])
            else:
                conversations = [r["prompt"] + r[side] for r in batch]
                per_side.append(
                    tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)[
                        "input_ids"
                    ]
                )
        lengths += [max(len(c), len(r)) for c, r in zip(*per_side)]
    return lengths


def preference_pairs_to_train(
    pair_set: PairSet,
    tokenizer: Any,
    max_length: int | None,
    stage: str,
    max_dropped_fraction: float,
) -> PairSet:
    """``pair_set`` without the pairs longer than ``max_length`` tokens (train and held out,
    so held-out metrics judge pairs of the length trained on), with its account and manifest
    info brought up to date."""
    account = pair_set.account or RowAccount(str(pair_set.info.get("recipe")))
    train, heldout, longest = pair_set.train, pair_set.heldout, None
    if max_length is not None and train + heldout:
        lengths = _pair_lengths(train + heldout, tokenizer)
        fits = [n <= max_length for n in lengths]
        train = [row for row, ok in zip(pair_set.train, fits) if ok]
        heldout = [row for row, ok in zip(pair_set.heldout, fits[len(pair_set.train) :]) if ok]
        account.drop("too_long", fits.count(False))
        longest = max(lengths)
    report_account(account, stage, max_dropped_fraction, longest=longest, max_length=max_length)
    if not train:
        raise account.no_rows_left(
            f"all {len(heldout)} pairs left are held out: lower data.pairs.heldout_fraction "
            "(pairs are split by prompt), or add pairs"
        )
    stats = {
        **pair_set.info.get("stats", {}),
        "kept": account.kept,
        "train": len(train),
        "heldout": len(heldout),
        "too_long_dropped": account.dropped.get("too_long", 0),
    }
    info = {
        **pair_set.info,
        **account.as_manifest(),
        "rows_train": len(train),
        "rows_heldout": len(heldout),
        "max_length": max_length,
        "stats": stats,
        "content_hash": content_hash(train),
        "heldout_content_hash": content_hash(heldout),
    }
    return dataclasses.replace(pair_set, train=train, heldout=heldout, info=info, account=account)


# ------------------------------------------------------------------------- after TRL


def trainer_row_count(dataset: Any) -> int:
    """Rows in a trainer's prepared dataset (best-fit packed: the rows inside the packs)."""
    if "seq_lengths" in dataset.column_names:
        return sum(len(lengths) for lengths in dataset["seq_lengths"])
    return len(dataset)


def check_trainer_rows(dataset: Any, expected: int, stage: str, args: Any = None) -> None:
    """Fail when the trainer holds other rows than the account kept (a TRL behaviour change).

    Packing that splits or wraps rows (``args.packing_strategy`` other than bfd) has no row
    count to compare.
    """
    if getattr(args, "packing", False) and args.packing_strategy != "bfd":
        return
    found = trainer_row_count(dataset)
    if found != expected:
        raise RuntimeError(
            f"{stage}: the trainer prepared {found} rows but the data accounting kept {expected}: "
            "TRL filtered differently than stages/core/data_accounting.py assumes; update it "
            "so the manifest stays true"
        )
