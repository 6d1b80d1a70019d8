"""`make <stage> ARGS='...'`: split ARGS like a shell would, but never run anything in it.

The Makefile used to paste ``$(ARGS)`` into the recipe's shell line, so ARGS='x=`cmd`' ran
``cmd``. Now it exports the raw text in an environment variable and calls::

    python -m stages.make_args ALIGNPIPE_ARGS -- <command> <its own args...>

which appends ``shlex.split($ALIGNPIPE_ARGS)`` to the command and execs it. Quotes still group
words (``ARGS="data.sft.path='my file.jsonl'"``); backticks, ``$(...)``, ``$VAR``, globs,
``;`` and ``|`` are plain characters that reach Hydra unchanged (which then rejects or keeps
them as values).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

USAGE = "usage: python -m stages.make_args ENV_VAR -- COMMAND [ARG ...]"


class MakeArgsError(ValueError):
    """ARGS cannot be split into words (an unbalanced quote)."""


def split_args(variable: str, text: str) -> list[str]:
    """The words of ``text`` by shell quoting rules, without any expansion."""
    try:
        return shlex.split(text, comments=False, posix=True)
    except ValueError as err:  # "No closing quotation", "No escaped character"
        name = variable.removeprefix("ALIGNPIPE_")
        raise MakeArgsError(
            f"{name}={text!r} cannot be split into words: {err}. Balance the quotes, e.g. "
            f"""make dpo {name}="stage.beta=0.05 'data.sft.path=my file.jsonl'\""""
        ) from None


def command_line(argv: Sequence[str], environ: dict[str, str]) -> list[str]:
    """``COMMAND ARG... + split($ENV_VAR)`` from ``ENV_VAR -- COMMAND ARG...``."""
    if len(argv) < 3 or argv[1] != "--":
        raise MakeArgsError(USAGE)
    variable, command = argv[0], list(argv[2:])
    return command + split_args(variable, environ.get(variable, ""))


def main(argv: Sequence[str] | None = None) -> None:
    try:
        command = command_line(sys.argv[1:] if argv is None else argv, dict(os.environ))
    except MakeArgsError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.flush()
    os.execvp(command[0], command)  # the stage's exit status is make's


if __name__ == "__main__":
    main()
