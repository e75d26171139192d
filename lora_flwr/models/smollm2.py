"""SmolLM2-135M-Instruct: the one-off GGUF -> float32 safetensors conversion.

The conversion runs once per cache directory; a thread lock and a file lock make
concurrent loaders (threads, Ray actors) wait for it instead of converting twice.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_flwr.assets import cache_dir, fetch_asset
from lora_flwr.atomic import atomic_write_dir
from lora_flwr.models.weights import CorruptWeightsError, check_safetensors

logger = logging.getLogger(__name__)

# The SmolLM2 release holds a Q4_1 GGUF file; it is dequantised once (~30 s) and
# cached as a plain safetensors directory under cache_dir() / SMOLLM2_HF_SUBDIR.
SMOLLM2_HF_SUBDIR = ("smollm2", "hf")
SMOLLM2_WEIGHTS = "model.safetensors"
# The tied input embedding (and lm_head): present in every whole conversion.
_EMBEDDING = "model.embed_tokens.weight"

_convert_lock = threading.Lock()


def _smollm2_hf_dir() -> Path:
    """Return the safetensors directory of SmolLM2, converting the GGUF once.

    A directory whose weights file fails :func:`check_safetensors` (truncated,
    damaged header) is converted again; the weights are memory-mapped by every
    process that loads them, and a truncated mapped file would kill them with
    SIGBUS instead of raising.
    """
    target = cache_dir().joinpath(*SMOLLM2_HF_SUBDIR)
    if _converted_ok(target):
        return target
    gguf_path = fetch_asset("smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (Ray actors) or threads may start at once: one converts,
    # the others wait for it and then find the directory.
    with _convert_lock, _file_lock(target.parent / ".convert.lock"):
        if not _converted_ok(target, warn=True):
            _convert_gguf(gguf_path, target)
    return target


def _converted_ok(target: Path, *, warn: bool = False) -> bool:
    """Whether ``target`` holds a config and a whole SmolLM2 weights file."""
    if not target.is_dir():
        return False
    weights = target / SMOLLM2_WEIGHTS
    try:
        tensors = check_safetensors(weights)
        if not (target / "config.json").is_file():
            raise CorruptWeightsError(f"{target} has no config.json")
        if _EMBEDDING not in tensors:
            raise CorruptWeightsError(f"{weights} holds no {_EMBEDDING!r}")
    except (OSError, CorruptWeightsError) as exc:
        if warn:
            logger.warning("Rebuilding the SmolLM2 conversion: %s", exc)
        return False
    return True


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint and save it, atomically, as an HF directory.

    The directory is written and checked under a temporary name, fsynced, then
    renamed into place (replacing a damaged one), so a reader sees either no
    directory or a whole one. The weights file is made read-only: every process
    maps it, and nothing should ever write it in place.
    """
    logger.info(
        "Converting %s to float32 safetensors in %s (once; ~30 s)", gguf_path, target
    )
    # Imported here: only the one-off conversion needs transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(tmp: Path) -> None:
        kwargs: dict[str, Any] = {"gguf_file": gguf_path.name}
        with _silence_gguf_progress():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            model: Any = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, dtype=torch.float32, **kwargs
            )
        # The GGUF quantizer stays attached after dequantisation and makes
        # save_pretrained refuse to save (or save a quantization_config that the
        # next load would try to honour); the weights are plain float32 by now.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        check_safetensors(tmp / SMOLLM2_WEIGHTS)
        (tmp / SMOLLM2_WEIGHTS).chmod(0o444)

    try:
        atomic_write_dir(target, write)
    except Exception as exc:
        raise RuntimeError(
            f"Could not convert {gguf_path} to a Hugging Face directory at {target}: "
            f"{type(exc).__name__}: {exc}. Check that the `gguf` package is "
            "installed (`pip install gguf`) and that the file is intact (delete it "
            "to fetch it again)."
        ) from exc


@contextlib.contextmanager
def _silence_gguf_progress() -> Iterator[None]:
    """Hide the GGUF dequantisation progress bar.

    transformers' GGUF reader uses ``tqdm.auto.tqdm`` directly, not its own switch.
    """
    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        yield
        return
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return
    module.tqdm = functools.partial(original, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.tqdm = original  # type: ignore[attr-defined]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still keeps the cache valid
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
