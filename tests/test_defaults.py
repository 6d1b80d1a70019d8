"""One source of defaults: each knob's default and its comment live in its schema.

A stage, tracking or paths YAML may set no value that differs from its schema's default (a
stage YAML holds only its defaults list and ``name``). A preset of a shared schema (data/*,
model/*, peft/*) may differ from the schema, but each such value says why in a comment on its
line or the line above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stages.cli_help import schema_field_comments
from tests.conftest import CONF_DIR

# Groups whose options must not change a default, and presets of a shared schema.
NO_OVERRIDE_GROUPS = ("stage", "tracking", "paths")
PRESET_GROUPS = ("data", "model", "peft")
# The key that names the option itself (`tracking=none` is backend none): it must equal the
# file's name, so it is not a default being changed.
OPTION_KEYS = {"stage": "name", "tracking": "backend", "data": "name", "model": "name"}
_KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_]\w*):")


@dataclass
class Setting:
    key: str  # dotted, inside the group
    value: Any
    default: Any  # the schema's default; MISSING_DEFAULT when the schema has none
    line: int  # 1-based line in the YAML file


MISSING_DEFAULT = object()


def schema_node(yaml_file: Path) -> DictConfig:
    """The schema a YAML option composes onto: the ``*_schema`` entry of its defaults list, or
    that of the option it extends (data/hh_file.yaml starts from data/toy.yaml)."""
    group = yaml_file.parent.name
    raw = yaml.safe_load(yaml_file.read_text()) or {}
    entries = [d for d in raw.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    schemas = [d for d in entries if d.endswith("_schema")]
    if schemas:
        return ConfigStore.instance().load(f"{group}/{schemas[0]}.yaml").node
    (base,) = entries
    return schema_node(yaml_file.parent / f"{base}.yaml")


def key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line number (nesting by indentation)."""
    found: dict[str, int] = {}
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _KEY_LINE.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        found.setdefault(".".join(k for _, k in stack), number)
    return found


def settings(yaml_file: Path) -> list[Setting]:
    """Every leaf value the YAML sets, with the schema's default for it."""
    text = yaml_file.read_text()
    raw = yaml.safe_load(text) or {}
    lines = key_lines(text)
    out: list[Setting] = []

    def walk(values: dict, node: DictConfig | None, prefix: str) -> None:
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            if node is None or key not in node:
                out.append(Setting(dotted, value, MISSING_DEFAULT, lines.get(dotted, 0)))
                continue
            child = node._get_node(key)
            if isinstance(value, dict) and isinstance(child, DictConfig):
                if child._is_none():  # an optional section (model.tiny): its class's defaults
                    child = OmegaConf.structured(child._metadata.ref_type)
                walk(value, child, f"{dotted}.")
                continue
            if OmegaConf.is_missing(node, key):
                default = MISSING_DEFAULT
            elif isinstance(child, DictConfig) or OmegaConf.is_list(child):
                default = OmegaConf.to_container(child)
            else:
                default = child._value()
            out.append(Setting(dotted, value, default, lines.get(dotted, 0)))

    walk({k: v for k, v in raw.items() if k != "defaults"}, schema_node(yaml_file), "")
    return out


def differs(setting: Setting) -> bool:
    return setting.default is MISSING_DEFAULT or setting.value != setting.default


def has_comment(text_lines: list[str], line: int) -> bool:
    """A comment on the key's line (after the value) or on the line right above it."""
    here = text_lines[line - 1]
    after_colon = here.split(":", 1)[1] if ":" in here else ""
    above = text_lines[line - 2].strip() if line >= 2 else ""
    return " #" in after_colon or after_colon.lstrip().startswith("#") or above.startswith("#")


def default_problems(yaml_file: Path) -> list[str]:
    """Every way ``yaml_file`` breaks the one-source-of-defaults rule, one line each."""
    group = yaml_file.parent.name
    where = yaml_file.relative_to(yaml_file.parents[1]).as_posix()
    text_lines = yaml_file.read_text().splitlines()
    problems: list[str] = []
    for s in settings(yaml_file):
        shown = "" if s.default is MISSING_DEFAULT else f" (schema default: {s.default!r})"
        if s.key == OPTION_KEYS.get(group):
            if s.value != yaml_file.stem:
                problems.append(f"conf/{where}:{s.line}: {s.key}={s.value!r} must be the file name")
        elif group == "stage":
            problems.append(
                f"conf/{where}:{s.line}: {group}.{s.key}={s.value!r}{shown}: a stage YAML holds "
                "only its defaults list and name; put the default and its comment in the schema"
            )
        elif group in NO_OVERRIDE_GROUPS and differs(s):
            problems.append(
                f"conf/{where}:{s.line}: {group}.{s.key}={s.value!r}{shown}: differs from the "
                "schema; change the schema's default instead"
            )
        elif (
            group in PRESET_GROUPS
            and differs(s)
            and s.default is not MISSING_DEFAULT  # supplying a required value changes no default
            and not has_comment(text_lines, s.line)
        ):
            problems.append(
                f"conf/{where}:{s.line}: {group}.{s.key}={s.value!r}{shown}: a preset's "
                "value that differs from the schema needs a comment saying why"
            )
    return problems


def options(*groups: str) -> list[Path]:
    return [p for group in groups for p in sorted((CONF_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize("yaml_file", options(*NO_OVERRIDE_GROUPS, *PRESET_GROUPS), ids=str)
def test_yaml_agrees_with_its_schema(yaml_file: Path) -> None:
    problems = default_problems(yaml_file)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("yaml_file", options("stage"), ids=lambda p: p.stem)
def test_every_stage_knob_is_documented_in_its_schema(yaml_file: Path) -> None:
    """With the YAML comments gone, `alignpipe --help stage=<name>` reads the schema's."""
    node = schema_node(yaml_file)
    docs = schema_field_comments(OmegaConf.get_type(node))
    undocumented = [key for key in node if not docs.get(str(key))]
    assert not undocumented, f"{yaml_file.stem}: no comment in the schema for {undocumented}"


def test_the_stage_defaults_are_the_tuned_ones() -> None:
    """The values every measured result used (docs/tuning.md), now the schemas' own."""
    from stages.dpo.config import DPOStageConfig
    from stages.ppo.config import PPOHyperparams, PPOStageConfig

    assert (DPOStageConfig.max_steps, DPOStageConfig.sft_weight) == (300, 1.0)
    tuned = {
        "num_minibatches": 2,
        "total_updates": 200,
        "response_length": 16,
        "temperature": 0.3,
        "kl_coef": 1.0,
        "learning_rate": 1e-4,
        "save_steps": 50,
    }
    stage = PPOStageConfig()
    assert {k: getattr(stage, k) for k in tuned} == tuned
    trainer = PPOHyperparams()  # trl 1.12's defaults stay the trainer API's
    assert (trainer.temperature, trainer.kl_coef, trainer.response_length) == (0.7, 0.05, 53)


# ------------------------------------------------------------ the check itself can fail


def _write(tmp_path: Path, group: str, text: str) -> Path:
    path = tmp_path / group / "probe.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_a_stage_yaml_setting_a_knob_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "stage", "defaults:\n  - dpo_schema\n  - _self_\n\nname: probe\n"
                  "beta: 0.1\n")  # fmt: skip
    (problem,) = default_problems(path)  # name == the file's name is fine
    assert problem.startswith("conf/stage/probe.yaml:6: stage.beta=0.1 (schema default: 0.1)")


def test_a_tracking_yaml_changing_a_default_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "tracking", "defaults:\n  - tracking_schema\n  - _self_\n\n"
                  "backend: wandb\nproject: other\nentity: null\n")  # fmt: skip
    problems = default_problems(path)
    assert any("backend='wandb' must be the file name" in p for p in problems), problems
    assert any(
        p.startswith("conf/tracking/probe.yaml:6: tracking.project='other'") for p in problems
    )
    assert not any("entity" in p for p in problems), "a value equal to the default is fine"


def test_a_preset_value_without_a_comment_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "model", "defaults:\n  - model_schema\n  - _self_\n\nname: probe\n"
                  "name_or_path: some/model\nmax_length: 77\n"
                  "# why this one\nmax_new_tokens: 9\nmax_prompt_length: 11  # and why\n")  # fmt: skip
    problems = default_problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("conf/model/probe.yaml:7: model.max_length=77")
