"""All model loading, in one place: full weights, peft adapters (on a full-precision or a
4-bit base), and parent checkpoints. Adapter configs and weights: ``stages.core.adapters``.

A stage asks for a *trainable* model given the experiment config and (optionally) its parent
stage; this module decides how to build it:

=================  =====================================================================
parent             what gets built
=================  =====================================================================
none (SFT)         base model -> full weights, or a fresh adapter (4-bit base: quantize=4bit)
full checkpoint    the parent's weights become the base -> full, or a fresh adapter
adapter, continue  the parent's base + the parent adapter, trainable (DPO: TRL keeps a frozen
                   copy of it as the reference, so reference = SFT policy)
adapter, merge     base + parent adapter merged in full precision (saved once under the run
                   dir, so QLoRA can re-quantise it) -> full, or a fresh adapter
=================  =====================================================================

Nothing trusts remote code unless model.trust_remote_code is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from stages.core.adapters import (
    build_peft_config,
    continue_adapter,
    continue_as_seq_cls,
    stage_peft_config,
)
from stages.core.handoff import HandoffError, ParentStage, check_same_base
from stages.core.model_sources import check_model_source
from stages.core.runtime import Precision, is_main_process, main_process_first
from stages.core.schema import (
    ADAPTER_METHODS,
    ConfigError,
    ModelConfig,
    PathsConfig,
    PeftConfig,
    method_of_kind,
    parent_adapter_problem,
)
from stages.core.sharded_weights import full_state_dict_for_save
from stages.core.tiny_model import ensure_tiny_model, spec_hash

log = logging.getLogger(__name__)

BASE_MODEL_FILE = "alignpipe_base_model.json"
MERGED_PARENT_DIR = "merged_parent"
TASKS = ("causal_lm", "seq_cls")


@dataclass(frozen=True)
class BaseModelRef:
    """Identity of the pretrained base an experiment starts from."""

    id: str  # stable identity recorded in manifests ("Qwen/..." or "builtin:tiny-llama-<hash>")
    path: str  # what from_pretrained receives (hub id or local directory)
    revision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChatTemplateError(ConfigError):
    """The tokenizer's chat template cannot do what the stage config asks of it."""


def require_training_template(tokenizer: PreTrainedTokenizerBase, source: str | Path) -> None:
    """For stage.assistant_only_loss=true: the chat template must mark assistant replies with
    ``{% generation %}`` or be one TRL can patch (its own check), before any weights load."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise ChatTemplateError(
            f"stage.assistant_only_loss=true: the chat template of {source} has no "
            "`{% generation %}` markers and TRL has no training version of it, so the loss "
            "cannot be limited to the replies. Set stage.assistant_only_loss=false (loss on "
            "the whole conversation), or give the tokenizer a template with "
            "`{% generation %}...{% endgeneration %}` around each assistant reply "
            "(chat_template.jinja in a saved tokenizer directory)."
        ) from None


def resolve_base_model(model_cfg: ModelConfig, paths: PathsConfig) -> BaseModelRef:
    """Hub id / local path as given (checked loadable: ``check_model_source``); the embedded
    tiny model is built on first use."""
    if model_cfg.name_or_path.startswith("builtin:"):
        if model_cfg.name_or_path != "builtin:tiny":
            raise ValueError(
                f"model.name_or_path={model_cfg.name_or_path!r}: the only built-in is 'builtin:tiny'"
            )
        assert model_cfg.tiny is not None  # checked by the schema
        path = ensure_tiny_model(model_cfg.tiny, paths.builtin_models).resolve()
        return BaseModelRef(id=f"builtin:tiny-llama-{spec_hash(model_cfg.tiny)}", path=str(path))
    check_model_source(model_cfg.name_or_path, model_cfg.revision)
    return BaseModelRef(
        id=model_cfg.name_or_path, path=model_cfg.name_or_path, revision=model_cfg.revision
    )


def load_tokenizer(source: str | Path, model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (falls back to EOS) and a chat template checked present."""
    tokenizer = AutoTokenizer.from_pretrained(
        str(source), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(
            f"the tokenizer of {source} has no chat template; pick an instruct checkpoint or "
            "add one (tokenizer.chat_template) before training on chat data"
        )
    return tokenizer


def compute_dtype(peft_cfg: PeftConfig, precision: Precision) -> torch.dtype:
    """Dtype of 4-bit matmuls. bf16 by default: fp32 compute mixes dtypes on CPU and fails."""
    if peft_cfg.bnb_4bit_compute_dtype == "auto":
        return torch.float16 if precision.name == "fp16" else torch.bfloat16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        peft_cfg.bnb_4bit_compute_dtype
    ]


def quantization_config(peft_cfg: PeftConfig, precision: Precision) -> BitsAndBytesConfig | None:
    if peft_cfg.quantize != "4bit":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=peft_cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(peft_cfg, precision),
    )


def load_pretrained(
    path: str | Path,
    *,
    task: str,
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    precision: Precision,
    revision: str | None,
    pad_token_id: int | None,
) -> PreTrainedModel:
    """``path`` as a causal LM or a 1-label sequence classifier (``task``), in the stage's
    precision, 4-bit NF4 for peft.quantize=4bit; no adapter attached."""
    quant = quantization_config(peft_cfg, precision)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        # Quantised layers compute in bf16; the rest (norms, head) must match it.
        "dtype": compute_dtype(peft_cfg, precision) if quant else precision.torch_dtype,
    }
    if quant is not None:
        kwargs["quantization_config"] = quant
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    else:
        with held_load_reports() as reports:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=1, output_loading_info=True, **kwargs
            )
        if only_a_fresh_head(model, info):
            # A causal LM becoming a reward model: the score head is new by design (and an
            # untied lm_head goes), so transformers' MISSING-keys report says nothing wrong.
            log.info("%s: new score head, trained by this stage", path)
        else:
            for record in reports:
                logging.getLogger(record.name).handle(record)
        model.config.pad_token_id = pad_token_id  # needed to find the last real token
    declare_tied_weights(model)
    feed_output_head_contiguous(model)
    return model


def _contiguous_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def feed_output_head_contiguous(model: PreTrainedModel) -> None:
    """Give the LM head a contiguous input: the same logits (up to float rounding), without a
    batch x vocab x hidden copy.

    With ``logits_to_keep`` (generation's prefill, PPO's response logits) the head sees a
    strided slice ``hidden[:, -k:]``. For a frozen head without grad, torch's matmul cannot
    fold that slice into one matrix and runs a bmm on the head's weight expanded per row:
    a transient copy of batch x vocab x hidden (3 GB for 64 prompts at vocab 32k, hidden 768,
    bf16; bench/ppo_memory.py) and several times slower. A contiguous copy of the slice costs
    batch x k x hidden.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)


class _HoldLoadReports(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


@contextmanager
def held_load_reports() -> Iterator[list[logging.LogRecord]]:
    """Hold back transformers' weight-loading report while a model loads (the caller decides
    whether it says anything); every other record passes through."""
    logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReports()
    logger.addFilter(hold)
    try:
        yield hold.held
    finally:
        logger.removeFilter(hold)


def only_a_fresh_head(model: PreTrainedModel, info: dict[str, Any]) -> bool:
    """True when every missing / unexpected key lies outside the base model (the new task
    head, or the dropped lm_head) and nothing mismatched: a clean LM -> classifier load."""
    prefix = model.base_model_prefix
    outside = [*info.get("missing_keys", ()), *info.get("unexpected_keys", ())]
    return not info.get("mismatched_keys") and all(
        not key.startswith(f"{prefix}.") for key in outside
    )


def declare_tied_weights(model: PreTrainedModel) -> None:
    """Let a resume re-tie tied weights instead of warning that they are missing.

    save_pretrained leaves out the tied copy (``lm_head.weight`` of a model with tied
    embeddings), and Trainer's resume warns ``missing keys ['lm_head.weight']`` unless the
    missing keys are exactly the model's ``_keys_to_ignore_on_save``, in which case it ties
    them. Declaring them changes nothing that is saved (the tied copy never is).
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if tied:
        model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | tied


@dataclass
class LoadedModel:
    """A model ready for a trainer, plus what the manifest should say about how it was built."""

    model: PreTrainedModel | PeftModel
    base: BaseModelRef  # the pretrained weights the trained parameters sit on
    kind: str  # the manifest's checkpoint kind: PeftConfig.checkpoint_kind()
    provenance: dict[str, Any]  # how it was built (parent adapter continued / merged, ...)


def _merged_parent_dir(
    parent: ParentStage,
    run_dir: Path,
    model_cfg: ModelConfig,
    precision: Precision,
) -> Path:
    """Merge the parent's adapter into its base in full precision, saved once under run_dir.

    Only rank 0 saves the merge; under `accelerate launch` the other ranks wait for it and
    then load what it saved (the marker check below), instead of reading a half-written dir.
    """
    with main_process_first():
        return _merge_parent_once(parent, run_dir, model_cfg, precision)


def _merge_parent_once(
    parent: ParentStage,
    run_dir: Path,
    model_cfg: ModelConfig,
    precision: Precision,
) -> Path:
    target = run_dir / MERGED_PARENT_DIR
    marker = target / "alignpipe_merged_from.json"
    if marker.is_file() and json.loads(marker.read_text())["sha"] == parent.manifest_sha256:
        return target
    base = parent.base_model
    full_precision = Precision("fp32", torch.float32) if precision.name == "fp32" else precision
    model = AutoModelForCausalLM.from_pretrained(
        base["path"],
        revision=base.get("revision"),
        dtype=full_precision.torch_dtype,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(model, str(parent.final_dir)).merge_and_unload()
    if is_main_process():
        merged.save_pretrained(target)
        tokenizer = AutoTokenizer.from_pretrained(str(parent.final_dir))
        tokenizer.save_pretrained(target)
        marker.write_text(json.dumps({"sha": parent.manifest_sha256, "from": str(parent.run_dir)}))
    return target


def load_trainable_model(
    *,
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig,
    paths: PathsConfig,
    precision: Precision,
    run_dir: Path,
    stage: str,
    task: str = "causal_lm",
    parent: ParentStage | None = None,
    parent_adapter: str = "continue",
    pad_token_id: int | None = None,
) -> LoadedModel:
    """Build the model a stage trains, following the table in the module docstring."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    base = resolve_base_model(model_cfg, paths)
    load = dict(
        task=task, model_cfg=model_cfg, peft_cfg=peft_cfg, precision=precision,
        pad_token_id=pad_token_id,
    )  # fmt: skip
    provenance: dict[str, Any] = {"parent_adapter": None, "fresh_adapter": False}

    if parent is not None:
        check_same_base(parent, base.id, child=stage)

    if parent is None:
        model = load_pretrained(base.path, revision=base.revision, **load)
        weights_base = base
    elif parent.kind == "full":
        # The parent's full weights are the new base for this stage.
        model = load_pretrained(parent.final_dir, revision=None, **load)
        weights_base = BaseModelRef(id=base.id, path=str(parent.final_dir.resolve()))
        provenance["parent_weights"] = "full"
    elif parent_adapter == "continue":
        if peft_cfg.method == "none":
            raise HandoffError(
                f"parent '{parent.stage}' is a {parent.kind} adapter but peft=none: set "
                f"stage.parent_adapter=merge to train full weights, or use peft={parent.kind}"
            )
        problem = parent_adapter_problem(stage, parent.stage, parent.kind, peft_cfg.method)
        if problem:  # before any weights load
            raise HandoffError(problem)
        four_bit = peft_cfg.quantize == "4bit"
        if task != "causal_lm":
            # A new head on the parent's adapter (e.g. a QLoRA reward model on the SFT adapter):
            # same base, so PPO can later host policy, reference, reward and value on one base.
            model = load_pretrained(base.path, revision=base.revision, **load)
            model = continue_as_seq_cls(model, parent.final_dir)
            if four_bit:
                keep_4bit_backward(model)
            provenance["parent_adapter"] = "continued_as_seq_cls"
            log.info("reward head on the %s adapter of %s", parent.kind, parent.final_dir)
            return LoadedModel(model, base, peft_cfg.checkpoint_kind(), provenance)
        model = load_pretrained(base.path, revision=base.revision, **load)
        if four_bit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = continue_adapter(model, parent.final_dir)
        if four_bit:
            keep_4bit_backward(model)
        provenance["parent_adapter"] = "continued"
        log.info("continuing %s adapter from %s", parent.kind, parent.final_dir)
        return LoadedModel(model, base, peft_cfg.checkpoint_kind(), provenance)
    else:  # merge
        problem = parent_adapter_problem(stage, parent.stage, parent.kind, None)
        if problem:  # before any weights load
            raise HandoffError(problem)
        merged = _merged_parent_dir(parent, run_dir, model_cfg, precision)
        model = load_pretrained(merged, revision=None, **load)
        weights_base = BaseModelRef(id=base.id, path=str(merged.resolve()))
        provenance["parent_adapter"] = "merged"

    if peft_cfg.method == "none":
        return LoadedModel(model, weights_base, "full", provenance)
    if peft_cfg.quantize == "4bit" and task == "causal_lm":
        # Not for seq_cls: this upcasts the final norm to fp32, while TRL casts the trainable
        # score head (like the adapters) to bf16 on a 4-bit base, so the head's matmul would
        # mix dtypes. Without it everything outside the 4-bit weights stays in the compute
        # dtype, exactly as a plain reload of the adapter runs (get_peft_model freezes the base).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, build_peft_config(peft_cfg, task, model.config.model_type))
    if peft_cfg.quantize == "4bit":
        keep_4bit_backward(model)
    provenance["fresh_adapter"] = True
    return LoadedModel(model, weights_base, peft_cfg.checkpoint_kind(), provenance)


def keep_4bit_backward(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from swapping trained 4-bit layers onto its inference-only CPU kernel.

    bitsandbytes 0.50 repacks a CPU ``Linear4bit``'s weight for an AVX512-BF16 kernel the first
    time the layer runs in eval mode without grad (a PPO rollout, an eval, TRL's reference pass), and uses that kernel from
    then on. The kernel has no autograd: gradients through the base layer are silently
    dropped, so every LoRA adapter *below* it stops learning. Turning the repack off keeps the
    autograd path. A layer that was already repacked cannot be trusted: load the base again.
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "a 4-bit layer was already repacked by bitsandbytes for CPU inference (the model "
                "ran in eval mode without grad before PPO); its backward would drop gradients. "
                "Load the 4-bit base again and call this before any eval forward."
            )
        module.support_avx512bf16_for_cpu = False


QUANTIZED_BASES_DIR = "_quantized_bases"


def quantized_base_copy(base: BaseModelRef, quant: Any, experiment_dir: Path) -> Path:
    """Save the 4-bit base a QLoRA adapter was trained on, once per experiment and base.

    The adapter then points at it, so ``AutoPeftModelForCausalLM.from_pretrained(final)``
    rebuilds exactly the quantised weights it was trained against (its config.json carries
    the quantization_config), instead of silently using the full-precision base.
    """
    quant_dict = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant)
    key = json.dumps({"base": base.as_dict(), "quant": quant_dict}, sort_keys=True, default=str)
    target = experiment_dir / QUANTIZED_BASES_DIR / hashlib.sha256(key.encode()).hexdigest()[:12]
    if (target / "config.json").is_file():
        return target.resolve()
    base_model = AutoModelForCausalLM.from_pretrained(
        base.path,
        revision=base.revision,
        quantization_config=BitsAndBytesConfig.from_dict(quant_dict),
        dtype=quant_dict.get("bnb_4bit_compute_dtype") or torch.bfloat16,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    base_model.save_pretrained(staging)
    os.replace(staging, target)
    return target.resolve()


def save_final(
    loaded: LoadedModel, tokenizer: PreTrainedTokenizerBase, final_dir: Path, *, model: Any = None
) -> None:
    """save_pretrained the trained model (or adapter) + tokenizer with its chat template.

    Adapters record their base with an absolute path, plus ``alignpipe_base_model.json``,
    so AutoPeftModel*.from_pretrained(final_dir) rebuilds them without our code.

    Safe to call on every rank: under FSDP every rank must (the gather of the shards is a
    collective), and only the main process writes.
    """
    model = model if model is not None else loaded.model
    gathered = full_state_dict_for_save(model)  # None unless the weights are sharded
    if not is_main_process():
        return
    final_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        adapter_base = loaded.base.path
        quant = getattr(model.get_base_model().config, "quantization_config", None)
        if quant is not None:  # a 4-bit base
            adapter_base = str(quantized_base_copy(loaded.base, quant, final_dir.parent.parent))
        for adapter_cfg in model.peft_config.values():
            adapter_cfg.base_model_name_or_path = adapter_base
    if gathered is None:
        model.save_pretrained(final_dir)
    else:  # rank 0's full copy of the sharded weights
        model.save_pretrained(final_dir, state_dict=gathered)
    tokenizer.save_pretrained(final_dir)
    (final_dir / BASE_MODEL_FILE).write_text(
        json.dumps({"kind": loaded.kind, "base_model": loaded.base.as_dict()}, indent=2)
    )


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def load_stage_model(
    stage: ParentStage,
    model_cfg: ModelConfig,
    peft_cfg: PeftConfig | None,
    precision: Precision,
) -> PreTrainedModel | PeftModel:
    """A finished stage's ``final/`` as a frozen causal LM in eval mode, for sampling and eval.

    full -> the saved weights; an adapter kind -> the base it was trained on (the manifest's
    ``base_model.path``: the pretrained base, or a full / merged parent) plus the adapter,
    the base in 4-bit NF4 for a 4-bit kind. ``peft_cfg`` only supplies the 4-bit settings;
    None uses the stage's own (from its manifest), which is what reproduces it exactly.
    """
    peft_cfg = stage_peft_config(stage, peft_cfg)
    load = dict(
        task="causal_lm", model_cfg=model_cfg, peft_cfg=peft_cfg, precision=precision,
        pad_token_id=None,
    )  # fmt: skip
    if stage.kind == "full":
        model = load_pretrained(stage.final_dir, revision=None, **load)
    elif method_of_kind(stage.kind)[0] in ADAPTER_METHODS:
        base = stage.base_model
        model = load_pretrained(base["path"], revision=base.get("revision"), **load)
        model = PeftModel.from_pretrained(model, str(stage.final_dir), is_trainable=False)
    else:
        raise HandoffError(f"{stage.run_dir}: unknown model kind {stage.kind!r} in its manifest")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model
