"""SmolLM2-135M-Instruct: the one-off GGUF -> float32 safetensors conversion.

The conversion runs once per cache directory; a thread lock and a file lock make
concurrent loaders (threads, Ray actors) wait for it instead of converting twice.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_flwr.assets import cache_dir, fetch_asset

logger = logging.getLogger(__name__)

# The SmolLM2 release holds a Q4_1 GGUF file; it is dequantised once (~30 s) and
# cached as a plain safetensors directory under cache_dir() / SMOLLM2_HF_SUBDIR.
SMOLLM2_HF_SUBDIR = ("smollm2", "hf")

_convert_lock = threading.Lock()


def _smollm2_hf_dir() -> Path:
    """Return the safetensors directory of SmolLM2, converting the GGUF once."""
    target = cache_dir().joinpath(*SMOLLM2_HF_SUBDIR)
    if target.is_dir():
        return target
    gguf_path = fetch_asset("smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (Ray actors) or threads may start at once: one converts,
    # the others wait for it and then find the directory.
    with _convert_lock, _file_lock(target.parent / ".convert.lock"):
        if not target.is_dir():
            _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint and save it, atomically, as an HF directory."""
    logger.info(
        "Converting %s to float32 safetensors in %s (once; ~30 s)", gguf_path, target
    )
    # Imported here: only the one-off conversion needs transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
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
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shareable
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # a concurrent writer did not win either
                raise
    except Exception as exc:
        raise RuntimeError(
            f"Could not convert {gguf_path} to a Hugging Face directory at {target}: "
            f"{type(exc).__name__}: {exc}. Check that the `gguf` package is "
            "installed (`pip install gguf`) and that the file is intact (delete it "
            "to fetch it again)."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
