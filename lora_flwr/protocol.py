"""What travels between the server and a client, shared by both sides.

Pure standard library: the server (``fl/strategy.py``, ``aggregation/``) and the
client (``fl/client.py``, ``training/``) import it without pulling in each other's
dependencies.

A round's instruction to one client is a :class:`Plan`. It travels as scalars in the
fit (or evaluate) config, and both sides derive the order of the arrays on the wire
from it and from the adapter's weight names, so names never travel.

Adapter tensors fall into three groups:

* ``"A"``: every ``<module>.lora_A.weight``, shape ``(r, in)``,
* ``"B"``: every ``<module>.lora_B.weight``, shape ``(out, r)``,
* ``"M"``: every ``modules_to_save`` parameter (e.g. a new classifier head).

At the start of a call the client sets each group from, in order of precedence, the
payload (``receive``), its private store (``keep``), or the shared seeded init.
Before that it folds the base-weight delta the plan describes into its frozen
weights (``fold_mode``). It then trains ``train``, stores ``keep`` and sends
``send``. The payload is::

    fold section   per LoRA module, in weight order:
                     "stack": <module>.fold_B (out, R), <module>.fold_A (R, in)
                              with R = sum(fold_ranks); block j of width
                              fold_ranks[j] is one server version, added in order
                     "dense": <module>.fold_delta (out, in), the whole delta
    adapter        the adapter weights of the ``receive`` groups, in weight order,
                   A and B cut to the plan's rank

and the reply is the adapter weights of the ``send`` groups in the same form, or,
under ``compression.codec``, their update encoded as :mod:`lora_flwr.compression`
describes (decoded on the server into that form before any check).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Group = Literal["A", "B", "M"]
GROUPS: tuple[Group, ...] = ("A", "B", "M")
FoldMode = Literal["none", "stack", "dense"]

Shape = tuple[int, ...]
Scalar = bool | bytes | float | int | str

# ---------------------------------------------------------------- config keys
# Round instructions the strategy sends with every fit/evaluate call.
ROUND = "server_round"
LR = "lr"
LOCAL_STEPS = "local_steps"
PROX_MU = "prox_mu"
# How the client encodes its fit reply (lora_flwr.compression): the codec name and
# top-k's share of entries. The server decodes with the same two values.
COMPRESSION = "compression"
TOPK_FRACTION = "topk_fraction"
# Evaluate instruction (head.calibration): instead of testing, return the
# class statistics of the head's inputs on the local training split, encoded by
# lora_flwr.aggregation.lda.encode_stats under the same key.
HEAD_STATS = "head_stats"
# The plan, flattened (see Plan.to_config).
PLAN_RANK = "plan.rank"
PLAN_RECEIVE = "plan.receive"
PLAN_TRAIN = "plan.train"
PLAN_SEND = "plan.send"
PLAN_KEEP = "plan.keep"
PLAN_FOLD_MODE = "plan.fold_mode"
PLAN_FOLD_FROM = "plan.fold_from"
PLAN_FOLD_TO = "plan.fold_to"
PLAN_FOLD_RANKS = "plan.fold_ranks"

# ---------------------------------------------------------------- metric keys
# Training and evaluation metrics (LoRATrainer's keys; the client reports them).
TRAIN_LOSS = "train_loss"
NUM_EXAMPLES = "num_examples"
NUM_STEPS = "num_steps"
NUM_TOKENS = "num_tokens"
SECONDS = "seconds"
TOKENS_PER_S = "tokens_per_s"
EVAL_LOSS = "loss"
ACCURACY = "accuracy"
PERPLEXITY = "perplexity"
# What a client reports besides its training metrics.
PARTITION_ID = "partition_id"
BASE_VERSION = "base_version"  # the base-weight version the client now holds
FIT_CALLS = "client_fit_calls"  # how many fit calls this node has served
WORKER_PID = "worker_pid"  # which process served the call (critical path)
MODEL_LOADS = "model_loads"  # base models built by that process so far
# Instruction data: the client's training conversations whose responses
# model.max_length cut short (kept), or cut entirely (left out).
RESPONSES_TRUNCATED = "responses_truncated"
RESPONSES_DROPPED = "responses_dropped"

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
FOLD_A_SUFFIX = ".fold_A"
FOLD_B_SUFFIX = ".fold_B"
FOLD_DELTA_SUFFIX = ".fold_delta"


def group_of(name: str) -> Group:
    """Return the group of an adapter weight name (``"A"``, ``"B"`` or ``"M"``)."""
    if name.endswith(LORA_A_SUFFIX):
        return "A"
    if name.endswith(LORA_B_SUFFIX):
        return "B"
    return "M"


def module_of(name: str) -> str:
    """Return the LoRA module of a ``lora_A``/``lora_B`` weight name."""
    for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{name!r} is not a lora_A/lora_B weight name")


def _groups(value: Iterable[str], key: str) -> frozenset[Group]:
    out: set[Group] = set()
    for g in value:
        if g not in GROUPS:
            raise ValueError(f"`{key}` holds {g!r}; groups are {list(GROUPS)}")
        out.add(g)
    return frozenset(out)


def _fmt_groups(groups: frozenset[Group]) -> str:
    return "".join(g for g in GROUPS if g in groups)


@dataclass(frozen=True)
class Plan:
    """One client's instructions for one call (fit or evaluate).

    Parameters
    ----------
    rank
        Active LoRA rank ``r_k`` (at most the adapter's allocated rank).
    receive
        Groups whose values are in the payload.
    train
        Groups the client trains (the others are frozen).
    send
        Groups the client returns.
    keep
        Groups the client keeps privately between rounds (FedSA's B).
    fold_mode
        ``"none"``, ``"stack"`` (add factored blocks to the held delta) or
        ``"dense"`` (replace the held delta with the whole delta).
    fold_from
        Base-weight version the client must hold before a ``"stack"`` fold.
    fold_to
        Base-weight version the client holds after the fold (and must hold when
        ``fold_mode`` is ``"none"``).
    fold_ranks
        Width of each stacked block, one per server version, for ``"stack"``.
    """

    rank: int
    receive: frozenset[Group] = frozenset(GROUPS)
    train: frozenset[Group] = frozenset(GROUPS)
    send: frozenset[Group] = frozenset(GROUPS)
    keep: frozenset[Group] = frozenset()
    fold_mode: FoldMode = "none"
    fold_from: int = 0
    fold_to: int = 0
    fold_ranks: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        """Check the fields are consistent."""
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"`plan.rank` should be >= 1 but is {self.rank!r}")
        for key in ("receive", "train", "send", "keep"):
            object.__setattr__(self, key, _groups(getattr(self, key), f"plan.{key}"))
        if self.keep & self.receive:
            raise ValueError(
                f"`plan.keep` {_fmt_groups(self.keep)} overlaps `plan.receive` "
                f"{_fmt_groups(self.receive)}: a kept group is never sent down"
            )
        if self.fold_mode not in ("none", "stack", "dense"):
            raise ValueError(f"`plan.fold_mode` is {self.fold_mode!r}")
        if self.fold_to < 0 or self.fold_from < 0:
            raise ValueError("`plan.fold_from` and `plan.fold_to` should be >= 0")
        if self.fold_mode == "stack":
            if not self.fold_ranks or any(r < 1 for r in self.fold_ranks):
                raise ValueError(
                    f"`plan.fold_ranks` should be positive widths for a stacked "
                    f"fold but is {self.fold_ranks!r}"
                )
            if self.fold_to - self.fold_from != len(self.fold_ranks):
                raise ValueError(
                    f"a stacked fold from version {self.fold_from} to "
                    f"{self.fold_to} needs {self.fold_to - self.fold_from} blocks, "
                    f"got {len(self.fold_ranks)}"
                )
        elif self.fold_ranks:
            raise ValueError("`plan.fold_ranks` is only used by a stacked fold")

    def evaluation(self) -> Plan:
        """Return the same plan for an evaluate call: nothing trained or sent."""
        return Plan(
            rank=self.rank,
            receive=self.receive,
            train=frozenset(),
            send=frozenset(),
            keep=self.keep,
            fold_mode=self.fold_mode,
            fold_from=self.fold_from,
            fold_to=self.fold_to,
            fold_ranks=self.fold_ranks,
        )

    # ------------------------------------------------------------ (de)serialise
    def to_config(self) -> dict[str, Scalar]:
        """Flatten into fit/evaluate config scalars (``plan.*`` keys)."""
        return {
            PLAN_RANK: self.rank,
            PLAN_RECEIVE: _fmt_groups(self.receive),
            PLAN_TRAIN: _fmt_groups(self.train),
            PLAN_SEND: _fmt_groups(self.send),
            PLAN_KEEP: _fmt_groups(self.keep),
            PLAN_FOLD_MODE: self.fold_mode,
            PLAN_FOLD_FROM: self.fold_from,
            PLAN_FOLD_TO: self.fold_to,
            PLAN_FOLD_RANKS: ",".join(str(r) for r in self.fold_ranks),
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Scalar]) -> Plan:
        """Read a plan back from config scalars; a missing or bad key is named."""
        try:
            return cls(
                rank=_int(config, PLAN_RANK),
                receive=_groups(str(config[PLAN_RECEIVE]), PLAN_RECEIVE),
                train=_groups(str(config[PLAN_TRAIN]), PLAN_TRAIN),
                send=_groups(str(config[PLAN_SEND]), PLAN_SEND),
                keep=_groups(str(config.get(PLAN_KEEP, "")), PLAN_KEEP),
                fold_mode=str(config.get(PLAN_FOLD_MODE, "none")),  # type: ignore[arg-type]
                fold_from=_int(config, PLAN_FOLD_FROM, 0),
                fold_to=_int(config, PLAN_FOLD_TO, 0),
                fold_ranks=_ints(config, PLAN_FOLD_RANKS),
            )
        except KeyError as exc:
            raise ValueError(
                f"The instruction has no {exc.args[0]!r}; the server and this client "
                "run different versions of lora_flwr"
            ) from None


def _int(config: Mapping[str, Scalar], key: str, default: int | None = None) -> int:
    if key not in config:
        if default is None:
            raise KeyError(key)
        return default
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{key}` should be an integer but is {value!r}")
    return value


def _ints(config: Mapping[str, Scalar], key: str) -> tuple[int, ...]:
    text = str(config.get(key, ""))
    try:
        return tuple(int(r) for r in text.split(",") if r)
    except ValueError:
        raise ValueError(
            f"`{key}` should be comma-separated integers but is {text!r}"
        ) from None


# ------------------------------------------------------------------ wire order
@dataclass(frozen=True)
class AdapterLayout:
    """Names and allocated shapes of an adapter, as both sides know them.

    Parameters
    ----------
    names
        Adapter weight names in weight order (``LoRAAdapter.weight_names()``).
    shapes
        Their shapes at the allocated rank.
    """

    names: tuple[str, ...]
    shapes: tuple[Shape, ...]

    def __post_init__(self) -> None:
        """Check the layout is a LoRA adapter: A/B pairs of one rank."""
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} names for {len(self.shapes)} shapes")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "shapes", tuple(tuple(s) for s in self.shapes))
        a = {module_of(n): s for n, s in self.items() if group_of(n) == "A"}
        b = {module_of(n): s for n, s in self.items() if group_of(n) == "B"}
        if list(a) != list(b):
            raise ValueError("every LoRA module needs a lora_A and a lora_B weight")
        ranks = {s[0] for s in a.values()} | {s[1] for s in b.values()}
        if len(ranks) > 1:
            raise ValueError(f"LoRA factors of several ranks {sorted(ranks)}")

    def items(self) -> list[tuple[str, Shape]]:
        """Return ``(name, shape)`` pairs in weight order."""
        return list(zip(self.names, self.shapes, strict=True))

    @property
    def shape_of(self) -> dict[str, Shape]:
        """Return the allocated shape of every weight, by name."""
        return dict(self.items())

    @property
    def modules(self) -> list[str]:
        """LoRA modules in weight order."""
        return [module_of(n) for n in self.names if group_of(n) == "A"]

    @property
    def rank(self) -> int:
        """Allocated LoRA rank ``r``."""
        for name, shape in self.items():
            if group_of(name) == "A":
                return shape[0]
        raise ValueError("The adapter has no LoRA module")

    def module_dims(self, module: str) -> tuple[int, int]:
        """``(out, in)`` of a LoRA module (the layout of ``B @ A``)."""
        shapes = self.shape_of
        return (
            shapes[module + LORA_B_SUFFIX][0],
            shapes[module + LORA_A_SUFFIX][1],
        )

    def weight_shape(self, name: str, rank: int) -> Shape:
        """Shape of a weight at an active ``rank``."""
        shape = self.shape_of[name]
        group = group_of(name)
        if group == "A":
            return (rank, shape[1])
        if group == "B":
            return (shape[0], rank)
        return shape

    def adapter_spec(
        self, groups: Iterable[Group], rank: int
    ) -> list[tuple[str, Shape]]:
        """Names and shapes of the adapter part of a message, in wire order."""
        chosen = set(groups)
        if rank > self.rank:
            raise ValueError(f"rank {rank} exceeds the allocated rank {self.rank}")
        return [
            (name, self.weight_shape(name, rank))
            for name in self.names
            if group_of(name) in chosen
        ]

    def fold_spec(self, plan: Plan) -> list[tuple[str, Shape]]:
        """Names and shapes of the fold section of a payload, in wire order."""
        if plan.fold_mode == "none":
            return []
        out: list[tuple[str, Shape]] = []
        width = sum(plan.fold_ranks)
        for module in self.modules:
            d_out, d_in = self.module_dims(module)
            if plan.fold_mode == "dense":
                out.append((module + FOLD_DELTA_SUFFIX, (d_out, d_in)))
            else:
                out.append((module + FOLD_B_SUFFIX, (d_out, width)))
                out.append((module + FOLD_A_SUFFIX, (width, d_in)))
        return out

    def payload_spec(self, plan: Plan) -> list[tuple[str, Shape]]:
        """Names and shapes of everything a client receives under ``plan``."""
        return self.fold_spec(plan) + self.adapter_spec(plan.receive, plan.rank)

    def reply_spec(self, plan: Plan) -> list[tuple[str, Shape]]:
        """Names and shapes of the reply a client sends under ``plan``."""
        return self.adapter_spec(plan.send, plan.rank)


def pair_names(
    spec: Sequence[tuple[str, Shape]], arrays: Sequence[object]
) -> dict[str, object]:
    """Key wire arrays by the names of ``spec``; the count must match."""
    if len(arrays) != len(spec):
        raise ValueError(
            f"{len(arrays)} arrays but the plan expects {len(spec)} "
            f"({', '.join(n for n, _ in spec[:3])}{', ...' if len(spec) > 3 else ''})"
        )
    return {name: array for (name, _), array in zip(spec, arrays, strict=True)}
