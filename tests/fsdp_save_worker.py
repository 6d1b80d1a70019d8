"""One rank of tests/test_scaleout.py's FSDP save test, run by `torchrun --nproc_per_node 2`.

Each CPU rank (gloo) loads the SFT stage's model, shards it with torch's FSDP2
(``fully_shard``: each rank keeps half of every parameter), trains a few steps, generates
greedily (every rank runs the same forwards, as a stage's evaluation would), then saves it
through ``StageRun.save_final`` + ``finish``: the path a stage takes. Rank 0 also writes what
it gathered, the initial weights and its replies, for the test to compare with final/.

Why torch directly and not `accelerate launch`: accelerate 1.15 builds FSDP only on GPUs (on
CPU it runs plain DDP), which is why ``StageRun.begin`` refuses FSDP on CPU. So this builds
the ``StageRun`` without ``begin`` and sets what `accelerate launch` with fsdp.yaml sets
(``ACCELERATE_USE_FSDP``), so the lifecycle saves collectively as it would under FSDP.

Each rank gets its own ``paths.runs_root``: anything rank 1 wrote would appear under its own
root, which the test checks is never created.

    torchrun --nproc_per_node 2 -m tests.fsdp_save_worker OUT_DIR BUILTIN_MODELS_DIR PEFT

PEFT ``none`` saves with ``models.save_final`` (SFT, RM); ``lora`` with
``reference_policy.save_without_reference`` (DPO, KTO, GRPO, RLOO), an adapter on the base.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch.distributed.fsdp import fully_shard

from stages.core.lifecycle import StageRun
from stages.core.models import load_tokenizer, resolve_base_model, save_final
from stages.core.reference_policy import save_without_reference
from stages.core.schema import validate_config
from stages.core.sharded_weights import full_state_dict_for_save, holds_sharded_weights
from stages.core.stage_steps import trainable_model
from tests.conftest import CONF_DIR, FAST

TRAIN_STEPS = 3
PROMPT = "What is 12 + 30?"


def main(out: Path, builtin: Path, peft: str) -> None:
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # as `accelerate launch` with fsdp.yaml
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    overrides = [
        "stage=sft", f"paths.runs_root={out / f'runs-rank{rank}'}",
        f"paths.builtin_models={builtin}", *FAST, f"peft={peft}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=overrides)
    stage = StageRun(validate_config(raw), raw)
    c = stage.cfg
    torch.manual_seed(c.seed)
    with stage:
        tokenizer = load_tokenizer(resolve_base_model(c.model, c.paths).path, c.model)
        loaded = trainable_model(stage)
        model = loaded.model
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        causal_lm = model.get_base_model() if peft != "none" else model
        for layer in causal_lm.model.layers:  # one shard unit per decoder layer, as fsdp.yaml
            fully_shard(layer)
        fully_shard(model)
        assert holds_sharded_weights(model)
        local = next(iter(model.parameters())).to_local()

        # A few steps on the same seeded batch on both ranks: the weights move away from init.
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-2)
        ids = torch.randint(
            3, tokenizer.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0)
        )
        losses = []
        for _ in range(TRAIN_STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())

        # Evaluation on the sharded model: greedy replies, the same forwards on every rank.
        model.eval()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        # A PeftModel's generate() calls its base model's, skipping the FSDP root's forward
        # hook: without unshard() the embedding is still a DTensor shard ("aten.embedding.default
        # got mixed torch.Tensor and DTensor"). The decoder layers unshard in their own hooks.
        if peft != "none":
            model.unshard()
        with torch.no_grad():
            reply = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        if peft != "none":
            model.reshard()

        gathered = full_state_dict_for_save(model)  # collective: rank 0 gets the full copy
        stage.save_final(
            kind=loaded.kind,
            base_model=loaded.base.as_dict(),
            train_metrics={"train/loss": losses[-1]},
            save=(
                (lambda final_dir: save_final(loaded, tokenizer, final_dir, model=model))
                if peft == "none"
                else save_without_reference(loaded, tokenizer, SimpleNamespace(model=model))
            ),
        )
        stage.finish(metrics={"train/loss": losses[-1]}, data={})
    if rank == 0:
        torch.save(initial, out / "initial.pt")
        torch.save(gathered, out / "gathered.pt")
        report = {
            "run_dir": str(stage.run_dir),
            "local_shape": list(local.shape),
            "losses": losses,
            "reply": reply[0].tolist(),
            "prompt": prompt["input_ids"][0].tolist(),
        }
        (out / "rank0.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
