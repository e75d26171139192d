r"""Classification losses for clients whose labels are skewed (``loss.name``).

Every loss takes the logits ``z`` (batch x classes), the labels ``y`` and the
counts ``n_c`` of each class in the client's *local training data* (what the client
knows about its own skew; nothing leaves the client). The model and the server are
unchanged: only the local objective differs, and evaluation uses the plain logits.

* ``ce``: cross-entropy, :math:`-\log \mathrm{softmax}(z)_y`.
* ``fedlc``: logit calibration (Zhang et al., "Federated Learning with Label
  Distribution Skew via Logits Calibration", ICML 2022):
  :math:`-\log \mathrm{softmax}(z - \tau\, n^{-1/4})_y`: the logits of
  classes the client rarely sees are lowered more, so training must score them
  higher (a class-dependent margin) and the local model is less biased towards its
  frequent classes. A class absent from the client counts as 1 (the paper's
  :math:`n_c^{-1/4}` is unbounded at 0).
* ``fedrs``: restricted softmax (Li & Zhan, "FedRS: Federated Learning with
  Restricted Softmax for Label Distribution Non-IID Data", KDD 2021): the logits of
  classes absent from the client are scaled by :math:`\alpha \in [0, 1]` before
  the softmax, so the client does not push their (shared) weights down.
* ``logit_adjust``: logit adjustment by the client's label prior (Menon et al.,
  "Long-tail learning via logit adjustment", ICLR 2021, applied per client):
  :math:`-\log \mathrm{softmax}(z + \tau \log \pi)_y` with
  :math:`\pi_c = n_c / \sum_j n_j`. The client's own prior is added during
  training, so its logits need not learn it: what they learn is the
  class-conditional part the clients share. A class absent from the client has
  :math:`\pi_c = 0` and drops out of the softmax; a client holding one class then
  has a zero loss and a zero gradient, and leaves the adapter as it came.
* ``balanced``: class-balanced cross-entropy (Cui et al., "Class-Balanced Loss
  Based on Effective Number of Samples", CVPR 2019): example weight
  :math:`(1-\beta)/(1-\beta^{n_y})`, normalised so that the weights of the
  batch's examples average to 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

LossName = Literal["ce", "fedlc", "fedrs", "logit_adjust", "balanced"]
LOSSES: tuple[str, ...] = ("ce", "fedlc", "fedrs", "logit_adjust", "balanced")


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count each class in ``labels`` (int64, shape ``(num_classes,)``).

    Raises
    ------
    ValueError
        If a label lies outside ``[0, num_classes)``.
    """
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels should lie in [0, {num_classes}) but range from "
            f"{int(labels.min())} to {int(labels.max())}; check `model.num_labels`"
        )
    return torch.bincount(labels.long(), minlength=num_classes)


def _check_shapes(
    logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor
) -> None:
    """Refuse logits, labels and class counts whose shapes do not agree."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits should be (batch, classes) and labels (batch,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if counts.shape != logits.shape[1:]:
        raise ValueError(
            f"counts should have one entry per class ({logits.shape[1]}), got "
            f"{tuple(counts.shape)}"
        )


def skew_loss(
    name: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    *,
    tau: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.999,
) -> torch.Tensor:
    r"""Mean loss of a batch under ``name`` (see the module docstring).

    Parameters
    ----------
    name
        ``"ce"``, ``"fedlc"``, ``"fedrs"``, ``"logit_adjust"`` or ``"balanced"``.
    logits
        Float tensor ``(batch, classes)``.
    labels
        Int tensor ``(batch,)``.
    counts
        Examples per class in the client's local training data, ``(classes,)``.
    tau
        FedLC's calibration strength, or logit adjustment's :math:`\tau` (>= 0).
    alpha
        FedRS's scale of absent classes' logits, in [0, 1].
    beta
        The class-balanced loss's :math:`\beta` in [0, 1).

    Returns
    -------
    torch.Tensor
        A scalar.

    Raises
    ------
    ValueError
        For an unknown ``name``, shapes that do not agree, or a parameter out of
        its range.
    """
    _check_shapes(logits, labels, counts)
    logits = logits.float()
    counts = counts.to(logits.device)
    if name == "ce":
        return nn.functional.cross_entropy(logits, labels)
    if name == "fedlc":
        if not tau >= 0:
            raise ValueError(f"`loss.tau` should be >= 0, not {tau}")
        shift = tau * counts.clamp(min=1).float().pow(-0.25)
        return nn.functional.cross_entropy(logits - shift, labels)
    if name == "fedrs":
        if not 0 <= alpha <= 1:
            raise ValueError(f"`loss.fedrs_alpha` should be in [0, 1], not {alpha}")
        scale = torch.where(counts > 0, 1.0, alpha).to(logits.dtype)
        return nn.functional.cross_entropy(logits * scale, labels)
    if name == "logit_adjust":
        if not tau >= 0:
            raise ValueError(f"`loss.tau` should be >= 0, not {tau}")
        present = counts > 0
        log_prior = torch.log(counts.clamp(min=1).float() / counts.sum().float())
        # Absent classes out of the softmax (exp(-inf) = 0), whatever tau is.
        shift = torch.where(present, tau * log_prior, -math.inf)
        return nn.functional.cross_entropy(logits + shift, labels)
    if name == "balanced":
        if not 0 <= beta < 1:
            raise ValueError(f"`loss.balanced_beta` should be in [0, 1), not {beta}")
        n = counts.clamp(min=1).double()
        weight = ((1 - beta) / (1 - beta**n)).float()
        per_example = nn.functional.cross_entropy(logits, labels, reduction="none")
        w = weight[labels]
        return (w * per_example).sum() / w.sum()
    raise ValueError(f"`loss.name` is {name!r}; use one of {', '.join(LOSSES)}")
