"""The export stage: final/ is one plain transformers model that loads with no peft installed
and reproduces the target's own model (full weights, LoRA / DoRA merged, QLoRA merged into a
dequantised base); prefix tuning is refused; a missing or re-trained target is handled."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from stages.core.handoff import HandoffError, resolve_parent
from stages.core.models import load_stage_model
from stages.core.runtime import resolve_precision
from stages.core.schema import ConfigError, validate_config
from stages.export import recipe as export
from tests.conftest import REPO
from tests.test_dpo import PAIRS_FAST

PROMPT = [{"role": "user", "content": "What is 12 + 34?"}]

# Loads final/ in a fresh interpreter where `import peft` fails, and saves its logits.
NO_PEFT_LOAD = """
import sys
sys.modules["peft"] = None  # any import of peft now raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import peft
except ImportError:
    print("peft: unavailable")
final, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(final).eval()
tokenizer = AutoTokenizer.from_pretrained(final)
ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is 12 + 34?"}], add_generation_prompt=True,
    return_tensors="pt", return_dict=True,
)
with torch.no_grad():
    torch.save(model(**ids).logits.float(), out)
print("loaded", type(model).__name__, model.dtype)
"""


def _dpo(compose_cfg, *overrides: str) -> None:
    from stages.dpo import recipe as dpo

    dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST, "stage.max_steps=4", *overrides))


def _logits_without_peft(final: Path, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / "no_peft_logits.pt"
    result = subprocess.run(
        [sys.executable, "-c", NO_PEFT_LOAD, str(final), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peft: unavailable" in result.stdout
    assert "loaded LlamaForCausalLM" in result.stdout
    return torch.load(out)


# (peft preset, the stage exported, the target's manifest kind)
CASES = [
    ("none", "dpo", "full"),
    ("lora", "dpo", "lora"),
    ("dora", "sft", "dora"),
    ("ia3", "sft", "ia3"),
    ("qlora", "sft", "qlora"),
]


@pytest.mark.parametrize(("peft", "target", "kind"), CASES)
def test_export_loads_without_peft_and_matches_the_adapter_model(
    compose_cfg, sft_runs, tmp_path, peft, target, kind
) -> None:
    runs = tmp_path / "runs" / "toy"
    shutil.copytree(sft_runs(peft), runs / "sft")
    if target == "dpo":
        _dpo(compose_cfg, f"peft={peft}")
    cfg = compose_cfg("stage=export", f"stage.target={target}", f"peft={peft}")
    metrics = export.run(cfg)

    final = runs / "export" / "final"
    assert (runs / "export" / "DONE").is_file()
    names = {p.name for p in final.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert "adapter_config.json" not in names and not list(final.glob("*.bin"))
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config, "the 4-bit base was dequantised"
    assert AutoTokenizer.from_pretrained(final).chat_template, "chat template exported"

    manifest = json.loads((runs / "export" / "manifest.json").read_text())
    typed = validate_config(cfg)
    target_stage = resolve_parent(typed.paths.runs_root, "toy", target, child="test")
    assert target_stage.kind == kind
    assert manifest["kind"] == "full"
    assert manifest["target"]["manifest_sha256"] == target_stage.manifest_sha256
    check = manifest["export"]["check"]
    assert manifest["export"]["source_kind"] == kind
    assert manifest["export"]["merged"] is (kind != "full")
    assert manifest["export"]["dequantized"] is (kind == "qlora")
    assert check["passed"] is True and check["conversations"] > 0
    assert check["max_abs_logit_diff"] == metrics["export/max_abs_logit_diff"]
    assert metrics["export/max_abs_logit_diff"] <= metrics["export/logit_tolerance"]
    if kind != "qlora":  # fp32 merge vs the fp32 adapter model: float rounding only
        assert metrics["export/logit_tolerance"] == 1e-4
    assert 0.0 <= metrics["export/accuracy"] <= 1.0
    assert metrics["target/eval_accuracy"] == json.loads(
        (target_stage.run_dir / "metrics.json").read_text()
    ).get("eval/accuracy")

    # Outside alignpipe, with no peft at all: the same logits as the target's own model.
    plain = _logits_without_peft(final, tmp_path)
    reference = load_stage_model(target_stage, typed.model, None, resolve_precision("auto"))
    tokenizer = AutoTokenizer.from_pretrained(target_stage.final_dir)
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        expected = reference(**ids).logits.float()
    assert (plain - expected).abs().max().item() <= metrics["export/logit_tolerance"]
    if kind != "full":
        # The adapter really is in the weights: the bare base answers differently.
        with torch.no_grad(), reference.disable_adapter():
            bare = reference(**ids).logits.float()
        error = (plain - expected).abs().max().item()
        assert (plain - bare).abs().max().item() > max(10 * error, 1e-2)


def test_prefix_tuning_is_refused_before_any_weights_load(compose_cfg, sft_runs, tmp_path) -> None:
    shutil.copytree(sft_runs("prefix"), tmp_path / "runs" / "toy" / "sft")
    with pytest.raises(export.UnmergeableAdapterError) as err:
        export.run(compose_cfg("stage=export", "stage.target=sft"))
    message = str(err.value)
    assert "prefix-tuning adapter" in message and "cannot be merged" in message
    assert "make sft EXP=toy" in message and "peft=lora" in message
    assert not (tmp_path / "runs" / "toy" / "export" / "DONE").exists()


def test_missing_target_fails_with_the_command_to_run(compose_cfg, tmp_path) -> None:
    with pytest.raises(HandoffError, match=r"Run `make dpo EXP=toy` first"):
        export.run(compose_cfg("stage=export"))
    # The CLI prints it as a clean error block with exit status 2.
    result = subprocess.run(
        [
            sys.executable, "-m", "stages", "stage=export", "tracking=none",
            f"paths.runs_root={tmp_path / 'runs'}",
        ],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    printed = result.stdout + result.stderr
    assert re.search(
        r"stage 'export' needs the 'dpo' stage .* Run `make dpo EXP=toy ARGS=\"[^`]*paths.runs_root=[^`]*\"` first",
        printed,
    )
    assert "Traceback" not in printed


def test_logits_beyond_the_tolerance_fail_the_stage(compose_cfg, sft_runs, tmp_path) -> None:
    runs = tmp_path / "runs" / "toy"
    shutil.copytree(sft_runs("lora"), runs / "sft")
    cfg = compose_cfg(
        "stage=export", "stage.target=sft", "stage.dtype=bf16", "stage.logit_tolerance=1e-6"
    )
    with pytest.raises(export.ExportCheckError) as err:
        export.run(cfg)
    message = str(err.value)
    assert "differ from the target's own model by max" in message
    assert "above the tolerance 1e-06 (stage.logit_tolerance)" in message
    assert "stage.dtype=fp32" in message
    assert not (runs / "export" / "DONE").exists()


def test_a_retrained_target_is_exported_again(compose_cfg, sft_runs, tmp_path) -> None:
    runs = tmp_path / "runs" / "toy"
    shutil.copytree(sft_runs("none"), runs / "sft")
    cfg = compose_cfg("stage=export", "stage.target=sft")
    export.run(cfg)
    first = json.loads((runs / "export" / "manifest.json").read_text())
    done = (runs / "export" / "DONE").stat().st_mtime_ns
    export.run(cfg)  # same target, same config: a no-op
    assert (runs / "export" / "DONE").stat().st_mtime_ns == done

    from stages.sft import recipe as sft

    sft.run(compose_cfg("force=true", "stage.max_steps=6", "stage.save_steps=6"))
    export.run(compose_cfg("stage=export", "stage.target=sft"))
    second = json.loads((runs / "export" / "manifest.json").read_text())
    retrained = resolve_parent(runs.parent, "toy", "sft", child="test")
    assert second["target"]["manifest_sha256"] == retrained.manifest_sha256
    assert second["target"]["manifest_sha256"] != first["target"]["manifest_sha256"]
    assert second["final_sha256"] != first["final_sha256"], "the new weights were exported"


def test_with_no_task_the_check_runs_on_sft_demonstrations(compose_cfg, sft_runs, tmp_path) -> None:
    from tests.conftest import FIXTURES

    runs = tmp_path / "runs" / "toy"
    shutil.copytree(sft_runs("lora"), runs / "sft")
    no_files = compose_cfg("stage=export", "stage.target=sft", "data=file")
    with pytest.raises(ConfigError, match=r"set data.prompts.path=.* or data.sft.path="):
        export.run(no_files)
    assert not (runs / "export" / "final").exists(), "refused before building the export"
    sft_file = FIXTURES / "sft_prompt_completion.jsonl"
    metrics = export.run(
        compose_cfg(
            "stage=export",
            "stage.target=sft",
            "data=file",
            f"data.sft.path={sft_file}",
            "stage.check_prompts=3",
        )
    )
    assert metrics["export/check_conversations"] == 3
    assert metrics["export/max_abs_logit_diff"] <= 1e-4
    assert "export/accuracy" not in metrics  # no task, so no judge
    manifest = json.loads((runs / "export" / "manifest.json").read_text())
    assert manifest["data"] == {"check": "sft rows"}


def test_an_adapter_whose_full_parent_was_rerun_is_refused(compose_cfg, sft_runs, tmp_path) -> None:
    """A LoRA DPO on full SFT weights sits on those very weights: after the SFT is re-run,
    merging it would build a model nobody trained."""
    from stages.core.handoff import StaleStageError
    from stages.sft import recipe as sft

    runs = tmp_path / "runs" / "toy"
    shutil.copytree(sft_runs("none"), runs / "sft")
    _dpo(compose_cfg, "peft=lora")
    dpo_manifest = json.loads((runs / "dpo" / "manifest.json").read_text())
    assert Path(dpo_manifest["base_model"]["path"]) == (runs / "sft" / "final").resolve()
    sft.run(compose_cfg("force=true", "stage.max_steps=6", "stage.save_steps=6"))
    with pytest.raises(StaleStageError) as err:
        export.run(compose_cfg("stage=export", "peft=lora"))
    message = str(err.value)
    assert "is STALE: its adapter sits on the weights of 'sft'" in message
    assert "rerun_stale=true" in message
    assert not (runs / "export" / "final").exists()
