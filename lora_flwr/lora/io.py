"""Save and load adapters: a PEFT directory (safetensors) and the seed's JSON file.

PEFT layout (what ``PeftModel.from_pretrained`` reads)::

    <dir>/adapter_config.json        # peft_type LORA, r, lora_alpha, target_modules...
    <dir>/adapter_model.safetensors  # base_model.model.<module>.lora_A.weight (r, in)
                                     # base_model.model.<module>.lora_B.weight (out, r)
                                     # base_model.model.<saved module>.<param>

Every file is written atomically (temp file in the same directory, then rename) and a
PEFT directory is swapped in as one unit (:mod:`lora_flwr.atomic`), so a crash never
leaves a half-written adapter, or weights without their config, behind. Nothing is
ever unpickled.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_flwr.atomic import atomic_write, atomic_write_dir, recover

# Re-exported (the explicit "as" form, for mypy): lora_flwr/fl/server_app.py
# imports write_text_atomic from here.
from lora_flwr.atomic import write_text_atomic as write_text_atomic
from lora_flwr.config import LoraConfig, Task
from lora_flwr.lora.model_ops import merge_and_unload

if TYPE_CHECKING:  # the adapter imports this module, not the other way round
    from lora_flwr.lora.adapter import LoRAAdapter

CONFIG_NAME = "adapter_config.json"
# Size cap of a JSON adapter: characters per value ("-1.2345678901234567e-05, ")
# plus room for the config and names.
JSON_BYTES_PER_VALUE = 32
JSON_SLACK_BYTES = 1 << 20
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BASE_DELTA_NAME = "base_delta.safetensors"
JSON_FORMAT = "lora_flwr-adapter"
# PEFT's task_type for each of our tasks (what AutoPeftModel picks its class by).
PEFT_TASK_TYPES: dict[Task, str] = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
JSON_VERSION = 1


# ------------------------------------------------------------------- PEFT dir
def peft_config_dict(
    adapter: LoRAAdapter,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """Build the ``adapter_config.json`` content (a real PEFT save's fields).

    ``target_modules`` lists the full names of the wrapped modules, so PEFT wraps
    exactly the same layers whatever the original pattern was.
    """
    cfg = adapter.config
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in adapter.layers.values())
    saved = sorted(
        {n.rsplit(".", 1)[0] for n in adapter.weight_names() if ".lora_" not in n}
    )
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True if cfg.init_lora_weights == "kaiming" else "gaussian",
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": cfg.lora_alpha,
        "lora_bias": False,
        "lora_dropout": cfg.lora_dropout,
        "modules_to_save": saved or None,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": adapter.module_names,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": cfg.use_rslora,
    }


def save_peft(
    adapter: LoRAAdapter,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapter`` as a PEFT adapter directory and return its path.

    ``task_type`` is PEFT's (``"CAUSAL_LM"``, ``"SEQ_CLS"``) or None for a plain
    ``PeftModel``. The directory is written as one unit: an existing ``path`` is
    replaced whole, so files other than the adapter's in it are removed.
    """
    path = Path(path)
    tensors = {
        PEFT_PREFIX + name: t.contiguous() for name, t in adapter.state_dict().items()
    }
    config = peft_config_dict(
        adapter, base_model_name_or_path=base_model_name_or_path, task_type=task_type
    )

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )

    # One unit: a kill between the two files must not pair new weights with an old
    # config (or none).
    atomic_write_dir(path, write)
    return path


def read_peft_config(path: str | Path) -> LoraConfig:
    """Read a PEFT ``adapter_config.json`` into a :class:`LoraConfig`.

    Raises
    ------
    FileNotFoundError
        If the directory or its config file is missing.
    ValueError
        If the file is not valid JSON, is not a LoRA config, or holds bad values.
    """
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {path}; expected a PEFT adapter directory "
            f"({CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path} is not a LoRA adapter config (peft_type != LORA)")
    # Per-module ranks/alphas and DoRA would load without a key error but compute
    # something else: refuse them instead of silently using one global scaling.
    unsupported = {
        k: raw[k] for k in ("alpha_pattern", "rank_pattern", "use_dora") if raw.get(k)
    }
    if unsupported:
        raise ValueError(
            f"{cfg_path} uses PEFT options this loader does not support: {unsupported}"
        )
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(str(t) for t in targets)
    init = raw.get("init_lora_weights", True)
    return LoraConfig(
        r=raw.get("r", 8),
        lora_alpha=raw.get("lora_alpha", 8),
        lora_dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets if targets else ("q_proj", "v_proj"),
        init_lora_weights="gaussian" if init == "gaussian" else "kaiming",
        use_rslora=bool(raw.get("use_rslora", False)),
        modules_to_save=tuple(raw.get("modules_to_save") or ()),
    )


def _check_same_scaling(adapter: LoRAAdapter, saved: LoraConfig, where: Path) -> None:
    cfg = adapter.config
    if saved.r != cfg.r or not math.isclose(saved.scaling, cfg.scaling):
        raise ValueError(
            f"{where} holds an adapter with r={saved.r}, "
            f"lora_alpha={saved.lora_alpha}, "
            f"use_rslora={saved.use_rslora} but this adapter has r={cfg.r}, "
            f"lora_alpha={cfg.lora_alpha}, use_rslora={cfg.use_rslora}"
        )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file, with a clear error if it is corrupt."""
    if not path.is_file():
        raise FileNotFoundError(f"Adapter weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}"
        ) from exc


def load_peft(adapter: LoRAAdapter, path: str | Path) -> None:
    """Load a PEFT adapter directory into an applied ``adapter`` (all-or-nothing).

    Raises
    ------
    FileNotFoundError
        If the directory, config or weights file is missing.
    ValueError
        If the config's rank/scaling differ, or keys, shapes, dtypes or values are bad.
    """
    path = Path(path)
    recover(path)  # a save killed mid-swap left the last complete copy aside
    if not path.is_dir():
        raise FileNotFoundError(f"Adapter directory not found: {path}")
    _check_same_scaling(adapter, read_peft_config(path), path)
    raw = read_safetensors(path / WEIGHTS_NAME)
    state = {}
    for key, value in raw.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        # PEFT may keep the adapter name in keys of older saves.
        name = name.replace(".lora_A.default.", ".lora_A.").replace(
            ".lora_B.default.", ".lora_B."
        )
        state[name] = value
    adapter.load_state_dict(state)


# ----------------------------------------------------------------- base delta
def save_base_delta(
    deltas: Mapping[str, npt.NDArray[np.float32]], path: str | Path
) -> Path:
    """Write per-module base-weight deltas ``(out, in)`` to a safetensors file.

    Rules that merge (FLoRA, FedEx-LoRA) keep part of the learned update in the
    base weights; this file holds it, keyed by module name, atomically written.
    """
    path = Path(path)
    tensors = {m: torch.from_numpy(np.ascontiguousarray(d)) for m, d in deltas.items()}
    atomic_write(
        path,
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": "lora_flwr"}),
    )
    return path


def load_base_delta(path: str | Path) -> dict[str, npt.NDArray[np.float32]]:
    """Read deltas written by :func:`save_base_delta` (for ``set_base_delta``)."""
    tensors = read_safetensors(Path(path))
    out = {}
    for name, value in tensors.items():
        if not value.is_floating_point() or value.dim() != 2:
            raise ValueError(f"{path}: {name} is not a 2-D float delta")
        out[name] = value.to(torch.float32).numpy()
    return out


# ---------------------------------------------------------------------- JSON
def save_json(adapter: LoRAAdapter, path: str | Path) -> Path:
    """Write the seed's JSON format: config + named tensors with shapes and values.

    Float32 values go through Python floats, which represent them exactly, so a JSON
    round trip is bit-exact.
    """
    path = Path(path)
    cfg = adapter.config
    doc = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "config": {
            "r": cfg.r,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": adapter.module_names,
            "init_lora_weights": cfg.init_lora_weights,
            "use_rslora": cfg.use_rslora,
            "modules_to_save": list(cfg.modules_to_save),
        },
        "tensors": [
            {
                "name": name,
                "shape": list(t.shape),
                "dtype": "float32",
                "data": t.to(torch.float32).flatten().tolist(),
            }
            for name, t in adapter.state_dict().items()
        ],
    }
    write_text_atomic(path, json.dumps(doc))
    return path


def load_json(adapter: LoRAAdapter, path: str | Path) -> None:
    """Load the seed's JSON format into an applied ``adapter`` (all-or-nothing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Adapter JSON file not found: {path}")
    # Refuse before parsing: a float needs < JSON_BYTES_PER_VALUE characters.
    numel = sum(t.numel() for t in adapter.state_dict().values())
    limit = JSON_BYTES_PER_VALUE * numel + JSON_SLACK_BYTES
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"{path} has {size:,} bytes, more than the {limit:,} an adapter of "
            f"{numel:,} values can take in JSON; it is not this adapter's file"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON (truncated?): {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
        raise ValueError(f"{path} is not a lora_flwr adapter JSON file")
    if doc.get("version") != JSON_VERSION:
        raise ValueError(f"{path}: unsupported version {doc.get('version')!r}")
    raw_cfg = doc.get("config")
    if not isinstance(raw_cfg, dict) or not isinstance(doc.get("tensors"), list):
        raise ValueError(f"{path}: `config` should be an object and `tensors` a list")
    saved = LoraConfig(
        r=raw_cfg.get("r", 0),
        lora_alpha=raw_cfg.get("lora_alpha", 0),
        use_rslora=bool(raw_cfg.get("use_rslora", False)),
    )
    _check_same_scaling(adapter, saved, path)
    state: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(doc["tensors"]):
        try:
            name = str(entry["name"])
            shape = [int(d) for d in entry["shape"]]
            data = entry["data"]
            if entry.get("dtype", "float32") != "float32":
                raise ValueError(f"dtype {entry.get('dtype')!r} is not float32")
            tensor = torch.tensor(data, dtype=torch.float32)
            if tensor.numel() != math.prod(shape) or any(d < 0 for d in shape):
                raise ValueError(f"{tensor.numel()} values for shape {shape}")
            state[name] = tensor.reshape(shape)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: tensor #{i} is malformed: {exc}") from exc
    adapter.load_state_dict(state)


# -------------------------------------------------------------- merged model
def save_merged_model(adapter: LoRAAdapter, path: str | Path) -> Path:
    """Export a plain model with the adapter merged in (the adapter is untouched).

    The model is copied first, so the live adapter keeps training. A Hugging Face
    model is written with ``save_pretrained`` (safetensors); any other module as
    ``model.safetensors`` holding its state dict.
    """
    path = Path(path)
    plain = merge_and_unload(copy.deepcopy(adapter.model))
    path.mkdir(parents=True, exist_ok=True)
    save_pretrained = getattr(plain, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(str(path))
    else:
        sd = {k: v.contiguous() for k, v in plain.state_dict().items()}
        atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, str(tmp)))
    return path
