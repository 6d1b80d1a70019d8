"""Run paths stay inside ``paths.runs_root``: names are checked before anything is created.

A run dir is ``<runs_root>/<experiment_name>/<stage>[/<variant>]``. ``experiment_name`` and
``paths.variant`` come from the command line, so each must be ONE plain path component: no
``..``, no ``/`` or ``\\``, not absolute, not a name the stage dir already uses for its own
files (``final``, ``checkpoint-N``, ...). Otherwise ``experiment_name=..`` writes a stage to
``./sft/`` and ``force=true`` deletes ``final/`` and ``checkpoint-*`` wherever it resolves.

Three hooks use this module:

- the ``Config`` schema reports ``run_path_problems`` as config problems (validation);
- ``handoff.stage_dir`` calls ``ensure_inside`` on every run dir it builds (defence in depth);
- Hydra's ``hydra.sweep.dir`` is built by the ``run_path`` resolver (``register_resolvers``),
  which refuses bad names *before* Hydra's sweeper creates the directory. (``hydra.run.dir``
  is ``.``: with ``chdir: false`` and no ``.hydra/`` copies nothing uses it, and creating the
  current directory is harmless; our own code creates the run dir only after validation.)

Sweep variants are Hydra ``override_dirname`` strings such as ``stage.beta=0.05`` or
``lr=0.001,stage.beta=0.1``: dots, ``=`` and commas are fine inside one component.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

from omegaconf import OmegaConf

# Names a stage dir uses for its own content (stages/core/handoff.py, W&B): a variant with
# one of these names would live inside, or be deleted with, the plain stage's files.
_RESERVED = re.compile(
    r"^(final|wandb|DONE|manifest\.json|metrics\.json|eval_samples\.jsonl|checkpoint-\d+.*)$"
)
# Longest file name most filesystems accept (bytes, one component).
NAME_MAX = 255
RESOLVER = "run_path"


def name_problem(
    key: str, value: object, *, allow_empty: bool = False, inside_stage_dir: bool = False
) -> str | None:
    """Why ``value`` cannot be the path component ``key`` (None when it can).

    ``inside_stage_dir``: the name is a sub-directory of a stage dir (``paths.variant``), so
    the stage dir's own file names are taken.
    """
    if not isinstance(value, str):
        return f"{key}={value!r} must be a string naming one directory"
    if value == "":
        return None if allow_empty else f"{key} is empty: give it a plain name, e.g. {key}=mine"
    why = None
    if value in (".", ".."):
        why = "'.' and '..' point outside their own directory"
    elif "/" in value or "\\" in value or os.sep in value:
        why = "it holds a path separator"
    elif PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive:
        why = "it is an absolute path"
    elif "\x00" in value or any(ord(c) < 32 for c in value):
        why = "it holds control characters"
    elif len(value.encode()) > NAME_MAX:
        why = f"it is longer than {NAME_MAX} bytes"
    elif inside_stage_dir and _RESERVED.match(value):
        why = "a stage directory already uses that name for its own files"
    if why is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", value).strip("._") or "mine"
    return (
        f"{key}={value!r} is not a plain directory name ({why}); run dirs must stay inside "
        f"paths.runs_root. Use letters, digits and . _ - = , + only, e.g. {key}={safe}"
    )


# Stage knobs that name another stage's run dir (runs/<exp>/<name>/).
STAGE_REFERENCES = ("parent", "target", "reward_stage")


def run_path_problems(experiment_name: object, variant: object, stage: object = None) -> list[str]:
    """Every problem with the names that make up a run dir, this stage's or one it reads
    (``stage.parent``, ``stage.target``, ``stage.reward_stage``); empty when all are safe."""
    problems = [
        name_problem("experiment_name", experiment_name),
        name_problem("paths.variant", variant, allow_empty=True, inside_stage_dir=True),
    ]
    for key in STAGE_REFERENCES:
        if (value := getattr(stage, key, None)) is not None:
            problems.append(name_problem(f"stage.{key}", value))
    return [p for p in problems if p]


def command_line_problems(argv: Sequence[str]) -> list[str]:
    """Problems with the run-dir names a command line sets, every value of a sweep included.

    For ``alignpipe -m experiment_name=...``: Hydra's sweeper creates ``hydra.sweep.dir``
    before any job's config is validated (the ``run_path`` resolver stops it, but inside
    Hydra, as a traceback); checking the overrides first gives the usual config error.
    Unparsable overrides are left to Hydra's own error.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides(
            [arg for arg in argv if not arg.startswith("-")]
        )
    except Exception:  # Hydra reports its own parse errors, with the grammar
        return []
    checks = {
        "experiment_name": {},
        "paths.variant": {"allow_empty": True, "inside_stage_dir": True},
    }
    problems = []
    for override in overrides:
        options = checks.get(override.key_or_group)
        if options is None or override.is_delete():
            continue
        if override.is_sweep_override():
            values: list[object] = list(override.sweep_string_iterator())
        else:
            values = [override.value()]
        for value in values:
            value = "" if value is None else str(value)
            if problem := name_problem(override.key_or_group, value, **options):
                problems.append(problem)
    return problems


def check_command_line(argv: Sequence[str]) -> None:
    """``command_line_problems`` as one ConfigError (the entry point calls it first)."""
    problems = command_line_problems(argv)
    if problems:
        from stages.core.schema import ConfigError  # schema imports this module

        raise ConfigError("; ".join(problems), problems=problems)


def ensure_inside(runs_root: str | os.PathLike, path: Path) -> Path:
    """``path`` itself if it lies under ``runs_root`` (lexically), else a ConfigError."""
    root = os.path.normpath(os.path.abspath(runs_root))
    target = os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([root, target]) != root or target == root:
        from stages.core.schema import ConfigError  # schema imports this module

        raise ConfigError(
            f"run dir {path} lies outside paths.runs_root={runs_root}: check experiment_name "
            "and paths.variant (plain names, no '..' or '/')"
        )
    return path


def run_path(runs_root: str, *names: str) -> str:
    """The ``run_path`` resolver: ``runs_root/name/...`` after checking every name.

    conf/config.yaml builds ``hydra.sweep.dir`` with it, so a bad ``experiment_name`` fails
    while Hydra resolves the dir, before its sweeper creates it.
    """
    keys = {0: "experiment_name"}
    problems = [
        problem
        for index, name in enumerate(names)
        if (problem := name_problem(keys.get(index, "run dir name"), str(name)))
    ]
    if problems:
        from stages.core.schema import ConfigError  # schema imports this module

        raise ConfigError("; ".join(problems), problems=problems)
    return str(ensure_inside(runs_root, Path(runs_root, *map(str, names))))


def register_resolvers() -> None:
    """Register ``${run_path:...}`` for conf/config.yaml (idempotent)."""
    OmegaConf.register_new_resolver(RESOLVER, run_path, replace=True)
