"""Can this machine load ``model.name_or_path``? Answered in about a second, before torch.

from_pretrained on a hub id without network retries for minutes and ends in a traceback
that never names the model; a mistyped local path is taken for a hub id. This module checks
first and says which fix applies. Light to import (huggingface_hub only, lazily), so the CLI
can run it while validating the config, before any run directory exists.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from stages.core.schema import ConfigError


class ModelSourceError(ConfigError):
    """model.name_or_path cannot be loaded here (no such directory, not on the hub, or the hub
    unreachable and no cached copy); the message names the id and the fixes."""


def _looks_like_a_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a directory on this machine.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


@functools.lru_cache(maxsize=16)
def check_model_source(name: str, revision: str | None) -> None:
    """Fail in about a second, naming the model and the fixes, where from_pretrained would
    retry the hub for minutes and end in a traceback that never names the model.

    A local directory must hold a saved model; a hub id must be in the local HF cache
    (HF_HUB_OFFLINE=1) or answer one metadata request (no retries).
    """
    key = f"model.name_or_path={name!r}"
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelSourceError(
                f"{key}: {local.resolve()} has no config.json, so it is not a saved model. "
                "Point it at a directory written by save_pretrained (a run's final/ works)."
            )
        return
    if _looks_like_a_path(name):
        raise ModelSourceError(
            f"{key}: no such directory ({local.resolve()}). Point model.name_or_path at a "
            "directory written by save_pretrained, or at a hub id such as "
            "Qwen/Qwen2.5-0.5B-Instruct."
        )
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    at = f"@{revision}" if revision else ""
    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    local_fix = (
        f"or copy it to a directory (`hf download {name} --local-dir <dir>` where there is "
        "network) and run with model.name_or_path=<dir>"
    )
    if constants.HF_HUB_OFFLINE:
        if cached:
            return
        raise ModelSourceError(
            f"{key}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            "HF_HUB_OFFLINE=1 forbids downloading it. Run once with network (unset "
            f"HF_HUB_OFFLINE) to cache it, {local_fix}."
        )
    try:
        model_info(name, revision=revision, timeout=10)
    except RevisionNotFoundError:
        raise ModelSourceError(
            f"model.revision={revision!r}: {name} has no such branch, tag or commit on the hub."
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{key}: no such model on the hub, or it is private or gated for you. Check the "
            "id; for a gated or private model accept its licence and run `hf auth login`."
        ) from None
    except Exception as exc:  # any transport failure: the hub is unreachable from here
        fix = (
            "a copy is in the local cache: run with HF_HUB_OFFLINE=1 to use it"
            if cached
            else f"there is no cached copy: run where the hub is reachable to cache it, {local_fix}"
        )
        raise ModelSourceError(
            f"{key}{at}: cannot reach the Hugging Face hub ({type(exc).__name__}: {exc}); {fix}."
        ) from None


# Config keys that name a model's number of positions (GPT-2 style configs use n_positions);
# also read from loaded configs by stages.core.generation.context_length.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def check_training_length_fits(name: str, revision: str | None, max_length: int) -> None:
    """model.max_length must fit the model's positions: a longer training row runs past a
    learned position table (IndexError mid-training). Reads config.json of a local dir or of
    the cached hub copy; a model we cannot read yet is checked by the loader instead."""
    local = Path(name).expanduser()
    config_file: Path | None = local / "config.json" if local.is_dir() else None
    if config_file is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None or not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)  # multimodal configs nest the LM's
    context = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), None)
    if context is not None and max_length > context:
        raise ConfigError(
            f"model.max_length={max_length} is longer than the {context} positions of "
            f"{name}: set model.max_length<={context} (and model.max_prompt_length + "
            f"model.max_new_tokens <= {context} for generation)."
        )
