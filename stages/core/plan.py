"""`dry_run=true`: what a stage run would do, without doing any of it.

Validates the config, resolves the parents through their manifests (no weights), opens the
data files (exist, format detected on the first rows) and prints the plan: stage, run dir,
fresh / resume from checkpoint-N / already DONE, parents + manifest sha, base model, peft,
data sources. Loads no weights, imports no torch, creates no directory.

Exit status (``Plan.exit_status``): 0 when the real run would start (or be a DONE no-op), 2
when it would stop at start, like any user error (a parent missing or unfinished, a data file
that fits no format); the plan then names what blocks it and the command to run first.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from stages.core import handoff
from stages.core.handoff import HandoffError
from stages.core.schema import Config, validate_config

FIRST_ROWS = 3  # rows read per data file to detect its format


class DryRunBlocked(HandoffError):
    """A dry run found that the real run would stop at start (the message says why)."""


@dataclass
class Plan:
    """The printed plan (``lines``) and what would stop the real run (``blockers``)."""

    stage: str
    run_dir: Path
    state: str
    lines: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)
    # Parent stages not finished yet, e.g. ["sft"]: the README test accepts those that an
    # earlier command of the same chain would produce.
    missing_parents: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 2 if self.blockers else 0

    def render(self) -> str:
        text = [f"alignpipe dry run: stage {self.stage} (no weights loaded, nothing written)"]
        text += [f"  {line}" for line in self.lines]
        if self.blockers:
            text.append("It would stop at start:")
            text += [f"  - {line}" for line in self.blockers]
        else:
            text.append("Ready: the same command without dry_run=true runs it.")
        return "\n".join(text)


def build_plan(raw: DictConfig, overrides: list[str] | None = None) -> Plan:
    """The plan for one composed config; ``overrides`` (the command line) shape the hints."""
    cfg = validate_config(raw)
    stage = cfg.stage.name
    variant = cfg.stage.run_variant(cfg.paths.variant)
    run_dir = handoff.stage_dir(cfg.paths.runs_root, cfg.experiment_name, stage, variant)
    plan = Plan(stage=stage, run_dir=run_dir, state=_state(cfg, run_dir))
    plan.lines += [
        f"run dir:    {run_dir} ({plan.state})",
        f"base model: {cfg.model.name_or_path}"
        + (f" @ {cfg.model.revision}" if cfg.model.revision else ""),
        f"peft:       {cfg.peft.method}"
        + (f" on a {cfg.peft.quantize} base" if cfg.peft.quantize != "none" else "")
        + f", precision={cfg.precision}, seed={cfg.seed}",
    ]
    for parent in _parents_of(cfg):
        _add_parent(plan, cfg, parent, overrides)
    _add_data(plan, cfg)
    return plan


def check_startable(raw: DictConfig, overrides: list[str]) -> None:
    """Before a real run starts (and before anything is written): a parent that is missing or
    unfinished fails now with its command, a data file whose first rows fit no format now
    with file:row. Only the cheap checks: a finished parent's fingerprints are verified by
    the stage itself, so its weights are hashed once."""
    cfg = validate_config(raw)
    from data_recipes.rows import iter_rows
    from stages.core.schema import data_files_needed

    for key, path in data_files_needed(cfg):
        _detect_format(key, Path(str(path)), _format_of(cfg, key), iter_rows, stage=cfg.stage.name)
    for parent in _parents_of(cfg):
        run_dir = handoff.stage_dir(cfg.paths.runs_root, cfg.experiment_name, parent)
        if not handoff.is_done(run_dir):
            with handoff.invoked_with(overrides):  # raises naming the command to run first
                handoff.resolve_parent(
                    cfg.paths.runs_root, cfg.experiment_name, parent, child=cfg.stage.name
                )
        elif parent == cfg.stage.parent and (problem := _parent_adapter_problem(cfg, run_dir)):
            raise HandoffError(problem)


def _parent_adapter_problem(cfg: Config, parent_dir: Path) -> str | None:
    """A parent adapter this stage cannot continue (or merge) with its peft.method: from the
    parent's manifest, before any weights load (stages.core.schema.parent_adapter_problem)."""
    import json

    from stages.core.schema import parent_adapter_problem
    from stages.core.stage_spec import stage_spec

    spec = stage_spec(cfg.stage.name)
    if spec is None or not spec.trains or cfg.peft.method == "none":
        return None
    kind = json.loads((parent_dir / handoff.MANIFEST).read_text()).get("kind", "full")
    continues = cfg.stage.parent_adapter == "continue"
    return parent_adapter_problem(
        cfg.stage.name, cfg.stage.parent, kind, cfg.peft.method if continues else None
    )


def _state(cfg: Config, run_dir: Path) -> str:
    if handoff.is_done(run_dir):
        return "re-run from scratch: force=true" if cfg.force else "already DONE: a no-op"
    if cfg.force:
        return "fresh (force=true)"
    checkpoint = handoff.last_complete_checkpoint(run_dir)
    return f"resume from {checkpoint.name}" if checkpoint else "fresh"


def _parents_of(cfg: Config) -> list[str]:
    from stages.core.stage_spec import stage_spec
    from stages.core.task import JUDGE_REWARD_STAGE

    spec = stage_spec(cfg.stage.name)
    parents = [cfg.stage.parent] if cfg.stage.parent else []
    reward = getattr(cfg.stage, "reward_stage", None)  # PPO scores with this RM stage
    if reward:
        parents.append(reward)
    if getattr(cfg.stage, "reward", None) == "rm":  # GRPO / RLOO rewarded by this RM stage
        parents.append(JUDGE_REWARD_STAGE)
    target = getattr(cfg.stage, "target", None)  # eval compares this stage with its parent
    if target:
        parents.append(target)
    is_judge = cfg.stage.name == JUDGE_REWARD_STAGE
    if (
        spec is not None
        and "pairs" in spec.reads
        and not is_judge
        and (cfg.data.pairs.source == "on_policy" and cfg.data.pairs.judge == "reward_model")
    ):
        parents.append(JUDGE_REWARD_STAGE)  # its pairs are judged by this experiment's RM
    compares = spec is not None and (spec.parent == "policy" or not spec.trains)
    if compares and not is_judge and cfg.data.task_source() == "file":
        parents.append(JUDGE_REWARD_STAGE)  # the user's task is judged by the experiment's RM
    return list(dict.fromkeys(parents))


def _add_parent(plan: Plan, cfg: Config, parent: str, overrides: list[str] | None) -> None:
    try:
        # Its hint keeps the user's overrides (under Hydra, make_target reads them itself).
        hints = handoff.invoked_with(overrides) if overrides is not None else nullcontext()
        with hints:
            found = handoff.resolve_parent(
                cfg.paths.runs_root, cfg.experiment_name, parent, child=cfg.stage.name
            )
    except HandoffError as err:
        plan.lines.append(f"parent:     {parent}: NOT READY")
        plan.blockers.append(str(err))
        plan.missing_parents.append(parent)
        return
    plan.lines.append(
        f"parent:     {parent} {found.run_dir} (manifest sha256 {found.manifest_sha256[:12]}, "
        f"{found.kind})"
    )
    if parent == cfg.stage.parent and (problem := _parent_adapter_problem(cfg, found.run_dir)):
        plan.blockers.append(problem)


def _add_data(plan: Plan, cfg: Config) -> None:
    from data_recipes.rows import DataFormatError, iter_rows
    from stages.core.stage_spec import stage_spec

    data, stage = cfg.data, cfg.stage.name
    spec = stage_spec(stage)
    reads = spec.reads if spec is not None else ()
    if "sft" in reads:
        if data.sft.source == "toy":
            plan.lines.append(f"data:       toy task, {data.toy.num_train} demonstrations")
    elif ("pairs" in reads or "prompts" in reads) and data.pairs.source == "on_policy":
        pairs = "pairs" in reads
        what = "pairs sampled from the sft policy" if pairs else "prompts"
        judge = f", judged by {data.pairs.judge}" if pairs else ""
        task = "toy task" if data.task_source() == "toy" else f"prompts of {data.prompts.path}:"
        plan.lines.append(f"data:       {task} {what}{judge}")
    elif spec is not None and not spec.trains:
        plan.lines.append(f"data:       {data.toy.num_eval} held-out toy prompts")
    from stages.core.schema import data_files_needed

    for key, path in data_files_needed(cfg):
        try:
            detected = _detect_format(
                key, Path(str(path)), _format_of(cfg, key), iter_rows, stage=stage
            )
        except DataFormatError as err:
            plan.lines.append(f"data:       {key}={path}: UNREADABLE")
            plan.blockers.append(str(err))
            continue
        plan.lines.append(f"data:       {key}={path} (format {detected})")


def _format_of(cfg: Config, key: str) -> str:
    """The format setting of the file at ``key`` (data.sft / data.pairs / data.prompts)."""
    return getattr(cfg.data, key.split(".")[1]).format


def _detect_format(key: str, path: Path, fmt: str, iter_rows, *, stage: str = "") -> str:
    from stages.core.stage_spec import stage_spec

    spec = stage_spec(stage)
    if spec is not None and "labelled" in spec.reads and key == "data.pairs.path":
        from data_recipes.unpaired import LABELLED_FORMAT, is_labelled_file

        if is_labelled_file(path, fmt):
            return LABELLED_FORMAT
    from data_recipes.formats import (
        SFT_FORMATS,
        check_detected,
        detect_sft_format,
        unknown_format_error,
    )
    from data_recipes.preference_formats import PREFERENCE_FORMATS, detect_preference_format
    from data_recipes.prompts import PROMPT_FORMATS, detect_prompt_format

    detect, formats = {
        "data.sft.path": (detect_sft_format, SFT_FORMATS),
        "data.prompts.path": (detect_prompt_format, PROMPT_FORMATS),
    }.get(key, (detect_preference_format, PREFERENCE_FORMATS))
    if fmt != "auto" and fmt not in formats:
        raise unknown_format_error(fmt, formats)
    file_format = None
    for number, row in iter_rows(path):
        found = detect(row) if fmt == "auto" else fmt
        file_format = check_detected(found, file_format, formats, path, number)
        if number >= FIRST_ROWS:
            break
    if file_format is None:
        from data_recipes.rows import DataFormatError

        raise DataFormatError("the file has no rows", path=path, hint="point at a non-empty file")
    return f"{file_format}, detected on the first rows" if fmt == "auto" else file_format
