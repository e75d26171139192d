"""Low-rank linear algebra the rules share: folding, stacking, truncated SVD.

All products are taken in float64. :func:`fold_block` is the one operation that
turns a base-weight delta into the next version; the server and every client call
this same function on the same float32 inputs, so on one machine they hold the
same bits for the same version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lora_flwr.protocol import group_of

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def fold_block(
    delta: npt.NDArray[np.floating] | None,
    b: npt.NDArray[np.floating],
    a: npt.NDArray[np.floating],
) -> npt.NDArray[np.floating]:
    """Return ``delta + b @ a`` (float64 product and sum, result in ``b``'s dtype).

    Parameters
    ----------
    delta
        The held delta ``(out, in)``, or None for a zero delta.
    b, a
        One version's factored delta: ``(out, R)`` and ``(R, in)``.
    """
    acc = b.astype(np.float64) @ a.astype(np.float64)
    if delta is not None:
        acc += delta.astype(np.float64)
    return acc.astype(b.dtype)


def stack_factors(
    bs: Sequence[npt.NDArray[np.floating]],
    as_: Sequence[npt.NDArray[np.floating]],
    coefs: Sequence[float],
) -> tuple[F64, F64]:
    r"""Stack factor pairs so that one product is their weighted sum.

    .. math:: [B_1 \dots B_K] \, [c_1 A_1; \dots; c_K A_K] = \sum_k c_k B_k A_k

    The coefficient goes to the A side. Ranks may differ between pairs.
    """
    if not (len(bs) == len(as_) == len(coefs)) or not bs:
        raise ValueError("stack_factors needs the same, non-zero number of B, A, c")
    b = np.concatenate([x.astype(np.float64) for x in bs], axis=1)
    a = np.concatenate(
        [c * x.astype(np.float64) for c, x in zip(coefs, as_, strict=True)], axis=0
    )
    return b, a


def lowrank_svd(
    b: npt.NDArray[np.floating], a: npt.NDArray[np.floating]
) -> tuple[F64, F64, F64]:
    """Thin SVD of ``b @ a`` without forming it: ``b @ a = U diag(S) Vt``.

    With ``b`` of shape ``(out, k)`` and ``a`` of shape ``(k, in)``: QR of both
    factors, then the SVD of the small ``k x k`` core, so the cost is
    ``O((out + in) k^2)``. Returns ``U (out, k')``, ``S (k',)``, ``Vt (k', in)``
    with ``k' = min(k, out, in)``, singular values in decreasing order.
    """
    b64 = np.asarray(b, dtype=np.float64)
    a64 = np.asarray(a, dtype=np.float64)
    qb, rb = np.linalg.qr(b64)  # b = qb rb
    qa, ra = np.linalg.qr(a64.T)  # a^T = qa ra, so a = ra^T qa^T
    core = rb @ ra.T  # b a = qb (rb ra^T) qa^T
    u_c, s, vt_c = np.linalg.svd(core, full_matrices=False)
    u = qb @ u_c
    vt = vt_c @ qa.T
    return u, s, vt


def truncate(u: F64, s: F64, vt: F64, rank: int) -> tuple[F64, F64]:
    """Best rank-``rank`` factors ``(B, A) = (U_r diag(S_r), Vt_r)``, zero-padded.

    ``A = Vt_r`` has orthonormal rows. When fewer than ``rank`` singular triplets
    exist, the missing columns of B and rows of A are zero.
    """
    k = min(rank, s.shape[0])
    b = np.zeros((u.shape[0], rank))
    a = np.zeros((rank, vt.shape[1]))
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vt[:k]
    return b, a


def relative_error(approx: F64, exact: F64) -> float:
    """``||approx - exact||_F / ||exact||_F`` (0 when both are zero)."""
    denom = float(np.linalg.norm(exact))
    num = float(np.linalg.norm(approx - exact))
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def cut_to_rank(array: npt.NDArray[Any], name: str, rank: int) -> npt.NDArray[Any]:
    """Cut weight ``name`` to ``rank``: A's first rows, B's first columns.

    Other weights (saved modules) are returned as they are.
    """
    group = group_of(name)
    if group == "A":
        return np.ascontiguousarray(array[:rank])
    if group == "B":
        return np.ascontiguousarray(array[:, :rank])
    return array
