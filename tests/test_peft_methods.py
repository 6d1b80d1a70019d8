"""peft=prefix / prompt / ia3 / dora: SFT's final/ is a plain peft adapter (reloads without
alignpipe and gives the stage's own logits), and DPO continues it and changes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.core.handoff import HandoffError, resolve_parent
from stages.core.models import load_stage_model
from stages.core.runtime import resolve_precision
from stages.core.schema import validate_config
from stages.dpo import recipe as dpo
from stages.sft import recipe as sft
from tests.conftest import saved_tensors
from tests.test_dpo import PAIRS_FAST

# peft's adapter_config.json peft_type for each method, and the manifest kind.
PEFT_TYPES = {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ia3": "IA3", "dora": "LORA"}


def _prompt_ids(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 34?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3", "dora"])
def test_sft_adapter_reloads_with_plain_peft_and_dpo_continues_it(compose_cfg, method) -> None:
    sft_cfg = compose_cfg(f"peft={method}")
    sft.run(sft_cfg)
    typed = validate_config(sft_cfg)
    sft_stage = resolve_parent(typed.paths.runs_root, "toy", "sft", child="test")
    final = sft_stage.final_dir
    assert sft_stage.kind == method
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == PEFT_TYPES[method]
    if method == "dora":
        assert adapter_config["use_dora"] is True
    assert not (final / "model.safetensors").exists(), "an adapter, not full weights"

    # The stage's own model (as DPO and the comparison load it) vs a plain peft reload.
    ours = load_stage_model(sft_stage, typed.model, None, resolve_precision(typed.precision))
    base_path = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32), str(final)
    ).eval()
    ids = _prompt_ids(AutoTokenizer.from_pretrained(final))
    with torch.no_grad():
        ours_logits = ours(**ids).logits
        plain_logits = plain(**ids).logits
        with plain.disable_adapter():
            bare_logits = plain(**ids).logits
    assert torch.equal(ours_logits, plain_logits)
    # prompt tuning also returns logits at its virtual tokens: compare the real positions
    real = plain_logits[:, -bare_logits.shape[1] :]
    assert not torch.allclose(real, bare_logits), "SFT trained the adapter"

    # DPO from it: the same method continues the adapter and changes every trained tensor.
    dpo.run(compose_cfg("stage=dpo", f"peft={method}", *PAIRS_FAST, "stage.max_steps=4"))
    dpo_final = Path(typed.paths.runs_root) / "toy" / "dpo" / "final"
    dpo_config = json.loads((dpo_final / "adapter_config.json").read_text())
    assert dpo_config["peft_type"] == PEFT_TYPES[method]
    before, after = saved_tensors(final), saved_tensors(dpo_final)
    assert before.keys() == after.keys(), "final/ holds the continued adapter only"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"DPO left the {method} adapter unchanged"
    manifest = json.loads((dpo_final.parent / "manifest.json").read_text())
    assert manifest["kind"] == method


def test_continuing_a_parent_adapter_with_another_method_fails_before_loading(
    compose_cfg, sft_runs, tmp_path
) -> None:
    import shutil

    from stages.core.plan import check_startable

    shutil.copytree(sft_runs("prompt"), tmp_path / "runs" / "toy" / "sft")
    with pytest.raises(HandoffError) as err:
        check_startable(compose_cfg("stage=dpo", "peft=lora"), [])
    message = str(err.value)
    assert "stage dpo would continue the prompt adapter of parent 'sft'" in message
    assert "peft.method=lora" in message and "Use peft=prompt (the parent's)" in message
    # and the recipe itself refuses before any weights load
    with pytest.raises(HandoffError, match="would continue the prompt adapter"):
        dpo.run(compose_cfg("stage=dpo", "peft=lora", *PAIRS_FAST))
    # merging a prompt adapter into the base is impossible: said at once too
    with pytest.raises(HandoffError, match="adds virtual tokens, not weights"):
        check_startable(compose_cfg("stage=dpo", "peft=lora", "stage.parent_adapter=merge"), [])


@pytest.mark.parametrize(
    ("kind", "saved", "method", "quantize"),
    [
        (
            "qlora",
            {"kind": "qlora", "target_modules": None, "bnb_4bit_quant_type": "fp4"},
            "lora",
            "4bit",
        ),
        ("full", {"kind": "none", "r": 16}, "none", "none"),
        ("lora", {"kind": "lora", "target_modules": ["q_proj"]}, "lora", "none"),
        (
            "dora-4bit",
            {"method": "dora", "quantize": "4bit", "bnb_4bit_quant_type": "fp4"},
            "dora",
            "4bit",
        ),
        ("prefix", {"method": "prefix", "num_virtual_tokens": 4}, "prefix", "none"),
    ],
)
def test_manifests_old_and_new_rebuild_the_stage_peft_config(kind, saved, method, quantize):
    from types import SimpleNamespace

    from stages.core.adapters import stage_peft_config

    stage = SimpleNamespace(kind=kind, manifest={"config": {"peft": saved}})
    rebuilt = stage_peft_config(stage)  # type: ignore[arg-type]
    assert (rebuilt.method, rebuilt.quantize) == (method, quantize)
    assert rebuilt.checkpoint_kind() == kind
    if "bnb_4bit_quant_type" in saved:  # the stage's own 4-bit settings, not the defaults
        assert rebuilt.bnb_4bit_quant_type == "fp4"


@pytest.mark.slow  # three stages: minutes on a shared CPU
def test_dora_runs_sft_rm_ppo(compose_cfg, sft_runs, tmp_path) -> None:
    """DoRA is declared for the RM and PPO: the RM continues the SFT DoRA adapter under its
    head, PPO trains the policy adapter against it."""
    import shutil

    from stages.ppo import recipe as ppo_stage
    from stages.rm import recipe as rm
    from tests.test_ppo_stage import PPO_SMOKE, RM_PAIRS

    runs = tmp_path / "runs" / "toy"
    shutil.copytree(sft_runs("dora"), runs / "sft")
    rm.run(compose_cfg("stage=rm", "peft=dora", *RM_PAIRS))
    rm_config = json.loads((runs / "rm" / "final" / "adapter_config.json").read_text())
    assert (rm_config["task_type"], rm_config["use_dora"]) == ("SEQ_CLS", True)
    ppo_stage.run(compose_cfg(*PPO_SMOKE, "peft=dora", fast=False))
    manifest = json.loads((runs / "ppo" / "manifest.json").read_text())
    assert (manifest["kind"], manifest["roles"]["layout"]) == ("dora", "separate")
    policy = json.loads((runs / "ppo" / "final" / "adapter_config.json").read_text())
    assert policy["use_dora"] is True
    before, after = saved_tensors(runs / "sft" / "final"), saved_tensors(runs / "ppo" / "final")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "PPO trained the policy"


@pytest.mark.parametrize("method", ["dora", "prefix", "prompt"])  # ia3: refused (test_config)
def test_adapter_methods_train_on_a_4bit_base(compose_cfg, method) -> None:
    """peft.quantize=4bit combines with these adapter methods: final/ points at the 4-bit base
    it was trained on and reloads with plain peft to the stage's own logits."""
    from peft import AutoPeftModelForCausalLM

    cfg = compose_cfg(f"peft={method}", "peft.quantize=4bit")
    sft.run(cfg)
    typed = validate_config(cfg)
    stage = resolve_parent(typed.paths.runs_root, "toy", "sft", child="test")
    assert stage.kind == f"{method}-4bit"
    base = json.loads((stage.final_dir / "adapter_config.json").read_text())
    base_config = json.loads((Path(base["base_model_name_or_path"]) / "config.json").read_text())
    assert base_config["quantization_config"]["load_in_4bit"] is True
    ours = load_stage_model(stage, typed.model, None, resolve_precision(typed.precision))
    plain = AutoPeftModelForCausalLM.from_pretrained(str(stage.final_dir)).eval()
    ids = _prompt_ids(AutoTokenizer.from_pretrained(stage.final_dir))
    with torch.no_grad():
        torch.testing.assert_close(ours(**ids).logits, plain(**ids).logits)
