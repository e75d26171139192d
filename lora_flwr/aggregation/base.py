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
rule- or optimizer-specific arrays.

Notation in the rules' docstrings: ``p_k = n_k / sum_j n_j`` over the clients that
replied, ``s`` the LoRA scaling (``lora_alpha / r``, or ``lora_alpha / sqrt(r)``
with rsLoRA). In rank-tier runs every tier uses the allocated rank's ``s``, so a
zero-padded or truncated factor pair keeps its product.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import numpy.typing as npt

from lora_flwr.aggregation.linalg import F64, cut_to_rank, fold_block, relative_error
from lora_flwr.aggregation.robust import RobustMode, robust_mean
from lora_flwr.protocol import (
    GROUPS,
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

if TYPE_CHECKING:  # annotations only: the rules do not depend on the config
    from lora_flwr.config import FedConfig

NDArray = npt.NDArray[np.float32]
Arrays = dict[str, NDArray]


@dataclass(frozen=True)
class FoldBlock:
    """One step of the base-weight delta: ``Delta W_m = B_m @ A_m`` per module.

    The scaling is already inside the factors.
    """

    factors: Mapping[str, tuple[NDArray, NDArray]]

    @property
    def width(self) -> int:
        """Inner dimension ``R`` of the factors (the same for every module)."""
        return int(next(iter(self.factors.values()))[0].shape[1])


@dataclass(frozen=True)
class ServerState:
    """Everything the server knows between rounds.

    Parameters
    ----------
    round
        The last completed round (0 before the first).
    arrays
        The global adapter at the allocated rank, by weight name.
    base_delta
        Per LoRA module, the delta ``(out, in)`` folded into the base weights so
        far (empty for rules that never merge).
    fold_log
        The factored steps that built ``base_delta``: version ``v`` is
        ``fold_log[:v]`` applied in order with :func:`fold_block`.
    extra
        Rule- or server-optimizer-specific arrays (e.g. ``"opt.m.<name>"``).
    """

    round: int
    arrays: Mapping[str, NDArray]
    base_delta: Mapping[str, NDArray] = field(default_factory=dict)
    fold_log: tuple[FoldBlock, ...] = ()
    extra: Mapping[str, NDArray] = field(default_factory=dict)

    @property
    def base_version(self) -> int:
        """Version of the base weights: how many fold steps were applied."""
        return len(self.fold_log)

    def replace(self, **changes: object) -> ServerState:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows of one client when it plans its call.

    Parameters
    ----------
    partition
        The client's partition id.
    rank
        Its rank tier ``r_k``.
    base_version
        The base-weight version it holds, or None when unknown (e.g. its last
        call failed after folding): it then gets the whole delta.
    """

    partition: int
    rank: int
    base_version: int | None = 0


@dataclass(frozen=True)
class ClientReply:
    """One validated client reply.

    Parameters
    ----------
    partition
        The client's partition id.
    plan
        The plan it was sent.
    arrays
        The reply by weight name (``plan.send`` groups at ``plan.rank``).
    num_examples
        Its local training examples (the weight ``n_k``).
    start
        What its adapter held when training began, by weight name, for every
        group the server knows (received groups and seeded inits; not kept ones).
    """

    partition: int
    plan: Plan
    arrays: Mapping[str, NDArray]
    num_examples: int
    start: Mapping[str, NDArray] = field(default_factory=dict)

    def factor(self, name: str) -> NDArray | None:
        """Return the client's ``name`` after training, if the server can know it."""
        if name in self.arrays:
            return self.arrays[name]
        return self.start.get(name)


@dataclass(frozen=True)
class GroupPlan:
    """Which groups a rule's clients receive, train, send and keep in a round."""

    receive: frozenset[Group]
    train: frozenset[Group]
    send: frozenset[Group]
    keep: frozenset[Group] = frozenset()


ALL: frozenset[Group] = frozenset(GROUPS)
# How the saved modules ("M": e.g. a new classifier head) are treated, on top of
# any rule (``fed.head``; config.HEAD_MODES lists the same names).
HEAD_MODES: tuple[str, ...] = ("averaged", "frozen", "local", "reinit")
_M: frozenset[Group] = frozenset({"M"})


def groups(text: str) -> frozenset[Group]:
    """Return the groups named by a string such as ``"BM"``."""
    return frozenset(g for g in GROUPS if g in text)


def example_weights(replies: Sequence[ClientReply]) -> npt.NDArray[np.float64]:
    """Normalised weights ``p_k = n_k / sum_j n_j`` (float64).

    Raises
    ------
    ValueError
        If there are no replies or the example counts are not positive.
    """
    if not replies:
        raise ValueError("Cannot aggregate zero client replies")
    counts = np.array([r.num_examples for r in replies], dtype=np.float64)
    if np.any(counts <= 0):
        raise ValueError(f"Client example counts must be > 0, got {counts}")
    weights: npt.NDArray[np.float64] = counts / counts.sum()
    return weights


class Rule:
    """Base class of the aggregation rules.

    Parameters
    ----------
    layout
        Names and allocated shapes of the adapter.
    initial
        The shared seeded starting adapter (A, zero B, initial saved modules).
    scaling
        The LoRA scaling ``s`` every client uses.
    """

    name: ClassVar[str] = ""
    # Is the aggregate a plain weighted sum of what clients send? Secure
    # aggregation can only compute such sums.
    plain_weighted_sum: ClassVar[bool] = False
    # Can clients hold different ranks (rank tiers)?
    supports_rank_tiers: ClassVar[bool] = False
    # Does a server optimizer over the averaged tensors make sense?
    supports_server_optimizer: ClassVar[bool] = False
    # No global model exists (FedSA's B stays on the clients): evaluate each
    # client's personalised model on its local split instead.
    personalized: ClassVar[bool] = False
    # Can a coordinate-wise median / trimmed mean replace the weighted mean? Only
    # where the rule's aggregate is a plain average of what clients send.
    supports_robust: ClassVar[bool] = False

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
        # fed.robust: the averaging :meth:`weighted_mean` performs.
        self.robust: RobustMode = "none"
        self.trim_fraction = 0.2
        # Differential privacy (:meth:`use_dp`): equal weights and Gaussian noise.
        self.dp_noise_multiplier = 0.0
        self.dp_clip_norm = 0.0
        self._dp_rng: np.random.Generator | None = None
        # fed.head (:meth:`use_head`).
        self.head = "averaged"
        self.head_warmup_rounds = 0

    def use_dp(self, noise_multiplier: float, clip_norm: float) -> None:
        """Average with equal weights and add Gaussian noise to every mean.

        Each averaged tensor gets ``N(0, (z C / m)^2)`` noise, ``z`` the noise
        multiplier, ``C`` the clip norm the server applied to every update and
        ``m`` the number of replies (DP-FedAvg, McMahan et al., "Learning
        Differentially Private Recurrent Language Models", ICLR 2018). The noise
        comes from fresh OS entropy, never from the run's seed: noise that can be
        replayed protects nothing.

        Raises
        ------
        ValueError
            If the rule's aggregate is not a plain average (see ``check_setup``).
        """
        self.check_setup(rank_tiers=(), server_optimizer="none", dp=True)
        self.dp_noise_multiplier = float(noise_multiplier)
        self.dp_clip_norm = float(clip_norm)
        self._dp_rng = np.random.default_rng(secrets.randbits(128))

    def use_robust(self, mode: RobustMode, trim_fraction: float = 0.2) -> None:
        """Average with a coordinate-wise ``median`` or ``trimmed_mean`` instead.

        Raises
        ------
        ValueError
            If the rule's aggregate is not a plain average (see ``check_setup``).
        """
        self.check_setup(rank_tiers=(), server_optimizer="none", robust=mode)
        self.robust = mode
        self.trim_fraction = trim_fraction

    def use_head(self, mode: str, warmup_rounds: int = 0) -> None:
        """Treat the saved modules (group ``M``, e.g. a new head) as ``mode`` says.

        * ``averaged``: as the rule says (every rule trains, sends and averages M).
        * ``frozen``: trained and averaged in rounds ``1..warmup_rounds``, then
          received but neither trained nor sent; the global M stays as it was
          (``warmup_rounds = 0``: fixed at the seeded init, as FedBABU fixes its
          head: Oh et al., "FedBABU: Toward Enhanced Representation for Federated
          Image Classification", ICLR 2022).
        * ``local``: never received or sent; each client trains and keeps its own
          (the personalised part, like FedSA-LoRA's B: Guo et al., ICLR 2025);
          the global M stays at the seeded init.
        * ``reinit``: not received; every round each client trains it from the
          seeded init, and the server averages those, so head drift does not
          accumulate across rounds.

        Raises
        ------
        ValueError
            For an unknown mode, a negative warm-up, a warm-up with another mode,
            or an adapter without saved modules.
        """
        if mode not in HEAD_MODES:
            raise ValueError(
                f"`fed.head` should be one of {', '.join(map(repr, HEAD_MODES))} "
                f"but is {mode!r}"
            )
        if warmup_rounds < 0 or (warmup_rounds and mode != "frozen"):
            raise ValueError(
                f"`fed.head_warmup_rounds` = {warmup_rounds} should be >= 0, and 0 "
                "unless `fed.head` = 'frozen'"
            )
        if mode != "averaged" and not self.head_names:
            raise ValueError(
                f"`fed.head` = {mode!r} needs saved modules (`lora.modules_to_save`, "
                "e.g. 'classifier') but the adapter has none"
            )
        self.head = mode
        self.head_warmup_rounds = int(warmup_rounds)

    @property
    def head_names(self) -> list[str]:
        """Weight names of the saved modules (group ``M``)."""
        return [n for n in self.layout.names if group_of(n) == "M"]

    @property
    def local_head(self) -> bool:
        """Whether each client keeps its own head (``fed.head = 'local'``)."""
        return self.head == "local"

    def head_groups(self, g: GroupPlan, server_round: int) -> GroupPlan:
        """Apply :meth:`use_head`'s treatment of ``M`` to a rule's round plan."""
        if self.head == "frozen" and server_round > self.head_warmup_rounds:
            return GroupPlan(g.receive, g.train - _M, g.send - _M, g.keep)
        if self.head == "local":
            return GroupPlan(g.receive - _M, g.train, g.send - _M, g.keep | _M)
        if self.head == "reinit":
            return GroupPlan(g.receive - _M, g.train, g.send, g.keep)
        return g

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

    @classmethod
    def check_setup(
        cls,
        *,
        rank_tiers: Sequence[int],
        server_optimizer: str,
        robust: str = "none",
        dp: bool = False,
        secagg: bool = False,
    ) -> None:
        """Refuse combinations that make no sense for this rule (one clear line).

        Raises
        ------
        ValueError
            On heterogeneous rank tiers for a rule that needs one rank, a server
            optimizer for a rule whose state it cannot act on, robust averaging
            or differential privacy for a rule whose aggregate is not a plain
            average, or secure aggregation for a rule whose aggregate is not a
            plain weighted sum of equally shaped replies.
        """
        if len(set(rank_tiers)) > 1 and not cls.supports_rank_tiers:
            raise ValueError(
                f"`fed.aggregation`={cls.name!r} needs one rank for every client but "
                f"`fed.rank_tiers` is {','.join(map(str, rank_tiers))!r}; use hetlora, "
                "flexlora or flora for heterogeneous ranks"
            )
        if server_optimizer != "none" and not cls.supports_server_optimizer:
            raise ValueError(
                f"`fed.server_optimizer`={server_optimizer!r} cannot be combined with "
                f"`fed.aggregation`={cls.name!r}: {cls.optimizer_refusal}"
            )
        if robust != "none" and not cls.supports_robust:
            raise ValueError(
                f"`fed.robust`={robust!r} cannot be combined with "
                f"`fed.aggregation`={cls.name!r}: its aggregate is not a plain "
                "average of what clients send; use fedit, ffa, fedsa, rolora or fedsvd"
            )
        if dp and not cls.supports_robust:
            raise ValueError(
                f"differential privacy (`fed.dp_noise_multiplier` > 0) cannot be "
                f"combined with `fed.aggregation`={cls.name!r}: its aggregate is not "
                "a noisy mean of clipped updates; use ffa or fedsvd (as their papers "
                "do under DP), fedit, fedsa or rolora"
            )

        if secagg and not cls.plain_weighted_sum:
            raise ValueError(
                f"`fed.secagg` = true cannot be combined with `fed.aggregation`="
                f"{cls.name!r}: SecAgg+ reveals only a weighted sum of what clients "
                "send, and this rule needs each reply; use fedit, ffa, fedsa, rolora, "
                "fedsvd or hetlora"
            )
        if secagg and len(set(rank_tiers)) > 1:
            raise ValueError(
                "`fed.secagg` = true needs one rank for every client (SecAgg+ sums "
                f"equally shaped vectors) but `fed.rank_tiers` is "
                f"{','.join(map(str, rank_tiers))!r}"
            )

    @classmethod
    def check_config(cls, fed: FedConfig) -> None:
        """:meth:`check_setup` for the ``[fed]`` section of a config.

        Raises
        ------
        ValueError
            As :meth:`check_setup`.
        """
        cls.check_setup(
            rank_tiers=fed.rank_tiers,
            server_optimizer=fed.server_optimizer,
            robust=fed.robust,
            dp=fed.dp_noise_multiplier > 0,
            secagg=fed.secagg,
        )

    optimizer_refusal: ClassVar[str] = (
        "its state is not a fixed set of averaged tensors"
    )

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

        With ``fed.robust`` set (:meth:`use_robust`) the coordinate-wise median or
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
