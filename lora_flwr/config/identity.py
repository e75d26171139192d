"""A run's identity: the resolved config minus what cannot change its numbers.

A resume continues a run only under the config that run started with; anything
else would mix two experiments in one history (rounds 1-2 at one learning rate,
3-5 at another). The identity is every flat key of the config except
:data:`IDENTITY_EXEMPT`; the server stores it, with its :func:`fingerprint`, in
every checkpoint, and a resume compares against it
(:func:`lora_flwr.fl.checkpoint.resume_checkpoint`).

Exempt, because they cannot change a result:

* ``name`` and ``output_dir``: where the run is written (``--resume DIR`` and
  the deployment scripts' absolute ``output_dir`` change them);
* ``on_existing``: how this attempt treats the folder (a resume sets it);
* ``compute.profile``: adds timing columns to the history, computes the same;
* ``compute.gradient_checkpointing``: recomputes the same activations in the
  backward pass (the same gradients; a resume may turn it on to fit memory);
* ``compute.progress_every``: how often a client logs its progress;
* ``eval.benchmark*``, ``eval.samples``, ``eval.sample_tokens``: read-outs of the
  final global model after the last round, which no round depends on (a resume
  may add or change them).

Everything else stays in, also where an effect is small or indirect:
``fed.num_rounds`` (the last round's evaluation and head refit),
``compute.device``, ``compute.precision``, ``compute.num_threads`` (reduction
order), ``compute.client_cpus``/``client_gpus`` (which clients share a process and
a device), ``eval.*`` (what the history holds).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lora_flwr.config.load import FlatValue, toml_value

if TYPE_CHECKING:
    from lora_flwr.config.schema import ExperimentConfig

IDENTITY_EXEMPT = (
    "name",
    "output_dir",
    "on_existing",
    "compute.profile",
    "compute.gradient_checkpointing",
    "compute.progress_every",
    "eval.benchmark",
    "eval.benchmark_split",
    "eval.benchmark_per_subject",
    "eval.samples",
    "eval.sample_tokens",
)


def run_identity(cfg: ExperimentConfig) -> dict[str, FlatValue]:
    """Return the flat config keys that define ``cfg``'s run, with their values."""
    return {k: v for k, v in cfg.to_flat().items() if k not in IDENTITY_EXEMPT}


def fingerprint(identity: Mapping[str, FlatValue]) -> str:
    """Return the SHA-256 (hex) of ``identity`` as sorted, compact JSON."""
    text = json.dumps(dict(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def identity_differences(
    there: Mapping[str, FlatValue], now: Mapping[str, FlatValue]
) -> list[str]:
    """Describe each key whose value differs: ``train.lr (0.02 there, 0.5 now)``.

    Keys come in ``now``'s order (the schema's), then keys only ``there`` has; a
    key one side lacks shows as ``absent``. Values are written as in TOML.
    """
    keys = [*now, *(k for k in there if k not in now)]
    out = []
    for key in keys:
        old, new = there.get(key), now.get(key)
        if old != new or type(old) is not type(new):
            out.append(f"{key} ({_shown(old)} there, {_shown(new)} now)")
    return out


def _shown(value: FlatValue | None) -> str:
    return "absent" if value is None else toml_value(value)
