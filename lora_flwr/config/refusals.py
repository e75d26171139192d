"""The one table of settings that are valid alone but cannot run together.

Each row names the keys it reads, says when the combination is refused and what
would work instead. A row whose keys all lie in one section is applied when that
section is built (``HeadConfig(warmup_rounds=2)`` alone is refused); a row across
sections when the whole :class:`~lora_flwr.config.ExperimentConfig` is built.
:func:`cross_feature_errors` applies every row to a whole config, for checks such
as the preflight that want them all at once.

Only what the config itself decides belongs here; what needs more (the rule
registry's capabilities, the model's own task) stays where that is known.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_flwr.config.choices import BASE_DELTA_RULES, NATIVE_MODEL_NAMES

if TYPE_CHECKING:
    from lora_flwr.config.schema import ExperimentConfig


@dataclass(frozen=True)
class Refusal:
    """A combination of settings that cannot run together."""

    keys: tuple[str, ...]  # dotted keys it reads; the first is the one to change
    refuse: Callable[[ExperimentConfig], bool]  # true when the combination is set
    # What the first key should be instead, and why; "{lora.r}" shows a value.
    fix: str

    @property
    def section(self) -> str:
        """The one section all keys lie in, or "" when they span several."""
        sections = {k.partition(".")[0] if "." in k else "" for k in self.keys}
        return sections.pop() if len(sections) == 1 else ""

    def wanted(self, cfg: ExperimentConfig) -> str:
        """Return :attr:`fix` with the values it names filled in from ``cfg``."""
        return _PLACEHOLDER.sub(lambda m: str(_value(cfg, m.group(1))), self.fix)

    def message(self, cfg: ExperimentConfig) -> str:
        """Return one line naming every key of the row, its value and the fix."""
        first, *others = self.keys
        given = ", ".join(f"{k} = {_shown(_value(cfg, k))}" for k in others)
        return (
            f"`{first}` should be {self.wanted(cfg)} but the value passed is "
            f"{_shown(_value(cfg, first))} (with {given})"
        )


_PLACEHOLDER = re.compile(r"\{([a-z_]+\.[a-z_0-9]+)\}")


def _value(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _shown(value: object) -> str:
    """Write a value as a config file does: true, 'x', [4, 8]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _lora_scaling(cfg: ExperimentConfig) -> float:
    """``LoraConfig.scaling`` from the three keys it reads."""
    lora = cfg.lora
    divisor = math.sqrt(lora.r) if lora.use_rslora else lora.r
    return float(lora.lora_alpha) / divisor


def _over_clients(key: str) -> Refusal:
    """Refuse a client count ``key`` above fed.num_clients (it cannot be met)."""
    return Refusal(
        (key, "fed.num_clients"),
        lambda c: typing.cast(int, _value(c, key)) > c.fed.num_clients,
        "at most fed.num_clients={fed.num_clients} (no more clients exist)",
    )


# The largest lora_alpha / r (rsLoRA: / sqrt(r)) a config may ask for.
MAX_LORA_SCALING = 1e4

_HIDDEN = "with secagg.enabled = true: the server sees no single update"
_NATIVE = " or ".join(NATIVE_MODEL_NAMES)

# In the order they are checked: the first refusal that applies is reported.
REFUSALS: tuple[Refusal, ...] = (
    # ------------------------------------------------------------------- model
    Refusal(
        ("model.implementation", "model.name"),
        lambda c: (
            c.model.implementation == "native"
            and c.model.name not in NATIVE_MODEL_NAMES
        ),
        f"'auto' or 'transformers' when model.name is not {_NATIVE} (the models "
        "with a plain-torch implementation)",
    ),
    # ------------------------------------------------------------------- train
    Refusal(
        ("model.quantization", "fed.aggregation"),
        lambda c: (
            c.model.quantization != "none" and c.fed.aggregation in BASE_DELTA_RULES
        ),
        "'none' with fed.aggregation={fed.aggregation}: "
        f"{' and '.join(BASE_DELTA_RULES)} fold part of the update into the base "
        "weights, which a quantized base cannot hold; use another rule (e.g. "
        "fedit, flexlora)",
    ),
    Refusal(
        ("train.local_steps", "train.local_epochs"),
        lambda c: c.train.local_steps == 0 and c.train.local_epochs == 0,
        "> 0, or train.local_epochs > 0 (else nothing trains)",
    ),
    Refusal(
        ("train.weight_decay", "train.lr"),
        # AdamW and SGD both multiply every weight by 1 - lr x weight_decay per
        # step: at 0 a step wipes the adapter, below it the weights flip sign and
        # grow. No run needs that; lr x weight_decay is usually below 1e-4.
        lambda c: c.train.lr * c.train.weight_decay >= 1,
        "smaller: train.lr x weight_decay must stay below 1 (each step multiplies "
        "the weights by 1 - lr x weight_decay; at 1 or more they are wiped or flip "
        "sign)",
    ),
    Refusal(
        ("train.momentum", "train.optimizer"),
        lambda c: c.train.momentum != 0 and c.train.optimizer != "sgd",
        "0 unless train.optimizer = 'sgd' (momentum is sgd's)",
    ),
    # ----------------------------------------------------------- client counts
    _over_clients("sampling.min_clients"),
    _over_clients("sampling.min_available"),
    _over_clients("sampling.min_replies"),
    _over_clients("eval.min_clients"),
    # ------------------------------------------ guards, privacy and the head
    Refusal(
        ("guards.robust", "privacy.noise_multiplier"),
        lambda c: c.privacy.noise_multiplier != 0 and c.guards.robust != "none",
        "'none' with differential privacy (privacy.noise_multiplier > 0: its noise "
        "is calibrated to a mean)",
    ),
    Refusal(
        ("guards.filter", "privacy.noise_multiplier"),
        lambda c: (
            c.privacy.noise_multiplier != 0 and c.guards.filter not in ("none", "auto")
        ),
        "'none' or 'auto' with differential privacy (privacy.noise_multiplier > 0: "
        "leaving out a client for what it sent is not in the accountant's analysis)",
    ),
    Refusal(
        ("head.mode", "head.calibration"),
        lambda c: (
            c.head.calibration != "none" and c.head.mode not in ("averaged", "frozen")
        ),
        "'averaged' or 'frozen' with head.calibration = 'lda' (the server's "
        "head must reach the clients)",
    ),
    Refusal(
        ("head.calibration", "secagg.enabled", "privacy.noise_multiplier"),
        lambda c: (
            c.head.calibration != "none"
            and (c.secagg.enabled or c.privacy.noise_multiplier != 0)
        ),
        "'none' with secagg.enabled or differential privacy (privacy.noise_multiplier "
        "> 0): they do not cover the class statistics the clients would send",
    ),
    Refusal(
        ("head.calibration", "guards.robust"),
        lambda c: c.head.calibration != "none" and c.guards.robust != "none",
        "'none' with guards.robust (a median or trimmed mean of class statistics is "
        "not implemented; the statistics are checked for consistency only)",
    ),
    Refusal(
        ("head.warmup_rounds", "head.mode"),
        lambda c: c.head.warmup_rounds != 0 and c.head.mode != "frozen",
        "0 unless head.mode = 'frozen' (rounds the head trains before it is frozen)",
    ),
    # ------------------------------------------------------------------ secagg
    Refusal(
        ("sampling.min_clients", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.sampling.min_clients < 2,
        ">= 2 with secagg.enabled = true (a sum of one update reveals it)",
    ),
    Refusal(
        ("guards.norm_guard", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.guards.norm_guard != "off",
        f"'off' {_HIDDEN}",
    ),
    Refusal(
        ("guards.weight_cap", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.guards.weight_cap != 0,
        f"0 {_HIDDEN}",
    ),
    Refusal(
        ("guards.max_update_norm", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.guards.max_update_norm != 0,
        f"0 {_HIDDEN}",
    ),
    Refusal(
        ("guards.robust", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.guards.robust != "none",
        f"'none' {_HIDDEN}",
    ),
    Refusal(
        ("guards.filter", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.guards.filter not in ("none", "auto"),
        f"'none' or 'auto' {_HIDDEN}",
    ),
    Refusal(
        ("compression.codec", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.compression.codec != "none",
        "'none' with secagg.enabled = true (SecAgg+ sums equally shaped float vectors "
        "and quantises them itself; a per-client encoding cannot be decoded inside "
        "that sum)",
    ),
    Refusal(
        ("privacy.noise_multiplier", "secagg.enabled"),
        lambda c: c.secagg.enabled and c.privacy.noise_multiplier != 0,
        f"0 {_HIDDEN} (DP clips each update)",
    ),
    Refusal(
        ("fed.rank_tiers", "secagg.enabled"),
        lambda c: c.secagg.enabled and len(set(c.fed.rank_tiers)) > 1,
        "one rank for every client with secagg.enabled = true (SecAgg+ sums equally "
        "shaped vectors)",
    ),
    # ---------------------------------------------------------- LoRA and loss
    Refusal(
        ("lora.lora_alpha", "lora.r", "lora.use_rslora"),
        # The scaling multiplies every LoRA update. The usual one is 0.25..4 (alpha
        # r to 2r, or rsLoRA's alpha / sqrt(r)); at 1e4 a single step of 1e-4
        # already moves a layer by as much as its weights, and 1e30 overflows
        # float32 activations: nothing trains. No real run needs more than 1e4.
        lambda c: _lora_scaling(c) > MAX_LORA_SCALING,
        f"a value whose LoRA scaling (lora_alpha / r, or / sqrt(r) with use_rslora) "
        f"is at most {MAX_LORA_SCALING:g} (the factor on every LoRA update, usually "
        "0.25..4)",
    ),
    Refusal(
        ("fed.rank_tiers", "lora.r"),
        lambda c: bool(c.fed.rank_tiers) and max(c.fed.rank_tiers) != c.lora.r,
        "ranks whose largest equals lora.r={lora.r} (the allocated rank)",
    ),
    Refusal(
        ("head.calibration", "lora.modules_to_save"),
        lambda c: c.head.calibration != "none" and not c.lora.modules_to_save,
        "'none' when lora.modules_to_save is empty (there is no head to refit; set "
        "lora.modules_to_save, e.g. 'classifier')",
    ),
    Refusal(
        ("head.mode", "lora.modules_to_save"),
        lambda c: c.head.mode != "averaged" and not c.lora.modules_to_save,
        "'averaged' when lora.modules_to_save is empty (there is no head to treat; "
        "set lora.modules_to_save, e.g. 'classifier')",
    ),
    Refusal(
        ("loss.name", "model.task"),
        lambda c: c.model.task == "causal_lm" and c.loss.name != "ce",
        "'ce' with model.task = 'causal_lm' (the other losses act on class logits)",
    ),
)


def _errors(cfg: ExperimentConfig, rows: Iterable[Refusal]) -> list[str]:
    return [row.message(cfg) for row in rows if row.refuse(cfg)]


def cross_feature_errors(cfg: ExperimentConfig) -> list[str]:
    """Every refusal of :data:`REFUSALS` that ``cfg`` triggers, as messages.

    Returns
    -------
    list[str]
        One line per refused combination, in table order; empty when none.
    """
    return _errors(cfg, REFUSALS)


def check_cross_feature(cfg: ExperimentConfig) -> None:
    """Raise on the combinations of :data:`REFUSALS` that ``cfg`` triggers.

    Raises
    ------
    ValueError
        Listing every refused combination, one per line.
    """
    errors = cross_feature_errors(cfg)
    if errors:
        raise ValueError("\n".join(errors))


def check_refusals(obj: object, section: str) -> None:
    """Apply the rows that read only ``section`` (``""``: rows across sections).

    Raises
    ------
    ValueError
        On the first such row ``obj`` triggers.
    """
    rows = [row for row in REFUSALS if row.section == section]
    # A row local to one section reads nothing else, so that section alone,
    # under its own name, stands in for the whole config.
    view = obj if not section else types.SimpleNamespace(**{section: obj})
    errors = _errors(typing.cast("ExperimentConfig", view), rows)
    if errors:
        raise ValueError(errors[0])
