"""A node's tokenized partition on disk, keyed by everything that produced it.

A deployed SuperNode runs every message in a fresh ``flwr-clientapp`` process, so
without this each round would read the corpus, import ``flwr_datasets`` (pandas,
matplotlib and seaborn come with it), partition the whole train pool and tokenize
the node's share again. The first call on a node stores its local train and test
splits as one safetensors file; later calls, in any process, read it back instead.

The file name is a SHA-256 of a description of what produced it: the data section,
the seed, the partition id and count, the resolved task, the model's name, its
tokenizer (class, vocabulary size, special ids, and the files it was read from, by
size and modification time) and ``max_length``, and the corpus file (size and
modification time) for a local dataset. Change any of them and the key changes: a
stale file is never read, it is simply not asked for. The same description is
stored in the file and compared on load; a file that does not match, or whose
arrays are inconsistent, is ignored with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_flwr.atomic import atomic_write, write_text_atomic
from lora_flwr.data.tokenize import TokenizedDataset

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: instruction data's target masks and cut counts
SPLITS = ("train", "test")


def cache_key(description: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of ``description`` as canonical JSON."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Describe a tokenizer well enough that a different one never matches.

    Class, vocabulary size, pad/eos/bos ids, and the size and modification time of
    every file in the directory it was loaded from (if it came from a directory).
    """
    source = str(getattr(tokenizer, "name_or_path", "") or "")
    files: dict[str, list[float]] = {}
    path = Path(source)
    if source and path.is_dir():
        for item in sorted(path.iterdir()):
            if item.is_file():
                st = item.stat()
                files[item.name] = [st.st_size, st.st_mtime]
    return {
        "class": type(tokenizer).__name__,
        "source": source,
        "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "pad": getattr(tokenizer, "pad_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "files": files,
    }


def cache_path(root: Path, description: Mapping[str, Any]) -> Path:
    """Where the partition described by ``description`` lives under ``root``."""
    return root / "partitions" / f"{cache_key(description)}.safetensors"


def save_partition(
    path: Path,
    description: Mapping[str, Any],
    splits: Mapping[str, TokenizedDataset],
) -> None:
    """Write the node's splits to ``path`` atomically (one file)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "description": description}
    for name in SPLITS:
        ds = splits[name]
        lengths = torch.tensor([int(t.numel()) for t in ds.input_ids], dtype=torch.long)
        tensors[f"{name}.ids"] = (
            torch.cat(ds.input_ids).long()
            if len(ds)
            else torch.zeros(0, dtype=torch.long)
        )
        tensors[f"{name}.lengths"] = lengths
        if ds.labels is not None:
            tensors[f"{name}.labels"] = ds.labels.long().contiguous()
        if ds.targets is not None and len(ds):
            tensors[f"{name}.targets"] = torch.cat(ds.targets).to(torch.uint8)
        meta[name] = {
            "task": ds.task,
            "pad_token_id": ds.pad_token_id,
            "targets": ds.targets is not None,
            "truncated": ds.truncated,
            "dropped": ds.dropped,
        }
    header = {"lora_flwr": json.dumps(meta, sort_keys=True, default=str)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_partition(
    path: Path, description: Mapping[str, Any]
) -> dict[str, TokenizedDataset] | None:
    """Read the splits back; None if absent, for another description, or broken."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["lora_flwr"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        expected = json.loads(json.dumps(description, sort_keys=True, default=str))
        if meta.get("format") != FORMAT_VERSION or meta["description"] != expected:
            raise ValueError("it was written for another configuration")
        out = {name: _split(tensors, name, meta[name]) for name in SPLITS}
    except Exception as exc:  # a broken cache must never break a run
        logger.warning(
            "ignoring the cached partition %s (%s); rebuilding it", path, exc
        )
        return None
    return out


def _split(
    tensors: Mapping[str, torch.Tensor], name: str, meta: Mapping[str, Any]
) -> TokenizedDataset:
    """One split from its flat ids, lengths and labels, checked for consistency."""
    ids, lengths = tensors[f"{name}.ids"], tensors[f"{name}.lengths"]
    if ids.dtype != torch.long or lengths.dtype != torch.long:
        raise ValueError(f"{name}: ids and lengths must be int64")
    if lengths.ndim != 1 or (lengths < 1).any() or int(lengths.sum()) != ids.numel():
        raise ValueError(f"{name}: lengths do not add up to the {ids.numel()} ids")
    labels = tensors.get(f"{name}.labels")
    if labels is not None and labels.shape != lengths.shape:
        raise ValueError(f"{name}: {labels.numel()} labels for {lengths.numel()} rows")
    task = meta["task"]
    if (task == "seq_cls") != (labels is not None):
        raise ValueError(f"{name}: labels do not match task {task!r}")
    sizes = lengths.tolist()
    input_ids = tuple(torch.split(ids, sizes)) if sizes else ()
    targets = None
    if meta.get("targets"):
        flat = tensors.get(f"{name}.targets", torch.zeros(0, dtype=torch.uint8))
        if flat.shape != ids.shape:
            raise ValueError(f"{name}: {flat.numel()} target flags for {ids.numel()}")
        targets = tuple(torch.split(flat.bool(), sizes)) if sizes else ()
    return TokenizedDataset(
        input_ids,
        labels,
        task,
        int(meta["pad_token_id"]),
        targets,
        truncated=int(meta.get("truncated", 0)),
        dropped=int(meta.get("dropped", 0)),
    )


def task_path(root: Path, description: Mapping[str, Any]) -> Path:
    """Where the task resolved for ``description`` is kept under ``root``."""
    return root / "tasks" / f"{cache_key(description)}.json"


def load_task(path: Path, description: Mapping[str, Any]) -> str | None:
    """Return the task a previous process resolved; None if absent, stale, broken.

    A fresh ClientApp process would otherwise read the whole corpus (the default
    one is a bz2 CSV: ~1.5 s) only to learn the task and check the label count.
    """
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        expected = json.loads(json.dumps(description, sort_keys=True, default=str))
        if stored.get("description") != expected:
            raise ValueError("it was written for another configuration")
        task = stored["task"]
        if task not in ("seq_cls", "causal_lm"):
            raise ValueError(f"unknown task {task!r}")
    except Exception as exc:  # a broken cache must never break a run
        logger.warning("ignoring the cached task %s (%s)", path, exc)
        return None
    return str(task)


def save_task(path: Path, description: Mapping[str, Any], task: str) -> None:
    """Keep a resolved (and checked) task for later processes, atomically."""
    text = json.dumps(
        {"description": description, "task": task}, sort_keys=True, default=str
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
