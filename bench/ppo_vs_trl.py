"""Side-by-side PPO update time: our ``stages.ppo`` vs trl 1.12.0's ``trl.experimental.ppo``.

Yardstick (docs/contracts.md): random-init Llama (hidden 64, 2 layers, vocab 64),
8 prompts per update, 4 PPO epochs, 1 minibatch, response length 32, stop at EOS,
missing-EOS penalty 1.0, fp32, 2 torch threads. Both implementations get identical models
(same seeds), prompts and hyper-parameters, each in its own subprocess: ours in this
interpreter, trl 1.12.0 in a side venv this script creates with pinned versions (an unpinned
torch would pull a multi-GB CUDA build).

Per-update wall time = time between consecutive update-end callbacks (so both include their
own logging); we report the median of ``--updates`` after ``--warmup`` warm-up updates.
Runs alternate ours/trl for ``--rounds`` rounds so background load hits both alike.

    python bench/ppo_vs_trl.py                # writes docs/bench/ppo_vs_trl.{md,json}
    python bench/ppo_vs_trl.py --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = "/tmp/alignpipe-trl112-venv"
TRL_PINS = [
    "torch==2.13.0",
    "trl==1.12.0",
    "transformers==5.23.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "datasets",
]

# The yardstick. Both workers read these, nothing else.
VOCAB, PAD, EOS = 64, 0, 1
MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=None,
    tie_word_embeddings=False,
)
SETTINGS = dict(
    batch_prompts=8,
    num_ppo_epochs=4,
    num_minibatches=1,
    response_length=32,
    temperature=0.7,
    missing_eos_penalty=1.0,
    kl_coef=0.05,
    learning_rate=3e-6,
    num_prompts=64,
    dtype="fp32",
)


# ----------------------------------------------------------------------------- shared setup


def build_models():
    """policy, reference, reward, value: same seeds in both workers -> identical weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    def make(cls, seed, **extra):
        torch.manual_seed(seed)
        return cls(LlamaConfig(**MODEL, **extra)).float()

    policy = make(LlamaForCausalLM, 0)
    reference = make(LlamaForCausalLM, 0)
    reward = make(LlamaForSequenceClassification, 1, num_labels=1)
    value = make(LlamaForSequenceClassification, 1, num_labels=1)
    return policy, reference, reward, value


def build_prompts() -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(4, 13, (SETTINGS["num_prompts"],), generator=g).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def build_tokenizer():
    """A word-level tokenizer over the 64 ids (TRL needs a processing_class)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


# ----------------------------------------------------------------------------- workers


def run_ours(total_updates: int) -> list[float]:
    from stages.ppo import PPOHyperparams, PPOTrainer, SeparateRoles

    policy, reference, reward, value = build_models()
    config = PPOHyperparams(
        rollout_batch_size=SETTINGS["batch_prompts"],
        num_ppo_epochs=SETTINGS["num_ppo_epochs"],
        num_minibatches=SETTINGS["num_minibatches"],
        response_length=SETTINGS["response_length"],
        temperature=SETTINGS["temperature"],
        stop_token="eos",
        missing_eos_penalty=SETTINGS["missing_eos_penalty"],
        kl_coef=SETTINGS["kl_coef"],
        learning_rate=SETTINGS["learning_rate"],
        max_grad_norm=None,  # trl 1.12.0's PPO loop does not clip
        total_updates=total_updates,
        seed=0,
    )
    marks: list[float] = []
    trainer = PPOTrainer(
        config,
        SeparateRoles(policy, value, reward, reference),
        build_prompts(),
        tokenizer=build_tokenizer(),
        on_log=lambda metrics, step: marks.append(time.perf_counter()),
    )
    marks.append(time.perf_counter())
    trainer.train()
    marks.sort()
    return [b - a for a, b in itertools.pairwise(marks)]


def run_trl(total_updates: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    policy, reference, reward, value = build_models()
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=SETTINGS["batch_prompts"],
            gradient_accumulation_steps=1,
            num_ppo_epochs=SETTINGS["num_ppo_epochs"],
            num_mini_batches=SETTINGS["num_minibatches"],
            response_length=SETTINGS["response_length"],
            temperature=SETTINGS["temperature"],
            stop_token="eos",
            missing_eos_penalty=SETTINGS["missing_eos_penalty"],
            kl_coef=SETTINGS["kl_coef"],
            learning_rate=SETTINGS["learning_rate"],
            total_episodes=SETTINGS["batch_prompts"] * total_updates,
            num_sample_generations=0,
            bf16=False,
            fp16=False,
            use_cpu=True,
            gradient_checkpointing=False,  # both sides without it: not worth it at this size
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=build_tokenizer(),
            model=policy,
            ref_model=reference,
            reward_model=reward,
            value_model=value,
            train_dataset=Dataset.from_dict({"input_ids": build_prompts()}),
            callbacks=[Marks()],
        )
        trainer.train()
    return [b - a for a, b in itertools.pairwise(marks)]


def worker(kind: str, total_updates: int, threads: int, out: str) -> None:
    import torch

    torch.set_num_threads(threads)
    times = run_ours(total_updates) if kind == "ours" else run_trl(total_updates)
    Path(out).write_text(json.dumps({"times": times, "torch": torch.__version__}))


# ----------------------------------------------------------------------------- driver


def ensure_trl_venv(venv: Path) -> Path:
    """Create the side venv with trl 1.12.0 (pinned torch!) unless it is already complete."""
    python = venv / "bin" / "python"
    probe = "import trl, torch; assert trl.__version__ == '1.12.0'; from trl.experimental.ppo import PPOTrainer"
    if (
        python.exists()
        and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0
    ):
        return python
    print(f"creating {venv} with {' '.join(TRL_PINS)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python


def run_worker(python: Path, kind: str, total: int, threads: int) -> tuple[list[float], str]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    cmd = [str(python), __file__, "--worker", kind, "--total", str(total), "--threads",
           str(threads), "--out", out]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data["times"], data["torch"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--warmup", type=int, default=2, help="updates excluded from the median")
    parser.add_argument("--updates", type=int, default=10, help="timed updates per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/trl rounds")
    parser.add_argument("--venv", default=DEFAULT_VENV, help="side venv with trl 1.12.0")
    parser.add_argument("--output", default=str(REPO / "docs" / "bench" / "ppo_vs_trl"),
                        help="report path without suffix (.md and .json are written)")  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.total, args.threads, args.out)
        return

    trl_python = ensure_trl_venv(Path(args.venv))
    total = args.warmup + args.updates
    runs: dict[str, list[list[float]]] = {"ours": [], "trl": []}
    torch_versions = {}
    load_before = os.getloadavg()
    for round_index in range(args.rounds):
        order = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
        for kind in order:
            python = Path(sys.executable) if kind == "ours" else trl_python
            times, torch_versions[kind] = run_worker(python, kind, total, args.threads)
            timed = times[args.warmup : args.warmup + args.updates]
            runs[kind].append(timed)
            print(
                f"round {round_index + 1} {kind:4s}: median {statistics.median(timed):.4f} s/update"
            )
    load_after = os.getloadavg()

    per_round = {k: [statistics.median(t) for t in v] for k, v in runs.items()}
    medians = {k: statistics.median([x for t in v for x in t]) for k, v in runs.items()}
    ratio = medians["ours"] / medians["trl"]
    report = {
        "machine": {
            "cpu": cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": args.threads,
            "python": platform.python_version(),
            "torch": torch_versions,
            "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "settings": {
            **SETTINGS,
            "model": MODEL,
            "warmup": args.warmup,
            "timed_updates": args.updates,
            "rounds": args.rounds,
        },
        "median_s_per_update": medians,
        "per_round_median_s": per_round,
        "ratio_ours_over_trl": ratio,
        "raw_times_s": runs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"ours {medians['ours']:.4f} s, trl 1.12.0 {medians['trl']:.4f} s, ratio {ratio:.3f}")
    print(f"wrote {out.with_suffix('.md')}")


def markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    rounds = "\n".join(
        f"| {i + 1} | {o:.4f} | {t:.4f} | {o / t:.3f} |"
        for i, (o, t) in enumerate(
            zip(r["per_round_median_s"]["ours"], r["per_round_median_s"]["trl"])
        )
    )
    return f"""# PPO update time: alignpipe vs trl 1.12.0

Generated by `python bench/ppo_vs_trl.py` on {r["date"]}.

| | seconds per update (median) |
|---|---|
| ours (`stages.ppo`) | **{r["median_s_per_update"]["ours"]:.4f}** |
| trl 1.12.0 (`trl.experimental.ppo.PPOTrainer`) | **{r["median_s_per_update"]["trl"]:.4f}** |
| ratio ours / trl | **{r["ratio_ours_over_trl"]:.3f}** |

Per round (runs alternate so background load hits both):

| round | ours | trl | ratio |
|---|---|---|---|
{rounds}

## Machine
- CPU: {m["cpu"]}, {m["logical_cores"]} logical cores, torch threads {m["torch_threads"]}
- python {m["python"]}, torch {m["torch"]}
- 1-minute load average before/after: {m["loadavg_1m_before_after"]} (a shared machine: other jobs
  add noise)

## Settings (identical for both)
- model: random-init Llama, hidden {s["model"]["hidden_size"]}, {s["model"]["num_hidden_layers"]} layers,
  vocab {s["model"]["vocab_size"]}; separate policy / reference / reward / value models, fp32
- {s["batch_prompts"]} prompts per update, {s["num_ppo_epochs"]} PPO epochs, {s["num_minibatches"]} minibatch,
  response length {s["response_length"]}, stop at EOS, missing-EOS penalty {s["missing_eos_penalty"]},
  temperature {s["temperature"]}, kl_coef {s["kl_coef"]}, lr {s["learning_rate"]}, no grad clipping
- per-update wall = time between consecutive update-end callbacks; median of {s["timed_updates"]}
  updates after {s["warmup"]} warm-up updates, pooled over {s["rounds"]} rounds
"""


if __name__ == "__main__":
    main()
