"""Packaging beyond what pyproject.toml can declare: ship conf/ inside the wheel.

``alignpipe`` composes its runs from the Hydra config tree in ``conf/``. A non-editable
install (``pip install .``) would otherwise carry only the Python packages and fail to
compose, so each ``conf/`` folder becomes a data package under ``stages.conf``
(``conf/stage`` -> ``stages.conf.stage``); its YAML files travel as package data
(pyproject.toml: ``[tool.setuptools.package-data]``) and ``stages/config_files.py`` finds
them there. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CONF = ROOT / "conf"

# Relative paths: setuptools rejects absolute package_dir entries.
conf_packages = {"stages.conf": "conf"}
for folder in sorted(p for p in CONF.rglob("*") if p.is_dir() and p.name != "__pycache__"):
    relative = folder.relative_to(CONF)
    conf_packages["stages.conf." + ".".join(relative.parts)] = (Path("conf") / relative).as_posix()

setup(
    packages=[*find_packages(include=["stages*", "data_recipes*"]), *conf_packages],
    package_dir=conf_packages,
)
