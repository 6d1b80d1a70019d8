"""Models that cannot load here fail at once, naming the model and the fix (no hub needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core.model_sources import (
    ModelSourceError,
    check_model_source,
    check_training_length_fits,
)
from stages.core.models import ChatTemplateError, resolve_base_model
from stages.core.schema import ConfigError, validate_config
from stages.sft import recipe as sft
from tests.conftest import REPO

MISSING_ID = "alignpipe-tests/no-such-model"


@pytest.fixture(autouse=True)
def fresh_checks():
    check_model_source.cache_clear()  # results are cached per process
    yield
    check_model_source.cache_clear()


@pytest.fixture
def tiny_dir(compose_cfg, tmp_path) -> Path:
    """A locally saved copy of the tiny model (what `model.name_or_path=<dir>` points at)."""
    cfg = validate_config(compose_cfg())
    target = tmp_path / "my_model"
    shutil.copytree(resolve_base_model(cfg.model, cfg.paths).path, target)
    return target


def test_a_saved_model_directory_passes(tiny_dir) -> None:
    check_model_source(str(tiny_dir), None)


@pytest.mark.parametrize("name", ["/nonexistent/alignpipe/model", "./no_such_dir", "~/nope/x"])
def test_a_missing_local_directory_says_so(name) -> None:
    with pytest.raises(ModelSourceError, match="no such directory") as err:
        check_model_source(name, None)
    assert f"model.name_or_path={name!r}" in str(err.value)
    assert isinstance(err.value, ConfigError)  # printed as a clean block, exit status 2


def test_a_directory_without_config_json_is_not_a_model(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        check_model_source(str(tmp_path / "empty"), None)


def test_training_length_must_fit_the_models_positions(tmp_path) -> None:
    """A GPT-2-shaped local model with 32 learned positions cannot train rows of 64 tokens."""
    from transformers import GPT2Config

    GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    check_training_length_fits(str(tmp_path / "gpt2"), None, 32)
    with pytest.raises(ConfigError, match=r"model\.max_length=64 is longer than the 32 positions"):
        check_training_length_fits(str(tmp_path / "gpt2"), None, 64)


def fake_cache_entry(cache: Path, repo_id: str) -> None:
    """What the HF cache holds for a downloaded model: refs/main -> a snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")


def test_offline_hub_id_not_cached_names_the_model_and_the_fixes(monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelSourceError) as err:
        check_model_source(MISSING_ID, None)
    text = str(err.value)
    assert MISSING_ID in text and "HF_HUB_OFFLINE=1" in text
    assert "model.name_or_path=<dir>" in text and f"hf download {MISSING_ID}" in text
    fake_cache_entry(tmp_path / "hub", MISSING_ID)
    check_model_source.cache_clear()
    check_model_source(MISSING_ID, None)  # cached + offline: transformers will find it


@pytest.mark.parametrize("cached", [False, True])
def test_unreachable_hub_fails_in_seconds_with_the_fix_that_applies(
    monkeypatch, tmp_path, cached
) -> None:
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_api.api, "endpoint", "http://127.0.0.1:9")  # nothing listens there
    if cached:
        fake_cache_entry(tmp_path / "hub", MISSING_ID)
    started = time.perf_counter()
    with pytest.raises(ModelSourceError, match="cannot reach the Hugging Face hub") as err:
        check_model_source(MISSING_ID, None)
    assert time.perf_counter() - started < 10  # not minutes of retries
    text = str(err.value)
    assert MISSING_ID in text
    if cached:
        assert "run with HF_HUB_OFFLINE=1 to use it" in text
    else:
        assert "model.name_or_path=<dir>" in text


def test_hub_model_without_network_is_a_clean_cli_error(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "stages", "stage=sft", "model=qwen2_5_0_5b",
            f"paths.runs_root={tmp_path / 'runs'}", "tracking=none",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def without_generation_markers(model_dir: Path) -> None:
    template = model_dir / "chat_template.jinja"
    text = template.read_text()
    assert "{% generation %}" in text
    template.write_text(text.replace("{% generation %}", "").replace("{% endgeneration %}", ""))


def test_template_without_generation_markers_fails_before_weights_load(
    compose_cfg, tiny_dir, monkeypatch
) -> None:
    without_generation_markers(tiny_dir)

    def no_weights(*_, **__):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(sft, "trainable_model", no_weights)
    cfg = compose_cfg(f"model.name_or_path={tiny_dir}")
    with pytest.raises(ChatTemplateError) as err:
        sft.run(cfg)
    text = str(err.value)
    assert "stage.assistant_only_loss=false" in text and "{% generation %}" in text
    assert str(tiny_dir) in text
    # The hint works: without assistant_only_loss the same model gets as far as its weights.
    with pytest.raises(AssertionError, match="weights were loaded"):
        sft.run(compose_cfg(f"model.name_or_path={tiny_dir}", "stage.assistant_only_loss=false"))
