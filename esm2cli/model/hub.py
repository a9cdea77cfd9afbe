"""The Hugging Face hub: weights fetched once (into its cache or a folder), and offline runs that fail at once.

A model already in the cache is loaded from there without contacting the hub. One that is not is
downloaded after one quick request to the hub (no retries): offline (HF_HUB_OFFLINE=1) or when the hub
cannot be reached, the run stops at once with one message saying how to get the weights there.
Settings (HF_HUB_OFFLINE, HF_ENDPOINT, HF_HOME, HF_HUB_CACHE) are read when used, not at import.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from esm2cli.errors import ModelLoadError

log = logging.getLogger(__name__)

# What an encoder needs from a model repository; one weights format, not every format the repo offers.
_META = ["config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "tokenizer.json"]
# One weights format, each as: the single file, the index of a sharded set, the shards.
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
_PYTORCH = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
_PROBE_TIMEOUT_S = 10.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_repo_id(name: str) -> bool:
    """True for an owner/name hub id that is not also a local path."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, as huggingface_hub reads it."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return env.upper() in _TRUE if env is not None else bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT, else huggingface_hub's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The hub cache: HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _complete(folder: Path, weights: list[str] | None = None) -> bool:
    """True when a folder holds a config and weights (in the given format; else in either)."""
    formats = [weights] if weights else [_SAFETENSORS, _PYTORCH]
    return (folder / "config.json").is_file() and any(
        (folder / single).is_file() or (folder / index).is_file() for single, index, _ in formats
    )


def cached(repo_id: str) -> Path | None:
    """The snapshot folder of a hub model in the cache, when it holds a config and weights; else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # One format at a time: the cache is complete for what was fetched, not for every file of the repo.
    for weights in (_SAFETENSORS, _PYTORCH):
        try:
            folder = Path(
                snapshot_download(repo_id, cache_dir=cache_dir(), local_files_only=True, allow_patterns=_META + weights)
            )
        except (LocalEntryNotFoundError, OSError, ValueError):
            continue
        if _complete(folder, weights):
            return folder
    return None


def _get_it_there(repo_id: str, alias: str | None) -> str:
    name = alias or repo_id
    return (
        f"on a machine with internet access run `esm2cli download {name}` (with the same HF_HOME, "
        f"or --to DIR on a shared volume and then -m DIR/{repo_id.split('/')[-1]})"
    )


def not_available(repo_id: str, reason: str, alias: str | None = None) -> ModelLoadError:
    """The one error for a model that is not cached and cannot be downloaded now."""
    return ModelLoadError(
        f"{repo_id} is not in the Hugging Face cache ({cache_dir()}) and {reason}: {_get_it_there(repo_id, alias)}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _probe(repo_id: str, alias: str | None) -> list[str]:
    """One request to the hub, no retries: the repository's files, or an error saying why not.

    Raises:
        ModelLoadError: Offline, unreachable, no such repository, or access denied.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if offline():
        raise not_available(repo_id, "HF_HUB_OFFLINE=1 is set", alias)
    try:
        info = HfApi(endpoint=endpoint()).model_info(repo_id, timeout=_PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelLoadError(f"{repo_id} is gated on the hub: accept its terms and log in (HF_TOKEN)") from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"{repo_id}: no such model on the Hugging Face hub ({endpoint()})") from exc
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"{repo_id}: the hub answered {_first_line(exc)}") from exc
    except Exception as exc:  # connection refused, DNS, timeouts, TLS: the hub cannot be reached
        reason = f"the hub cannot be reached at {endpoint()} ({_first_line(exc)})"
        raise not_available(repo_id, reason, alias) from exc
    return [s.rfilename for s in info.siblings or []]


def _patterns(files: list[str]) -> list[str]:
    from fnmatch import fnmatch

    weights = _SAFETENSORS if any(fnmatch(f, p) for f in files for p in _SAFETENSORS) else _PYTORCH
    return _META + weights


def fetch(repo_id: str, to: str | os.PathLike | None = None, alias: str | None = None) -> Path:
    """Downloads a hub model's config, tokenizer and one set of weights, once.

    Args:
        repo_id: The hub id (facebook/esm2_t33_650M_UR50D).
        to: A folder to put the model folder in (``to/<name>``, for a shared volume); None: the hub cache.
        alias: The name the user typed, for the messages.

    Returns:
        The local folder that holds the model (a cache snapshot, or ``to/<name>``).

    Raises:
        ModelLoadError: Offline, unreachable, no such model, or the download failed.
    """
    from huggingface_hub import snapshot_download

    patterns = _patterns(_probe(repo_id, alias))
    local_dir = Path(to).expanduser() / repo_id.split("/")[-1] if to is not None else None
    log.info("downloading %s from %s into %s", repo_id, endpoint(), local_dir or cache_dir())
    try:
        folder = snapshot_download(
            repo_id, cache_dir=cache_dir(), local_dir=local_dir, allow_patterns=patterns, endpoint=endpoint()
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot download {repo_id} from {endpoint()}: {_first_line(exc)}") from exc
    if not _complete(Path(folder)):
        raise ModelLoadError(f"{repo_id} on the hub has no config.json and weights esm2cli can load")
    return Path(folder)


def model_folder(repo_id: str, alias: str | None = None) -> Path:
    """The local folder of a hub model: from the cache without contacting the hub, else downloaded once.

    Raises:
        ModelLoadError: Not cached, and offline or the hub cannot be reached (one message, at once).
    """
    if (folder := cached(repo_id)) is not None:
        log.debug("%s from the cache: %s", repo_id, folder)
        return folder
    return fetch(repo_id, alias=alias)


def download(repo_id: str, to: str | os.PathLike | None = None, alias: str | None = None) -> Path:
    """``esm2cli download``: fetches a model once; offline, a copy already there is enough.

    Returns:
        The local folder of the model.

    Raises:
        ModelLoadError: Offline or unreachable and not there yet, no such model, or the download failed.
    """
    if offline():
        there = cached(repo_id) if to is None else Path(to).expanduser() / repo_id.split("/")[-1]
        if there is not None and _complete(there):
            return there
    return fetch(repo_id, to, alias)
