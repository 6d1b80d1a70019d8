"""Config tree: every group option composes, typed schemas reject bad keys and values."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import typing

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from stages.core.bounds import Bound
from stages.core.handoff import stage_dir
from stages.core.schema import Config, ConfigError, validate_config
from stages.ppo.config import PPO_BOUNDS
from stages.registry import STAGES
from tests.conftest import CONF_DIR, FIXTURES


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_stage_group_has_one_option_per_stage() -> None:
    assert _options("stage") == sorted(spec.name for spec in STAGES)


@pytest.mark.parametrize(
    ("stage", "experiment"), list(itertools.product(_options("stage"), _options("experiment")))
)
def test_every_stage_x_experiment_composes_and_validates(compose_cfg, stage, experiment) -> None:
    cfg = compose_cfg(f"stage={stage}", f"experiment={experiment}", fast=False)
    typed = validate_config(cfg)
    assert isinstance(typed, Config)
    assert typed.stage.name == stage
    assert typed.experiment_name == experiment  # experiment files name themselves


# What each stage can train with (the registry's peft_methods, spelled out here so that a
# change to them is a visible test change).
WORKING_METHODS = {
    "sft": {"none", "lora", "dora", "ia3", "prefix", "prompt"},
    "dpo": {"none", "lora", "dora", "ia3", "prefix", "prompt"},
    "kto": {"none", "lora", "dora", "ia3", "prefix", "prompt"},  # like dpo
    "eval": {"none", "lora", "dora", "ia3", "prefix", "prompt"},
    "export": {"none", "lora", "dora", "ia3", "prefix", "prompt"},  # the target's kind counts
    "rm": {"none", "lora", "dora"},
    "ppo": {"none", "lora", "dora"},
    "grpo": {"none", "lora", "dora"},
    "rloo": {"none", "lora", "dora"},
}


@pytest.mark.parametrize(
    ("stage", "peft", "experiment"),
    list(itertools.product(_options("stage"), _options("peft"), _options("experiment"))),
)
def test_every_stage_x_peft_x_experiment_validates_or_names_the_methods(
    compose_cfg, stage, peft, experiment
) -> None:
    cfg = compose_cfg(f"stage={stage}", f"peft={peft}", f"experiment={experiment}", fast=False)
    method = cfg.peft.method  # an experiment bundle may pick its own peft
    spec = next(s for s in STAGES if s.name == stage)
    assert set(spec.peft_methods) == WORKING_METHODS[stage]
    if method in WORKING_METHODS[stage]:
        typed = validate_config(cfg)
        assert (typed.stage.name, typed.peft.method) == (stage, method)
        return
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert err.value.problems == [
        f"peft.method={method} does not work for stage {stage}; the methods that do: "
        f"{list(spec.peft_methods)}. Pick one of them, e.g. `alignpipe stage={stage} peft=lora`"
    ]


def test_peft_quantize_and_target_modules_are_checked(compose_cfg) -> None:
    typed = validate_config(compose_cfg("peft=dora", "peft.quantize=4bit"))
    assert typed.peft.checkpoint_kind() == "dora-4bit"
    assert validate_config(compose_cfg("peft=qlora")).peft.checkpoint_kind() == "qlora"
    assert validate_config(compose_cfg("peft=lora")).peft.target_modules == "all-linear"
    typed = validate_config(compose_cfg("peft=lora", "peft.target_modules=[q_proj,v_proj]"))
    assert typed.peft.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"peft\.quantize=4bit needs an adapter method"):
        validate_config(compose_cfg("peft=none", "peft.quantize=4bit"))
    with pytest.raises(ConfigError, match=r"peft\.method=ia3 does not train on a 4-bit base"):
        validate_config(compose_cfg("peft=ia3", "peft.quantize=4bit"))
    with pytest.raises(ConfigError, match=r"peft\.target_modules='all_linear' must be"):
        validate_config(compose_cfg("peft=lora", "peft.target_modules=all_linear"))


@pytest.mark.parametrize("group", ["model", "peft", "data", "tracking", "paths"])
def test_every_option_of_every_group_composes(compose_cfg, group) -> None:
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "file":
            overrides += [
                f"data.sft.path={FIXTURES / 'sft_messages.jsonl'}",
                f"data.pairs.path={FIXTURES / 'pref_standard.jsonl'}",
            ]
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
    cfg = compose_cfg("peft.method=qlorra")
    with pytest.raises(ConfigError, match=r"peft\.method='qlorra'"):
        validate_config(cfg)
    cfg = compose_cfg("stage=dpo", "stage.beta=-1")
    with pytest.raises(ConfigError, match=r"stage\.beta"):
        validate_config(cfg)
    # A checkpoint between two logging steps would lose the losses logged since the last log:
    # a resumed run could not report the same metrics.
    cfg = compose_cfg("stage.logging_steps=20", "stage.save_steps=25")
    with pytest.raises(ConfigError, match=r"stage\.save_steps=25 must be a multiple of stage"):
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


# ------------------------------------------------------------- every numeric knob is checked


def _schema_tree() -> list[tuple[type, str, str]]:
    """(schema class, key prefix, stage to compose) for every node of the config tree; the
    stage node has one schema per stage."""
    from stages.core import schema

    found: list[tuple[type, str, str]] = []

    def walk(cls: type, prefix: str, stage: str) -> None:
        found.append((cls, prefix, stage))
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if dataclasses.is_dataclass(inner[0]):
                walk(inner[0], f"{prefix}{f.name}.", stage)

    walk(schema.Config, "", "sft")
    for spec in STAGES:
        walk(spec.schema, "stage.", spec.name)
    return found


def _numeric_fields(cls: type) -> list[str]:
    names = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if kinds[0] in (int, float):
            names.append(f.name)
    return names


def test_every_schema_class_is_in_the_config_tree() -> None:
    """A new schema class must hang in the tree, or the range meta-test would not see it."""
    from stages.core import schema

    defined = {
        obj
        for obj in vars(schema).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == schema.__name__
    }
    reached = {base for cls, _, _ in _schema_tree() for base in cls.__mro__}
    assert defined <= reached, f"not in the config tree: {defined - reached}"


def _bounds_of(cls: type) -> dict[str, Bound]:
    from stages.ppo.config import PPOStageConfig

    bounds = dict(getattr(cls, "BOUNDS", {}))
    if issubclass(cls, PPOStageConfig):
        bounds.update(PPO_BOUNDS)
    return bounds


def test_every_numeric_knob_has_a_range() -> None:
    from stages.ppo.config import PPOStageConfig

    unchecked = []
    for cls, prefix, _ in _schema_tree():
        exempt = set(PPOStageConfig.NOT_PPO_KNOBS) if issubclass(cls, PPOStageConfig) else set()
        unchecked += [
            f"{prefix}{name} ({cls.__name__})"
            for name in _numeric_fields(cls)
            if name not in _bounds_of(cls) and name not in exempt
        ]
    assert not unchecked, "numeric knobs without a range in BOUNDS: " + ", ".join(unchecked)


def _out_of_range_cases() -> list[tuple[str, str, object]]:
    from stages.ppo.config import PPOStageConfig

    cases = []
    for cls, prefix, stage in _schema_tree():
        bounds = _bounds_of(cls)
        for name in _numeric_fields(cls):
            if issubclass(cls, PPOStageConfig) and name in PPOStageConfig.NOT_PPO_KNOBS:
                cases.append((stage, f"{prefix}{name}", 1))  # any value: not a PPO knob
                continue
            cases += [(stage, f"{prefix}{name}", v) for v in bounds[name].outside_values()]
    return cases


def test_every_out_of_range_value_is_a_config_error_naming_its_key(compose_cfg) -> None:
    """Walks every int/float field of every schema, sets a value just outside its range and
    expects validation to name that key; so a knob whose check is missing or wrong fails."""
    composed = {}
    failures, cases = [], _out_of_range_cases()
    assert len(cases) > 100  # the walk really reaches every schema
    for stage, key, value in cases:
        if stage not in composed:
            composed[stage] = compose_cfg(f"stage={stage}", fast=False)
        cfg = copy.deepcopy(composed[stage])
        OmegaConf.update(cfg, key, value, merge=False)
        try:
            validate_config(cfg)
        except ConfigError as err:
            if not any(p.startswith((f"{key}=", f"{key} ")) for p in err.problems):
                failures.append(f"{key}={value!r}: error does not name it: {err.problems}")
        else:
            failures.append(f"{key}={value!r} (stage={stage}) was accepted")
    assert not failures, "\n".join(failures)


def test_all_problems_are_reported_at_once(compose_cfg) -> None:
    cfg = compose_cfg(
        "stage.gradient_accumulation_steps=0",
        "data.toy.num_train=0",
        "stage.warmup_ratio=2.5",
        "peft.dropout=1.0",
        "model.tiny.num_heads=0",
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    keys = [p.split("=")[0] for p in err.value.problems]
    assert keys == [
        "stage.gradient_accumulation_steps",
        "stage.warmup_ratio",
        "model.tiny.num_heads",
        "peft.dropout",
        "data.toy.num_train",
    ]


def test_ppo_problems_are_all_reported(compose_cfg) -> None:
    cfg = compose_cfg(
        "stage=ppo", "stage.kl_coef=-1", "stage.lam=0", "stage.max_steps=3", fast=False
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    text = "\n".join(err.value.problems)
    assert "stage.kl_coef=-1.0 must be >= 0" in text
    assert "stage.lam=0.0 must be in (0, 1]" in text
    assert "stage.max_steps is not a PPO knob: set stage.total_updates" in text


def test_cross_field_checks(compose_cfg, monkeypatch) -> None:
    from stages.core import schema

    with pytest.raises(
        ConfigError, match=r"model\.max_prompt_length=64 must be < model\.max_length=64"
    ):
        validate_config(compose_cfg("model.max_length=64", "model.max_prompt_length=64"))
    with pytest.raises(
        ConfigError,
        match=r"model\.max_length=120 must be <= model\.tiny\.max_position_embeddings=100",
    ):
        validate_config(
            compose_cfg("model.tiny.max_position_embeddings=100", "model.max_length=120")
        )
    monkeypatch.setattr(schema, "_has_cuda", lambda: False)
    with pytest.raises(ConfigError, match=r"precision=fp16 needs a CUDA GPU"):
        validate_config(compose_cfg("peft=qlora", "precision=fp16"))
    with pytest.raises(ConfigError, match=r"peft\.bnb_4bit_compute_dtype=fp16 needs a CUDA GPU"):
        validate_config(compose_cfg("peft=qlora", "peft.bnb_4bit_compute_dtype=fp16"))
    monkeypatch.setattr(schema, "_has_cuda", lambda: True)
    assert validate_config(compose_cfg("peft=qlora", "precision=fp16")).precision == "fp16"


def test_missing_mandatory_value_names_the_key(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"model\.name_or_path is missing"):
        validate_config(compose_cfg("model.name_or_path=???"))


# ------------------------------------------------------------- data groups fit the stage


def test_sft_on_a_file_needs_only_the_sft_source(compose_cfg) -> None:
    path = FIXTURES / "sft_sharegpt.jsonl"
    typed = validate_config(compose_cfg("stage=sft", "data=file", f"data.sft.path={path}"))
    assert typed.data.sft.path == str(path) and typed.data.pairs.path is None


@pytest.mark.parametrize("stage", ["dpo", "rm", "ppo"])
def test_preference_stages_on_a_file_need_only_pairs(compose_cfg, stage) -> None:
    path = FIXTURES / "pref_hh_rlhf.jsonl"
    cfg = compose_cfg(f"stage={stage}", "data=file", f"data.pairs.path={path}", fast=False)
    typed = validate_config(cfg)
    assert typed.data.pairs.path == str(path) and typed.data.sft.path is None


@pytest.mark.parametrize(
    ("stage", "key"),
    [("sft", "data.sft.path"), ("dpo", "data.pairs.path"), ("ppo", "data.pairs.path")],
)
def test_a_missing_data_file_is_named_at_validation(compose_cfg, tmp_path, stage, key) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as err:
        validate_config(compose_cfg(f"stage={stage}", "data=file", f"{key}={missing}", fast=False))
    assert err.value.problems == [
        f"{key}={str(missing)!r}: no such file ({missing}). Point {key} at an existing JSONL / "
        "JSON / Parquet file (relative paths are from the directory you run in)"
    ]
    with pytest.raises(ConfigError, match=rf"{key.replace('.path', '.source')}=file needs {key}="):
        validate_config(compose_cfg(f"stage={stage}", "data=file", fast=False))
