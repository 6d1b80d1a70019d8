"""Sweep jobs: give each Hydra multirun job its own run dir, W&B run, group and tags.

Owns the mapping from a Hydra multirun job to our config, applied by `stages.__main__` before
the stage runs (so ``run(cfg)`` stays a pure function of its config, which tests call
directly):

- ``paths.variant``  = the job's ``hydra.job.override_dirname`` made filesystem-safe, so the
  job lands in ``runs/<exp>/<stage>/<variant>/`` and two jobs with different overrides never
  share a directory (the same overrides twice are the same run: a no-op unless force=true).
  Keys that do not change *what* is trained (stage, experiment, tracking, paths, ...) are
  excluded by ``hydra.job.config.override_dirname.exclude_keys`` in conf/config.yaml.
- ``tracking.group`` = the sweep: kept if the sweep file (or the command line) names one,
  else ``<experiment>-<stage>-sweep``;
- ``tracking.tags``  += the job's overrides (one tag each), so W&B can filter and group by them.

Parents are still resolved from ``runs/<exp>/<parent>/`` (no variant), so every job of a sweep
starts from the same parent checkpoint. Outside multirun nothing changes, and a job given
``paths.variant=...`` on the command line keeps it: ``paths.variant=`` makes a one-job
multirun (a stage sent to Slurm) a plain run of its stage, in the dir and W&B group that
later stages and the experiment use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

from omegaconf import DictConfig, open_dict

# W&B rejects tags longer than 64 characters.
WANDB_TAG_MAX = 64
# One path component must stay well below the usual 255-byte filename limit.
VARIANT_MAX = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")


def safe_variant(override_dirname: str, overrides: Sequence[str] = ()) -> str:
    """A directory name from Hydra's ``k=v,k2=v2`` override string ("" stays "").

    Characters outside ``[A-Za-z0-9._,=+-]`` (``/``, spaces, braces, quotes, ...) become
    ``_`` and the name gets a hash of the original appended, so two override sets never
    collide. A name too long for one path component (many constant overrides, e.g. the tiny
    settings of a test) keeps every *value* but only the last part of each key
    (``data.pairs.num_prompts=32`` -> ``num_prompts=32``), is cut if still too long, and
    ends with the hash.
    """
    if not override_dirname:
        return ""  # only excluded keys differ (e.g. `-m stage=sft,dpo`): the plain stage dirs
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:12]
    name = _UNSAFE.sub("_", override_dirname)
    if name != override_dirname:
        name = f"{name}-{digest}"
    if len(name) <= VARIANT_MAX:
        return name
    if overrides:
        short = []
        for override in overrides:
            key, sep, value = override.partition("=")
            short.append(f"{key.rsplit('.', 1)[-1].lstrip('+~')}{sep}{value}")
        name = _UNSAFE.sub("_", ",".join(short))
    return f"{name[: VARIANT_MAX - len(digest) - 1]}-{digest}"


def override_tags(overrides: Sequence[str]) -> list[str]:
    """One W&B tag per override (``stage.beta=0.1``), cut to W&B's 64-character limit."""
    return [o if len(o) <= WANDB_TAG_MAX else o[: WANDB_TAG_MAX - 1] + "~" for o in overrides]


def default_group(experiment: str, stage: str) -> str:
    return f"{experiment}-{stage}-sweep"


def apply_sweep_job(
    cfg: DictConfig,
    *,
    override_dirname: str,
    overrides: Sequence[str],
    keep_variant: bool = False,
) -> DictConfig:
    """Return a copy of ``cfg`` set up as one sweep job (see the module docstring).

    ``overrides`` are the job's overrides already filtered like ``override_dirname`` (what
    distinguishes this job). ``keep_variant``: paths.variant was given on the command line
    (``paths.variant=`` puts a one-job multirun, e.g. a stage sent to Slurm, in the plain
    stage dir that later stages read as their parent). Pure: tests call it without Hydra.
    """
    out = cfg.copy()
    with open_dict(out):
        if not keep_variant and not out.paths.get("variant"):
            out.paths.variant = safe_variant(override_dirname, overrides)
        if not keep_variant and not out.tracking.get("group"):
            out.tracking.group = default_group(out.experiment_name, out.stage.name)
        tags = list(out.tracking.get("tags") or [])
        out.tracking.tags = tags + [t for t in override_tags(overrides) if t not in tags]
    return out


def from_hydra(cfg: DictConfig) -> DictConfig:
    """In a Hydra multirun job: ``apply_sweep_job`` with this job's overrides; else ``cfg``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return cfg
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cfg
    task = list(hydra_cfg.overrides.task)
    return apply_sweep_job(
        cfg,
        override_dirname=hydra_cfg.job.override_dirname,
        overrides=job_overrides(task, hydra_cfg.job.config.override_dirname.exclude_keys),
        keep_variant="paths.variant" in _keys(task),
    )


def _keys(overrides: Sequence[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}


def job_overrides(overrides: Sequence[str], exclude_keys: Sequence[str]) -> list[str]:
    """The overrides that name this job, filtered exactly as Hydra builds override_dirname."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return sorted(str(o.input_line) for o in parsed if o.key_or_group not in set(exclude_keys))
