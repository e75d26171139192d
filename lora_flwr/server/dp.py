"""Client-level DP on the server: clip every update, account the privacy spent.

The Gaussian noise itself is the rule's (``Rule.use_dp``); this hook clips each
update ``reply - start`` to ``privacy.clip_norm`` first (flat clipping, as
Flower's DP strategies do) and records the noise std and epsilon per round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_flwr.aggregation import ClientReply, ServerState
from lora_flwr.aggregation.robust import clip_update
from lora_flwr.config import ExperimentConfig
from lora_flwr.privacy import epsilon, require_accountant
from lora_flwr.server.hooks import FitRound
from lora_flwr.server.sampling import sample_count
from lora_flwr.validation import update_norm


class DPHook:
    """Clip updates to ``privacy.clip_norm``; account epsilon over noisy rounds."""

    collapses = False

    def __init__(self, cfg: ExperimentConfig) -> None:
        require_accountant()  # refuse before round 1 trains, not after it
        self.cfg = cfg
        self.rounds = 0  # rounds that released a noisy aggregate

    def on_replies(
        self, fit: FitRound, replies: list[ClientReply]
    ) -> list[ClientReply]:
        """Clip every update to norm ``privacy.clip_norm``; record how many were."""
        out = []
        clipped = 0
        bound = self.cfg.privacy.clip_norm
        for reply in replies:
            if update_norm(reply.arrays, reply.start) > bound:
                clipped += 1
                arrays = clip_update(reply.arrays, reply.start, bound)
                reply = dataclasses.replace(reply, arrays=arrays)
            out.append(reply)
        fit.record.dp_clipped = clipped
        return out

    def on_aggregated(self, fit: FitRound, state: ServerState) -> None:
        """Record the noise std and the privacy spent so far (epsilon at delta)."""
        fed, sampling, privacy = self.cfg.fed, self.cfg.sampling, self.cfg.privacy
        self.rounds += 1
        rec = fit.record
        sampled = sample_count(fed.num_clients, sampling.fraction, sampling.min_clients)
        rec.dp_noise_std = (
            privacy.noise_multiplier * privacy.clip_norm / max(1, rec.fit_ok or 1)
        )
        for name, amplified in (
            ("dp_epsilon", True),
            ("dp_epsilon_unamplified", False),
        ):
            value = epsilon(
                noise_multiplier=privacy.noise_multiplier,
                num_clients=fed.num_clients,
                sampled=sampled,
                rounds=self.rounds,
                delta=privacy.delta,
                amplified=amplified,
            )
            setattr(rec, name, value)

    def counters(self) -> dict[str, Any]:
        """Return the noisy-round count."""
        return {"dp_rounds": self.rounds}

    def restore(self, counters: dict[str, Any]) -> None:
        """Continue the noisy-round count."""
        self.rounds = int(counters.get("dp_rounds", 0))
