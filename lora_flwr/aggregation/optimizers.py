r"""Server optimizers on the pseudo-gradient of what a rule averaged (pure numpy).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2). For every
tensor ``x`` that the rule set to a weighted mean ``x_agg`` this round, with
``Delta = x_agg - x`` (the pseudo-gradient, pointing the way the clients moved):

.. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) \Delta_t

    \text{FedAdagrad: } v_t = v_{t-1} + \Delta_t^2

    \text{FedYogi: } v_t = v_{t-1} - (1 - \beta_2) \Delta_t^2
        \operatorname{sign}(v_{t-1} - \Delta_t^2)

    \text{FedAdam: } v_t = \beta_2 v_{t-1} + (1 - \beta_2) \Delta_t^2

    x_{t+1} = x_t + \eta \, m_t / (\sqrt{v_t} + \tau)

with :math:`m_{-1} = 0` and :math:`v_{-1} = \tau^2` (the paper asks
:math:`v_{-1} \ge \tau^2`; Flower starts at 0). FedAvgM (Hsu et al., "Measuring
the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019): :math:`m_t = \beta_1 m_{t-1} + \Delta_t`,
:math:`x_{t+1} = x_t + \eta m_t`; with :math:`\eta = 1, \beta_1 = 0` it is the rule
itself. Optimizer state lives in ``ServerState.extra`` as ``opt.m.<name>`` and
``opt.v.<name>``; a tensor the rule did not average this round keeps its value
and its moments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

OptimizerName = Literal["none", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]
OPTIMIZERS: tuple[OptimizerName, ...] = (
    "none",
    "fedavgm",
    "fedadagrad",
    "fedadam",
    "fedyogi",
)
M_PREFIX = "opt.m."
V_PREFIX = "opt.v."

Arr = npt.NDArray[np.floating]


@dataclass(frozen=True)
class ServerOptimizer:
    """One of FedAvgM, FedAdagrad, FedAdam, FedYogi with its hyper-parameters.

    Parameters
    ----------
    name
        ``"fedavgm"``, ``"fedadagrad"``, ``"fedadam"`` or ``"fedyogi"``.
    lr
        Server learning rate ``eta``.
    beta1
        Momentum ``beta_1``.
    beta2
        Second-moment decay ``beta_2`` (FedAdam, FedYogi).
    tau
        Adaptivity ``tau``: floor of the denominator and ``sqrt(v_{-1})``.
    """

    name: OptimizerName
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        """Validate the hyper-parameters."""
        if self.name not in OPTIMIZERS or self.name == "none":
            raise ValueError(
                f"`server_opt.name` should be one of {list(OPTIMIZERS[1:])} but "
                f"the value passed is {self.name!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"`server_opt.lr` should be > 0 but is {self.lr}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError(
                "`server_opt.beta1` and `server_opt.beta2` must be in [0, 1)"
            )
        if not self.tau > 0:
            raise ValueError(f"`server_opt.tau` should be > 0 but is {self.tau}")

    def step(
        self,
        old: Mapping[str, Arr],
        aggregated: Mapping[str, Arr],
        names: Sequence[str],
        state: Mapping[str, Arr],
    ) -> tuple[dict[str, Arr], dict[str, Arr]]:
        """Apply one server step to the tensors ``names``.

        Parameters
        ----------
        old
            The global tensors before the round.
        aggregated
            The rule's new tensors (``x_agg``).
        names
            Tensors the rule averaged this round.
        state
            Optimizer state from the previous round (may be empty).

        Returns
        -------
        tuple of dict
            The tensors after the step (only ``names``; float64 math, input dtype)
            and the whole new optimizer state.
        """
        out: dict[str, Arr] = {}
        new_state = dict(state)
        b1, b2 = self.beta1, self.beta2
        for name in names:
            x = old[name].astype(np.float64)
            delta = aggregated[name].astype(np.float64) - x
            m_prev = state.get(M_PREFIX + name)
            m = np.zeros_like(x) if m_prev is None else m_prev.astype(np.float64)
            if self.name == "fedavgm":
                m = b1 * m + delta
                x_new = x + self.lr * m
            else:
                v_prev = state.get(V_PREFIX + name)
                v = (
                    np.full_like(x, self.tau**2)
                    if v_prev is None
                    else v_prev.astype(np.float64)
                )
                m = b1 * m + (1 - b1) * delta
                d2 = delta * delta
                if self.name == "fedadagrad":
                    v = v + d2
                elif self.name == "fedyogi":
                    v = v - (1 - b2) * d2 * np.sign(v - d2)
                else:  # fedadam
                    v = b2 * v + (1 - b2) * d2
                x_new = x + self.lr * m / (np.sqrt(v) + self.tau)
                new_state[V_PREFIX + name] = v
            new_state[M_PREFIX + name] = m
            out[name] = x_new.astype(old[name].dtype)
        return out, new_state
