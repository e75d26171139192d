"""The one check for named arrays that cross a trust boundary (numpy only).

Used wherever adapter tensors arrive from outside: a client reply on the server
(``FedLoRA``), a payload on the client (``LoRAAdapter.set_weights``) and a file on
disk (adapter loading). Everything is checked before anything is used, and the
first fault is raised as a ``ValueError`` that names the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

Shape = tuple[int, ...]


def check_arrays(
    arrays: Mapping[str, object],
    expected: Sequence[tuple[str, Shape]] | Mapping[str, Shape],
    *,
    dtype: npt.DTypeLike | None = np.float32,
    what: str = "arrays",
) -> None:
    """Raise ``ValueError`` on the first fault of ``arrays`` against ``expected``.

    Checks, in order: the set of names (missing, then unexpected), then per array
    its type (a numpy array), dtype (``dtype``, or any floating type when None),
    shape, and that every value is finite.

    Parameters
    ----------
    arrays
        The arrays by name.
    expected
        ``(name, shape)`` pairs or a name -> shape mapping.
    dtype
        Required dtype; None accepts any floating dtype.
    what
        What the arrays are, for the message (e.g. ``"client reply"``).
    """
    shapes = dict(expected.items() if isinstance(expected, Mapping) else expected)
    missing = [n for n in shapes if n not in arrays]
    unexpected = [n for n in arrays if n not in shapes]
    if missing or unexpected:
        raise ValueError(
            f"{what}: names do not match: missing {_few(missing)} ({len(missing)}), "
            f"unexpected {_few(unexpected)} ({len(unexpected)})"
        )
    for name, shape in shapes.items():
        array = arrays[name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{name}: not a numpy array ({type(array).__name__})")
        if dtype is not None and array.dtype != np.dtype(dtype):
            raise ValueError(f"{name}: dtype {array.dtype}, expected {np.dtype(dtype)}")
        if dtype is None and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name}: dtype {array.dtype} is not floating point")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"{name}: shape {tuple(array.shape)}, expected {tuple(shape)}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: contains NaN or Inf")


def update_norm(
    arrays: Mapping[str, npt.NDArray[np.floating]],
    reference: Mapping[str, npt.NDArray[np.floating]],
) -> float:
    """L2 norm of ``arrays - reference`` over the names both hold (float64)."""
    sq = 0.0
    for name, array in arrays.items():
        if name not in reference:
            continue
        diff = array.astype(np.float64) - reference[name].astype(np.float64)
        sq += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(sq))


def _few(names: Sequence[str]) -> str:
    return str(list(names[:3]))[:-1] + (", ...]" if len(names) > 3 else "]")
