"""Shell commands as a user types them (README code blocks, printed hints) -> the `alignpipe`
jobs they start: `make` lines run through the real Makefile (with stand-in programs), and
multirun sweeps are expanded into one override list per job, as Hydra's sweepers would."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
STAGE_MODULE = "stages"  # `python -m stages` / `accelerate launch ... -m stages`


@dataclass
class Invocation:
    """One `alignpipe` process a shell command starts."""

    source: str  # the command as written
    overrides: list[str]
    multirun: bool = False
    jobs: list[list[str]] = field(default_factory=list)  # per-job overrides (multirun)


PLACEHOLDER = re.compile(r"\.\.\.|<[^>]*>")
FENCED = re.compile(r"```(\w*)\n(.*?)```", flags=re.DOTALL)


def shell_commands(markdown: str) -> list[str]:
    """Every `alignpipe ...` / `make ...` command in document order: the lines of ```bash
    blocks (continuation lines joined, comments dropped) and inline code spans."""
    found: list[tuple[int, str]] = []
    for block in FENCED.finditer(markdown):
        if block.group(1) not in ("bash", "sh", ""):
            continue
        for line in block.group(2).replace("\\\n", " ").splitlines():
            found.append((block.start(), line))
    prose = FENCED.sub(lambda m: " " * len(m.group(0)), markdown)
    for span in re.finditer(r"`([^`\n]+)`", prose):
        found.append((span.start(), span.group(1)))
    commands = []
    for _, line in sorted(found, key=lambda item: item[0]):
        if line.split()[:1] not in (["alignpipe"], ["make"]) or PLACEHOLDER.search(line):
            continue  # prose about a command (`make ... ARGS='...'`, `EXP=<bundle>`)
        tokens = shlex.split(line, comments=True)
        if len(tokens) > 1 and tokens[0] in ("alignpipe", "make"):
            commands.append(shlex.join(tokens))
    return commands


def make_run(tokens: list[str]) -> list[list[str]]:
    """Run `make <tokens>` for real, with stand-ins for the programs in .venv/bin (python,
    accelerate, ruff) that record their command line instead of running it; returns those
    command lines. So the Makefile's recipes and `stages.make_args` (how ARGS is split) are
    exercised as a user's `make` would; raises when make fails."""
    with tempfile.TemporaryDirectory(prefix="fake_bin_") as tmp:
        fake_bin, record = Path(tmp) / "bin", Path(tmp) / "commands.jsonl"
        fake_bin.mkdir()
        recorder = (
            f"exec {shlex.quote(sys.executable)} -c 'import json, os, sys; "
            'open(os.environ["ALIGNPIPE_RECORD"], "a").write(json.dumps(sys.argv[1:]) + "\\n")'
            '\' "$0" "$@"\n'
        )
        for program in ("python", "accelerate", "ruff"):
            script = "#!/bin/bash\n"
            if program == "python":  # the ARGS splitter runs for real, then execs a fake
                script += (
                    'if [ "$1" = -m ] && [ "$2" = stages.make_args ]; then '
                    f'exec {shlex.quote(sys.executable)} "$@"; fi\n'
                )
            (fake_bin / program).write_text(script + recorder)
            (fake_bin / program).chmod(0o755)
        result = subprocess.run(
            ["make", "--no-print-directory", *tokens, f"BIN={fake_bin}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "ALIGNPIPE_RECORD": str(record)},
        )
        if result.returncode != 0:
            raise AssertionError(f"`make {shlex.join(tokens)}` fails: {result.stderr.strip()}")
        lines = record.read_text().splitlines() if record.exists() else []
    return [json.loads(line) for line in lines]


def command_lines(command: str) -> list[list[str]]:
    """The processes a shell command starts: itself for `alignpipe`, the recipes for `make`."""
    tokens = shlex.split(command)
    return [tokens] if tokens[0] == "alignpipe" else make_run(tokens[1:])


def invocations(command: str, lines: list[list[str]] | None = None) -> list[Invocation]:
    """The alignpipe processes among ``lines`` (default: ``command_lines(command)``)."""
    found = []
    for line in command_lines(command) if lines is None else lines:
        argv = _stage_argv(line)
        if argv is None:
            continue
        multirun = bool({"-m", "--multirun"} & set(argv))
        overrides = [a for a in argv if a not in ("-m", "--multirun")]
        found.append(Invocation(command, overrides, multirun))
    return found


def _stage_argv(line: list[str]) -> list[str] | None:
    if line and Path(line[0]).name == "alignpipe":
        return line[1:]
    for i in range(len(line) - 1):
        if line[i] == "-m" and line[i + 1] == STAGE_MODULE:
            return line[i + 2 :]
    return None


def other_modules(lines: list[list[str]]) -> list[str]:
    """`python -m <module>` run by these lines that is not a stage (compare, pytest, ...)."""
    return [
        line[i + 1]
        for line in lines
        for i in range(len(line) - 1)
        if line[i] == "-m"
        and line[i + 1] != STAGE_MODULE
        and line[i + 1] != "-m"
        and Path(line[0]).name == "python"
        and i == 1
    ]


def expand_jobs(overrides: list[str], extra: list[str]) -> list[list[str]]:
    """Per-job overrides of a multirun: command-line sweeps (a,b,c / range / interval) and the
    `hydra.sweeper.params` of a sweep file, crossed; an interval contributes its two ends."""
    parser = OverridesParser.create()
    axes: list[list[str]] = []
    fixed: list[str] = []
    for override in parser.parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            axes.append([f"{key}={v}" for v in _sweep_values(override.value())])
        else:
            fixed.append(override.input_line)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*fixed, *extra], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    params = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False).get("params") or {}
    for key, spec in params.items():
        if any(axis[0].split("=")[0] == key for axis in axes):
            continue  # the command line wins over the sweep file
        value = parser.parse_overrides([f"{key}={spec}"])[0].value()
        axes.append([f"{key}={v}" for v in _sweep_values(value)])
    return [[*fixed, *combo] for combo in itertools.product(*axes)] if axes else [fixed]


def _sweep_values(value: object) -> list[object]:
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        return list(range(int(start), int(stop), int(step)))  # type: ignore[arg-type]
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    return [value]
