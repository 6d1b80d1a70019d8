"""Reading local data files row by row, and the error type for bad data.

Owns: `iter_rows` over JSONL / JSON / Parquet files, yielding `(row_number, dict)` with a
1-based row number (the line number for JSONL, so an editor jumps straight to it), and
`DataFormatError`, which every data loader in `data_recipes` raises for bad input.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".jsonl", ".json", ".parquet")
# Keys under which a `.json` file may wrap its list of rows.
JSON_LIST_KEYS: tuple[str, ...] = ("data", "train")


class DataFormatError(ValueError):
    """Bad input data: says where (file, row), what is wrong, what was expected, what to do.

    `path` and `row` are None until known: row normalisers raise without a location and the
    file loaders re-raise with one through `at`.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | os.PathLike[str] | None = None,
        row: int | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.row = row
        self.expected = expected
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.row is not None:
            where.append(f"row {self.row}")
        text = (", ".join(where) + ": " if where else "") + self.problem
        if self.expected:
            text += f"\nExpected: {self.expected}"
        if self.hint:
            text += f"\nWhat to do: {self.hint}"
        return text

    def at(self, path: str | os.PathLike[str], row: int | None) -> DataFormatError:
        """Same error, located at `path`/`row` (keeps a location that is already set)."""
        return DataFormatError(
            self.problem,
            path=self.path if self.path is not None else path,
            row=self.row if self.row is not None else row,
            expected=self.expected,
            hint=self.hint,
        )


def iter_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(row_number, row)` for every row of a local `.jsonl`, `.json` or `.parquet` file.

    Path and extension are checked now (not at the first `next`), so a typo fails at once.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataFormatError(
            f"unsupported file extension {path.suffix!r}",
            path=path,
            expected=f"one of {', '.join(SUPPORTED_EXTENSIONS)}",
            hint="convert the file, or rename it if its content already is one of these formats",
        )
    if not path.exists():
        raise FileNotFoundError(
            f"data file not found: {path} (absolute: {path.absolute()}); check the data path "
            "in the config, relative paths are resolved from the current directory"
        )
    if not path.is_file():
        raise DataFormatError(
            "is not a regular file", path=path, expected=f"a {suffix} file", hint="point at a file"
        )
    readers = {".jsonl": _iter_jsonl, ".json": _iter_json, ".parquet": _iter_parquet}
    return readers[suffix](path)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # Bytes, decoded line by line: a text-mode reader decodes ahead in 8 KB chunks, so a bad
    # byte on line 16 would surface while reading line 1.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]  # written by some Windows editors
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"text is not valid UTF-8 ({err.reason}: byte {raw[err.start]:#04x} at "
                    f"column {err.start + 1})",
                    path=path,
                    row=line_number,
                    expected="a UTF-8 encoded JSONL file",
                    hint="re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or "
                    "fix this line",
                ) from err
            if not line.strip():  # blank lines (e.g. a trailing newline) are not rows
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"line is not valid JSON ({err.msg} at column {err.colno})",
                    path=path,
                    row=line_number,
                    expected="one JSON object per line",
                    hint="fix or remove this line",
                ) from err
            if not isinstance(row, dict):
                raise DataFormatError(
                    f"line holds a JSON {type(row).__name__}, not an object",
                    path=path,
                    row=line_number,
                    expected='one JSON object per line, e.g. {"messages": [...]}',
                    hint="wrap the value in an object with the columns of a supported format",
                )
            yield line_number, row


def _iter_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    expected = "a JSON list of objects, or an object with the list under " + " or ".join(
        repr(k) for k in JSON_LIST_KEYS
    )
    raw = path.read_bytes()
    try:
        document = json.loads(raw.decode("utf-8-sig"))
    except json.JSONDecodeError as err:
        hint = "fix the JSON"
        if err.msg == "Extra data":
            hint = "this looks like one JSON object per line: rename the file to .jsonl"
        raise DataFormatError(
            f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})",
            path=path,
            expected=expected,
            hint=hint,
        ) from err
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1  # a JSON file's rows are not lines
        raise DataFormatError(
            f"text is not valid UTF-8 ({err.reason}) on line {line}",
            path=path,
            expected="a UTF-8 encoded JSON file",
            hint="re-encode the file as UTF-8",
        ) from err
    rows = document
    if isinstance(document, dict):
        key = next((k for k in JSON_LIST_KEYS if k in document), None)
        if key is None:
            raise DataFormatError(
                f"top-level object has keys {sorted(document)[:10]} but none of "
                f"{list(JSON_LIST_KEYS)}",
                path=path,
                expected=expected,
                hint="put the rows in a top-level list",
            )
        rows = document[key]
    if not isinstance(rows, list):
        raise DataFormatError(
            f"rows are a JSON {type(rows).__name__}, not a list",
            path=path,
            expected=expected,
            hint="put the rows in a list",
        )
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataFormatError(
                f"list element is a JSON {type(row).__name__}, not an object",
                path=path,
                row=index,
                expected=expected,
                hint="make every list element an object",
            )
        yield index, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataFormatError(
            f"cannot be read as Parquet ({err})",
            path=path,
            expected="a Parquet file",
            hint="check the file is not truncated and really is Parquet",
        ) from err
    row_number = 0
    # Batches keep memory flat on large files; to_pylist turns nested structs into dicts.
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row
