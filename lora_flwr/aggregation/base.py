"""The rule API every aggregation method implements, and the registry (pure numpy).

A rule is an object that answers four questions, round by round:

* :meth:`Rule.plan`: what one client does (its rank, which factor groups it
  receives, trains, sends and keeps, and which base-weight delta it must fold in);
* :meth:`Rule.payload`: the arrays that client receives, in wire order;
* :meth:`Rule.reply_spec`: the names and shapes its reply must have;
* :meth:`Rule.aggregate`: the new :class:`ServerState` from the validated replies.

Arrays are keyed by adapter weight name (``<module>.lora_A.weight``, ...). The
server state holds the global adapter at the allocated rank, the accumulated
base-weight delta of rules that merge (FLoRA, FedEx-LoRA) with the factored log of
how it grew (so a client that missed rounds can catch up exactly), and any
rule- or optimizer-specific arrays. Those value types live in
:mod:`lora_flwr.aggregation.state`; the capability flags and run options (robust,
DP, head) in :mod:`lora_flwr.aggregation.options`.

Notation in the rules' docstrings: ``p_k = n_k / sum_j n_j`` over the clients that
replied, ``s`` the LoRA scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)``
with rsLoRA). In rank-tier runs every tier uses the allocated rank's ``s``, so a
zero-padded or truncated factor pair keeps its product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lora_flwr.aggregation.linalg import F64, cut_to_rank, fold_block, relative_error
from lora_flwr.aggregation.options import HEAD_MODES, RuleOptions
from lora_flwr.aggregation.robust import robust_mean
from lora_flwr.aggregation.state import (
    ALL,
    Arrays,
    ClientInfo,
    ClientReply,
    FoldBlock,
    GroupPlan,
    NDArray,
    ServerState,
    example_weights,
    groups,
)
from lora_flwr.protocol import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    AdapterLayout,
    FoldMode,
    Group,
    Plan,
    Shape,
    group_of,
)
from lora_flwr.validation import check_arrays

# The value types and option names live in ``state`` and ``options``; they stay
# importable from here, where the rule API has always been described.
__all__ = [
    "ALL",
    "HEAD_MODES",
    "Arrays",
    "ClientInfo",
    "ClientReply",
    "FoldBlock",
    "GroupPlan",
    "NDArray",
    "Rule",
    "RuleFactory",
    "ServerState",
    "available_rules",
    "example_weights",
    "get_rule",
    "groups",
    "register",
]


class Rule(RuleOptions):
    """Base class of the aggregation rules.

    Parameters
    ----------
    layout
        Names and allocated shapes of the adapter.
    initial
        The shared seeded starting adapter (A, zero B, initial saved modules).
    scaling
        The LoRA scaling ``s`` every client uses.

    Notes
    -----
    The capability flags, :meth:`check_setup` and the robust, DP and head options
    come from :class:`~lora_flwr.aggregation.options.RuleOptions`.
    """

    def __init__(
        self, layout: AdapterLayout, initial: Mapping[str, NDArray], scaling: float
    ) -> None:
        check_arrays(initial, layout.items(), dtype=None, what="initial adapter")
        dtypes = {np.dtype(a.dtype) for a in initial.values()}
        if len(dtypes) != 1 or not dtypes <= {
            np.dtype(np.float32),
            np.dtype(np.float64),
        }:
            raise ValueError(f"initial adapter: one float dtype expected, got {dtypes}")
        if not scaling > 0:
            raise ValueError(f"`scaling` should be > 0 but is {scaling}")
        self.layout = layout
        # float32 on the wire; tests run the same maths in float64.
        self.dtype = dtypes.pop()
        self.initial: Arrays = {n: np.array(a) for n, a in initial.items()}
        self.scaling = float(scaling)
        super().__init__()

    def update(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """:meth:`aggregate`, with ``M`` held fixed when clients did not send it.

        A frozen or local head is not in the replies: the rule sees the global
        value in its place, and the new state keeps the old one exactly (no
        robust, DP or rounding change).
        """
        fixed = [n for n in self.head_names if not any(n in r.arrays for r in replies)]
        if not fixed:
            return self.aggregate(state, replies, server_round)
        filled = [
            dataclasses.replace(
                r, arrays={**r.arrays, **{n: state.arrays[n] for n in fixed}}
            )
            for r in replies
        ]
        new = self.aggregate(state, filled, server_round)
        return new.replace(arrays={**new.arrays, **{n: state.arrays[n] for n in fixed}})

    def __repr__(self) -> str:
        """Name shown in logs."""
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------- overrides
    def round_groups(self, server_round: int) -> GroupPlan:
        """Return the groups received, trained, sent and kept in ``server_round``."""
        return GroupPlan(receive=ALL, train=ALL, send=ALL)

    def aggregate(
        self, state: ServerState, replies: Sequence[ClientReply], server_round: int
    ) -> ServerState:
        """Return the new state from the validated replies (sorted by partition)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def init_state(self) -> ServerState:
        """Return the state before round 1: the seeded initial adapter, no fold."""
        return ServerState(round=0, arrays=dict(self.initial))

    def global_arrays(self, state: ServerState) -> Arrays:
        """Return the global adapter at the allocated rank (evaluation, export)."""
        return dict(state.arrays)

    # ------------------------------------------------------------------ plans
    def plan(self, state: ServerState, client: ClientInfo, server_round: int) -> Plan:
        """Return the fit plan of one client in ``server_round``."""
        g = self.head_groups(self.round_groups(server_round), server_round)
        mode, start, end, ranks = self.catch_up(state, client.base_version)
        return Plan(
            rank=client.rank,
            receive=g.receive,
            train=g.train,
            send=g.send,
            keep=g.keep,
            fold_mode=mode,
            fold_from=start,
            fold_to=end,
            fold_ranks=ranks,
        )

    def catch_up(
        self, state: ServerState, held: int | None
    ) -> tuple[FoldMode, int, int, tuple[int, ...]]:
        """How a client holding base version ``held`` reaches the server's version.

        Returns ``(mode, from, to, block widths)``. The stacked blocks of the
        missed versions are sent when they take fewer bytes than one dense delta
        per module; an unknown version always gets the dense delta.
        """
        now = state.base_version
        # Nothing folded yet: every node of this run holds W0, whatever it says.
        if held == now or now == 0:
            return "none", now, now, ()
        if held is None or held > now:
            return "dense", 0, now, ()
        blocks = state.fold_log[held:now]
        stack = sum(
            b.width * sum(sum(self.layout.module_dims(m)) for m in self.layout.modules)
            for b in blocks
        )
        dense = sum(o * i for o, i in map(self.layout.module_dims, self.layout.modules))
        if stack <= dense:
            return "stack", held, now, tuple(b.width for b in blocks)
        return "dense", held, now, ()

    def payload(self, state: ServerState, plan: Plan) -> list[NDArray]:
        """Return the arrays ``plan``'s client receives, in wire order."""
        out = self.fold_arrays(state, plan)
        for name, shape in self.layout.adapter_spec(plan.receive, plan.rank):
            array = self.down(state, name, plan.rank)
            assert array.shape == shape, (name, array.shape, shape)
            out.append(array)
        return out

    def down(self, state: ServerState, name: str, rank: int) -> NDArray:
        """Global value of ``name`` as sent to a client of ``rank`` (cut to rank)."""
        return cut_to_rank(state.arrays[name], name, rank)

    def fold_arrays(self, state: ServerState, plan: Plan) -> list[NDArray]:
        """Return the fold section of ``plan``'s payload."""
        if plan.fold_mode == "none":
            return []
        out: list[NDArray] = []
        for module in self.layout.modules:
            if plan.fold_mode == "dense":
                out.append(_delta_or_zero(state, self.layout, module, self.dtype))
                continue
            blocks = state.fold_log[plan.fold_from : plan.fold_to]
            out.append(np.concatenate([b.factors[module][0] for b in blocks], axis=1))
            out.append(np.concatenate([b.factors[module][1] for b in blocks], axis=0))
        return out

    def reply_spec(self, plan: Plan) -> list[tuple[str, Shape]]:
        """Names and shapes the reply of ``plan``'s client must have."""
        return self.layout.reply_spec(plan)

    def start_arrays(self, state: ServerState, plan: Plan) -> Arrays:
        """Return what the client's adapter holds when training starts, where known.

        Received groups hold the payload; groups neither received nor kept hold
        the seeded init; kept groups are private (absent here).
        """
        out: Arrays = {}
        for name, _ in self.layout.adapter_spec(ALL, plan.rank):
            group = group_of(name)
            if group in plan.receive:
                out[name] = self.down(state, name, plan.rank)
            elif group not in plan.keep:
                out[name] = cut_to_rank(self.initial[name], name, plan.rank)
        return out

    # ---------------------------------------------------------------- helpers
    def averaged_names(self, replies: Sequence[ClientReply]) -> list[str]:
        """Global weights the rule set to a weighted mean this round.

        A server optimizer acts on exactly these.
        """
        sent: set[Group] = set()
        for reply in replies:
            sent |= reply.plan.send
        return [n for n in self.layout.names if group_of(n) in sent]

    def weighted_mean(
        self, replies: Sequence[ClientReply], name: str, *, pad: bool = False
    ) -> F64:
        """``sum_k p_k X_k`` of one weight (float64); ``pad`` zero-pads to rank r.

        With ``guards.robust`` set (:meth:`use_robust`) the coordinate-wise median or
        trimmed mean of the ``X_k`` instead (unweighted); with differential privacy
        (:meth:`use_dp`) their plain mean plus Gaussian noise.
        """
        weights = example_weights(replies)
        shape = self.layout.shape_of[name]
        values: list[F64] = []
        for reply in replies:
            value = reply.arrays[name].astype(np.float64)
            if pad:
                value = _pad(value, shape)
            elif value.shape != shape:
                raise ValueError(
                    f"{name}: shape {value.shape} but the global is {shape}"
                )
            values.append(value)
        if self.robust != "none":
            return robust_mean(values, self.robust, self.trim_fraction)
        if self._dp_rng is not None:
            # Clipped updates, equal weights: one client moves the mean by at
            # most C/m, which is what the noise is calibrated to.
            mean: F64 = np.mean(values, axis=0)
            std = self.dp_noise_multiplier * self.dp_clip_norm / len(values)
            return mean + self._dp_rng.normal(0.0, std, size=shape)
        acc = np.zeros(shape, dtype=np.float64)
        for w, value in zip(weights, values, strict=True):
            acc += w * value
        return acc

    def cast(self, arrays: Mapping[str, npt.NDArray[np.floating]]) -> Arrays:
        """Cast arrays to the adapter's dtype (rules compute in float64)."""
        return {n: np.asarray(a, dtype=self.dtype) for n, a in arrays.items()}

    def with_fold(self, state: ServerState, block: FoldBlock) -> ServerState:
        """State with ``block`` folded into the base delta (the next version)."""
        delta = {
            m: fold_block(state.base_delta.get(m), b, a)
            for m, (b, a) in block.factors.items()
        }
        return state.replace(base_delta=delta, fold_log=(*state.fold_log, block))

    def aggregation_error(
        self,
        old: ServerState,
        new: ServerState,
        replies: Sequence[ClientReply],
    ) -> float | None:
        r"""Relative error of the global update against the mean client update.

        .. math::
            \frac{\| (D' - D) + s B' A' - \sum_k p_k s B_k A_k \|_F}
                 {\| \sum_k p_k s B_k A_k \|_F}

        averaged over LoRA modules, where ``D, D'`` are the base deltas before and
        after the round, ``B' A'`` the new global product and ``B_k A_k`` client
        ``k``'s product after training. FedIT's is the error of averaging the
        factors separately. None when the server cannot know a client's product
        (FedSA keeps B private).
        """
        if self.personalized or not replies:
            return None
        weights = example_weights(replies)
        errors: list[float] = []
        new_global = self.global_arrays(new)
        for module in self.layout.modules:
            a_name, b_name = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
            ideal: F64 | None = None
            for w, reply in zip(weights, replies, strict=True):
                a, b = reply.factor(a_name), reply.factor(b_name)
                if a is None or b is None:
                    return None
                term = w * self.scaling * (b.astype(np.float64) @ a.astype(np.float64))
                ideal = term if ideal is None else ideal + term
            assert ideal is not None
            effective = self.scaling * (
                new_global[b_name].astype(np.float64)
                @ new_global[a_name].astype(np.float64)
            )
            if module in new.base_delta:
                effective += new.base_delta[module].astype(np.float64)
            if module in old.base_delta:
                effective -= old.base_delta[module].astype(np.float64)
            errors.append(relative_error(effective, ideal))
        return float(np.mean(errors))


def _pad(value: F64, shape: Shape) -> F64:
    """Zero-pad a factor cut to a lower rank back to the allocated shape."""
    if value.shape == shape:
        return value
    out = np.zeros(shape, dtype=np.float64)
    out[tuple(slice(0, n) for n in value.shape)] = value
    return out


def _delta_or_zero(
    state: ServerState, layout: AdapterLayout, module: str, dtype: np.dtype[Any]
) -> NDArray:
    if module in state.base_delta:
        return state.base_delta[module]
    return np.zeros(layout.module_dims(module), dtype=dtype)


# -------------------------------------------------------------------- registry
_RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: register a rule under its ``name`` (``fed.aggregation``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _RULES:
        raise ValueError(f"Aggregation rule {cls.name!r} is already registered")
    _RULES[cls.name] = cls
    return cls


def get_rule(name: str) -> type[Rule]:
    """Return the rule class registered as ``name``.

    Raises
    ------
    ValueError
        If no rule has that name; the message lists the known ones.
    """
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(
            f"`fed.aggregation` should be one of {available_rules()} but the value "
            f"passed is {name!r}"
        ) from None


def available_rules() -> list[str]:
    """Names of the registered rules, sorted."""
    return sorted(_RULES)


RuleFactory = Callable[[AdapterLayout, Mapping[str, NDArray], float], Rule]
