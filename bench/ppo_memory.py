"""PPO's memory per role layout at a size where the weights, not the runtime, dominate.

Three layouts of PPO's four roles (policy, reference, reward, value), each run as a user
runs them: the real stages `sft -> rm -> ppo` as `python -m stages ...` subprocesses, in
their own runs root, on a random-initialised Llama saved as a local model directory (with the
embedded byte-level tokenizer and its chat template next to it; the model's vocabulary is
larger than the tokenizer's, as in real checkpoints) and passed as `model.name_or_path`:

* ``separate-fp32`` (peft=none): four fp32 models, policy and value trained (AdamW state
  for both);
* ``lora`` (peft=lora): the same four models, each an fp32 base with an adapter;
* ``shared-4bit`` (peft=qlora, stage.share_base=true): one NF4 base carrying four adapters.

Per layout the PPO process reports (its manifest's metrics, ``stages/ppo/recipe.py``):
``perf/role_weights_mb`` (bytes of every distinct parameter and buffer of the four roles,
4-bit weights as packed bytes), ``perf/peak_rss_mb`` (the process's peak RSS up to the end
of training, checkpoint included, before the comparison with SFT) and
``perf/rss_before_roles_mb`` (RSS right before the first weights load: the runtime floor of
torch, transformers, ...). This script adds the peak RSS of the whole PPO process (the
comparison with SFT included) from ``wait4``. The report gives per layout weights, peak,
peak - floor, and the ratios of every layout to separate-fp32.

    python bench/ppo_memory.py            # ~95M parameters; docs/bench/ppo_memory.{md,json}
    python bench/ppo_memory.py --tiny --output /tmp/ppo_memory   # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not a package on the path
    sys.path.insert(0, str(REPO))
from bench.host import cpu_model  # noqa: E402

# ~95M parameters (embeddings tied to the LM head): Llama hidden 768, 10 layers, vocab 32k.
FULL_SHAPE = dict(hidden=768, layers=10, heads=12, intermediate=2048, vocab=32000)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=512)

# (name in the report, peft override, extra PPO overrides)
LAYOUTS = (
    ("separate-fp32", "none", []),
    ("lora", "lora", []),
    ("shared-4bit", "qlora", ["stage.share_base=true"]),
)

# Every stage: tiny data, a few steps, short replies; the same for every layout.
COMMON = [
    "tracking=none",
    "precision=fp32",
    "data.toy.num_train=64",
    "data.toy.num_eval=4",
    "data.toy.num_reversal_train=8",
    "data.toy.num_reversal_eval=2",
    "model.max_length=48",
    "model.max_prompt_length=32",
    "model.max_new_tokens=8",
]
SFT = ["stage=sft", "stage.max_steps=2", "stage.per_device_batch_size=4",
       "stage.logging_steps=1", "stage.save_steps=2"]  # fmt: skip
RM = ["stage=rm", "stage.max_steps=2", "stage.per_device_batch_size=4",
      "stage.logging_steps=1", "stage.save_steps=2", "data.pairs.heldout_fraction=0.25"]  # fmt: skip
PPO_UPDATES = 2
PPO = [
    "stage=ppo",
    f"stage.total_updates={PPO_UPDATES}",
    f"stage.save_steps={PPO_UPDATES}",  # one checkpoint, as a real run writes them
    "stage.rollout_batch_size=8",
    "stage.num_minibatches=2",
    "stage.num_ppo_epochs=2",
    "stage.response_length=16",
    "stage.num_prompts=32",
    "stage.num_eval_samples_logged=0",
]


def save_base_model(directory: Path, shape: dict[str, int]) -> int:
    """A random-init Llama of ``shape`` in bf16 (as hub checkpoints ship) with the embedded
    tokenizer; returns its parameter count (tied embeddings counted once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.core.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=max(shape["vocab"], len(tokenizer)),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def write_pairs(path: Path, count: int = 48) -> int:
    """Toy preference pairs (correct sum vs off by ten) for the RM: no sampling needed.
    Returns how many distinct prompts were written."""
    from data_recipes import toy
    from stages.core.schema import ToyTaskConfig

    distinct = list(dict.fromkeys(toy.problems(ToyTaskConfig(), "train")))[:count]
    with path.open("w") as out:
        for problem in distinct:
            out.write(json.dumps({
                "prompt": problem.messages(),
                "chosen": [{"role": "assistant", "content": f"{problem.answer}."}],
                "rejected": [{"role": "assistant", "content": f"{problem.answer + 10}."}],
            }) + "\n")  # fmt: skip
    return len(distinct)


def run_stage(args: list[str], env: dict[str, str], log_file: Path) -> int:
    """Run one `python -m stages` subprocess; returns its peak RSS in KiB (wait4)."""
    with log_file.open("a") as log:
        log.write(f"\n$ python -m stages {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages", *args], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_file.read_text()[-4000:]
        raise RuntimeError(f"`python -m stages {' '.join(args)}` failed:\n{tail}")
    return usage.ru_maxrss


def measure_layout(
    name: str, peft: str, extra: list[str], model_dir: Path, pairs: Path, work: Path,
    env: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """sft -> rm -> ppo for one layout in its own runs root; the PPO process's memory."""
    root = work / name
    base = [*COMMON, f"peft={peft}", f"paths.runs_root={root}",
            f"model.name_or_path={model_dir}", "model.name=bench"]  # fmt: skip
    log_file = work / f"{name}.log"
    started = time.perf_counter()
    run_stage([*base, *SFT], env, log_file)
    run_stage([*base, *RM, "data.pairs.source=file", f"data.pairs.path={pairs}"], env, log_file)
    process_peak_kib = run_stage([*base, *PPO, *extra], env, log_file)
    ppo_dir = root / "toy" / "ppo"
    metrics = json.loads((ppo_dir / "metrics.json").read_text())
    roles = json.loads((ppo_dir / "manifest.json").read_text())["roles"]
    peak = metrics["perf/peak_rss_mb"]
    floor = metrics["perf/rss_before_roles_mb"]
    return {
        "layout": name,
        "peft": peft,
        "roles_layout": roles["layout"],
        "role_weights_mb": metrics["perf/role_weights_mb"],
        "floor_rss_mb": floor,
        "peak_rss_mb": peak,
        "peak_minus_floor_mb": peak - floor,
        "process_peak_rss_mb": process_peak_kib / 1024,
        "seconds": time.perf_counter() - started,
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every layout's numbers divided by separate-fp32's (the raw numbers, nothing else)."""
    base = next(r for r in rows if r["layout"] == "separate-fp32")
    keys = ("role_weights_mb", "peak_rss_mb", "peak_minus_floor_mb", "process_peak_rss_mb")
    return {
        r["layout"]: {k: r[k] / base[k] for k in keys}
        for r in rows
        if r["layout"] != "separate-fp32"
    }


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    shape = s["model"]
    table = "\n".join(
        f"| {row['layout']} | `{row['peft']}` ({row['roles_layout']}) | {row['role_weights_mb']:.1f}"
        f" | {row['floor_rss_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['peak_minus_floor_mb']:.0f}"
        f" | {row['process_peak_rss_mb']:.0f} |"
        for row in r["layouts"]
    )
    ratio_rows = "\n".join(
        f"| {name} / separate-fp32 | {q['role_weights_mb']:.3f} | {q['peak_rss_mb']:.3f}"
        f" | {q['peak_minus_floor_mb']:.3f} | {q['process_peak_rss_mb']:.3f} |"
        for name, q in r["ratios"].items()
    )
    shared = r["ratios"]["shared-4bit"]["peak_rss_mb"]
    verdict = "met" if shared <= r["goal_peak_ratio"] else "NOT met"
    return f"""# PPO memory per role layout

Generated by `{r["command"]}` on {r["date"]}.

Model: random-init Llama, hidden {shape["hidden"]}, {shape["layers"]} layers, {shape["heads"]} heads,
MLP {shape["intermediate"]}, vocab {shape["vocab_size"]} (tied embeddings):
**{s["parameters"]:,} parameters** ({s["parameters"] * 4 / 2**20:.0f} MB in fp32), saved in bf16 as a
local model directory with the embedded byte-level tokenizer ({s["tokenizer_size"]} tokens).

| layout | peft | role weights MB | floor RSS MB | peak RSS MB | peak - floor MB | whole process peak MB |
|---|---|---|---|---|---|---|
{table}

| ratio | weights | peak RSS | peak - floor | whole process peak |
|---|---|---|---|---|
{ratio_rows}

Goal: shared-4bit peak RSS at most {r["goal_peak_ratio"]}x separate-fp32's: **{verdict}**
({shared:.3f}x).

- role weights: bytes of every distinct parameter and buffer of policy, reference, reward
  and value (a shared base once; 4-bit weights as packed bytes, their quantisation
  constants not included), `perf/role_weights_mb` of the PPO manifest.
- floor: the PPO process's RSS right before its first weights load (torch, transformers,
  accelerate, datasets, ... imported), `perf/rss_before_roles_mb`.
- peak RSS: the PPO process's peak up to the end of training (loading, {s["ppo_updates"]} updates, the
  final checkpoint), `perf/peak_rss_mb`; peak - floor is what the roles and training add.
- whole process peak: `wait4`'s ru_maxrss of the PPO process, including the comparison with
  SFT after training (which loads the SFT policy once more).

## Machine
- CPU: {m["cpu"]}, {m["logical_cores"]} logical cores, {m["memory_gb"]} GB RAM, torch threads {m["torch_threads"]}
- python {m["python"]}, torch {m["torch"]}, transformers {m["transformers"]}, peft {m["peft"]},
  bitsandbytes {m["bitsandbytes"]}
- 1-minute load average before/after: {m["loadavg_1m_before_after"]}

## Settings
- every layout: `sft -> rm -> ppo` as `python -m stages` subprocesses in its own runs root,
  `{" ".join(s["common"])}`
- sft: `{" ".join(s["sft"])}`
- rm: `{" ".join(s["rm"])}` on {s["pairs"]} toy pairs (`data.pairs.source=file`)
- ppo: `{" ".join(s["ppo"])}` (+ `stage.share_base=true` for shared-4bit)
- wall time per layout (all three stages): {", ".join(f"{row['layout']} {row['seconds']:.0f} s" for row in r["layouts"])}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny shape (hidden 64, 2 layers): a smoke run of the script")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads per stage")
    parser.add_argument("--work", help="directory for the model and runs (default: a temp dir)")
    parser.add_argument("--output", default=str(REPO / "docs" / "bench" / "ppo_memory"),
                        help="report path without suffix (.md and .json are written)")  # fmt: skip
    args = parser.parse_args()

    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = work / "base-model"
        parameters = save_base_model(model_dir, shape)
        pairs = work / "pairs.jsonl"
        pair_count = write_pairs(pairs)
        print(f"model: {parameters:,} parameters in {model_dir}")

        load_before = os.getloadavg()
        rows = []
        for name, peft, extra in LAYOUTS:
            row = measure_layout(name, peft, extra, model_dir, pairs, work, env)
            rows.append(row)
            print(
                f"{name:14s} weights {row['role_weights_mb']:8.1f} MB  peak {row['peak_rss_mb']:7.0f}"
                f" MB  floor {row['floor_rss_mb']:6.0f} MB  ({row['seconds']:.0f} s)"
            )
        load_after = os.getloadavg()
        config = json.loads((model_dir / "config.json").read_text())
        tokenizer_size = len(
            json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        )

    import bitsandbytes
    import peft
    import torch
    import transformers

    report = {
        "command": " ".join(["python", "bench/ppo_memory.py", *sys.argv[1:]]),
        "machine": {
            "cpu": cpu_model(),
            "logical_cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "torch_threads": args.threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "settings": {
            "model": {**shape, "vocab_size": config["vocab_size"]},
            "parameters": parameters,
            "tokenizer_size": tokenizer_size,
            "pairs": pair_count,
            "common": COMMON,
            "sft": SFT,
            "rm": RM,
            "ppo": PPO,
            "ppo_updates": PPO_UPDATES,
        },
        "layouts": rows,
        "ratios": ratios(rows),
        "goal_peak_ratio": 0.4,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    for name, q in report["ratios"].items():
        print(f"{name} / separate-fp32: weights {q['role_weights_mb']:.3f}x, peak RSS "
              f"{q['peak_rss_mb']:.3f}x, peak - floor {q['peak_minus_floor_mb']:.3f}x")  # fmt: skip
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
