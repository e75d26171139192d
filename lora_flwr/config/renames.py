"""Keys that moved when the config was split into one section per feature.

An old key is refused with the key to write instead, so that a TOML file or a
``--set`` written for the flat ``[fed]`` / ``[train]`` layout fails in one line
that says what to change.
"""

from __future__ import annotations

# old dotted key -> new dotted key
RENAMED: dict[str, str] = {
    # [sampling]
    "fed.fraction_fit": "sampling.fraction",
    "fed.min_fit_clients": "sampling.min_clients",
    "fed.min_available_clients": "sampling.min_available",
    "fed.min_fit_replies": "sampling.min_replies",
    # [eval]
    "fed.eval_every": "eval.every",
    "fed.eval_overlap": "eval.overlap",
    "fed.fraction_evaluate": "eval.fraction",
    "fed.min_evaluate_clients": "eval.min_clients",
    "train.eval_batch_size": "eval.batch_size",
    "data.eval_max_examples": "eval.max_examples",
    # [server_opt]
    "fed.server_optimizer": "server_opt.name",
    "fed.server_lr": "server_opt.lr",
    "fed.server_beta1": "server_opt.beta1",
    "fed.server_beta2": "server_opt.beta2",
    "fed.server_tau": "server_opt.tau",
    # [guards]
    "fed.max_update_norm": "guards.max_update_norm",
    "fed.weight_cap": "guards.weight_cap",
    "fed.norm_guard": "guards.norm_guard",
    "fed.norm_guard_factor": "guards.norm_guard_factor",
    "fed.robust": "guards.robust",
    "fed.trim_fraction": "guards.trim_fraction",
    # [privacy]
    "fed.dp_noise_multiplier": "privacy.noise_multiplier",
    "fed.dp_clip_norm": "privacy.clip_norm",
    "fed.dp_delta": "privacy.delta",
    # [compression]
    "fed.compression": "compression.codec",
    "fed.topk_fraction": "compression.topk_fraction",
    # [head]
    "fed.head": "head.mode",
    "fed.head_warmup_rounds": "head.warmup_rounds",
    "fed.head_calibration": "head.calibration",
    "fed.lda_shrinkage": "head.lda_shrinkage",
    "fed.lda_max_examples": "head.lda_max_examples",
    "fed.lda_every": "head.lda_every",
    # [secagg]
    "fed.secagg": "secagg.enabled",
    "fed.secagg_clip": "secagg.clip",
    "fed.secagg_max_weight": "secagg.max_weight",
    "fed.secagg_shares": "secagg.shares",
    "fed.secagg_threshold": "secagg.threshold",
    # [loss]
    "train.loss": "loss.name",
    "train.loss_tau": "loss.tau",
    "train.fedrs_alpha": "loss.fedrs_alpha",
    "train.balanced_beta": "loss.balanced_beta",
    # [compute]
    "train.device": "compute.device",
    "train.precision": "compute.precision",
    "train.num_threads": "compute.num_threads",
    "train.profile": "compute.profile",
    "fed.client_num_cpus": "compute.client_cpus",
    "fed.client_num_gpus": "compute.client_gpus",
}


def unknown_key_error(key: str) -> ValueError:
    """Return the error for a key the schema does not have.

    A key that moved names its new place, both as a dotted key and as the TOML
    table and line to write.
    """
    new = RENAMED.get(key)
    if new is None:
        return ValueError(f"Unknown config key: {key}")
    section, name = new.split(".")
    return ValueError(
        f"Config key `{key}` has moved to `{new}`: write it under [{section}] as "
        f"`{name} = ...` (or --set {new}=...)"
    )
