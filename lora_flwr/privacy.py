"""Privacy spent by client-level DP-FedAvg, from a maintained RDP accountant.

The server samples ``m`` of ``n`` clients per round without replacement (our
seeded sampler), clips each update to ``C`` and adds ``N(0, (z C)^2)`` to their
sum (``z C / m`` on the mean). Two neighbouring federations differ in one client's
data (``REPLACE_ONE``), which moves the sum by at most ``2 C``: the accountant
sees a Gaussian mechanism of noise multiplier ``z / 2``, amplified by sampling
without replacement (Wang, Balle, Kasiviswanathan, AISTATS 2019), composed over
the rounds. The RDP accountant is Google's ``dp-accounting``.

Amplification by sampling assumes the sample is secret. Our sampler is seeded from
``seed`` in the run config, so whoever knows the config knows the sample: the
guarantee with sampling then holds only if the server keeps the seed secret, and
:func:`epsilon` also reports the bound without amplification (every round counts).

``dp-accounting`` (and the scipy it pulls) is the ``dp`` extra, needed only when
``privacy.noise_multiplier > 0``: :func:`require_accountant` refuses such a run in
one line before it starts when the extra is missing.
"""

from __future__ import annotations

import math
import warnings

INSTALL_DP = "pip install 'lora_flwr[dp]'"


class AccountantMissingError(ImportError, ValueError):
    """``dp-accounting`` cannot be imported (a ValueError too: a refused config)."""


def require_accountant() -> None:
    """Refuse differential privacy before a run starts if its accountant is missing.

    Call it for a run with ``privacy.noise_multiplier > 0`` before any engine
    starts; without it the missing package would show only after round 1 trained.

    Raises
    ------
    AccountantMissingError
        ``dp-accounting`` (the ``dp`` extra) cannot be imported: one line naming
        the install command. It is a ValueError, like every refused config.
    """
    try:
        import dp_accounting.rdp  # noqa: F401 (imports the package too)
    except ImportError as exc:
        raise AccountantMissingError(
            "`privacy.noise_multiplier` > 0 needs the privacy accountant "
            f"`dp-accounting`, which cannot be imported ({exc}); install it with: "
            f"{INSTALL_DP}"
        ) from None


def epsilon(
    *,
    noise_multiplier: float,
    num_clients: int,
    sampled: int,
    rounds: int,
    delta: float,
    amplified: bool = True,
) -> float:
    """Return epsilon at ``delta`` after ``rounds`` rounds of client-level DP.

    Parameters
    ----------
    noise_multiplier
        ``z``: noise std on the sum of clipped updates divided by the clip norm.
    num_clients, sampled
        ``n`` clients, ``m`` sampled per round without replacement.
    rounds
        Rounds composed so far.
    delta
        Target delta.
    amplified
        Account for the sampling (False: as if every round saw everyone's data).

    Raises
    ------
    ValueError
        On a non-positive noise multiplier, ``sampled`` outside ``[1, n]``, or
        ``delta`` outside (0, 1).
    AccountantMissingError
        ``dp-accounting`` (the ``dp`` extra) is not installed.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier should be > 0 but is {noise_multiplier}")
    if not 1 <= sampled <= num_clients:
        raise ValueError(f"sampled={sampled} should be in [1, {num_clients}]")
    if not 0 < delta < 1:
        raise ValueError(f"delta should be in (0, 1) but is {delta}")
    if rounds <= 0:
        return 0.0
    require_accountant()
    import dp_accounting
    from dp_accounting import rdp

    # Replace-one doubles the sensitivity of the sum: z / 2 per unit of it.
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    event: dp_accounting.DpEvent = gaussian
    if amplified and sampled < num_clients:
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, sampled, gaussian
        )
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(event, rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps = float(accountant.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf
