"""Uplink compression of a client's reply (pure numpy and the standard library).

``compression.codec`` picks how a client encodes its reply before Flower serializes
it; the server decodes every reply back to float32 arrays before any check, so the
validation, the guards and the rules see the same kind of reply as without
compression. Only the uplink is compressed: what the server sends (the global
adapter, fold blocks) stays float32, as every client must hold the same bits.

What is coded is the **update** ``u = reply - reference``, where the reference of a
weight is what the client started from: the payload for a received group, the
seeded init for a group neither received nor kept (both sides compute it, as
``Rule.start_arrays`` does), zero for a kept group (private: the server does not
know it). Coding the update rather than the weights puts the coding error on the
scale of one round's change (FedPAQ quantises the update the same way, Reisizadeh
et al., AISTATS 2020). The server rebuilds ``reference + decode(u)`` in float32.

An encoded reply is a short list of 1-D arrays, each serialized by Flower with its
own dtype (``np.save``), so the bytes counted on the server (``bytes_up``) are the
encoded bytes::

    header    uint32  [MAGIC, codec id, CRC-32 of the reference, n, size_1..size_n]
    fp16      float16 (N,)                  the update, tensor after tensor
    bf16      uint16  (N,)                  bfloat16 bits of the update
    int8      float32 (S,) scales, int8 (N,) values
    topk      uint32  (k,) flat indices (strictly increasing), float32 (k,) values

with ``N = sum(size_i)`` over the reply's tensors in wire order. The header names
the codec, the tensor count and sizes, and a CRC-32 of the reference the client
coded against (a client and server that disagree on the start are refused rather
than decoded into a wrong reply). :func:`decode_reply` checks everything (array
count, dtypes, lengths, codec, sizes, CRC, index order and range, finite scales
and values) and raises ``ValueError`` naming the fault; the strategy drops such a
reply like any other malformed one.

Codecs and their error bounds, per element ``x`` of the update:

``none``  float32 arrays as before; exact.
``fp16``  IEEE half precision, round to nearest even (numpy's cast):
          ``|x' - x| <= 2**-11 |x|`` in fp16's normal range (``|x| >= 2**-14``),
          ``<= 2**-25`` below it (subnormal spacing 2**-24); ``|x| > 65504`` is
          refused on the client. (IEEE 754-2008 binary16.)
``bf16``  bfloat16 (float32's 8-bit exponent, 7 stored mantissa bits), rounded to
          nearest even from the float32 bits: ``|x' - x| <= 2**-8 |x|`` for float32
          normals. (Kalamkar et al., "A Study of BFLOAT16 for Deep Learning
          Training", 2019.)
``int8``  symmetric linear quantisation with one float32 scale per slice:
          ``s = max|slice| / 127`` (rounded up to float32, so no value clips),
          ``q = round(x / s)`` in ``[-127, 127]``, ``x' = q s``, so
          ``|x' - x| <= s / 2`` (up to float32 rounding of the product). A 2-D
          tensor gets one scale per slice along its longer axis
          (``min(rows, cols)`` scales): per row of ``lora_A (r, in)`` and per
          column of ``lora_B (out, r)``, i.e. per rank-1 component. Per row of
          ``lora_B`` would be one 4-byte scale per ``r`` int8 values (+50 % at
          r=8). Other tensors get one scale. (Per-channel absmax quantisation as
          in Jacob et al., CVPR 2018; Dettmers et al., LLM.int8(), 2022.)
``topk``  the ``k = max(1, round(fraction * N))`` entries of largest magnitude of
          ``u + e`` over the whole reply (float32 values, exact), where ``e`` is the
          client's residual: what it did not send before. The client keeps
          ``e' = u + e - sent`` for its next round (error feedback: Stich, Cordonnier
          and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al.,
          "Error Feedback Fixes SignSGD and other Gradient Compression Schemes",
          ICML 2019), so over rounds everything computed is sent, later.

None of the lossy codecs keeps a round's aggregate a plain weighted sum of what the
clients send: each fp16/bf16/int8 reply must be decoded on its own (int8 with its
own scales), and top-k replies have different index sets. Secure aggregation
(SecAgg+, which quantises on its own and sums equally shaped float vectors) needs
that sum, so ``secagg.enabled`` requires ``compression.codec = "none"``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

NDArray = npt.NDArray[np.float32]
Shape = tuple[int, ...]

Codec = Literal["none", "fp16", "bf16", "int8", "topk"]
CODECS: tuple[Codec, ...] = ("none", "fp16", "bf16", "int8", "topk")
# Codec ids in the header (0 is never sent: "none" sends the float32 reply).
CODEC_IDS: dict[Codec, int] = {"fp16": 1, "bf16": 2, "int8": 3, "topk": 4}
MAGIC = 0x3143464C  # b"LFC1" read as a little-endian uint32 (format version 1)
HEADER_FIXED = 4  # MAGIC, codec id, reference CRC, tensor count
# np.save (Flower's ndarray_to_bytes) writes a 128-byte npy v1.0 header before
# each array of the shapes sent here (1-D, or a LoRA factor; measured, numpy 2.4).
NPY_HEADER_NBYTES = 128
INT8_MAX = 127
FP16_MAX = 65504.0

_U32 = np.dtype("<u4")
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
_I8 = np.dtype("i1")
# What every codec sends after the header: (section name, dtype).
_SECTIONS: dict[Codec, tuple[tuple[str, np.dtype[np.generic]], ...]] = {
    "fp16": (("values", _F16),),
    "bf16": (("values", _U16),),
    "int8": (("scales", _F32), ("values", _I8)),
    "topk": (("indices", _U32), ("values", _F32)),
}


@dataclass(frozen=True)
class EncodedReply:
    """What a client sends, and the residual it keeps (top-k only).

    Parameters
    ----------
    arrays
        The arrays Flower serializes, in order.
    residual
        ``topk``: what was computed but not sent, per reply tensor (the error
        feedback for the next round); None for the other codecs.
    """

    arrays: list[npt.NDArray[np.generic]]
    residual: list[NDArray] | None = None


def check_codec(codec: str) -> Codec:
    """Return ``codec`` if it is a known codec name, else raise ``ValueError``."""
    if codec not in CODECS:
        raise ValueError(f"`compression.codec` is {codec!r}; codecs are {list(CODECS)}")
    return codec


# ------------------------------------------------------------------ sizes
def topk_count(total: int, fraction: float) -> int:
    """Entries top-k sends of ``total``: ``max(1, round(fraction * total))``."""
    if not 0 < fraction <= 1:
        raise ValueError(
            f"`compression.topk_fraction` should be in (0, 1] but is {fraction}"
        )
    if total == 0:
        return 0
    return max(1, min(total, round(fraction * total)))


def num_scales(shape: Shape) -> int:
    """int8 scales of one tensor: ``min(rows, cols)`` for 2-D, else one."""
    if int(np.prod(shape)) == 0:
        return 0
    return min(shape) if len(shape) == 2 else 1


def encoded_nbytes(codec: Codec, shapes: Sequence[Shape], fraction: float) -> int:
    """Bytes of the encoded arrays' data (``sum(a.nbytes)``), npy headers excluded."""
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes)
    if codec == "none":
        return 4 * total
    header = 4 * (HEADER_FIXED + len(shapes))
    if codec in ("fp16", "bf16"):
        return header + 2 * total
    if codec == "int8":
        return header + 4 * sum(num_scales(s) for s in shapes) + total
    return header + 8 * topk_count(total, fraction)


def wire_nbytes(codec: Codec, shapes: Sequence[Shape], fraction: float) -> int:
    """Bytes Flower serializes for one reply (what ``bytes_up`` counts)."""
    arrays = len(shapes) if codec == "none" else 1 + len(_SECTIONS[codec])
    return encoded_nbytes(codec, shapes, fraction) + NPY_HEADER_NBYTES * arrays


# --------------------------------------------------------------- per codec
def to_bf16_bits(x: NDArray) -> npt.NDArray[np.uint16]:
    """Round float32 values to the nearest bfloat16 (ties to even); its bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Add half an ulp of bf16, minus one unless the kept bit is odd (ties to even);
    # finite float32 bits stay below 2**32 after the addition.
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = bits + np.uint32(0x7FFF) + lsb
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(bits: npt.NDArray[np.uint16]) -> NDArray:
    """Return float32 values of bfloat16 bits."""
    wide = bits.astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def _scale_axis(shape: Shape) -> int | None:
    """Axis reduced for the int8 scales: one scale per slice along the longer axis."""
    if len(shape) != 2:
        return None
    return 1 if shape[0] <= shape[1] else 0


def quantize_int8(x: NDArray) -> tuple[NDArray, npt.NDArray[np.int8]]:
    """Symmetric absmax int8 of one tensor: ``(scales, values)`` (flat).

    Each scale is the smallest float32 at or above ``max|slice| / 127``, so no
    value needs clipping and every value decodes within half a step of itself,
    down to subnormal slices (where rounding to nearest could halve the scale).
    """
    if x.size == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int8)
    axis = _scale_axis(x.shape)
    x64 = x.astype(np.float64)
    peak = np.abs(x64).max(axis=axis, keepdims=True)
    exact = peak / INT8_MAX
    scale = exact.astype(np.float32)
    low = scale.astype(np.float64) < exact
    scale[low] = np.nextafter(scale[low], np.float32(np.inf))
    s64 = scale.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s64 > 0, np.rint(x64 / s64), 0.0)
    q = np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8)
    return scale.ravel(), q.ravel()


def dequantize_int8(
    scales: NDArray, values: npt.NDArray[np.int8], shape: Shape
) -> NDArray:
    """Inverse of :func:`quantize_int8`: ``q * s`` in float32, shaped ``shape``."""
    q = values.astype(np.float32).reshape(shape)
    axis = _scale_axis(shape)
    if axis is None:
        return q * scales.reshape(())
    s = scales.reshape((-1, 1) if axis == 1 else (1, -1))
    return q * s


def select_topk(flat: NDArray, k: int) -> npt.NDArray[np.uint32]:
    """Return the indices (ascending) of the ``k`` largest-magnitude entries."""
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.uint32)
    part = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    return np.sort(part).astype(np.uint32)


# -------------------------------------------------------------- encode
def reference_crc(reference: Sequence[NDArray]) -> int:
    """CRC-32 of the reference's float32 bytes in order (ties a reply to a start)."""
    crc = 0
    for array in reference:
        crc = zlib.crc32(np.ascontiguousarray(array, dtype=np.float32).tobytes(), crc)
    return crc


def _header(codec: Codec, crc: int, shapes: Sequence[Shape]) -> npt.NDArray[np.uint32]:
    sizes = [int(np.prod(s)) for s in shapes]
    return np.array([MAGIC, CODEC_IDS[codec], crc, len(shapes), *sizes], dtype=_U32)


def _flat(arrays: Sequence[NDArray]) -> NDArray:
    if not arrays:
        return np.zeros(0, np.float32)
    return np.concatenate([np.ravel(a) for a in arrays]).astype(np.float32, copy=False)


def _split(flat: NDArray, shapes: Sequence[Shape]) -> list[NDArray]:
    out = []
    start = 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start : start + size].reshape(shape).copy())
        start += size
    return out


def encode_update(
    codec: Codec,
    update: Sequence[NDArray],
    *,
    crc: int = 0,
    fraction: float = 1.0,
) -> list[npt.NDArray[np.generic]]:
    """Encode float32 tensors (an update) as the codec's arrays, header first.

    ``topk`` sends the ``topk_count`` largest entries of ``update`` as given: error
    feedback is :func:`encode_reply`'s job.

    Raises
    ------
    ValueError
        On a non-finite value, or one outside the fp16 or bf16 range.
    """
    if codec == "none":
        raise ValueError("codec 'none' sends the float32 reply itself")
    shapes = [tuple(a.shape) for a in update]
    flat = _flat(update)
    if not np.isfinite(flat).all():
        raise ValueError(f"cannot encode a non-finite update with {codec!r}")
    header = _header(codec, crc, shapes)
    if codec == "fp16":
        peak = float(np.abs(flat).max(initial=0.0))
        if peak > FP16_MAX:
            raise ValueError(
                f"update value of magnitude {peak:.4g} exceeds the fp16 range "
                f"({FP16_MAX:g}); use compression.codec = 'bf16'"
            )
        return [header, flat.astype(_F16)]
    if codec == "bf16":
        bits = to_bf16_bits(flat)
        if not np.isfinite(from_bf16_bits(bits)).all():
            raise ValueError("update value rounds past the bf16 range")
        return [header, bits.astype(_U16)]
    if codec == "int8":
        parts = [quantize_int8(np.asarray(a, np.float32)) for a in update]
        scales = _flat([s for s, _ in parts])
        values = (
            np.concatenate([q for _, q in parts]) if parts else np.zeros(0, np.int8)
        )
        return [header, scales.astype(_F32), values.astype(_I8)]
    k = topk_count(flat.size, fraction)
    idx = select_topk(flat, k)
    return [header, idx.astype(_U32), flat[idx].astype(_F32)]


def encode_reply(
    codec: Codec,
    reply: Sequence[NDArray],
    reference: Sequence[NDArray],
    *,
    fraction: float = 1.0,
    residual: Sequence[NDArray] | None = None,
) -> EncodedReply:
    """Encode ``reply - reference`` (plus the residual, for top-k) for the uplink.

    Parameters
    ----------
    codec
        One of :data:`CODECS`; ``"none"`` returns the reply unchanged.
    reply
        The client's reply tensors in wire order (float32).
    reference
        What the client started from, tensor by tensor (zeros where the server
        does not know the start).
    fraction
        ``topk``: share of the entries sent.
    residual
        ``topk``: what earlier rounds did not send (None: zero, the first round).

    Returns
    -------
    EncodedReply
        The arrays to send and, for ``topk``, the new residual
        ``update + residual - sent`` (exactly: the sent entries are zeroed).
    """
    if len(reference) != len(reply):
        raise ValueError(f"{len(reply)} reply tensors but {len(reference)} references")
    if codec == "none":
        return EncodedReply([np.asarray(a) for a in reply])
    update = [
        np.asarray(a, np.float32) - np.asarray(r, np.float32)
        for a, r in zip(reply, reference, strict=True)
    ]
    crc = reference_crc(reference)
    if codec != "topk":
        return EncodedReply(encode_update(codec, update, crc=crc))
    if residual is not None:
        if [r.shape for r in residual] != [u.shape for u in update]:
            raise ValueError("the top-k residual does not match the reply's shapes")
        update = [
            u + np.asarray(e, np.float32) for u, e in zip(update, residual, strict=True)
        ]
    arrays = encode_update(codec, update, crc=crc, fraction=fraction)
    flat = _flat(update)
    flat[arrays[1].astype(np.int64)] = 0.0
    return EncodedReply(arrays, _split(flat, [u.shape for u in update]))


# -------------------------------------------------------------- decode
def _check_section(
    codec: Codec, name: str, array: object, dtype: np.dtype[np.generic], length: int
) -> npt.NDArray[np.generic]:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{codec} {name}: not a numpy array ({type(array).__name__})")
    if array.dtype != dtype:
        raise ValueError(f"{codec} {name}: dtype {array.dtype}, expected {dtype}")
    if array.ndim != 1 or array.size != length:
        raise ValueError(f"{codec} {name}: shape {array.shape}, expected ({length},)")
    return array


def decode_update(
    codec: Codec,
    arrays: Sequence[object],
    shapes: Sequence[Shape],
    *,
    crc: int = 0,
    fraction: float = 1.0,
) -> list[NDArray]:
    """Decode :func:`encode_update`'s arrays into float32 tensors of ``shapes``.

    Raises
    ------
    ValueError
        On any fault, named: array count, dtype or length of a section, magic,
        codec, tensor count or sizes, reference CRC, a scale that is negative or
        not finite, an int8 value of -128, top-k indices not strictly increasing
        or out of range, a decoded value that is not finite.
    """
    if codec == "none":
        raise ValueError("codec 'none' sends the float32 reply itself")
    sections = _SECTIONS[codec]
    if len(arrays) != 1 + len(sections):
        names = ", ".join(["header", *(n for n, _ in sections)])
        raise ValueError(
            f"encoded reply: {len(arrays)} arrays, compression.codec={codec!r} sends "
            f"{1 + len(sections)} ({names})"
        )
    sizes = [int(np.prod(s)) for s in shapes]
    total = sum(sizes)
    header = _check_section(
        codec, "header", arrays[0], _U32, HEADER_FIXED + len(shapes)
    ).astype(np.int64)
    magic, codec_id, got_crc, count = (int(v) for v in header[:HEADER_FIXED])
    if magic != MAGIC:
        raise ValueError(f"{codec} header: magic {magic:#x}, expected {MAGIC:#x}")
    if codec_id != CODEC_IDS[codec]:
        sent = {v: k for k, v in CODEC_IDS.items()}.get(codec_id, f"id {codec_id}")
        raise ValueError(f"reply encoded as {sent!r} but compression.codec={codec!r}")
    if count != len(shapes):
        raise ValueError(
            f"{codec} header: {count} tensors, the plan expects {len(shapes)}"
        )
    got_sizes = [int(v) for v in header[HEADER_FIXED:]]
    if got_sizes != sizes:
        bad = next(
            i for i, (g, s) in enumerate(zip(got_sizes, sizes, strict=True)) if g != s
        )
        raise ValueError(
            f"{codec} header: tensor {bad} has {got_sizes[bad]} elements, the plan "
            f"expects {sizes[bad]}"
        )
    if got_crc != crc:
        raise ValueError(
            f"{codec} header: the update was coded against another start (reference "
            f"CRC {got_crc:#010x}, the server's {crc:#010x})"
        )
    if codec == "fp16":
        values = _check_section(codec, "values", arrays[1], _F16, total)
        flat = values.astype(np.float32)
    elif codec == "bf16":
        bits = _check_section(codec, "values", arrays[1], _U16, total)
        flat = from_bf16_bits(bits.astype(np.uint16))
    elif codec == "int8":
        flat = _decode_int8(arrays, shapes)
    else:
        flat = _decode_topk(arrays, total, fraction)
    if not np.isfinite(flat).all():
        raise ValueError(f"{codec} values: decoded update contains NaN or Inf")
    return _split(flat, shapes)


def _decode_int8(arrays: Sequence[object], shapes: Sequence[Shape]) -> NDArray:
    counts = [num_scales(s) for s in shapes]
    total = sum(int(np.prod(s)) for s in shapes)
    scales = _check_section("int8", "scales", arrays[1], _F32, sum(counts)).astype(
        np.float32
    )
    values = _check_section("int8", "values", arrays[2], _I8, total).astype(np.int8)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError("int8 scales: every scale must be finite and >= 0")
    if (values == -INT8_MAX - 1).any():
        raise ValueError("int8 values: -128 is outside the symmetric range [-127, 127]")
    out = []
    s_at = v_at = 0
    for shape, n_s in zip(shapes, counts, strict=True):
        size = int(np.prod(shape))
        if size:
            part = dequantize_int8(
                scales[s_at : s_at + n_s],
                values[v_at : v_at + size].astype(np.int8),
                shape,
            )
            out.append(part.ravel())
        s_at += n_s
        v_at += size
    return _flat(out)


def _decode_topk(arrays: Sequence[object], total: int, fraction: float) -> NDArray:
    k = topk_count(total, fraction)
    idx = _check_section("topk", "indices", arrays[1], _U32, k).astype(np.int64)
    values = _check_section("topk", "values", arrays[2], _F32, k)
    if k and (np.diff(idx) <= 0).any():
        raise ValueError("topk indices: not strictly increasing")
    if k and idx[-1] >= total:
        raise ValueError(
            f"topk indices: {int(idx[-1])} is out of range for {total} entries"
        )
    flat = np.zeros(total, np.float32)
    flat[idx] = values
    return flat


def decode_reply(
    codec: Codec,
    arrays: Sequence[object],
    reference: Sequence[NDArray],
    *,
    fraction: float = 1.0,
) -> list[npt.NDArray[np.generic]]:
    """Rebuild a reply: ``reference + decode(arrays)`` in float32.

    Parameters
    ----------
    codec
        The codec the server asked for; ``"none"`` returns ``arrays`` unchanged
        (the usual reply checks then apply).
    arrays
        What the client sent.
    reference
        What the client started from, per reply tensor in wire order (zeros where
        the server does not know it); gives the shapes.
    fraction
        ``topk``: share of the entries sent.

    Raises
    ------
    ValueError
        On any fault of the encoding (see :func:`decode_update`).
    """
    if codec == "none":
        return list(arrays)  # type: ignore[arg-type]
    shapes = [tuple(r.shape) for r in reference]
    update = decode_update(
        codec, arrays, shapes, crc=reference_crc(reference), fraction=fraction
    )
    return [
        np.asarray(r, np.float32) + u for r, u in zip(reference, update, strict=True)
    ]
