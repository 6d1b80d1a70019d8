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
    python bench/ppo_vs_trl.py --scale        # docs/bench/ppo_scaling.{md,json,png}

``--scale`` runs the same comparison at three shapes (yardstick, 10.5M, 53.7M parameters) x
response lengths 32 and 128, with each shape's own warm-up / timed updates (SCALE_SHAPES;
``--warmup`` / ``--updates`` apply to the default mode only), times generation / scoring /
training inside each update on both sides, and compares our sampling loops' tokens/s with
plain ``model.generate``.
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
if str(REPO) not in sys.path:  # run as a script: bench/ is not a package on the path
    sys.path.insert(0, str(REPO))
from bench.host import cpu_model  # noqa: E402

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
    """Prompt token ids drawn from the whole vocab (2..vocab-1: real, in-range ids)."""
    import torch

    vocab = MODEL["vocab_size"]
    g = torch.Generator().manual_seed(1234)
    lengths = torch.randint(4, 13, (SETTINGS["num_prompts"],), generator=g).tolist()
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def build_tokenizer():
    """A word-level tokenizer over the model's ids (TRL needs a processing_class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, MODEL["vocab_size"])}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Left padding: trl's collator pads prompts with it, and generation continues from the
    # last column (right-padded prompts make transformers warn and sample after pads).
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    # generate_ids renders chat prompts: the user turn's text is the prompt's token words.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


# ----------------------------------------------------------------------------- workers


def run_ours(total_updates: int) -> tuple[list[float], list[dict[str, float]]]:
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
    import stages.ppo.roles as roles_module
    import stages.ppo.rollout as rollout_module

    # Phase clock from the outside: the sampler and the no-grad scoring of the rollout.
    clock = PhaseClock()
    clock.wrap(rollout_module, "sample_completions", "generation")
    clock.wrap(roles_module.PPORoles, "score_rollout", "scoring")
    marks: list[float] = []
    phases: list[dict[str, float]] = []

    def on_log(metrics, step):
        marks.append(time.perf_counter())
        phases.append(clock.take())

    trainer = PPOTrainer(
        config,
        SeparateRoles(policy, value, reward, reference),
        build_prompts(),
        tokenizer=build_tokenizer(),
        on_log=on_log,
    )
    marks.append(time.perf_counter())
    clock.take()
    try:
        trainer.train()
    finally:
        clock.restore()
    return [b - a for a, b in itertools.pairwise(marks)], phases


def run_trl(total_updates: int) -> tuple[list[float], list[dict[str, float]]]:
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # trl is not edited: its module-level helpers are wrapped from the outside. In its update,
    # `batch_generation` samples, `forward` (reference) and `get_reward` (value, reward) score
    # the rollout under no_grad; its training forward also goes through `forward`, with grad.
    clock = PhaseClock()
    clock.wrap(trl_ppo, "batch_generation", "generation")
    clock.wrap(trl_ppo, "forward", "scoring", no_grad_only=True)
    clock.wrap(trl_ppo, "get_reward", "scoring")
    policy, reference, reward, value = build_models()
    marks: list[float] = []
    phases: list[dict[str, float]] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            clock.take()

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            phases.append(clock.take())

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
        try:
            trainer.train()
        finally:
            clock.restore()
    return [b - a for a, b in itertools.pairwise(marks)], phases


def run_generation(lengths: list[int], repeats: int, batch: int) -> list[dict]:
    """Sampled tokens/s of our two sampling paths against plain ``model.generate``.

    All three sample ``batch`` prompts at the same temperature with no top-k / top-p and make
    every row produce exactly ``n`` tokens: ours with no stop token, plain generate with
    ``min_new_tokens = max_new_tokens``; ``generate_ids`` keeps its EOS stop, so its tokens
    are counted from the columns it produced (batch x longest reply). Median of ``repeats``
    timed calls after one warm-up call."""
    import torch
    from transformers import GenerationConfig

    from stages.core.generation import generate_ids, left_pad
    from stages.ppo.rollout import sample_completions

    policy = build_models()[0].eval()
    tokenizer = build_tokenizer()
    prompts = build_prompts()[:batch]
    ids, mask = left_pad(prompts, PAD)
    chats = [[{"role": "user", "content": " ".join(f"t{t}" for t in p)}] for p in prompts]
    temperature = SETTINGS["temperature"]

    def ours(n: int) -> int:
        tokens, _ = sample_completions(
            policy, ids, mask.bool(), max_new_tokens=n, temperature=temperature,
            stop_token_id=None, pad_token_id=PAD,
        )  # fmt: skip
        return tokens.numel()

    def ours_generate_ids(n: int) -> int:
        _, replies = generate_ids(
            policy, tokenizer, chats, max_new_tokens=n, max_prompt_length=64,
            batch_size=batch, do_sample=True, temperature=temperature, seed=0,
        )  # fmt: skip
        return batch * max(len(r[0]) for r in replies)

    def plain(n: int) -> int:
        config = GenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=n,
            min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOS, use_cache=True,
        )  # fmt: skip
        with torch.no_grad():
            out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return out[:, ids.shape[1] :].numel()

    rows = []
    for n in lengths:
        row: dict = {"response_length": n, "batch": batch}
        for name, fn in (("ours_sample_completions", ours), ("ours_generate_ids", ours_generate_ids),
                         ("plain_generate", plain)):  # fmt: skip
            fn(n)  # warm-up
            rates = []
            for _ in range(repeats):
                started = time.perf_counter()
                tokens = fn(n)
                rates.append(tokens / (time.perf_counter() - started))
            row[name] = {"tokens_per_s": statistics.median(rates), "raw_tokens_per_s": rates}
        rows.append(row)
    return rows


class PhaseClock:
    """Wall seconds spent inside wrapped functions, per phase, since the last ``take()``.
    Nested calls of wrapped functions count once (the outermost)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth = 0
        self._originals: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, phase: str, no_grad_only: bool = False) -> None:
        """Time ``owner.name`` into ``phase``; with ``no_grad_only``, only calls made with
        gradients off (trl's `forward` also serves the training forward)."""
        import torch

        inner = getattr(owner, name)
        self._originals.append((owner, name, inner))

        def timed(*args, **kwargs):
            if self._depth or (no_grad_only and torch.is_grad_enabled()):
                return inner(*args, **kwargs)
            self._depth += 1
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                elapsed = time.perf_counter() - started
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed

        setattr(owner, name, timed)

    def restore(self) -> None:
        """Put the wrapped functions back (the next run in this process wraps afresh)."""
        for owner, name, inner in reversed(self._originals):
            setattr(owner, name, inner)
        self._originals.clear()

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, {}
        return taken


def worker(kind: str, total_updates: int, threads: int, out: str, spec: str | None) -> None:
    import torch

    torch.set_num_threads(threads)
    run = run_ours if kind == "ours" else run_trl
    if not spec:
        times, _ = run(total_updates)
        Path(out).write_text(json.dumps({"times": times, "torch": torch.__version__}))
        return
    # --scale: one shape, every response length in turn (one process start per shape), then
    # (ours only) the generation comparison at that shape.
    loaded = json.loads(Path(spec).read_text())
    MODEL.update(loaded["model"])
    result: dict = {"lengths": {}, "torch": torch.__version__}
    for length in loaded["lengths"]:
        SETTINGS["response_length"] = length
        times, phases = run(total_updates)
        result["lengths"][str(length)] = {"times": times, "phases": phases}
    if "gen" in loaded:
        result["generation"] = run_generation(**loaded["gen"])
    Path(out).write_text(json.dumps(result))


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


def run_worker(python: Path, kind: str, total: int, threads: int, spec: dict | None = None) -> dict:
    """One worker subprocess; its JSON result (times, phases or generation, torch)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    spec_args: list[str] = []
    if spec is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        spec_args = ["--spec", f.name]
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
           str(threads), "--out", out, *spec_args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if spec_args:
        os.unlink(spec_args[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument(
        "--scale",
        action="store_true",
        help="three shapes x response lengths 32, 128 -> docs/bench/ppo_scaling.*",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="with --scale: tiny shapes and lengths, 1+1 updates (for tests)",
    )
    parser.add_argument("--shapes", help="with --scale: comma-separated subset of the shapes")
    parser.add_argument("--lengths", help="with --scale: comma-separated response lengths")
    parser.add_argument(
        "--skip-trl",
        action="store_true",
        help="with --scale: our side only (no side venv needed; ratios empty)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--warmup", type=int, default=2, help="updates excluded from the median")
    parser.add_argument("--updates", type=int, default=10, help="timed updates per run")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating ours/trl rounds (default 2; 1 with --scale)")  # fmt: skip
    parser.add_argument("--venv", default=DEFAULT_VENV, help="side venv with trl 1.12.0")
    parser.add_argument("--output", default=str(REPO / "docs" / "bench" / "ppo_vs_trl"),
                        help="report path without suffix (.md and .json are written)")  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.total, args.threads, args.out, args.spec)
        return
    if args.rounds is None:
        args.rounds = 1 if args.scale else 2  # --scale: one round keeps it near 20 minutes
    if args.scale:
        scale_main(args)
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
            data = run_worker(python, kind, total, args.threads)
            times, torch_versions[kind] = data["times"], data["torch"]
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


# ----------------------------------------------------------------------------- --scale

# (name, Llama shape, warm-up updates, timed updates). Few updates at the large shapes keep the
# whole --scale run to minutes on 2 cores; positions 256 fit prompt (<= 12) + 128.
SCALE_SHAPES = [
    ("yardstick", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=64), 2, 8),
    ("10M", dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=8192), 1, 4),
    ("40M", dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8, vocab_size=32000), 1, 3),
]  # fmt: skip
SCALE_LENGTHS = [32, 128]
TINY_SHAPES = [
    ("tiny-a", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=64), 1, 1),
    ("tiny-b", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=256), 1, 1),
    ("tiny-c", dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=512), 1, 1),
]  # fmt: skip
TINY_LENGTHS = [4, 8]
PHASES = ("generation", "scoring", "training")


def count_parameters(shape: dict) -> dict[str, int]:
    """Parameters of the policy (causal LM) and of the value / reward models at ``shape``."""
    h, v, i, n = (shape[k] for k in ("hidden_size", "vocab_size", "intermediate_size",
                                     "num_hidden_layers"))  # fmt: skip
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o, k, v, MLP, two RMSNorms
    backbone = v * h + n * layer + h  # embeddings, layers, final norm
    return {"policy": backbone + h * v, "value": backbone + h}


def phase_shares(times: list[float], phases: list[dict[str, float]]) -> dict[str, float]:
    """Median share of each phase in an update; training = the update minus the other two."""
    shares: dict[str, list[float]] = {k: [] for k in PHASES}
    for total, seen in zip(times, phases):
        generation, scoring = seen.get("generation", 0.0), seen.get("scoring", 0.0)
        parts = {"generation": generation, "scoring": scoring,
                 "training": total - generation - scoring}  # fmt: skip
        for k in PHASES:
            shares[k].append(parts[k] / total)
    return {k: statistics.median(v) for k, v in shares.items()}


def scale_main(args: argparse.Namespace) -> None:
    shapes, lengths = (TINY_SHAPES, TINY_LENGTHS) if args.tiny else (SCALE_SHAPES, SCALE_LENGTHS)
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = set(wanted) - {name for name, *_ in shapes}
        if unknown:
            raise SystemExit(f"--shapes: unknown {sorted(unknown)}; known {[s[0] for s in shapes]}")
        shapes = [shape for shape in shapes if shape[0] in wanted]
    if args.lengths:
        lengths = [int(n) for n in args.lengths.split(",")]
    kinds = ("ours",) if args.skip_trl else ("ours", "trl")
    trl_python = None if args.skip_trl else ensure_trl_venv(Path(args.venv))
    output = Path(args.output)
    if output == REPO / "docs" / "bench" / "ppo_vs_trl":  # the non-scale default
        output = REPO / "docs" / "bench" / "ppo_scaling"
    repeats = 1 if args.tiny else 3
    load_before = os.getloadavg()
    started = time.perf_counter()
    points, generation, torch_versions = [], [], {}
    for name, shape, warmup, updates in shapes:
        model = {**MODEL, **shape, "max_position_embeddings": 256}
        params = count_parameters(model)
        spec = {"model": model, "lengths": lengths}
        raw = {k: {n: [] for n in lengths} for k in kinds}
        phases = {k: {n: [] for n in lengths} for k in kinds}
        for round_index in range(args.rounds):
            order = kinds if round_index % 2 == 0 else kinds[::-1]
            for kind in order:
                python = Path(sys.executable) if kind == "ours" else trl_python
                run_spec = dict(spec)
                if kind == "ours" and round_index == 0:  # tokens/s: once per shape
                    run_spec["gen"] = {"lengths": lengths, "repeats": repeats,
                                       "batch": SETTINGS["batch_prompts"]}  # fmt: skip
                data = run_worker(python, kind, warmup + updates, args.threads, run_spec)
                torch_versions[kind] = data["torch"]
                for n in lengths:
                    got = data["lengths"][str(n)]
                    raw[kind][n] += got["times"][warmup : warmup + updates]
                    phases[kind][n] += got["phases"][warmup : warmup + updates]
                for row in data.get("generation", []):
                    row.update(shape=name, parameters=params["policy"])
                    row["ratio_ours_over_plain"] = (
                        row["ours_sample_completions"]["tokens_per_s"]
                        / row["plain_generate"]["tokens_per_s"]
                    )
                    generation.append(row)
        for n in lengths:
            medians = {k: statistics.median(raw[k][n]) for k in kinds}
            point = {
                "shape": name, "model": model, "parameters": params, "response_length": n,
                "warmup": warmup, "timed_updates": updates,
                "raw_times_s": {k: raw[k][n] for k in kinds},
                "raw_phases_s": {k: phases[k][n] for k in kinds},
                "median_s_per_update": medians,
                "phase_shares": {k: phase_shares(raw[k][n], phases[k][n]) for k in kinds},
                "ratio_ours_over_trl": medians["ours"] / medians["trl"] if "trl" in medians else None,
            }  # fmt: skip
            points.append(point)
            ratio = point["ratio_ours_over_trl"]
            print(f"{name:9s} R={n:3d}: "
                  + ", ".join(f"{k} {v:.3f} s" for k, v in medians.items())
                  + (f", ratio {ratio:.3f}" if ratio is not None else ""), flush=True)  # fmt: skip
        for row in generation[-len(lengths) :]:
            print(f"{name:9s} generation, {row['response_length']} tokens: ours / plain "
                  f"tokens/s {row['ratio_ours_over_plain']:.3f}", flush=True)  # fmt: skip
    load_after = os.getloadavg()
    command = "python bench/ppo_vs_trl.py " + " ".join(sys.argv[1:])
    report = {
        "machine": {
            "cpu": cpu_model(),
            "logical_cores": os.cpu_count(),
            "torch_threads": args.threads,
            "python": platform.python_version(),
            "torch": torch_versions,
            "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        },
        "command": command.strip(),
        "settings": {
            **{k: v for k, v in SETTINGS.items() if k != "response_length"},
            "rounds": args.rounds,
            "implementations": list(kinds),
        },
        "points": points,
        "generation": generation,
        "wall_s": time.perf_counter() - started,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text(scale_markdown(report))
    plot_scaling(report, output.with_suffix(".png"))
    print(f"wrote {output.with_suffix('.md')}, .json, .png in {report['wall_s']:.0f} s")


def plot_scaling(report: dict, path: Path) -> None:
    """Seconds per update against policy parameters: one line per implementation x length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = report["settings"]["implementations"]
    lengths = sorted({p["response_length"] for p in report["points"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for kind in kinds:
        for index, length in enumerate(lengths):
            pts = [p for p in report["points"] if p["response_length"] == length]
            pts.sort(key=lambda p: p["parameters"]["policy"])
            ax.plot([p["parameters"]["policy"] for p in pts],
                    [p["median_s_per_update"][kind] for p in pts],
                    marker="o", linestyle="-" if kind == "ours" else "--",
                    color=colors[index % len(colors)],
                    label=f"{'ours' if kind == 'ours' else 'trl 1.12.0'}, response {length}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("policy parameters")
    ax.set_ylabel("seconds per PPO update (median)")
    ax.set_title("PPO update time vs model size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scale_markdown(r: dict) -> str:
    m, s = r["machine"], r["settings"]
    kinds = s["implementations"]

    def shares(point: dict, kind: str) -> str:
        sh = point["phase_shares"][kind]
        return " / ".join(f"{100 * sh[k]:.0f}" for k in PHASES)

    rows = []
    for p in r["points"]:
        med = p["median_s_per_update"]
        trl = f"{med['trl']:.3f}" if "trl" in med else "not run"
        ratio = f"**{p['ratio_ours_over_trl']:.3f}**" if p["ratio_ours_over_trl"] else "-"
        trl_shares = shares(p, "trl") if "trl" in kinds else "-"
        rows.append(
            f"| {p['shape']} | {p['parameters']['policy']:,} | {p['response_length']} | "
            f"{med['ours']:.3f} | {trl} | {ratio} | {shares(p, 'ours')} | {trl_shares} | "
            f"{p['warmup']} + {p['timed_updates']} |"
        )
    gen_rows = [
        f"| {g['shape']} | {g['parameters']:,} | {g['response_length']} | "
        f"{g['ours_sample_completions']['tokens_per_s']:.0f} | "
        f"{g['ours_generate_ids']['tokens_per_s']:.0f} | "
        f"{g['plain_generate']['tokens_per_s']:.0f} | **{g['ratio_ours_over_plain']:.3f}** |"
        for g in r["generation"]
    ]
    shapes = "\n".join(
        f"- {p['shape']}: hidden {p['model']['hidden_size']}, intermediate "
        f"{p['model']['intermediate_size']}, {p['model']['num_hidden_layers']} layers, "
        f"{p['model']['num_attention_heads']} heads, vocab {p['model']['vocab_size']}: "
        f"policy / reference {p['parameters']['policy']:,} parameters, value / reward "
        f"{p['parameters']['value']:,}"
        for p in r["points"]
        if p["response_length"] == r["points"][0]["response_length"]
    )
    return f"""# PPO update time vs model size: alignpipe vs trl 1.12.0

Generated by `{r["command"]}` on {r["date"]} (whole run {r["wall_s"]:.0f} s).

| shape | policy params | response length | ours s/update | trl 1.12.0 s/update | ours / trl | ours gen / score / train % | trl gen / score / train % | updates (warm-up + timed) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Seconds per update: the median over the timed updates (pooled over {s["rounds"]} alternating
round(s)). Shares (median per update): *gen* = inside the sampler (ours:
`stages.ppo.rollout.sample_completions`; trl: its `batch_generation`, i.e. `model.generate`),
*score* = the no-grad reference / value / reward forwards of the rollout (ours:
`PPORoles.score_rollout`; trl: its `forward` and `get_reward` helpers), *train* = the rest of
the update (advantages, {s["num_ppo_epochs"]} PPO epochs of forward + backward + AdamW,
metrics, and trl's `gc.collect()` / `empty_cache()`). Both sides are timed by wrapping those
functions from the outside; trl is not edited.

![seconds per update vs parameters](ppo_scaling.png)

## Generation: sampled tokens/s

| shape | policy params | new tokens | ours `sample_completions` | ours `generate_ids` | plain `model.generate` | ours / plain |
|---|---|---|---|---|---|---|
{chr(10).join(gen_rows)}

{s["batch_prompts"]} prompts, temperature {s["temperature"]}, no top-k / top-p, KV cache, fp32.
Every row produces the full number of tokens: `sample_completions` with no stop token, plain
`model.generate` with `min_new_tokens = max_new_tokens`. `generate_ids` (the sampling path of
pairs and evaluation) keeps its EOS stop; its tokens are counted as batch x longest reply.
Median tokens/s of the timed calls after one warm-up call.

## Machine
- CPU: {m["cpu"]}, {m["logical_cores"]} logical cores, torch threads {m["torch_threads"]}
- python {m["python"]}, torch {m["torch"]}
- 1-minute load average before/after: {m["loadavg_1m_before_after"]}

## Settings (identical for both)
{shapes}
- random-init Llama, separate policy / reference / reward / value models, fp32, 256 positions
- {s["batch_prompts"]} prompts per update (4-12 tokens, ids drawn from the whole vocab),
  {s["num_ppo_epochs"]} PPO epochs, {s["num_minibatches"]} minibatch, stop at EOS, missing-EOS
  penalty {s["missing_eos_penalty"]}, temperature {s["temperature"]}, kl_coef {s["kl_coef"]},
  lr {s["learning_rate"]}, no grad clipping
"""


if __name__ == "__main__":
    main()
