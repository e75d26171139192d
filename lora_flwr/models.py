"""Pretrained models and tokenizers, loaded offline.

``model.name`` picks one of

* a built-in name (:data:`BUILTIN_MODELS`):

  - ``minilm``: all-MiniLM-L6-v2 (BERT encoder, 22.7 M parameters) with a new
    sequence-classification head, from a pinned package-index release;
  - ``smollm2-135m``: SmolLM2-135M-Instruct (Llama decoder, 134.5 M parameters) from a
    GGUF file in a pinned release, dequantised once and cached as safetensors;
  - ``tiny-bert``, ``tiny-llama``, ``tiny-gpt2``: randomly initialised 2-layer models
    with hidden size 32 and an in-code character tokenizer, for fast tests;

* a local directory written by ``save_pretrained``;
* a Hugging Face Hub id (needs a reachable hub).

Every model comes back in float32, on the CPU, in ``eval()`` mode, with
``requires_grad`` untouched (the LoRA code freezes the base weights).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import shutil
import string
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from lora_flwr.assets import cache_dir, fetch_asset
from lora_flwr.config import ModelConfig, Task

logger = logging.getLogger(__name__)

BUILTIN_MODELS: tuple[str, ...] = (
    "minilm",
    "smollm2-135m",
    "tiny-bert",
    "tiny-llama",
    "tiny-gpt2",
)

# model_type values of decoder-only language models: ``task = "auto"`` picks
# causal_lm for them even when the config lists no architecture.
CAUSAL_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "bloom",
        "codegen",
        "cohere",
        "falcon",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gptj",
        "granite",
        "llama",
        "mistral",
        "mixtral",
        "mpt",
        "olmo",
        "olmo2",
        "opt",
        "phi",
        "phi3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "stablelm",
        "starcoder2",
    }
)

# model_type values of encoder-only models, which cannot be adapted as causal LMs.
ENCODER_MODEL_TYPES: frozenset[str] = frozenset(
    {
        "albert",
        "bert",
        "camembert",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "modernbert",
        "mpnet",
        "roberta",
        "xlm-roberta",
    }
)

_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")

# Sizes of the tiny random models: big enough to have every module kind of the
# real ones (attention projections, MLP, norms, embeddings), small enough to build
# and train in milliseconds.
TINY_HIDDEN = 32
TINY_LAYERS = 2
TINY_INTERMEDIATE = 64
TINY_MAX_POSITIONS = 512

# The SmolLM2 release holds a Q4_1 GGUF file; it is dequantised once (~30 s) and
# cached as a plain safetensors directory under cache_dir() / SMOLLM2_HF_SUBDIR.
SMOLLM2_HF_SUBDIR = ("smollm2", "hf")


@dataclass
class ModelBundle:
    """A model ready to adapt, with its tokenizer.

    Attributes
    ----------
    model
        A ``transformers`` ``PreTrainedModel``: float32, on the CPU, ``eval()``
        mode, ``requires_grad`` as loaded (all True).
    tokenizer
        Its tokenizer, with a pad token set (for causal LMs the EOS token when the
        model has none; ``model.config.pad_token_id`` then matches).
    task
        ``"seq_cls"`` (logits of shape ``(batch, num_labels)``) or ``"causal_lm"``
        (logits of shape ``(batch, seq, vocab)``).
    name
        The ``ModelConfig.name`` it came from.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    task: Task
    name: str


# ------------------------------------------------------------------ cache
_CacheKey = tuple[str, str, int, int]
_cache: dict[_CacheKey, ModelBundle] = {}
_cache_lock = threading.RLock()
_load_count = 0
_count_lock = threading.Lock()
_convert_lock = threading.Lock()


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
    RuntimeError
        If a local directory or a built-in asset exists but cannot be loaded.
    """
    global _load_count
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
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
        cast(PreTrainedModel, model).config.name_or_path = cfg.name
    _check_pad_token(bundle)
    with _count_lock:
        _load_count += 1
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Loaded model %r (%s, %s, %s parameters)",
        cfg.name,
        type(model).__name__,
        bundle.task,
        f"{n_params:,}",
    )
    return bundle


def get_model(cfg: ModelConfig, *, seed: int = 0) -> ModelBundle:
    """Return the process-wide shared model for ``cfg``, loading it on first use.

    The same ``ModelBundle`` object comes back for the same ``(name, task,
    num_labels, seed)``: simulated clients in one process share one base model
    instead of loading it once each. Callers must not change its weights in
    place; wrap or copy it (``copy.deepcopy``) first.

    Parameters
    ----------
    cfg
        Which model; ``max_length`` plays no part in the cache key.
    seed
        Seed for randomly initialised weights (see :func:`load_model`).

    Returns
    -------
    ModelBundle
        The cached bundle.
    """
    key: _CacheKey = (cfg.name, cfg.task, cfg.num_labels, seed)
    with _cache_lock:
        bundle = _cache.get(key)
        if bundle is None:
            bundle = load_model(cfg, seed=seed)
            _cache[key] = bundle
        return bundle


def model_load_count() -> int:
    """Return how many models :func:`load_model` has built in this process."""
    return _load_count


def clear_model_cache() -> None:
    """Forget every model cached by :func:`get_model` (the load count is kept)."""
    with _cache_lock:
        _cache.clear()


def resolve_task(cfg: ModelConfig, hf_config: PretrainedConfig) -> Task:
    """Decide the task for a model from ``cfg.task`` and the model's config.

    ``"auto"`` gives ``"causal_lm"`` when an architecture ends in ``ForCausalLM``
    or ``LMHeadModel`` or the ``model_type`` is a known decoder (llama, gpt2,
    mistral, qwen2, ...), and ``"seq_cls"`` otherwise.

    Parameters
    ----------
    cfg
        The model section; its ``task`` wins unless it is ``"auto"``.
    hf_config
        The model's ``transformers`` config (``AutoConfig.from_pretrained``).

    Returns
    -------
    Task
        ``"seq_cls"`` or ``"causal_lm"``.

    Raises
    ------
    ValueError
        If ``cfg.task`` is ``"causal_lm"`` for an encoder-only model (BERT, ...).
    """
    model_type = str(getattr(hf_config, "model_type", "") or "")
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if cfg.task == "causal_lm":
        if model_type in ENCODER_MODEL_TYPES:
            raise ValueError(
                f"`model.task` should be 'seq_cls' or 'auto' for {cfg.name!r}, an "
                f"encoder-only {model_type} model that cannot generate text, but the "
                f"value passed is {cfg.task!r}"
            )
        return "causal_lm"
    if cfg.task == "seq_cls":
        return "seq_cls"
    if model_type in CAUSAL_MODEL_TYPES or any(
        arch.endswith(_CAUSAL_ARCH_SUFFIXES) for arch in architectures
    ):
        return "causal_lm"
    return "seq_cls"


# ------------------------------------------------------------------ built-ins
def _load_minilm(cfg: ModelConfig) -> ModelBundle:
    """Load all-MiniLM-L6-v2 with a new classification head."""
    path = fetch_asset("minilm")
    config = AutoConfig.from_pretrained(path)
    task = resolve_task(cfg, config)  # raises for causal_lm
    return _from_dir(cfg, path, task, config)


def _load_smollm2(cfg: ModelConfig) -> ModelBundle:
    """Load SmolLM2-135M-Instruct from its cached safetensors conversion."""
    hf_dir = _smollm2_hf_dir()
    config = AutoConfig.from_pretrained(hf_dir)
    task = resolve_task(cfg, config)
    return _from_dir(cfg, hf_dir, task, config)


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


def _load_tiny_bert(cfg: ModelConfig) -> ModelBundle:
    """Build a random 2-layer BERT classifier with a character tokenizer."""
    tokenizer = _char_tokenizer(encoder=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        intermediate_size=TINY_INTERMEDIATE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.num_labels = cfg.num_labels
    task = resolve_task(cfg, config)
    return ModelBundle(BertForSequenceClassification(config), tokenizer, task, cfg.name)


def _load_tiny_llama(cfg: ModelConfig) -> ModelBundle:
    """Build a random 2-layer Llama (GQA, tied embeddings, like SmolLM2)."""
    tokenizer = _char_tokenizer(encoder=False)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.num_labels = cfg.num_labels
    task = resolve_task(cfg, config)
    model: PreTrainedModel
    if task == "causal_lm":
        model = LlamaForCausalLM(config)
    else:
        model = LlamaForSequenceClassification(config)  # type: ignore[no-untyped-call]
    return ModelBundle(model, tokenizer, task, cfg.name)


def _load_tiny_gpt2(cfg: ModelConfig) -> ModelBundle:
    """Build a random 2-layer GPT-2 (``Conv1D`` layers ``c_attn``, ``c_proj``)."""
    tokenizer = _char_tokenizer(encoder=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=TINY_HIDDEN,
        n_layer=TINY_LAYERS,
        n_head=2,
        n_inner=TINY_INTERMEDIATE,
        n_positions=TINY_MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.num_labels = cfg.num_labels
    task = resolve_task(cfg, config)
    model: PreTrainedModel
    if task == "causal_lm":
        model = GPT2LMHeadModel(config)
    else:
        model = GPT2ForSequenceClassification(config)
    return ModelBundle(model, tokenizer, task, cfg.name)


_BUILDERS: dict[str, Callable[[ModelConfig], ModelBundle]] = {
    "minilm": _load_minilm,
    "smollm2-135m": _load_smollm2,
    "tiny-bert": _load_tiny_bert,
    "tiny-llama": _load_tiny_llama,
    "tiny-gpt2": _load_tiny_gpt2,
}
assert tuple(_BUILDERS) == BUILTIN_MODELS


def _char_tokenizer(*, encoder: bool) -> PreTrainedTokenizerBase:
    """Build a character-level tokenizer over printable ASCII, fully offline.

    Encoders get BERT's specials and ``[CLS] text [SEP]``; decoders get
    ``<pad> <unk> <s> </s>`` and no added tokens (like GPT-2). Other characters map
    to the unknown token. Decoding joins the characters back, so ASCII text
    round-trips exactly.
    """
    if encoder:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=specials[1]))
    # Every character (newlines included) is its own word.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if encoder:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        names = {"cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:
        names = {"bos_token": "<s>", "eos_token": "</s>"}
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        pad_token=specials[0],
        unk_token=specials[1],
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        **names,
    )
    return cast(PreTrainedTokenizerBase, tokenizer)


# ------------------------------------------------------------------ any other name
def _load_external(cfg: ModelConfig) -> ModelBundle:
    """Load a local directory or a Hugging Face Hub id with the Auto classes."""
    name = cfg.name
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:
            raise RuntimeError(
                f"`model.name` {name!r} is a local directory ({path.resolve()}) but "
                f"holds no readable model config: {type(exc).__name__}: {exc}. Point "
                "it at a directory written by `save_pretrained` (config.json, "
                "weights and tokenizer files)."
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
        raise RuntimeError(
            f"Could not load model {cfg.name!r} from {source} as {task}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    # A new head is expected when adapting an encoder to classification; say so
    # quietly instead of transformers' LOAD REPORT warning.
    new = sorted(info.get("missing_keys", ())) + sorted(
        str(k) for k in info.get("mismatched_keys", ())
    )
    if new:
        logger.info("Newly initialised in %r: %s", cfg.name, ", ".join(new))
    return ModelBundle(model, tokenizer, task, cfg.name)


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
