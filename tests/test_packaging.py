"""A non-editable install composes: the wheel carries conf/, and `python -m stages` finds it.

Also: the tests guarded by an optional Hydra plugin skip (not abort collection) without it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONF_DIR, REPO
from tests.optional_plugins import hydra_plugin_installed

# What `pip install .` builds from (a copy, so the build leaves nothing in the checkout).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "stages", "data_recipes", "conf")
# The venv's setuptools, offline: no build isolation.
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP_WHEEL, "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = out.glob("alignpipe-*.whl")
    return built


def test_wheel_ships_every_conf_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"stages/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")
    }
    assert "stages/conf/config.yaml" in expected
    assert expected - names == set(), "conf/ files missing from the wheel"
    assert "stages/config_files.py" in names and "stages/__main__.py" in names


def test_installed_wheel_composes_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: not the checkout (no cwd, no editable finder
    # for `stages`: PYTHONPATH comes first on sys.path).
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import stages.config_files as c; print(c.CONF_DIR)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert where.stdout.strip() == str(site / "stages" / "conf"), where.stderr
    job = subprocess.run(
        [sys.executable, "-m", "stages", "--cfg", "job", "stage=dpo", "tracking=none"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr
    assert "name: dpo" in job.stdout and "beta:" in job.stdout


def test_plugin_probe_is_false_without_any_hydra_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_namespace(name: str, *args: object) -> None:
        # What find_spec does for "hydra_plugins.x" when no plugin at all is installed.
        raise ModuleNotFoundError("No module named 'hydra_plugins'", name="hydra_plugins")

    monkeypatch.setattr(importlib.util, "find_spec", no_namespace)
    assert hydra_plugin_installed("hydra_optuna_sweeper") is False
