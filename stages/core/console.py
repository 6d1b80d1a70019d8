"""What a stage run prints: our lines, and no third-party noise the user can do nothing about.

Called first thing by the CLI, before torch / transformers / bitsandbytes / tqdm are imported
(their import-time settings are read from the environment then). Causes we own are fixed
where they arise (tied weights on resume in ``models.py``, the ``cache`` argument of our
KV-cached rollout); what is left here is silenced narrowly, by logger and message, each
with the reason the user cannot act on it. Light to import: no torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    """A third-party log record we drop: its logger, how its message starts, and why."""

    logger: str
    message_start: str
    why: str


NOISE = (
    Noise(
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
        "logged at every start because peft (imported by transformers) imports bitsandbytes "
        "even for peft=none; the optional AVX512-BF16 kernel it names is fetched from the hub, "
        "so `pip install kernels` cannot help offline, and without it bitsandbytes uses its "
        "own compiled CPU kernel (trained 4-bit layers switch that path off anyway: "
        "models.keep_4bit_backward)",
    ),
)


@dataclass(frozen=True)
class NoisyWarning:
    """A third-party Python warning we ignore: category, message start, issuing module, why."""

    category: type[Warning]
    message_start: str
    module: str
    why: str


NOISY_WARNINGS = (
    NoisyWarning(
        FutureWarning,
        "`is_gradient_checkpointing` is deprecated",
        "transformers.modeling_utils",
        "trl 1.16 (DPOTrainer's reference pass) and peft 0.21 (get_peft_model) read this "
        "deprecated transformers property themselves; nothing in our code or config does",
    ),
)


class DropMessages(logging.Filter):
    """Drops records of one logger whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet_console() -> None:
    """Install the filters and progress-bar settings for this process (idempotent)."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for noise in NOISE:
        by_logger[noise.logger] = (*by_logger.get(noise.logger, ()), noise.message_start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(starts))
    for noisy in NOISY_WARNINGS:
        warnings.filterwarnings(
            "ignore",
            message=re.escape(noisy.message_start),
            category=noisy.category,
            module=re.escape(noisy.module),
        )
    # TRL's four dataset passes (tokenize, labels, truncate, drop masked) take seconds; the
    # stage logs rows read / kept / dropped instead of four bars.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not sys.stderr.isatty():
        # In a log file a bar is hundreds of \r-joined redraws: the step lines carry progress
        # there. Weight loading / saving bars go; our own bars (eval, pairs, PPO) redraw at
        # most once a minute, a heartbeat rather than a flood.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_MININTERVAL", "60")
