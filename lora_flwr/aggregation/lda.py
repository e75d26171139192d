"""A classification head fitted on the server from exactly aggregated class statistics.

Under label skew the averaged head is what breaks: each client's head learns its
own label prior, and their average predicts one class (docs/RESULTS.md, "Label
skew"). The features under the head stay useful. So the server can refit the head
from statistics that add up exactly across clients: per class ``c`` the count
``n_c`` and the feature sum ``s_c = sum_{y_i = c} x_i``, and the scatter
``S = sum_i x_i x_i^T`` over all examples. From their sums it computes the linear
discriminant (LDA: Gaussian classes with one shared covariance; Hastie, Tibshirani
and Friedman, *The Elements of Statistical Learning*, 2nd ed., section 4.3)::

    mu_c  = s_c / n_c,   pi_c = n_c / N,   N = sum_c n_c
    Sigma = (S - sum_c n_c mu_c mu_c^T) / (N - C)          pooled within-class
    Sigma_l = Sigma + l * (tr(Sigma) / d) * I                shrinkage (Friedman 1989)
    m = sum_c pi_c mu_c
    w_c = Sigma_l^{-1} (mu_c - m),   b_c = -(m + (mu_c - m) / 2)^T w_c + log pi_c

so ``softmax(W x + b)`` is the model's posterior and its argmax the Bayes rule
under the federation's own label prior. (The textbook ``w_c = Sigma_l^{-1} mu_c``,
``b_c = -1/2 mu_c^T w_c + log pi_c`` gives the same posterior: the two differ by
a term common to every class. But the features' common mean can lie along a
direction of tiny variance, and then those terms reach 1e5 and cancel in the
logits: centring keeps the head's values on the scale of the class differences.)
The pooled statistics, hence the head, are identical to those of one party
holding all the data: no client's skew leaks into it. Recalibrating the
classifier on the server from per-class feature statistics is the idea of CCVR
(Luo et al., "No Fear of Heterogeneity: Classifier Calibration for Federated
Learning with Non-IID Data", NeurIPS 2021), which samples virtual features from
per-class Gaussians and retrains the head on them; here the Gaussian model's own
classifier is computed in closed form instead.

What a client reveals: its class counts, per-class feature sums and feature
second moments (not single examples). Pure numpy: no torch, no flwr.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

# Keys of the encoded statistics (see encode_stats).
_KEYS = ("counts", "sums", "scatter_upper")


@dataclass(frozen=True)
class ClassStats:
    """Sufficient statistics of a labelled feature set for LDA.

    Attributes
    ----------
    counts
        ``(C,)`` examples per class.
    sums
        ``(C, d)`` per-class feature sums.
    scatter
        ``(d, d)`` sum of ``x x^T`` over all examples (symmetric).
    """

    counts: F64
    sums: F64
    scatter: F64

    @property
    def num_labels(self) -> int:
        """Number of classes ``C``."""
        return int(self.counts.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.sums.shape[1])

    @property
    def total(self) -> int:
        """Number of examples ``N``."""
        return int(round(float(self.counts.sum())))

    def __add__(self, other: ClassStats) -> ClassStats:
        """Statistics of the union of two disjoint example sets."""
        if (other.num_labels, other.dim) != (self.num_labels, self.dim):
            raise ValueError(
                f"cannot add class statistics of shape ({other.num_labels} classes, "
                f"dim {other.dim}) to ({self.num_labels} classes, dim {self.dim})"
            )
        return ClassStats(
            self.counts + other.counts,
            self.sums + other.sums,
            self.scatter + other.scatter,
        )


def stats_sample(labels: npt.ArrayLike, cap: int, seed: int) -> npt.NDArray[np.int64]:
    """Pick at most about ``cap`` examples, stratified by class.

    Class ``c`` keeps ``m_c = clip(round(cap * n_c / n), 1, n_c)`` of its ``n_c``
    examples, drawn without replacement: every class present keeps at least one.
    ``cap <= 0`` or ``cap >= n`` keeps every example. Pass the full split's class
    counts to :func:`class_stats` to scale the sample back up.
    """
    y = np.asarray(labels).astype(np.int64)
    if cap <= 0 or cap >= y.size:
        return np.arange(y.size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    keep: list[npt.NDArray[np.int64]] = []
    for c in np.unique(y):
        where = np.flatnonzero(y == c)
        m = int(np.clip(round(cap * where.size / y.size), 1, where.size))
        keep.append(np.sort(rng.choice(where, size=m, replace=False)))
    return np.sort(np.concatenate(keep))


def class_stats(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    num_labels: int,
    counts: npt.ArrayLike | None = None,
) -> ClassStats:
    """Compute :class:`ClassStats` of ``features`` ``(n, d)`` with ``labels`` ``(n,)``.

    ``counts``: the class counts of the full set when ``features`` are a
    stratified sample of it (:func:`stats_sample`). The counts are then exact and
    each class's sums and scatter are scaled by ``n_c / m_c``: unbiased estimates
    of the full set's.

    Raises
    ------
    ValueError
        On mismatched lengths, non-finite features, labels outside
        ``[0, num_labels)``, or counts a class of the sample exceeds.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"features {x.shape} and labels {y.shape} should be (n, d) and (n,)"
        )
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf")
    if y.size and (y.min() < 0 or y.max() >= num_labels):
        raise ValueError(f"labels should lie in [0, {num_labels}), got {np.unique(y)}")
    onehot = np.zeros((x.shape[0], num_labels))
    onehot[np.arange(x.shape[0]), y.astype(np.int64)] = 1.0
    sampled = onehot.sum(0)
    if counts is None:
        return ClassStats(sampled, onehot.T @ x, x.T @ x)
    full = np.asarray(counts, dtype=np.float64)
    if full.shape != (num_labels,) or (full < sampled).any():
        raise ValueError(
            f"counts {full} should have {num_labels} entries, each at least the "
            f"sample's {sampled}"
        )
    scale = np.divide(full, sampled, out=np.zeros(num_labels), where=sampled > 0)
    if ((full > 0) & (sampled == 0)).any():
        raise ValueError(f"the sample {sampled} misses a class the counts {full} hold")
    w = onehot @ scale
    return ClassStats(full, (onehot * w[:, None]).T @ x, (x * w[:, None]).T @ x)


def merge_stats(parts: Iterable[ClassStats]) -> ClassStats:
    """Sum the statistics of disjoint example sets (clients)."""
    items = list(parts)
    if not items:
        raise ValueError("no class statistics to merge")
    total = items[0]
    for part in items[1:]:
        total = total + part
    return total


def lda_head(stats: ClassStats, shrinkage: float = 1e-3) -> tuple[F64, F64]:
    """Fit the LDA head ``(W (C, d), b (C,))`` to pooled statistics.

    See the module docstring for the formula.

    Parameters
    ----------
    stats
        The federation's summed statistics.
    shrinkage
        ``l`` >= 0: how far the pooled covariance is pulled toward
        ``tr(Sigma)/d * I``. Keeps the solve well posed when ``d`` is near ``N``
        or features are collinear.

    Raises
    ------
    ValueError
        If a class has no examples (its mean is undefined: nobody holds it), there
        are not more examples than classes, or the covariance is singular.
    """
    if not shrinkage >= 0:
        raise ValueError(f"`shrinkage` should be >= 0 but is {shrinkage}")
    counts = stats.counts
    empty = [c for c in range(stats.num_labels) if counts[c] <= 0]
    if empty:
        raise ValueError(
            f"class(es) {empty} have no examples in any client's statistics: the "
            "LDA head needs every class held somewhere"
        )
    n = float(counts.sum())
    if n <= stats.num_labels:
        raise ValueError(
            f"{n:g} examples for {stats.num_labels} classes: LDA needs more "
            "examples than classes"
        )
    mu = stats.sums / counts[:, None]
    within = stats.scatter - (mu.T * counts) @ mu
    sigma = (within + within.T) / 2 / (n - stats.num_labels)
    ridge = shrinkage * np.trace(sigma) / stats.dim
    sigma[np.diag_indices_from(sigma)] += ridge
    mean = (counts / n) @ mu
    try:
        weight = np.asarray(np.linalg.solve(sigma, (mu - mean).T).T, dtype=np.float64)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"the pooled feature covariance is singular ({exc}); raise "
            "`head.lda_shrinkage` above 0"
        ) from exc
    bias: F64 = -np.einsum("cd,cd->c", weight, mean + (mu - mean) / 2)
    bias = bias + np.log(counts / n)
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise ValueError(
            "the LDA head is not finite (ill-conditioned covariance); raise "
            "`head.lda_shrinkage`"
        )
    return weight, bias


def head_weight_names(
    names: Sequence[str], shapes: Sequence[tuple[int, ...]], num_labels: int
) -> tuple[str, str]:
    """Find the head's output layer among the saved modules: ``(weight, bias)`` names.

    The layer is the one 2-D ``<m>.weight`` of shape ``(num_labels, d)`` with a
    ``<m>.bias`` of shape ``(num_labels,)``.

    Raises
    ------
    ValueError
        If there is not exactly one such pair.
    """
    shape_of = dict(zip(names, shapes, strict=True))
    found = [
        (n, n[: -len("weight")] + "bias")
        for n, s in shape_of.items()
        if n.endswith(".weight")
        and len(s) == 2
        and s[0] == num_labels
        and shape_of.get(n[: -len("weight")] + "bias") == (num_labels,)
    ]
    if len(found) != 1:
        raise ValueError(
            f"the LDA head needs exactly one saved linear layer with {num_labels} "
            f"outputs and a bias (lora.modules_to_save, e.g. 'classifier'); found "
            f"{[w for w, _ in found]} among {list(names)}"
        )
    return found[0]


def encode_stats(stats: ClassStats) -> bytes:
    """Serialise statistics for the wire (``.npz``; the scatter's upper triangle)."""
    buf = io.BytesIO()
    upper = stats.scatter[np.triu_indices(stats.dim)]
    np.savez(buf, counts=stats.counts, sums=stats.sums, scatter_upper=upper)
    return buf.getvalue()


def decode_stats(data: object, num_labels: int, dim: int) -> ClassStats:
    """Read statistics sent by a client, checking everything.

    Raises
    ------
    ValueError
        If ``data`` is not bytes, not an ``.npz`` of the expected keys, of the
        wrong shapes, not finite, or with counts that are not non-negative
        integers.
    """
    if not isinstance(data, bytes):
        raise ValueError(f"class statistics should be bytes, got {type(data).__name__}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            keys = set(npz.files)
            if keys != set(_KEYS):
                raise ValueError(f"keys {sorted(keys)}, expected {sorted(_KEYS)}")
            arrays = {k: np.asarray(npz[k], dtype=np.float64) for k in _KEYS}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"unreadable class statistics: {exc}") from exc
    upper_len = dim * (dim + 1) // 2
    expected = {
        "counts": (num_labels,),
        "sums": (num_labels, dim),
        "scatter_upper": (upper_len,),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise ValueError(
                f"class statistics `{key}` has shape {arrays[key].shape}, "
                f"expected {shape}"
            )
        if not np.isfinite(arrays[key]).all():
            raise ValueError(f"class statistics `{key}` contains NaN or Inf")
    counts = arrays["counts"]
    if (counts < 0).any() or (counts != np.round(counts)).any():
        raise ValueError(f"class counts {counts} should be non-negative integers")
    scatter = np.zeros((dim, dim))
    scatter[np.triu_indices(dim)] = arrays["scatter_upper"]
    scatter = scatter + np.triu(scatter, 1).T
    if (np.diag(scatter) < 0).any():
        raise ValueError("class statistics: the scatter has a negative diagonal")
    sums = arrays["sums"]
    if (sums[counts == 0] != 0).any():
        raise ValueError("class statistics: a class with no examples has non-zero sums")
    # Real features give a positive semi-definite within-class scatter
    # (S - sum_c n_c mu_c mu_c^T); anything else is made up, and would bend the
    # pooled covariance however its sender liked.
    held = counts > 0
    mu = sums[held] / counts[held, None]
    within = scatter - (mu.T * counts[held]) @ mu
    lowest = float(np.linalg.eigvalsh((within + within.T) / 2)[0])
    if lowest < -1e-6 * max(1.0, float(np.trace(scatter))):
        raise ValueError(
            "class statistics are inconsistent: the within-class scatter has a "
            f"negative eigenvalue ({lowest:.3g}); no set of features gives that"
        )
    return ClassStats(counts, sums, scatter)
