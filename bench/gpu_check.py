"""GPU check: the real stages (SFT, RM, PPO, DPO) with full weights, LoRA and QLoRA, bf16, on a
random-initialised model of Qwen2.5-0.5B's shape; tokens/s, MFU and peak GPU memory per run.

It takes the product path a GPU user takes: the model (random init, Qwen2 architecture) and the
embedded byte-level tokenizer (with its chat template) are saved as a local model directory,
synthetic data files are written in the user formats, and each stage runs as
``python -m stages stage=<s> model=qwen2_5_0_5b model.name_or_path=<dir> peft=<p>
precision=bf16 data=file ...`` in its own process with a timeout. After every stage the report
(docs/bench/gpu.md + gpu.json) is rewritten, so a timeout or a crash still leaves results.

    python bench/gpu_check.py            # one GPU, ~8 minutes (make gpu-check)
    python bench/gpu_check.py --tiny     # the same code path on CPU: tiny shape, fp32, few steps

What each number is:
* trained tokens/s: TRL's ``num_tokens`` (non-padding tokens the trainer fed, DPO's chosen +
  rejected) over TRL's ``train_runtime``; PPO: (prompt + response) tokens x PPO epochs over
  the optimisation part of the updates (update time minus rollout time), first update excluded.
* MFU: 6 x N x trained tokens/s / the device's peak dense bf16 FLOP/s (``PEAK_BF16``); N =
  parameters in the trained model's forward (tied embeddings once, as the output head; LoRA
  adapters included). For LoRA / QLoRA we count the same 6N per token as for full weights
  (the standard approximation: their backward skips the frozen weights' gradients, ~4N);
  DPO's reference forward and attention's seq^2 term are not counted; PPO counts policy and
  value (each 6N). n/a on CPU and on GPUs not in the table.
* generation tokens/s: PPO = response tokens over the rollout seconds (sampling + scoring by
  the frozen roles); DPO = samples x max_new_tokens over its data phase (pair sampling + RM
  judging; a random-init model almost never samples the end token).
* peak GPU memory: ``torch.cuda.max_memory_allocated`` of the stage's process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not a package on the path
    sys.path.insert(0, str(REPO))
from bench.host import cpu_model  # noqa: E402

STAGES = ("sft", "rm", "ppo", "dpo")  # in dependency order
# What each stage needs finished first (DPO's pairs are judged by the RM).
PARENTS = {"sft": (), "rm": ("sft",), "ppo": ("sft", "rm"), "dpo": ("sft", "rm")}
PEFT_MODES = ("none", "lora", "qlora")

# Peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' datasheets; first match wins,
# so the more specific names come first ("L40S" before "L4", "H100 PCIe" before "H100").
PEAK_BF16: tuple[tuple[str, float], ...] = (
    (r"H200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),  # SXM
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"\bL4\b", 121e12),
)


@dataclass(frozen=True)
class Shape:
    """The Qwen2 architecture knobs the check builds (a Qwen2Config subset)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768


QWEN2_5_0_5B = Shape(896, 24, 14, 2, 4864, 151936)
# Tiny: vocab above the byte tokenizer's ~262 ids, as the real shape's is (151936).
TINY = Shape(64, 2, 4, 2, 128, 320, max_position_embeddings=256)


@dataclass(frozen=True)
class Plan:
    """Step counts and lengths of one check (GPU or --tiny)."""

    precision: str
    max_length: int
    max_prompt_length: int
    max_new_tokens: int
    prompt_chars: int  # 3-letter words: ~2 chars per token with the filled vocab
    reply_chars: int
    rows: int  # SFT rows and preference pairs in the files
    prompts: int
    sft_steps: int
    rm_steps: int
    dpo_steps: int
    batch: int
    ppo_updates: int
    ppo_rollout: int
    ppo_epochs: int
    ppo_response: int
    pair_prompts: int
    stage_timeout_s: int
    budget_s: int


GPU_PLAN = Plan(
    precision="bf16", max_length=512, max_prompt_length=192, max_new_tokens=128,
    prompt_chars=256, reply_chars=720, rows=2048, prompts=256,
    sft_steps=40, rm_steps=20, dpo_steps=20, batch=16,
    ppo_updates=4, ppo_rollout=32, ppo_epochs=2, ppo_response=256,
    pair_prompts=32, stage_timeout_s=180, budget_s=480,
)  # fmt: skip
TINY_PLAN = Plan(
    precision="fp32", max_length=64, max_prompt_length=24, max_new_tokens=8,
    prompt_chars=12, reply_chars=30, rows=64, prompts=32,
    sft_steps=2, rm_steps=2, dpo_steps=2, batch=4,
    ppo_updates=2, ppo_rollout=4, ppo_epochs=1, ppo_response=8,
    pair_prompts=4, stage_timeout_s=300, budget_s=1800,
)  # fmt: skip


# ----------------------------------------------------------------------------- arithmetic
def forward_params(shape: Shape, *, head: str = "lm", lora_r: int = 0) -> int:
    """Parameters a token's forward multiplies with: every layer's weights and biases (Qwen2
    has q/k/v biases), the norms, and the output head (``lm``: the tied embedding matrix,
    counted once; ``score``: a sequence classifier's hidden -> 1 head, the embedding lookup
    costs no FLOPs). ``lora_r`` adds LoRA adapters on every linear layer but the head."""
    d, inter = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * (d // shape.num_attention_heads)
    linears = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    per_layer = sum(i * o for i, o in linears) + (d + 2 * kv) + 2 * d  # weights, qkv bias, norms
    if lora_r:
        per_layer += sum(lora_r * (i + o) for i, o in linears)
    head_params = shape.vocab_size * d if head == "lm" else d
    return shape.num_hidden_layers * per_layer + d + head_params


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a known GPU; None (MFU n/a) for CPU or an unknown device."""
    if not device_name:
        return None
    for pattern, flops in PEAK_BF16:
        if re.search(pattern, device_name):
            return flops
    return None


def mfu(params: int, tokens_per_s: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation: 6 * N * tokens/s (forward + backward) over the peak."""
    if peak is None or not tokens_per_s:
        return None
    return 6 * params * tokens_per_s / peak


# ----------------------------------------------------------------------------- setup
LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALNUM = LETTERS + LETTERS.upper() + "0123456789"


def vocab_filling_tokenizer(vocab_size: int) -> Any:
    """The embedded byte-level tokenizer (same specials, bytes and chat template), its vocab
    filled up to ``vocab_size`` with ASCII pieces and their merges (2-char, then 3-char:
    lowercase triples first, so every 3-letter word is one token).

    Why not the embedded tokenizer as it is: a random-init model samples uniformly over its
    vocab, and the ~261-id tokenizer decodes the other ~151k ids to nothing, so every sampled
    reply would be empty, on-policy pairs identical (DPO drops them all) and replies scored as
    blanks. With every id a distinct piece, sampled text decodes and re-tokenises like real
    text. Built in Rust (tokenizer.json), it loads as fast as Qwen's own 151k vocab."""
    import itertools

    from tokenizers import Tokenizer, models

    from stages.core.tiny_model import build_tokenizer

    base = build_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges: list[tuple[str, str]] = []
    room = vocab_size - len(base)
    pairs = ["".join(p) for p in itertools.product(ALNUM, repeat=2)]
    lower3 = ["".join(t) for t in itertools.product(LETTERS, repeat=3)]
    rest3 = (
        "".join(t)
        for t in itertools.product(ALNUM, repeat=3)
        if not set("".join(t)) <= set(LETTERS)
    )
    for piece in itertools.chain(pairs, lower3, rest3):
        if room == 0:
            break
        vocab[piece] = len(vocab)
        if len(piece) == 2:
            merges.append((piece[0], piece[1]))
        else:  # both orders of merging reach the triple, whichever pair merged first
            merges += [(piece[:2], piece[2]), (piece[0], piece[1:])]
        room -= 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    old = base.backend_tokenizer
    core.pre_tokenizer, core.decoder = old.pre_tokenizer, old.decoder
    special = [t.content for t in old.get_added_tokens_decoder().values()]
    core.add_special_tokens(special)
    tokenizer = type(base)(
        tokenizer_object=core,
        pad_token=base.pad_token,
        eos_token=base.eos_token,
        additional_special_tokens=[t for t in special if t not in (base.pad_token, base.eos_token)],
        model_max_length=base.model_max_length,
        padding_side=base.padding_side,
    )
    tokenizer.chat_template = base.chat_template
    return tokenizer


def build_model_dir(target: Path, shape: Shape, dtype: str) -> int:
    """Save a random-init Qwen2 of ``shape`` with the embedded tokenizer (vocab filled to the
    model's); returns the parameter count (tied embeddings once)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = vocab_filling_tokenizer(shape.vocab_size)
    config = Qwen2Config(
        **asdict(shape),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def _text(rng: random.Random, chars: int) -> str:
    """Random 3-letter words: with the filled vocab each word is one token, each space one."""
    words = ["".join(rng.choice(LETTERS) for _ in range(3)) for _ in range((chars + 1) // 4)]
    return " ".join(words)


def write_data(data_dir: Path, plan: Plan) -> dict[str, Path]:
    """SFT messages, preference pairs and a prompt file of fixed lengths (seeded)."""
    rng = random.Random(0)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: data_dir / f"{name}.jsonl" for name in ("sft", "prefs", "prompts")}
    with paths["sft"].open("w") as sft, paths["prefs"].open("w") as prefs:
        for _ in range(plan.rows):
            prompt = [{"role": "user", "content": _text(rng, plan.prompt_chars)}]
            reply = {"role": "assistant", "content": _text(rng, plan.reply_chars)}
            other = {"role": "assistant", "content": _text(rng, plan.reply_chars)}
            sft.write(json.dumps({"messages": [*prompt, reply]}) + "\n")
            prefs.write(json.dumps({"prompt": prompt, "chosen": [reply], "rejected": [other]}))
            prefs.write("\n")
    with paths["prompts"].open("w") as prompts:
        for _ in range(plan.prompts):
            prompts.write(json.dumps({"prompt": _text(rng, plan.prompt_chars)}) + "\n")
    return paths


def mean_prompt_tokens(model_dir: Path, prompts_path: Path, max_prompt_length: int) -> float:
    """Mean tokens of the prompt file's chat prompts, as PPO feeds them (left-truncated)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    for line in prompts_path.read_text().splitlines():
        chat = [{"role": "user", "content": json.loads(line)["prompt"]}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        lengths.append(min(len(ids), max_prompt_length))
    return sum(lengths) / len(lengths)


def stage_overrides(stage: str, peft: str, plan: Plan, paths: dict[str, Path]) -> list[str]:
    common = [
        f"stage={stage}",
        f"peft={peft}",
        f"precision={plan.precision}",
        "tracking=none",
        f"experiment_name=gpu_{peft}",
        "data=file",
        f"data.sft.path={paths['sft']}",
        f"data.pairs.path={paths['prefs']}",
        f"data.prompts.path={paths['prompts']}",
        "data.prompts.num_heldout=4",
        "data.pairs.heldout_fraction=0.05",
    ]
    if stage == "ppo":
        return [
            *common,
            f"stage.total_updates={plan.ppo_updates}",
            f"stage.rollout_batch_size={plan.ppo_rollout}",
            "stage.num_minibatches=1",
            f"stage.num_ppo_epochs={plan.ppo_epochs}",
            f"stage.response_length={plan.ppo_response}",
            f"stage.num_prompts={plan.prompts}",
            "stage.logging_steps=1",
            f"stage.save_steps={plan.ppo_updates}",
        ]
    steps = {"sft": plan.sft_steps, "rm": plan.rm_steps, "dpo": plan.dpo_steps}[stage]
    args = [
        *common,
        f"stage.max_steps={steps}",
        f"stage.per_device_batch_size={plan.batch}",
        "stage.logging_steps=1",
        # No checkpoint: its write (weights + optimiser state) would land in the train phase.
        "+stage.trainer_overrides.save_strategy=no",
    ]
    if stage == "sft":
        args.append("stage.validation_fraction=0")
    if stage == "dpo":  # pairs sampled from the SFT policy, judged by the RM: on-policy work
        args += [
            "data.pairs.source=on_policy",
            "data.pairs.judge=reward_model",
            f"data.pairs.num_prompts={plan.pair_prompts}",
            "data.pairs.samples_per_prompt=2",
            "data.pairs.min_margin=0.0",
        ]
    return args


# A stage's process: the real CLI (python -m stages), plus a probe that records what the
# trainer logged and, at exit, the peak GPU memory, into $GPU_CHECK_PROBE.
CHILD = r"""
import atexit, json, os, resource, runpy, sys
logs = []
def _probe():
    out = {"trainer_logs": logs[-3:],
           "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    with open(os.environ["GPU_CHECK_PROBE"], "w") as f:
        json.dump(out, f)
atexit.register(_probe)
import transformers
_log = transformers.Trainer.log
def log(self, logs_, *a, **k):
    logs.append(dict(logs_))
    return _log(self, logs_, *a, **k)
transformers.Trainer.log = log
sys.argv = ["alignpipe", *sys.argv[1:]]
runpy.run_module("stages", run_name="__main__", alter_sys=False)
"""


@dataclass
class Row:
    stage: str
    peft: str
    status: str = "pending"  # ok | failed (rc) | timeout | skipped (why)
    wall_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    trained_tokens: float | None = None
    train_s: float | None = None  # the seconds tokens/s divides by (see measure)
    tokens_per_s: float | None = None
    flop_params: int | None = None
    mfu: float | None = None
    generation_tokens_per_s: float | None = None
    generation_note: str = ""
    gpu_peak_mb: float | None = None
    rss_peak_mb: float | None = None
    log_tail: str = ""


def run_stage(
    row: Row, args: list[str], run_dir: Path, probe: Path, timeout: float, log_path: Path
) -> dict[str, Any]:
    """Run one stage process; fill the row's status, wall time and memory; return the probe."""
    env = {**os.environ, "GPU_CHECK_PROBE": str(probe), "WANDB_MODE": "offline"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *args],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
            )  # fmt: skip
            row.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            row.status = f"timeout ({timeout:.0f} s)"
    row.wall_s = time.perf_counter() - started
    if row.status != "ok":
        row.log_tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    found = json.loads(probe.read_text()) if probe.is_file() else {}
    row.gpu_peak_mb = found.get("gpu_peak_mb")
    row.rss_peak_mb = found.get("rss_peak_mb")
    return found


def measure(row: Row, run_dir: Path, probe: dict[str, Any], plan: Plan, shape: Shape,
            peak: float | None, lora_r: int, prompt_len: float) -> None:  # fmt: skip
    """Tokens/s, MFU and generation rate of a finished stage from its manifest and logs."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    timings = manifest.get("timings") or {}
    row.phases = dict(timings.get("phases") or {})
    r = lora_r if row.peft != "none" else 0
    head = "score" if row.stage == "rm" else "lm"
    row.flop_params = forward_params(shape, head=head, lora_r=r)
    if row.stage == "ppo":
        checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
        timed = history[1:] or history  # the first update warms up kernels and allocator
        resp = [h["response/length_mean"] * plan.ppo_rollout for h in timed]
        rollout_s = sum(h["perf/rollout_s"] for h in timed)
        optimise_s = sum(h["perf/update_s"] - h["perf/rollout_s"] for h in timed)
        seq = [(prompt_len * plan.ppo_rollout + n) * plan.ppo_epochs for n in resp]
        row.trained_tokens, row.train_s = sum(seq), optimise_s
        row.generation_tokens_per_s = sum(resp) / rollout_s
        row.generation_note = f"rollout, updates 2..{len(history)}" if history[1:] else "rollout"
        # Policy and value are both trained: policy's lm head, value's score head.
        row.flop_params += forward_params(shape, head="score", lora_r=r)
    else:
        logged = [e for e in probe.get("trainer_logs", []) if "num_tokens" in e]
        runtime = [
            e["train_runtime"] for e in probe.get("trainer_logs", []) if "train_runtime" in e
        ]
        row.trained_tokens = logged[-1]["num_tokens"] if logged else None
        # TRL's train_runtime: the training loop, without the trainer set-up that the
        # manifest's train phase also holds (shown next to it in the report).
        row.train_s = runtime[-1] if runtime else None
        if row.stage == "dpo" and row.phases.get("data"):
            # At most max_new_tokens per sample: a random-init model over a 151k vocab almost
            # never samples the end token, so on the real shape this is the count.
            samples = manifest["data"]["stats"]["generated"]
            row.generation_tokens_per_s = samples * plan.max_new_tokens / row.phases["data"]
            row.generation_note = (
                f"pair sampling: {samples} samples x <= {plan.max_new_tokens} tokens over the "
                "data phase (sampling + RM judging)"
            )
    if row.trained_tokens and row.train_s:
        row.tokens_per_s = row.trained_tokens / row.train_s
    row.mfu = mfu(row.flop_params, row.tokens_per_s, peak)


# ----------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    cpu = cpu_model()
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


HEADER = """# GPU check: SFT, RM, PPO and DPO at Qwen2.5-0.5B's shape

Generated by `bench/gpu_check.py` (`make gpu-check`; `python bench/gpu_check.py --tiny` runs
the same code on CPU). On one GPU, budgeted to 8 minutes (`--budget-s`: stages not started by
then are reported as skipped; each stage process has a timeout), it saves a random-initialised model
of Qwen2.5-0.5B's shape (Qwen2: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocab 151936, tied embeddings, rope theta 1e6) with the embedded byte-level tokenizer
and chat template (its vocab filled with ASCII pieces up to 151936, so that sampled ids decode
to text) as a local model directory, writes synthetic SFT / preference / prompt files, and runs the real
stages on it (`python -m stages stage=sft|rm|ppo|dpo model.name_or_path=<dir> peft=<mode>
precision=bf16 data=file ...`), for full weights, LoRA and QLoRA (bitsandbytes 4-bit). The
report is rewritten after every stage: a timeout or crash still leaves the rows before it.

Columns: trained tokens / tokens/s = TRL's logged `num_tokens` (non-padding tokens fed; DPO:
chosen + rejected) over TRL's `train_runtime` (the training loop; the manifest's `train`
phase, shown next to it, also holds the trainer's set-up); PPO: prompt + response tokens x PPO
epochs over the updates' optimisation time (update minus rollout; the first update, a warm-up,
excluded). MFU = 6 x N x tokens/s over the GPU's peak dense bf16 FLOP/s (H100/H200 SXM 989e12,
H100 PCIe 756e12, A100 312e12, L40S 362e12, L4 121e12; other devices and CPU: n/a), N =
parameters in the trained model's forward (tied embeddings once, LoRA adapters included; PPO:
policy + value). LoRA / QLoRA are counted with the same 6N per token as full weights (the
standard approximation; their backward skips the frozen weights' gradients, ~4N). DPO's
reference forward and attention's seq^2 FLOPs are not counted. Generation tokens/s: PPO =
response tokens over the rollout seconds (sampling + scoring by the frozen roles, first update
excluded); DPO = samples x max_new_tokens over its data phase (pair sampling + RM judging; a
random-init model over a 151k vocab almost never samples the end token). Peak GPU memory =
`torch.cuda.max_memory_allocated` of the stage's process; peak RSS = the process's max RSS.
The TRL stages run without checkpoints (`save_strategy: no`): their writes would count as
training. The first steps (CUDA warm-up) are inside `train_runtime`: tokens/s and MFU are a
little below the steady state. Phases: the manifest's exclusive seconds per phase.
"""

NO_GPU_NOTE = """
**A `--tiny` CPU run, not a GPU measurement** (tiny Qwen2 shape, fp32, a few steps; QLoRA
on CPU bitsandbytes). It shows the script works end to end; its speeds say nothing about a
GPU. When this report was committed no GPU had run the GPU settings: their step counts and
the 8-minute budget are estimates. Regenerate this file on a GPU with `make gpu-check`.
"""


def write_report(out_dir: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(
        json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    lines = [HEADER]
    if meta["tiny"]:
        lines.append(NO_GPU_NOTE)
        lines.append(f"GPU settings (`make gpu-check`): {json.dumps(asdict(GPU_PLAN))}\n")
    m = meta["machine"]
    lines += [
        "## Run\n",
        f"- date (UTC): {meta['date']}",
        f"- command: `{meta['command']}`",
        f"- device: {meta['device'] or 'CPU (no CUDA device)'}; peak bf16 FLOP/s: "
        f"{_fmt(meta['peak_flops'], '.3g')}",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CUDA {m['cuda']}), "
        f"{m['torch_threads']} torch threads; load average (1 min) before "
        f"{m['loadavg_1m_before']}, after {m.get('loadavg_1m_after', 'n/a')}",
        f"- model: Qwen2 {json.dumps(meta['shape'])}, {meta['model_params']:,} parameters",
        f"- settings: {json.dumps(meta['plan'])}",
        "",
        "| stage | peft | status | wall s | train phase s | timed s | trained tokens | tokens/s | "
        "MFU | generation tokens/s | peak GPU MiB | peak RSS MiB | phases (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.phases.items()) or "n/a"
        gen = _fmt(r.generation_tokens_per_s, ".1f")
        lines.append(
            f"| {r.stage} | {r.peft} | {r.status} | {_fmt(r.wall_s, '.1f')} | "
            f"{_fmt(r.phases.get('train'), '.2f')} | {_fmt(r.train_s, '.2f')} | "
            f"{_fmt(r.trained_tokens, '.0f')} | "
            f"{_fmt(r.tokens_per_s, '.1f')} | {_fmt(r.mfu, '.3f')} | {gen} | "
            f"{_fmt(r.gpu_peak_mb, '.0f')} | {_fmt(r.rss_peak_mb, '.0f')} | {phases} |"
        )
    failed = [r for r in rows if r.status not in ("ok", "pending")]
    for r in failed:
        if r.log_tail:
            lines += ["", f"### {r.stage} / {r.peft}: {r.status}", "", "```", r.log_tail, "```"]
    lines += ["", f"Summary: {summary(rows)}", ""]
    (out_dir / "gpu.md").write_text("\n".join(lines))


def summary(rows: list[Row]) -> str:
    ok = sum(r.status == "ok" for r in rows)
    bad = [f"{r.stage}/{r.peft}: {r.status}" for r in rows if r.status not in ("ok", "pending")]
    return f"{ok}/{len(rows)} stage runs ok" + (f"; {'; '.join(bad)}" if bad else "")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shape, fp32, few steps")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "bench")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/alignpipe-gpu-check"))
    parser.add_argument("--modes", default=",".join(PEFT_MODES), help="peft modes to run")
    parser.add_argument("--budget-s", type=int, help="stop starting stages after this long")
    parser.add_argument("--stage-timeout-s", type=int, help="timeout of each stage process")
    args = parser.parse_args(argv)

    import torch

    plan, shape = (TINY_PLAN, TINY) if args.tiny else (GPU_PLAN, QWEN2_5_0_5B)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --tiny for the CPU run", file=sys.stderr)
        return 2
    budget = args.budget_s or plan.budget_s
    timeout = args.stage_timeout_s or plan.stage_timeout_s
    modes = [m for m in args.modes.split(",") if m]
    work = args.work_dir.resolve()
    model_dir, runs_root = work / "model", work / "runs"
    started = time.perf_counter()

    params = build_model_dir(model_dir, shape, "float32" if args.tiny else "bfloat16")
    paths = write_data(work / "data", plan)
    prompt_len = mean_prompt_tokens(model_dir, paths["prompts"], plan.max_prompt_length)
    from stages.core.schema import PeftConfig

    lora_r = PeftConfig().r  # the rank peft=lora|qlora trains with (conf/peft leaves it)
    rows = [Row(stage, peft) for peft in modes for stage in STAGES]
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": " ".join(["python", "bench/gpu_check.py", *(argv or sys.argv[1:])]),
        "tiny": args.tiny,
        "device": None,
        "peak_flops": None,
        "machine": machine(),
        "shape": asdict(shape),
        "model_params": params,
        "ppo_mean_prompt_tokens": round(prompt_len, 1),
        "plan": asdict(plan),
    }
    model_args = [
        "model=qwen2_5_0_5b",
        f"model.name=gpu_check_{'tiny' if args.tiny else 'qwen2_5_0_5b_shape'}",
        f"model.name_or_path={model_dir}",
        f"model.max_length={plan.max_length}",
        f"model.max_prompt_length={plan.max_prompt_length}",
        f"model.max_new_tokens={plan.max_new_tokens}",
        f"paths.runs_root={runs_root}",
        "force=true",
    ]
    for row in rows:
        if row.status == "pending":
            elapsed = time.perf_counter() - started
            if elapsed > budget:
                row.status = f"skipped (budget {budget} s spent)"
            elif any(
                r.peft == row.peft and r.stage in PARENTS[row.stage] and r.status != "ok"
                for r in rows
            ):
                row.status = "skipped (a parent stage did not finish)"
            else:
                run_dir = runs_root / f"gpu_{row.peft}" / row.stage
                probe_path = work / f"probe-{row.peft}-{row.stage}.json"
                probe_path.unlink(missing_ok=True)
                stage_args = [*model_args, *stage_overrides(row.stage, row.peft, plan, paths)]
                print(f"gpu_check: {row.stage} / {row.peft} ...", flush=True)
                probe = run_stage(
                    row, stage_args, run_dir, probe_path, min(timeout, budget - elapsed + 30),
                    work / f"{row.peft}-{row.stage}.log",
                )  # fmt: skip
                if probe.get("device") and not meta["device"]:
                    meta["device"] = probe["device"]
                    meta["peak_flops"] = peak_flops(probe["device"])
                if row.status == "ok":
                    try:
                        measure(
                            row,
                            run_dir,
                            probe,
                            plan,
                            shape,
                            meta["peak_flops"],
                            lora_r,
                            prompt_len,
                        )
                    except (OSError, KeyError, ValueError, IndexError) as err:
                        row.status = f"ok, unmeasured ({type(err).__name__}: {err})"
                print(f"gpu_check: {row.stage} / {row.peft}: {row.status}, "
                      f"{_fmt(row.tokens_per_s, '.1f')} tokens/s", flush=True)  # fmt: skip
        meta["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        write_report(args.out_dir, meta, rows)
    print(f"gpu_check: {summary(rows)}; report: {args.out_dir / 'gpu.md'}")
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
