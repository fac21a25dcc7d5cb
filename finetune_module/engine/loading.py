"""Loading models and tokenizers from a local directory or the Hugging Face Hub, safely.

A model id that is not a local directory is looked up on the hub, unless HF_HUB_OFFLINE is set.
The hub's endpoint is asked first, with a short timeout, whether it answers at all: when it does
not, the model is looked for in the local cache only, so a machine without the hub fails in
seconds (or loads what it has cached) instead of retrying for a minute, or waiting for ever on a
connection that never answers. A local directory never touches the network.
"""

import os
import time
from collections.abc import Callable
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import get_session

from finetune_module.engine.collector import objects_alive_frozen
from finetune_module.errors import ModelNotAvailableError

DEFAULT_MODEL_ID = "google/flan-t5-small"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

TINY_MODEL_HINT = (
    "Pass a local model directory instead (--model-id /path/to/model, or the input model_id); "
    "to try the whole job offline, build a tiny one with "
    "`python -m finetune_module.tiny_model ./tiny-t5` and use --model-id ./tiny-t5."
)


#: How long the hub's endpoint may take to answer before the cache is used instead.
HUB_PROBE_TIMEOUT_S = 5.0
#: How long the answer (or the silence) is remembered: one run loads several times.
HUB_PROBE_MEMORY_S = 60.0
_hub_answers: dict[str, tuple[float, bool]] = {}  # endpoint -> (when asked, answered)


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off here (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE
    set to 1, true, yes or on)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_answers(endpoint: str | None = None) -> bool:
    """Whether the hub's endpoint (HF_ENDPOINT, default https://huggingface.co) answers a HEAD
    request within HUB_PROBE_TIMEOUT_S, through huggingface_hub's own HTTP client (its proxies
    and certificates). Any HTTP status is an answer. Remembered for HUB_PROBE_MEMORY_S."""
    endpoint = endpoint or hub_constants.ENDPOINT
    now = time.monotonic()
    asked = _hub_answers.get(endpoint)
    if asked is not None and now - asked[0] < HUB_PROBE_MEMORY_S:
        return asked[1]
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
        answered = True
    except Exception:  # whatever the HTTP client raises (timeout, refused, no DNS, proxy, TLS)
        answered = False
    _hub_answers[endpoint] = (now, answered)
    return answered


def resolve_model_id(model_id: str) -> str:
    """A local directory as an absolute path (so saved adapters find it again); a hub id as is."""
    if os.path.isdir(model_id):
        return os.path.abspath(model_id)
    if model_id.startswith((".", "/", "~")) or os.sep + os.sep in model_id:
        raise ModelNotAvailableError(f"Model directory {model_id!r} does not exist.")
    return model_id


def _one_line(error: Exception) -> str:
    """The error's message on one line, without a final full stop."""
    return " ".join(str(error).split()).rstrip(".")


def load_pretrained(loader: Callable[..., Any], model_id: str, **kwargs: Any) -> Any:
    """`loader(model_id, **kwargs)` (a `from_pretrained`), with one clear error when it fails.

    Only safetensors weights are loaded, and remote code only when the caller asks for it. A
    hub id is looked for in the local cache only when the hub does not answer (`hub_answers`).
    """
    model_id = resolve_model_id(model_id)
    silent_hub = not os.path.isdir(model_id) and not hub_offline() and not hub_answers()
    if silent_hub:
        kwargs["local_files_only"] = True
    try:
        with objects_alive_frozen():  # a tokenizer's vocabulary: objects by the thousand
            return loader(model_id, **kwargs)
    except ValueError as e:  # e.g. custom code that trust_remote_code=False refuses to run
        raise ModelNotAvailableError(f"Could not load {model_id!r}: {_one_line(e)}.") from e
    except OSError as e:
        if os.path.isdir(model_id):
            pickled = sorted(n for n in os.listdir(model_id) if n.endswith(PICKLE_SUFFIXES))
            never = (
                f" It has {', '.join(pickled)}: pickle weights are never loaded; save the model "
                "again with save_pretrained (safetensors is its default)."
                if pickled
                else ""
            )
            raise ModelNotAvailableError(
                f"Could not load the model in {model_id!r}: {_one_line(e)}. It must hold a "
                "Hugging Face model saved with save_pretrained (config.json, model.safetensors, "
                f"tokenizer files).{never}"
            ) from e
        if hub_offline():
            reason = (
                "the Hugging Face Hub is switched off here (HF_HUB_OFFLINE is set) and it is not "
                "in the local cache"
            )
        elif silent_hub:
            reason = (
                f"the Hugging Face Hub ({hub_constants.ENDPOINT}) did not answer within "
                f"{HUB_PROBE_TIMEOUT_S:g} s and it is not in the local cache"
            )
        else:
            reason = "the Hugging Face Hub is unreachable from this machine or has no such model"
        raise ModelNotAvailableError(
            f"Could not load {model_id!r}: {reason}. {TINY_MODEL_HINT}"
        ) from e


def saved_adapter_dir(path: str, setting: str) -> str:
    """`path` as an absolute path, if it holds a LoRA adapter saved as safetensors.

    Adapter weights saved as pickle files (`adapter_model.bin`) are refused, never loaded.

    :param path: a directory written by `save_pretrained` (a best_model or checkpoint folder).
    :param setting: the input that named it, for the error message.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise ModelNotAvailableError(
            f"{setting}: no saved adapter in {path!r} (no {ADAPTER_CONFIG})."
        )
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        pickled = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
        found = f" (it has {', '.join(pickled)})" if pickled else ""
        raise ModelNotAvailableError(
            f"{setting}: {path!r} has no {ADAPTER_WEIGHTS}{found}. Only safetensors weights are "
            "loaded, never pickle files: load the adapter where you trust it and save it again "
            "with save_pretrained(dir, safe_serialization=True)."
        )
    return path
