"""SFT training rows for a config: the embedded toy demonstrations or a local file.

Returns TRL conversational rows (``messages``) plus the facts the manifest records.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from datasets import Dataset

from data_recipes import toy
from stages.core.schema import DataConfig


def dataset_hash(dataset: Dataset) -> str:
    """sha256 of the rows' canonical JSON, in order: the data's identity in a manifest."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load_sft_rows(data_cfg: DataConfig) -> tuple[Dataset, dict[str, Any]]:
    if data_cfg.sft.source == "toy":
        rows = toy.sft_dataset(data_cfg.toy)
        info = {"recipe": "toy/addition", "toy": vars(data_cfg.toy).copy()}
    else:
        from data_recipes.formats import load_sft_file

        assert data_cfg.sft.path is not None
        rows = load_sft_file(data_cfg.sft.path, format=data_cfg.sft.format)
        info = {"recipe": "file", "path": data_cfg.sft.path, "format": data_cfg.sft.format}
    info.update({"rows": len(rows), "content_hash": dataset_hash(rows)})
    return rows, info
