"""The error every deployment step raises when the deployment or the run fails."""

from __future__ import annotations


class DeployError(RuntimeError):
    """The deployment or the run failed; the message says why."""
