"""Values a run accepts but that are far from what such settings usually are.

The schema refuses what no run needs (``train.lr`` above 10, a LoRA scaling above
1e4, ...). Between that and the usual range lies what is merely unusual: a typo
(``0.5`` for ``5e-4``) or a deliberate probe. :func:`unusual_values` says which,
one line each, naming the key, the value and the usual range; the run prints
them once where it starts (``run_simulation.py`` before Ray, a deployment's
ServerApp) and goes on.

Only settings the config actually uses are read: ``server_opt.lr`` without a
server optimizer, or ``loss.tau`` with a loss that has none, are never warned
about. The shipped configs (``configs/*.toml``) raise none (a test keeps them so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_flwr.config.schema import ExperimentConfig

# AdamW on LoRA: 1e-5..1e-2 in the LoRA papers and PEFT's examples (the shipped
# configs use 5e-4..2e-2).
_ADAMW_LR = (1e-6, 0.1)
# SGD (FedLC / FedRS' setting): 1e-3..1; its step is the gradient times lr.
_SGD_LR = (1e-6, 2.0)
# lora_alpha / r: alpha r..2r gives 1..2; rsLoRA's alpha / sqrt(r) a few more.
_SCALING = 64.0
# Server rates (Reddi et al., ICLR 2021, tune over 1e-3..10): the adaptive
# optimizers move each coordinate by about lr a round, fedavgm scales the mean.
_ADAPTIVE_SERVER_LR = 1.0
_FEDAVGM_SERVER_LR = 10.0
_PROX_MU = 10.0  # FedProx tunes mu over 0.001..1
_TAU = 10.0  # FedLC and logit adjustment: tau around 0.1..2
_WEIGHT_DECAY = 1.0  # AdamW: 0..0.1


def _g(value: float) -> str:
    return f"{value:g}"


def unusual_values(cfg: ExperimentConfig) -> list[str]:
    """Say which used settings of ``cfg`` lie far outside their usual range.

    Returns
    -------
    list[str]
        One line per unusual value, ending in ``"; continuing"``; empty when
        there is none.
    """
    lines: list[str] = []
    train = cfg.train
    lo, hi = _SGD_LR if train.optimizer == "sgd" else _ADAMW_LR
    usual = (
        "1e-3..1 for SGD"
        if train.optimizer == "sgd"
        else "1e-5..1e-2 for AdamW on LoRA"
    )
    if train.lr > hi:
        lines.append(f"train.lr = {_g(train.lr)} is far above the usual {usual}")
    elif train.lr < lo:
        lines.append(
            f"train.lr = {_g(train.lr)} is far below the usual {usual}: the "
            "adapter will barely move"
        )
    if train.weight_decay > _WEIGHT_DECAY:
        lines.append(
            f"train.weight_decay = {_g(train.weight_decay)} is far above the usual "
            "0..0.1"
        )
    lora = cfg.lora
    if lora.scaling > _SCALING:
        divisor = "sqrt(lora.r)" if lora.use_rslora else "lora.r"
        lines.append(
            f"lora.lora_alpha = {_g(lora.lora_alpha)} gives a LoRA scaling "
            f"{_g(lora.scaling)} (lora_alpha / {divisor}), far above the usual 0.25..4"
        )
    server = cfg.server_opt
    if server.name == "fedavgm" and server.lr > _FEDAVGM_SERVER_LR:
        lines.append(
            f"server_opt.lr = {_g(server.lr)} is far above the usual 0.1..3 for "
            "fedavgm (the server moves the adapter lr x the clients' mean update)"
        )
    elif server.name not in ("none", "fedavgm") and server.lr > _ADAPTIVE_SERVER_LR:
        lines.append(
            f"server_opt.lr = {_g(server.lr)} is far above the usual 1e-3..1e-1 for "
            f"{server.name} (each coordinate moves by about lr a round)"
        )
    if cfg.fed.prox_mu > _PROX_MU:
        lines.append(
            f"fed.prox_mu = {_g(cfg.fed.prox_mu)} is far above FedProx's usual "
            "0.001..1: the clients will barely leave the global adapter"
        )
    if cfg.loss.name in ("fedlc", "logit_adjust") and cfg.loss.tau > _TAU:
        lines.append(
            f"loss.tau = {_g(cfg.loss.tau)} is far above the usual 0.1..2 for "
            f"{cfg.loss.name}: the calibration outweighs the logits"
        )
    return [f"{line}; continuing" for line in lines]
