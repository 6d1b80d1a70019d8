"""Config tree: every group option composes, typed schemas reject bad keys and values."""

from __future__ import annotations

import itertools

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from stages.core.handoff import stage_dir
from stages.core.schema import STAGES, Config, ConfigError, validate_config
from tests.conftest import CONF_DIR


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_stage_group_has_one_option_per_stage() -> None:
    assert _options("stage") == sorted(STAGES)


@pytest.mark.parametrize(
    ("stage", "experiment"), list(itertools.product(_options("stage"), _options("experiment")))
)
def test_every_stage_x_experiment_composes_and_validates(compose_cfg, stage, experiment) -> None:
    cfg = compose_cfg(f"stage={stage}", f"experiment={experiment}", fast=False)
    typed = validate_config(cfg)
    assert isinstance(typed, Config)
    assert typed.stage.name == stage
    assert typed.experiment_name == experiment  # experiment files name themselves


@pytest.mark.parametrize("group", ["model", "peft", "data", "tracking", "paths"])
def test_every_option_of_every_group_composes(compose_cfg, group) -> None:
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "file":
            overrides += ["data.sft.path=x.jsonl", "data.pairs.path=y.jsonl"]
        typed = validate_config(compose_cfg(*overrides, fast=False))
        assert typed is not None


def test_real_model_configs_point_at_the_hub(compose_cfg) -> None:
    qwen = validate_config(compose_cfg("model=qwen2_5_0_5b", fast=False)).model
    llama = validate_config(compose_cfg("model=llama3_1_8b", fast=False)).model
    assert qwen.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert llama.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert not qwen.trust_remote_code and not llama.trust_remote_code


def test_unknown_key_fails_at_compose_naming_the_key(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("stage=dpo", "stage.bta=0.1")
    assert "bta" in str(err.value) or "bta" in str(err.value.__cause__)


def test_wrong_type_fails_at_compose_naming_the_key(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("stage=dpo", "stage.beta=abc")
    text = f"{err.value} {err.value.__cause__}"
    assert "beta" in text


def test_top_level_typo_fails(compose_cfg) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_cfg("sed=3")


def test_cross_field_checks_run_before_any_weights(compose_cfg) -> None:
    cfg = compose_cfg("data.toy.frac_correct=0.9")  # easy mix no longer sums to 1
    with pytest.raises(ConfigError, match=r"data\.toy\.frac_correct"):
        validate_config(cfg)
    cfg = compose_cfg("peft.kind=qlorra")
    with pytest.raises(ConfigError, match=r"peft\.kind='qlorra'"):
        validate_config(cfg)
    cfg = compose_cfg("stage=dpo", "stage.beta=-1")
    with pytest.raises(ConfigError, match=r"stage\.beta"):
        validate_config(cfg)


def test_struct_mode_blocks_new_keys_on_typed_nodes(compose_cfg) -> None:
    cfg = compose_cfg()
    with pytest.raises((ConfigKeyError, ValidationError, AttributeError)):
        OmegaConf.update(cfg, "model.hiden_size", 3, merge=False)


def test_run_dirs_are_deterministic(compose_cfg, tmp_path) -> None:
    cfg = validate_config(compose_cfg("stage=dpo", "experiment=toy_qlora"))
    expected = tmp_path / "runs" / "toy_qlora" / "dpo"
    assert stage_dir(cfg.paths.runs_root, cfg.experiment_name, cfg.stage.name) == expected


def test_every_schema_knob_carries_a_comment() -> None:
    """Every config field is documented where it is typed: a one-line comment on the field
    (subclasses that only change a default inherit the base field's comment)."""
    import ast
    import inspect

    from stages.core import schema

    source = inspect.getsource(schema)
    lines = source.splitlines()
    commented, fields = set(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    line = lines[stmt.lineno - 1]
                    above = lines[stmt.lineno - 2].strip()
                    fields.append((node.name, stmt.target.id, stmt.lineno))
                    if "#" in line or above.startswith("#"):
                        commented.add(stmt.target.id)
    missing = [f"{cls}.{name} (line {no})" for cls, name, no in fields if name not in commented]
    assert not missing, "config fields without a comment: " + ", ".join(missing)
