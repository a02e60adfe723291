"""Where `--model` points: a GGUF file, a model directory, or a Hugging Face hub id (org/name).

A hub id is resolved as mlx_lm.server resolves it: through the Hugging Face cache (HF_HUB_CACHE /
HF_HOME; HF_HUB_OFFLINE=1 keeps it to the cache), downloaded with huggingface_hub's progress bars
when it is not cached and the network allows, the files mlx-lm's own loader fetches. No mlx import
here: the settings check and the CLI use it before the engine starts.
"""

from __future__ import annotations

import os
import re

# org/name as the hub spells them (no leading '.' or '-', no '..'); "./x.gguf" or "a/b.gguf" stays a path
HUB_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*(?<!\.gguf)$")
ACCEPTED = ("--model takes a GGUF file, a model directory (mlx-lm or Hugging Face format) or a Hugging Face "
            "hub id (org/name) that is in the Hugging Face cache or can be downloaded")
# The files mlx-lm's loader downloads (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS; a test keeps them equal),
# not imported from there: that would import mlx and transformers into the CLI before the server starts.
ALLOW_PATTERNS = ("*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                  "*.txt", "*.jsonl", "*.jinja")


class ModelSourceError(ValueError):
    """--model names nothing that can be loaded; the message names the accepted forms."""


def is_hub_id(model: str) -> bool:
    """org/name that is not an existing local path (a local path always wins, as in mlx-lm)."""
    return bool(HUB_ID.match(model)) and not os.path.exists(model)


def check_model_arg(model: str) -> None:
    """Cheap check for the settings: an existing path or something shaped like a hub id."""
    if not os.path.exists(model) and not HUB_ID.match(model):
        raise ModelSourceError(f"model path {model!r} does not exist and is not a hub id (org/name); {ACCEPTED}")


def resolve_hub_model(repo_id: str) -> str:
    """The local snapshot directory of hub model `repo_id`: from the cache, else downloaded (with
    progress bars) unless HF_HUB_OFFLINE is set or the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=list(ALLOW_PATTERNS))
    except LocalEntryNotFoundError as exc:  # not cached, and offline or the hub unreachable
        raise ModelSourceError(f"model {repo_id!r} is not in the Hugging Face cache ({_cache_dir()}) and "
                               f"{_why_no_download(exc)}; {ACCEPTED}") from None
    except (HfHubHTTPError, ValueError) as exc:  # no such repo, gated, a bad revision
        raise ModelSourceError(f"model {repo_id!r} could not be fetched from the Hugging Face hub "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0]}); {ACCEPTED}") from None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _why_no_download(exc: Exception) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so nothing is downloaded"
    return f"could not be downloaded ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
