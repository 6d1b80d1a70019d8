"""`alignpipe --help`: stages, config groups, their options and knobs, from conf/ itself.

Hydra's generic page lists the internal ``*_schema`` configs as options and ``accelerate`` as
a group, and shows no docs. This page is built from the YAML files (the first comment line of
each option; a comment on a preset's key) and the typed schemas, where every knob's default
and its comment live (a field's comment, or the PPO knob's ``help``), composed with Hydra but
without importing torch or transformers, so it answers in well under a second. Hydra's own page stays at ``--hydra-help``.

    alignpipe --help                      stages, groups, options, top-level keys
    alignpipe --help stage=dpo            the knobs of stage=dpo, their defaults and docs
    alignpipe --help stage=ppo peft=qlora several options (and any overrides) at once
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.config_files import CONF_DIR

HELP_FLAGS = ("--help", "-h")
# Selectable groups, in the order a user meets them; `paths` is where, not what.
GROUPS = ("stage", "model", "peft", "data", "tracking", "experiment", "paths")
_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w]*):(?P<rest>.*)$")


def wants_help(argv: Sequence[str]) -> bool:
    """True when the command line asks for our help (``--help`` / ``-h``, not --hydra-help)."""
    return any(arg in HELP_FLAGS for arg in argv)


def option_doc(path: Path) -> str:
    """First sentence of a YAML option's leading comment (skipping ``# @package``), or ''."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        text = text.lstrip("#").strip()
        if text.startswith("@package"):
            continue
        if not text:
            break
        words.append(text)
        if text.endswith((".", ":")):  # the first sentence ends with this comment line
            break
    return first_sentence(" ".join(words))


def first_sentence(text: str) -> str:
    """Up to the first sentence end outside brackets (". ", or a final "." / ":")."""
    for match in re.finditer(r"\.(\s|$)|:$", text):
        head = text[: match.start() + 1]
        depth = sum(head.count(c) for c in "([") - sum(head.count(c) for c in ")]")
        if depth <= 0 and not head.endswith(("e.g.", "i.e.")):
            return head
    return text


def group_options(group: str) -> list[tuple[str, str]]:
    """(option, one-line doc) of each selectable YAML option of a conf/ group; a stage's doc is
    its registry summary (stages/registry.py), else the YAML's header comment."""
    folder = CONF_DIR / group
    summaries: dict[str, str] = {}
    if group == "stage":
        from stages.registry import STAGES  # config schemas only: no torch

        summaries = {spec.name: spec.summary for spec in STAGES if spec.summary}
    return [(p.stem, summaries.get(p.stem) or option_doc(p)) for p in sorted(folder.glob("*.yaml"))]


def yaml_key_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment on its line in a YAML file (nested keys by indentation)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = _KEY_LINE.match(line)
        if match is None or line.lstrip().startswith("#"):
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        rest = match["rest"]
        if "#" in rest and not rest.strip().startswith(("'", '"')):
            comments[dotted] = rest.split("#", 1)[1].strip()
    return comments


def schema_field_comments(cls: type) -> dict[str, str]:
    """Field name -> its one-line doc in a schema dataclass and its bases: the comment on the
    field's line, else the first sentence of the comment block right above it, else the
    field's ``help`` metadata (PPO knobs). The class that declares a field last documents it
    (PPOStageConfig's ``temperature`` over PPOHyperparams', PPOHyperparams' ``lr_scheduler``
    over StageConfig's)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        declared: dict[str, str] = {}
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            source = ""
        lines = source.splitlines()
        for stmt in ast.parse(source).body[0].body if source else []:  # type: ignore[attr-defined]
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            line = lines[stmt.lineno - 1]
            above = _comment_block_above(lines, stmt.lineno - 1)
            if "#" in line and not line.split("#", 1)[1].strip().startswith("fmt:"):
                declared[stmt.target.id] = line.split("#", 1)[1].strip()
            elif above:
                declared[stmt.target.id] = first_sentence(above)
        own_fields = inspect.get_annotations(klass)
        for item in dataclasses.fields(klass):
            help_text = item.metadata.get("help")
            if help_text and item.name in own_fields and item.name not in declared:
                declared[item.name] = first_sentence(" ".join(help_text.split()))
        docs.update(declared)
    return docs


def _comment_block_above(lines: list[str], index: int) -> str:
    """The comment lines right above ``lines[index]``, joined (a "# ----" divider ends it)."""
    block: list[str] = []
    for line in reversed(lines[:index]):
        text = line.strip()
        if not text.startswith("#") or text.lstrip("#").strip().startswith("-"):
            break
        block.insert(0, text.lstrip("#").strip())
    return " ".join(block)


def compose(overrides: Sequence[str]) -> Any:
    """The composed config (Hydra + our schemas) for these overrides; no heavy imports."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stages.registry import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def general_help() -> str:
    """The page for a bare ``--help``."""
    out = [
        "alignpipe: SFT -> reward model + PPO, DPO or KTO; full weights or a PEFT adapter "
        "(LoRA, QLoRA, DoRA, IA3, prefix, prompt).",
        "",
        "Usage: alignpipe stage=<stage> [group=option ...] [key=value ...]",
        "       alignpipe -m stage=dpo stage.beta=0.05,0.1   (a sweep: one run per value)",
        "       alignpipe --help stage=dpo                  (that option's knobs and defaults)",
        "       alignpipe --hydra-help                      (Hydra's own flags)",
        "",
        "Stages (stage=...; each writes runs/<experiment_name>/<stage>/):",
    ]
    out += [f"  {name:<14} {doc}" for name, doc in group_options("stage")]
    out += ["", "Config groups (group=option; the default is marked *):"]
    defaults = _default_options()
    from stages.core.schema import Config

    # The schema's own comments, except where they speak to developers.
    group_docs = {
        **schema_field_comments(Config),
        "experiment": "named bundles of overrides (conf/experiment/)",
        "paths": "where runs and the built-in model live (paths.runs_root=...)",
    }
    for group in GROUPS[1:]:
        out.append(f"  {group}: {group_docs.get(group, '')}")
        for name, doc in group_options(group):
            mark = "*" if defaults.get(group) == name else " "
            out.append(f"   {mark}{name:<14} {doc}".rstrip())
    out += ["", "Named sweeps (alignpipe -m +sweep=<name>, or make sweep SWEEP=<name>):"]
    out += [f"  {name:<14} {doc}" for name, doc in group_options("sweep")]
    out += ["", "Top-level keys (key=value):"]
    out += [f"  {key:<16} {doc}" for key, doc in top_level_keys().items()]
    accelerate = ", ".join(name for name, _ in group_options("accelerate"))
    out += [
        "",
        f"conf/accelerate/ ({accelerate}) holds `accelerate launch` configs, not a config",
        "group: make sft LAUNCH=accelerate ACC=ddp NPROC=8.",
        "Slurm: alignpipe -m hydra/launcher=slurm ... (conf/hydra/launcher/slurm.yaml).",
    ]
    return "\n".join(out)


def top_level_keys() -> dict[str, str]:
    """Top-level key -> doc: the comment in conf/config.yaml, else the schema's."""
    from stages.core.schema import Config

    yaml_docs = yaml_key_comments(CONF_DIR / "config.yaml")
    schema_docs = schema_field_comments(Config)
    return {
        item.name: yaml_docs.get(item.name) or schema_docs.get(item.name, "")
        for item in dataclasses.fields(Config)
        if item.name not in GROUPS
    }


def _default_options() -> dict[str, str]:
    """group -> default option, from conf/config.yaml's defaults list."""
    defaults: dict[str, str] = {}
    for line in (CONF_DIR / "config.yaml").read_text().splitlines():
        match = re.match(r"^\s*-\s*(\w+):\s*(\w+)", line)
        if match and match[1] in GROUPS:
            defaults[match[1]] = match[2]
    return defaults


def option_help(overrides: Sequence[str]) -> str:
    """The knobs of each ``group=option`` in ``overrides``, with the composed defaults."""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    picked = [o.split("=", 1) for o in overrides if "=" in o and o.split("=", 1)[0] in GROUPS]
    out: list[str] = []
    for group, option in picked:
        path = CONF_DIR / group / f"{option}.yaml"
        out += [f"{group}={option}: {option_doc(path)}", ""]
        node = cfg if group == "experiment" else cfg.get(group)
        if group == "experiment":
            out += [f"  (a bundle of overrides: {path.relative_to(CONF_DIR.parent)})", ""]
            out.append(path.read_text())
            continue
        comments = yaml_key_comments(path)
        schema = OmegaConf.get_type(node)
        field_docs = schema_field_comments(schema) if dataclasses.is_dataclass(schema) else {}
        out += _knob_lines(group, node, comments, field_docs)
        out.append("")
    if not picked:
        out.append("Name a group option to see its knobs, e.g. alignpipe --help stage=dpo")
    return "\n".join(out).rstrip()


def _knob_lines(
    prefix: str, node: Any, comments: dict[str, str], field_docs: dict[str, str], path: str = ""
) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    lines: list[str] = []
    for key in node:
        dotted = f"{path}.{key}" if path else str(key)
        value = node._get_node(key)
        doc = comments.get(dotted) or (field_docs.get(str(key)) if not path else "")
        if isinstance(value, DictConfig) and len(value) and not OmegaConf.is_missing(node, key):
            schema = OmegaConf.get_type(value)
            nested = schema_field_comments(schema) if dataclasses.is_dataclass(schema) else {}
            lines.append(f"  {prefix}.{dotted}:" + (f"  # {doc}" if doc else ""))
            for line in _knob_lines(prefix, value, comments, nested, dotted):
                lines.append(line)
            continue
        if path and not doc:
            doc = field_docs.get(str(key), "")
        shown = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value._value()
        text = f"  {prefix}.{dotted}={_render(shown)}"
        lines.append(f"{text:<48} # {doc}" if doc else text)
    return lines


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def print_help(argv: Sequence[str]) -> int:
    """Print the page for ``argv`` (the command line after the program name); exit status."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [arg for arg in argv if arg not in HELP_FLAGS and not arg.startswith("-")]
    if not overrides:
        print(general_help())
        return 0
    for override in overrides:
        group, _, option = override.partition("=")
        known = [name for name, _ in group_options(group)] if group in GROUPS else []
        if group in GROUPS and option not in known:
            print(
                f"alignpipe --help: {group}={option} is not an option of {group}; "
                f"the options are: {', '.join(known)}",
                file=sys.stderr,
            )
            return 2
    try:
        page = option_help(overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # a bad key or value
        print(f"alignpipe --help {' '.join(overrides)}: {exc}", file=sys.stderr)
        print("Run `alignpipe --help` for the groups and their options.", file=sys.stderr)
        return 2
    print(page)
    return 0
