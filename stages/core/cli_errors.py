"""User errors are not crashes: one block on stderr, exit status 2, no traceback.

Config, data and chaining errors (``ConfigError``, ``DataFormatError``, ``HandoffError`` and
their subclasses), Hydra's own compose errors (unknown key, bad type, unknown option) and
environment failures while writing run dirs (disk full, read-only or unwritable ``runs/``)
print what is wrong, what was expected and what to do. ``HYDRA_FULL_ERROR=1`` re-raises, so
the traceback is still one variable away. Anything else is a bug and keeps its traceback.

Only light imports here (no torch): the entry point uses this before any heavy import.
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from data_recipes.rows import DataFormatError
from stages.core.handoff import HandoffError
from stages.core.schema import ConfigError
from stages.ppo.config import PPOConfigError

USER_ERROR_STATUS = 2
USER_ERRORS = (ConfigError, HandoffError, DataFormatError, PPOConfigError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# What torch.save's zip writer raises when the disk fills up under it.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")
# Writers that are not Python file objects (safetensors' Rust writer raises SafetensorError)
# only carry the OS message in their text.
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")


def render_block(title: str, problems: list[str], todo: str | None) -> str:
    """The one block a user sees: a title, one line per problem, and what to do (None when
    the problem's own text already says it)."""
    lines = [f"alignpipe: {title}"]
    lines += [f"  - {line}" for problem in problems for line in [problem.strip()] if line]
    if todo:
        lines.append(f"What to do: {todo}")
    return "\n".join(lines)


def describe_user_error(err: BaseException, *, run_dir: Path | None = None) -> str | None:
    """The block for a user or environment error; None for anything else (a real crash)."""
    if isinstance(err, ConfigError):
        return render_block(
            f"{len(err.problems)} config problem(s)",
            err.problems,
            "fix the values above on the command line (or in the conf/ file that sets them); "
            "add dry_run=true to check a command without running it.",
        )
    if isinstance(err, PPOConfigError):
        return render_block(
            "PPO config problem", err.problems, "fix the stage.* value(s) named above."
        )
    if isinstance(err, DataFormatError):
        return render_block(
            "data problem",
            [str(err)],
            # DataFormatError's text ends with its own "What to do" when it has a hint.
            None if err.hint else "fix the file named above, or point the data path elsewhere.",
        )
    if isinstance(err, HandoffError):
        return render_block(
            "stage chaining problem", [str(err)], "run the command named above first."
        )
    if isinstance(err, (ConfigCompositionException, OverrideParseException)):
        return _compose_error_block(err)
    return _environment_error_block(err, run_dir)


def _compose_error_block(err: Exception) -> str:
    cause = err.__cause__
    lines = str(err).splitlines()
    # Hydra's own advice ("To append to your config use +key=...") cannot work on a typed
    # schema, and its config search path is noise here: keep what names the problem.
    problems = [
        line
        for line in lines[: next((i for i, x in enumerate(lines) if "search path" in x), None)]
        if line.strip() and not line.startswith("To append")
    ]
    if isinstance(cause, OmegaConfBaseException):
        problems += [line for line in str(cause).splitlines() if line.strip()][:1]
    todo = "check the spelling and the value; `alignpipe --help` lists every group and option."
    key, schema = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if isinstance(err, MissingConfigException):
        todo = "pick one of the options listed above (files under conf/<group>/)."
    elif isinstance(cause, ValidationError):
        todo = f"give {key or 'the key'} a value of the type it expects (see `alignpipe --help`)."
    elif isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
        close = _closest_field(str(getattr(cause, "key", "")), schema)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        todo = f"{key} is not a key of this config (keys cannot be added: the schema is typed)"
        todo += f"; did you mean {parent}{close}?" if close else "; check its spelling."
    return render_block("invalid command line", problems, todo)


def _closest_field(key: str, schema: object) -> str | None:
    if not key or not (isinstance(schema, type) and is_dataclass(schema)):
        return None
    names = [f.name for f in fields(schema)]
    match = difflib.get_close_matches(key, names, n=1)
    return match[0] if match else None


def _environment_error_block(err: BaseException, run_dir: Path | None) -> str | None:
    where = f" (run dir {run_dir})" if run_dir is not None else ""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in DISK_FULL:
            path = link.filename or run_dir or "the run dir"
            return render_block(
                "disk full",
                [f"no space left on the device while writing {path}{where}"],
                f"free space on that filesystem ({_df(path)}), or point paths.runs_root=<dir on "
                "a bigger disk> at another one; re-running resumes from the last checkpoint.",
            )
        if isinstance(link, OSError) and link.errno in NOT_WRITABLE:
            path = link.filename or run_dir or "the run dir"
            reason = "read-only filesystem" if link.errno == errno.EROFS else "permission denied"
            return render_block(
                "cannot write the run dir",
                [f"{reason} while writing {path}{where}"],
                "make it writable, or choose a writable place with paths.runs_root=<dir> "
                "(and paths.builtin_models=<dir> for the embedded model cache).",
            )
        if (
            isinstance(link, RuntimeError) and any(m in str(link) for m in TORCH_WRITE_FAILURES)
        ) or (not isinstance(link, OSError) and any(m in str(link) for m in DISK_FULL_TEXT)):
            path = run_dir or "the run dir"
            return render_block(
                "disk full (a checkpoint write failed)",
                [f"a save could not finish writing under {path}: {str(link).strip()[:200]}"],
                f"free space on that filesystem ({_df(path)}), or point paths.runs_root=<dir on "
                "a bigger disk> at another one; re-running resumes from the last checkpoint.",
            )
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _df(path: object) -> str:
    return f"`df -h {Path(str(path)).parent}` shows it"


@contextmanager
def reported_user_errors(*, run_dir: Path | None = None) -> Iterator[None]:
    """Turn a user or environment error into one stderr block and exit status 2; re-raise
    everything else, and everything when HYDRA_FULL_ERROR=1 (to see the traceback)."""
    try:
        yield
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        block = describe_user_error(err, run_dir=run_dir)
        if block is None:
            raise
        print(block, file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None
