"""The stage registry is the one list of stages: conf/, dispatch, schemas and make agree."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore

from stages.core.schema import StageConfig
from stages.core.stage_spec import stage_names
from stages.registry import STAGES
from tests.conftest import CONF_DIR, REPO


def test_conf_stage_yamls_and_the_registry_name_the_same_stages() -> None:
    yamls = sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))
    assert yamls == sorted(spec.name for spec in STAGES)
    assert stage_names() == [spec.name for spec in STAGES]


def test_every_stage_yaml_uses_its_registered_schema() -> None:
    for spec in STAGES:
        text = (CONF_DIR / "stage" / f"{spec.name}.yaml").read_text()
        assert f"- {spec.name}_schema" in text, f"conf/stage/{spec.name}.yaml: not on its schema"
        assert issubclass(spec.schema, StageConfig)
        assert spec.schema.name == spec.name  # the dataclass default names its own stage
        node = ConfigStore.instance().load(f"stage/{spec.name}_schema.yaml").node
        assert node.name == spec.name


def test_every_recipe_module_exists_and_defines_run() -> None:
    for spec in STAGES:
        found = importlib.util.find_spec(spec.recipe)
        assert found is not None and found.origin, spec.recipe
        source = Path(found.origin).read_text()
        assert "\ndef run(cfg: DictConfig) -> dict[str, Any]:" in source, spec.recipe


def test_importing_the_registry_imports_no_recipe_and_no_torch() -> None:
    code = (
        "import sys, stages.registry\n"
        "heavy = [m for m in sys.modules if m == 'torch' or m.endswith('.recipe')]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_makefile_has_one_target_per_registered_stage() -> None:
    out = subprocess.run(
        ["make", "-n", *(spec.name for spec in STAGES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "VENV": ".venv"},
        check=True,
    )
    for spec in STAGES:
        assert f"stage={spec.name} " in out.stdout
