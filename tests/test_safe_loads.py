"""Safe loads: a planted pickle in a PPO checkpoint must never run, and no code path loads
checkpoints with a full unpickler (``torch.load(weights_only=False)``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from stages.core.handoff import HandoffError
from stages.ppo import PPOTrainer
from stages.ppo.trainer import (
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    UnsafeCheckpointError,
)
from tests.test_ppo_trainer import EOS, PAD, comparable, full_weight_roles, hyperparams, prompts

REPO = Path(__file__).resolve().parents[1]


class TouchOnUnpickle:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def make_trainer() -> PPOTrainer:
    return PPOTrainer(
        hyperparams(total_updates=3),
        full_weight_roles(),
        prompts(),
        pad_token_id=PAD,
        eos_token_id=EOS,
    )


@pytest.mark.parametrize("planted", [RNG_FILE, OPTIMIZER_FILE, SCHEDULER_FILE])
def test_planted_pickle_in_a_ppo_checkpoint_never_runs(tmp_path: Path, planted: str) -> None:
    trainer = make_trainer()
    trainer.train(num_updates=1)
    checkpoint = trainer.save_checkpoint(tmp_path / "checkpoint-1")
    marker = tmp_path / "payload-ran"
    torch.save([TouchOnUnpickle(marker)], checkpoint / planted)

    with pytest.raises(UnsafeCheckpointError) as raised:
        make_trainer().load_checkpoint(checkpoint)

    assert not marker.exists(), "the planted pickle executed on resume"
    message = str(raised.value)
    assert str(checkpoint / planted) in message and "force=true" in message
    assert isinstance(raised.value, HandoffError)  # the CLI prints it as a clean error


def test_checkpoint_files_hold_only_tensors_and_plain_values(tmp_path: Path) -> None:
    """Our own checkpoints load under weights_only=True and still resume exactly."""
    uninterrupted = make_trainer()
    uninterrupted.train(num_updates=1)
    checkpoint = uninterrupted.save_checkpoint(tmp_path / "checkpoint-1")
    for name in (RNG_FILE, OPTIMIZER_FILE, SCHEDULER_FILE):
        torch.load(checkpoint / name, weights_only=True)  # raises if anything else is inside
    expected = comparable(uninterrupted.update())

    resumed = make_trainer()
    resumed.load_checkpoint(checkpoint)
    assert comparable(resumed.update()) == expected


def test_no_full_unpickling_torch_load_in_the_code() -> None:
    pattern = re.compile(r"weights_only\s*=\s*False")
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("stages", "data_recipes", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
