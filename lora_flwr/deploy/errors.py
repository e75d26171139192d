"""The errors every deployment step raises when the deployment or the run fails."""

from __future__ import annotations


class DeployError(RuntimeError):
    """The deployment or the run failed; the message says why."""


class BadInput(DeployError, ValueError):
    """The config, data, model or run folder cannot run; the message says why.

    Raised before any process starts; the launchers exit 2, like run_simulation.py.
    A ValueError too: what is refused is a value the user gave.
    """
