"""SFT training rows for a config: the embedded toy demonstrations or a local file.

Returns TRL conversational rows (``messages``), the facts the manifest records, and the row
account (read / kept / dropped by reason) that the stage completes with the length check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from data_recipes import toy
from data_recipes.accounting import RowAccount


@dataclass
class SftRows:
    """Demonstrations to train on, what the manifest records, and how many rows went where."""

    dataset: Dataset
    info: dict[str, Any]
    account: RowAccount


def load_sft_rows(data_cfg: Any) -> SftRows:
    """Rows for ``data_cfg`` (the ``data`` config: ``sft.source``, ``sft.path``, ``toy``)."""
    if data_cfg.sft.source == "toy":
        rows = toy.sft_dataset(data_cfg.toy)
        info = {"recipe": "toy/addition", "toy": vars(data_cfg.toy).copy()}
        account = RowAccount("toy/addition", read=len(rows))
    else:
        from data_recipes.formats import load_sft_file

        assert data_cfg.sft.path is not None
        account = RowAccount(str(data_cfg.sft.path))
        rows = load_sft_file(data_cfg.sft.path, format=data_cfg.sft.format, account=account)
        info = {"recipe": "file", "path": data_cfg.sft.path, "format": data_cfg.sft.format}
    return SftRows(rows, info, account)
