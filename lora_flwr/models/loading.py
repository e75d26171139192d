"""Load a model and its tokenizer: built-ins, local directories and Hub ids.

:func:`load_model` dispatches ``model.name``: the built-ins (:data:`BUILTIN_MODELS`)
to their builders, anything else to the ``transformers`` Auto classes, with an
error message that says what was tried and how to provide the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from lora_flwr.assets import fetch_asset
from lora_flwr.config import ModelConfig, Task
from lora_flwr.models import native
from lora_flwr.models.bundle import ModelBundle, resolve_task
from lora_flwr.models.smollm2 import _smollm2_hf_dir
from lora_flwr.models.weights import (
    CorruptWeightsError,
    check_safetensors,
    weight_residency,
)

# transformers is imported where a model is built with it, never at module level:
# it costs seconds (torch._dynamo, torch.distributed.tensor, scipy) that a process
# building a native model (lora_flwr.models.native) never pays.
if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

BUILTIN_MODELS: tuple[str, ...] = (
    "minilm",
    "smollm2-135m",
    "tiny-bert",
    "tiny-llama",
    "tiny-gpt2",
)

# Models built by load_model in this process; the Flower client reports it.
_load_count = 0
_count_lock = threading.Lock()


def load_model(cfg: ModelConfig, *, seed: int = 0) -> ModelBundle:
    """Build a fresh model and tokenizer for ``cfg``.

    Randomly initialised weights (a new classification head, every weight of the
    tiny models) are drawn after ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng``, so they are reproducible and the caller's global RNG
    state is left as it was.

    Parameters
    ----------
    cfg
        Which model (``name``), for which task (``task``, ``"auto"`` to follow the
        model) and, for classification, how many classes (``num_labels``).
    seed
        Seed for the randomly initialised weights.

    Returns
    -------
    ModelBundle
        A new model instance (never shared) and its tokenizer.

    Raises
    ------
    ValueError
        If ``cfg.task`` does not fit the model (e.g. ``causal_lm`` for an encoder),
        or ``cfg.name`` is neither a built-in, a local directory nor a loadable Hub
        id; the message says what was tried and how to provide the model.
        Also if a local directory is not a saved model (no config.json, no
        weights), or it or a built-in asset cannot be loaded (damaged weights).
    """
    global _load_count
    quiet = (
        contextlib.nullcontext() if native.uses_native(cfg) else _quiet_transformers()
    )
    with quiet, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name in _BUILDERS:
            bundle = _BUILDERS[cfg.name](cfg)
        else:
            bundle = _load_external(cfg)
    model = bundle.model
    model.float()
    model.eval()
    if cfg.name in _BUILDERS:
        # What exports record as the base model: the name that loads it again.
        cast("PreTrainedModel", model).config.name_or_path = cfg.name
    _check_pad_token(bundle)
    with _count_lock:
        _load_count += 1
    n_params = sum(p.numel() for p in model.parameters())
    residency = weight_residency(model)
    if residency is not None:
        logger.debug(
            "%r: %.1f MB of weights memory-mapped (shared with every process that "
            "maps the same file) from %s, %.1f MB private",
            cfg.name,
            residency.mapped_bytes / 1e6,
            ", ".join(residency.mapped) or "no file",
            residency.private / 1e6,
        )
    logger.info(
        "Loaded model %r (%s, %s, %s parameters)",
        cfg.name,
        type(model).__name__,
        bundle.task,
        f"{n_params:,}",
    )
    return bundle


def model_load_count() -> int:
    """Return how many models :func:`load_model` has built in this process."""
    return _load_count


# ------------------------------------------------------------------ built-ins
def _load_minilm(cfg: ModelConfig) -> ModelBundle:
    """Load all-MiniLM-L6-v2 with a new classification head."""
    path = fetch_asset("minilm")
    if native.uses_native(cfg):
        return native.build_bert_classifier(cfg, path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    task = resolve_task(cfg, config)  # raises for causal_lm
    return _from_dir(cfg, path, task, config)


def _load_smollm2(cfg: ModelConfig) -> ModelBundle:
    """Load SmolLM2-135M-Instruct from its cached safetensors conversion."""
    hf_dir = _smollm2_hf_dir()
    if native.uses_native(cfg):
        return native.build_llama(cfg, hf_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    task = resolve_task(cfg, config)
    return _from_dir(cfg, hf_dir, task, config)


def _load_tiny(cfg: ModelConfig) -> ModelBundle:
    """Build a tiny random test model (transformers classes, imported here)."""
    from lora_flwr.models import tiny

    builders = {
        "tiny-bert": tiny._load_tiny_bert,
        "tiny-llama": tiny._load_tiny_llama,
        "tiny-gpt2": tiny._load_tiny_gpt2,
    }
    return builders[cfg.name](cfg)


_BUILDERS: dict[str, Callable[[ModelConfig], ModelBundle]] = {
    "minilm": _load_minilm,
    "smollm2-135m": _load_smollm2,
    "tiny-bert": _load_tiny,
    "tiny-llama": _load_tiny,
    "tiny-gpt2": _load_tiny,
}
assert tuple(_BUILDERS) == BUILTIN_MODELS


# ------------------------------------------------------------------ any other name
def _load_external(cfg: ModelConfig) -> ModelBundle:
    """Load a local directory or a Hugging Face Hub id with the Auto classes."""
    from transformers import AutoConfig

    name = cfg.name
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_dir(name, path)
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise ValueError(
                f"`model.name` {name!r} is a local directory ({path.resolve()}) but "
                f"its config.json is not a model config ({_first_line(exc)}); point "
                "it at a directory written by `save_pretrained` (config.json, "
                "weights and tokenizer files)"
            ) from exc
        task = resolve_task(cfg, config)
        return _from_dir(cfg, path, task, config)
    if _looks_like_path(name):
        raise ValueError(_not_found_message(name, path, hub_error=None))
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as exc:
        raise ValueError(_not_found_message(name, path, hub_error=exc)) from exc
    task = resolve_task(cfg, config)
    return _from_dir(cfg, name, task, config)


def _from_dir(
    cfg: ModelConfig, source: Path | str, task: Task, config: PretrainedConfig
) -> ModelBundle:
    """Load a model and tokenizer for ``task`` from a directory or Hub id."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if isinstance(source, Path):
        _check_weight_files(cfg, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model: PreTrainedModel
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            info: dict[str, Any] = {}
        else:
            # Setting num_labels on the config (not as a keyword next to config=)
            # also rebuilds id2label; decoders get their pad id in _check_pad_token.
            config.num_labels = cfg.num_labels
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source,
                config=config,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                dtype=torch.float32,
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"Could not load model {cfg.name!r} from {source} as {task}: "
            f"{_first_line(exc)}"
        ) from exc
    # A new head is expected when adapting an encoder to classification; say so
    # quietly instead of transformers' LOAD REPORT warning.
    new = sorted(info.get("missing_keys", ())) + sorted(
        str(k) for k in info.get("mismatched_keys", ())
    )
    if new:
        logger.info("Newly initialised in %r: %s", cfg.name, ", ".join(new))
    return ModelBundle(model, tokenizer, task, cfg.name)


def _check_weight_files(cfg: ModelConfig, directory: Path) -> None:
    """Refuse a directory whose safetensors files are truncated or damaged.

    safetensors would refuse them too, but with a bare ``SafetensorError`` that
    does not say which file or what to do.
    """
    for weights in sorted(directory.glob("*.safetensors")):
        try:
            check_safetensors(weights)
        except CorruptWeightsError as exc:
            fix = (
                f"delete {directory} and the next run unpacks the built-in again"
                if cfg.name in _BUILDERS
                else "save the model there again (`save_pretrained`)"
            )
            raise ValueError(
                f"Could not load model {cfg.name!r}: {exc}. The file is damaged; {fix}."
            ) from exc


# What `save_pretrained` writes: a model config, and weights in one of these forms.
_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def _check_model_dir(name: str, path: Path) -> None:
    """Refuse a local directory that is not a saved model, in one line.

    Raises
    ------
    ValueError
        If ``path`` has no ``config.json`` (any folder, or weights alone such as a
        bare ``pytorch_model.bin``), or a config and no weights file.
    """
    where = path.resolve()
    weights = sorted({p.name for pattern in _WEIGHTS for p in path.glob(pattern)})
    expected = (
        "point it at a directory written by `save_pretrained` (config.json, "
        "model.safetensors and the tokenizer files), or use a built-in ("
        f"{', '.join(BUILTIN_MODELS)})"
    )
    if not (path / "config.json").is_file():
        held = f"it holds {', '.join(weights)} but" if weights else "it"
        raise ValueError(
            f"`model.name` {name!r} is a local directory ({where}) but not a saved "
            f"model: {held} has no config.json; {expected}"
        )
    if not weights:
        raise ValueError(
            f"`model.name` {name!r} is a local directory ({where}) with a "
            f"config.json but no weights (no model.safetensors); {expected}"
        )


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (library messages run to many lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a file path, never a Hub id (``org/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or os.path.isabs(name)
        or name.count("/") > 1
        or name.endswith((".gguf", ".safetensors", ".bin", ".pt", ".json"))
    )


def _not_found_message(name: str, path: Path, hub_error: Exception | None) -> str:
    """Explain what was tried for an unloadable ``model.name`` and what to do."""
    from huggingface_hub import constants as hub_constants

    offline = bool(getattr(hub_constants, "HF_HUB_OFFLINE", False)) or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ) not in ("", "0")
    if hub_error is None:
        hub = "it is a path, so it was not tried as a Hugging Face Hub id"
    else:
        hub = (
            f"loading it as a Hugging Face Hub id failed "
            f"({type(hub_error).__name__}: {str(hub_error).strip()[:300]})"
        )
    return (
        f"`model.name` should be a built-in model, a local model directory or a "
        f"Hugging Face Hub id but the value passed is {name!r}: it is not one of the "
        f"built-ins ({', '.join(BUILTIN_MODELS)}), there is no directory "
        f"{path.resolve()}, and {hub}. "
        + (
            "HF_HUB_OFFLINE is set, so no hub was contacted. "
            if offline
            else "This machine may be offline (no model hub reachable). "
        )
        + "Use a built-in (they need no hub), or download the model where a hub is "
        "reachable (`huggingface-cli download ID --local-dir DIR`, or "
        "`save_pretrained(DIR)` for the model and its tokenizer) and set model.name "
        "to that directory."
    )


def _check_pad_token(bundle: ModelBundle) -> None:
    """Give the tokenizer a pad token (EOS for causal LMs) and the model its id."""
    tokenizer = bundle.tokenizer
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"`model.name` {bundle.name!r} has a tokenizer with no pad, EOS or "
                "unknown token to pad batches with; add a pad token to the "
                "tokenizer (and resize the embeddings) and save it to a directory"
            )
        tokenizer.pad_token = fallback
    config = getattr(bundle.model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------ quiet loading
_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[int, bool] = (logging.WARNING, True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' logging (to errors) and progress bars while loading.

    The settings are global, so overlapping loads in several threads share one
    quiet period: the first to enter saves the user's settings, the last to leave
    restores them.
    """
    global _quiet_depth, _quiet_saved
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = (
                hf_logging.get_verbosity(),
                hf_logging.is_progress_bar_enabled(),
            )
            hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                verbosity, progress = _quiet_saved
                hf_logging.set_verbosity(verbosity)
                if progress:
                    hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
