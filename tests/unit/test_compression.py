"""Uplink codecs: round-trip error bounds, exact bytes, error feedback, strictness."""

from __future__ import annotations

import typing
from typing import Any

import numpy as np
import pytest
from flwr.common import RecordDict, ndarrays_to_parameters, parameters_to_ndarrays
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lora_flwr.compression import (
    CODECS,
    FP16_MAX,
    MAGIC,
    NPY_HEADER_NBYTES,
    decode_reply,
    decode_update,
    encode_reply,
    encode_update,
    encoded_nbytes,
    from_bf16_bits,
    num_scales,
    quantize_int8,
    reference_crc,
    to_bf16_bits,
    topk_count,
    wire_nbytes,
)
from lora_flwr.config import COMPRESSIONS, CompressionConfig
from lora_flwr.fl.client import RESIDUAL_KEY, ContextStore
from lora_flwr.fl.runner import MemoryStore, compress_reply

# The default task's reply: MiniLM-L6, r=8 on query and value of 6 layers, plus
# the 2-class head (classifier.weight, classifier.bias).
MINILM_SHAPES = [(8, 384), (384, 8)] * 12 + [(2, 384), (2,)]
SMALL_SHAPES = [(2, 5), (7, 2), (3,)]


def _arrays(shapes: list[tuple[int, ...]], seed: int, scale: float = 1.0) -> list:
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=s)).astype(np.float32) for s in shapes]


def _wire(arrays: list) -> int:
    """Bytes Flower serializes (what the strategy's bytes_up counts)."""
    return sum(len(t) for t in ndarrays_to_parameters(arrays).tensors)


finite32 = st.floats(
    min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32
)
small_shapes = st.one_of(
    hnp.array_shapes(min_dims=1, max_dims=1, min_side=1, max_side=40),
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
)


def _float_arrays() -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.float32, small_shapes, elements=finite32)


# ------------------------------------------------------------------ codec list
def test_config_and_codec_module_list_the_same_codecs() -> None:
    # Assert
    assert COMPRESSIONS == CODECS == ("none", "fp16", "bf16", "int8", "topk")
    hint = typing.get_type_hints(CompressionConfig)["codec"]
    assert typing.get_args(hint) == CODECS


# ------------------------------------------------------------ error bounds
@settings(max_examples=60, deadline=None)
@given(x=_float_arrays())
def test_fp16_round_trip_is_within_half_an_fp16_ulp(x: np.ndarray) -> None:
    # Execute
    (got,) = decode_update("fp16", encode_update("fp16", [x]), [x.shape])

    # Assert: relative 2**-11 in fp16's normal range, 2**-25 absolute below it.
    err = np.abs(got.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(2.0**-11 * np.abs(x.astype(np.float64)), 2.0**-25)
    assert (err <= bound).all()
    assert got.dtype == np.float32 and got.shape == x.shape


@settings(max_examples=60, deadline=None)
@given(x=_float_arrays())
def test_bf16_round_trip_is_within_half_a_bf16_ulp(x: np.ndarray) -> None:
    # Execute
    (got,) = decode_update("bf16", encode_update("bf16", [x]), [x.shape])

    # Assert: relative 2**-8 (8 significant bits), 2**-134 among subnormals.
    x64 = x.astype(np.float64)
    err = np.abs(got.astype(np.float64) - x64)
    assert (err <= np.maximum(2.0**-8 * np.abs(x64), 2.0**-134)).all()
    # The same as rounding to 8 significant bits, ties to even, in float64.
    mantissa, exponent = np.frexp(x64)
    want = np.ldexp(np.round(mantissa * 2**8) / 2**8, exponent)
    normal = np.abs(x64) >= 2.0**-126
    np.testing.assert_array_equal(got[normal], want[normal])


def test_bf16_rounds_ties_to_even() -> None:
    # Prepare: exact halfway points between two bf16 values (7 stored bits).
    x = np.array(
        [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 3.0],
        np.float32,
    )

    # Execute
    got = from_bf16_bits(to_bf16_bits(x))

    # Assert: 1 + 2**-8 -> 1 (even), 1 + 3 * 2**-8 -> 1 + 2**-6 (even), just
    # above a tie rounds up, representable values are kept.
    np.testing.assert_array_equal(
        got, np.array([1.0, 1 + 2**-6, -1.0, 1 + 2**-7, 3.0], np.float32)
    )


@settings(max_examples=60, deadline=None)
@given(x=_float_arrays())
# Found by hypothesis: round to nearest made this scale 2**-149, half of x / 127.
@example(x=np.array([2.5e-43], np.float32))
def test_int8_round_trip_is_within_half_a_step_of_its_slice(x: np.ndarray) -> None:
    # Execute
    scales, values = quantize_int8(x)
    (got,) = decode_update("int8", encode_update("int8", [x]), [x.shape])

    # Assert: one scale per slice along the longer axis, max|slice| / 127.
    assert scales.size == num_scales(x.shape)
    assert values.min(initial=0) >= -127 and values.max(initial=0) <= 127
    if x.ndim == 2 and x.shape[0] <= x.shape[1]:
        per_elem = np.repeat(scales, x.shape[1]).reshape(x.shape)  # rows
        peak = np.abs(x).max(axis=1)
    elif x.ndim == 2:
        per_elem = np.tile(scales, x.shape[0]).reshape(x.shape)  # columns
        peak = np.abs(x).max(axis=0)
    else:
        per_elem = np.full(x.shape, scales[0])
        peak = np.abs(x).max(keepdims=True)
    # The scale is max|slice| / 127 rounded up to float32 (one ulp at most, or the
    # smallest subnormal step 2**-149 for subnormal scales).
    exact = peak.astype(np.float64) / 127
    assert (scales.astype(np.float64) >= exact).all()
    assert (scales.astype(np.float64) <= exact * (1 + 2.0**-22) + 2.0**-149).all()
    err = np.abs(got.astype(np.float64) - x.astype(np.float64))
    # Half a step, plus float32 rounding of q * s (|q s| <= 127 s).
    assert (err <= per_elem.astype(np.float64) * (0.5 + 127 * 2.0**-23)).all()


def test_int8_scales_follow_the_lora_factors_rank_components() -> None:
    # Prepare: A (r, in) and B (out, r) with one large rank component (index 1).
    a = np.ones((3, 10), np.float32)
    a[1] *= 100
    b = np.ones((12, 3), np.float32)
    b[:, 1] *= 100

    # Execute
    sa, _ = quantize_int8(a)
    sb, _ = quantize_int8(b)

    # Assert: A per row, B per column, so the large component gets its own scale.
    np.testing.assert_allclose(sa, [1 / 127, 100 / 127, 1 / 127], rtol=2**-22)
    np.testing.assert_allclose(sb, [1 / 127, 100 / 127, 1 / 127], rtol=2**-22)


def test_int8_of_a_zero_tensor_is_exactly_zero() -> None:
    # Prepare
    x = [np.zeros((4, 6), np.float32), np.zeros(3, np.float32)]

    # Execute
    got = decode_update("int8", encode_update("int8", x), [(4, 6), (3,)])

    # Assert
    for g, want in zip(got, x, strict=True):
        np.testing.assert_array_equal(g, want)


@settings(max_examples=60, deadline=None)
@given(
    x=_float_arrays(),
    fraction=st.floats(min_value=0.01, max_value=1.0),
)
def test_topk_sends_the_largest_entries_exactly(x: np.ndarray, fraction: float) -> None:
    # Execute
    arrays = encode_update("topk", [x], fraction=fraction)
    (got,) = decode_update("topk", arrays, [x.shape], fraction=fraction)

    # Assert: k entries, exact where kept, zero elsewhere, and no dropped entry
    # is larger than a kept one.
    k = topk_count(x.size, fraction)
    kept = np.zeros(x.size, bool)
    kept[arrays[1].astype(np.int64)] = True
    kept = kept.reshape(x.shape)
    assert kept.sum() == k == arrays[2].size
    np.testing.assert_array_equal(got[kept], x[kept])
    assert (got[~kept] == 0).all()
    if k < x.size:
        assert np.abs(x[~kept]).max() <= np.abs(x[kept]).min()


def test_topk_count_rounds_the_fraction_and_sends_at_least_one() -> None:
    # Assert
    assert topk_count(74498, 0.1) == 7450
    assert topk_count(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004
    assert topk_count(10, 0.01) == 1
    assert topk_count(10, 1.0) == 10
    assert topk_count(0, 0.5) == 0
    with pytest.raises(ValueError, match="topk_fraction"):
        topk_count(10, 0.0)


# --------------------------------------------------------- replies, references
@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "topk"])
def test_a_reply_is_coded_as_its_update_against_the_reference(codec: Any) -> None:
    # Prepare: weights near 1 that moved by ~1e-3 in one round.
    reference = [1.0 + a for a in _arrays(SMALL_SHAPES, 0)]
    moves = _arrays(SMALL_SHAPES, 1, 1e-3)
    reply = [r + d for r, d in zip(reference, moves, strict=True)]

    # Execute
    sent = encode_reply(codec, reply, reference, fraction=1.0)
    got = decode_reply(codec, sent.arrays, reference, fraction=1.0)

    # Assert: the error is on the update's scale (~1e-3), not the weights' (~1):
    # bf16 of the weights themselves would be off by up to 2**-8 * 4.
    for g, want in zip(got, reply, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=0, atol=2e-5)
    if codec == "topk":  # fraction 1: everything, exactly (up to the add)
        assert sent.residual is not None
        assert all((e == 0).all() for e in sent.residual)


def test_codec_none_sends_the_reply_itself() -> None:
    # Prepare
    reply = _arrays(SMALL_SHAPES, 0)

    # Execute
    sent = encode_reply("none", reply, [np.zeros_like(a) for a in reply])
    got = decode_reply("none", sent.arrays, reply)

    # Assert
    assert sent.residual is None
    for s, g, want in zip(sent.arrays, got, reply, strict=True):
        np.testing.assert_array_equal(s, want)
        np.testing.assert_array_equal(g, want)


# ------------------------------------------------------------- exact bytes
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shapes", [SMALL_SHAPES, MINILM_SHAPES])
def test_serialized_bytes_equal_the_formula(codec: Any, shapes: list) -> None:
    # Prepare
    reference = _arrays(shapes, 0)
    reply = _arrays(shapes, 1)

    # Execute
    arrays = encode_reply(codec, reply, reference, fraction=0.1).arrays
    wire = _wire(arrays)

    # Assert: data bytes by the formula, plus one 128-byte npy header per array.
    assert sum(a.nbytes for a in arrays) == encoded_nbytes(codec, shapes, 0.1)
    assert wire == encoded_nbytes(codec, shapes, 0.1) + NPY_HEADER_NBYTES * len(arrays)
    assert wire == wire_nbytes(codec, shapes, 0.1)


def test_default_task_reply_sizes() -> None:
    # Prepare: 74,498 values in 26 tensors; 195 int8 scales.
    n = sum(int(np.prod(s)) for s in MINILM_SHAPES)
    header = 4 * (4 + 26)

    # Execute
    size = {c: wire_nbytes(c, MINILM_SHAPES, 0.1) for c in CODECS}

    # Assert: the exact byte counts and int8's ratio (the goal is <= 0.26).
    assert n == 74498
    assert sum(num_scales(s) for s in MINILM_SHAPES) == 195
    assert size["none"] == 4 * n + 128 * 26 == 301320
    assert size["fp16"] == size["bf16"] == header + 2 * n + 2 * 128 == 149372
    assert size["int8"] == header + 4 * 195 + n + 3 * 128 == 75782
    assert size["topk"] == header + 8 * 7450 + 3 * 128 == 60104
    assert size["int8"] / size["none"] == pytest.approx(0.2515, abs=1e-4)


# ---------------------------------------------------------- error feedback
def test_topk_residual_is_the_exact_remainder() -> None:
    # Prepare
    reference = _arrays(SMALL_SHAPES, 0)
    reply = _arrays(SMALL_SHAPES, 1)
    residual = _arrays(SMALL_SHAPES, 2, 0.5)

    # Execute
    sent = encode_reply("topk", reply, reference, fraction=0.25, residual=residual)
    update = decode_update(
        "topk",
        sent.arrays,
        SMALL_SHAPES,
        crc=reference_crc(reference),
        fraction=0.25,
    )

    # Assert: sent + new residual == update + old residual, bit for bit (the sent
    # entries are moved, not recomputed).
    assert sent.residual is not None
    for got, new, r, ref, old in zip(
        update, sent.residual, reply, reference, residual, strict=True
    ):
        np.testing.assert_array_equal(got + new, (r - ref) + old)
        assert ((got == 0) | (new == 0)).all()


def _decode_sent(arrays: list, reference: list, fraction: float) -> list:
    """What the server adds to the reference (the decoded update)."""
    got = decode_reply("topk", arrays, reference, fraction=fraction)
    return [g.astype(np.float64) - r for g, r in zip(got, reference, strict=True)]


def test_error_feedback_sends_every_update_over_the_rounds() -> None:
    # Prepare: five rounds of updates; the node's store starts empty.
    store = MemoryStore()
    names = ["a", "b", "c"]
    reference = [np.zeros(s, np.float32) for s in SMALL_SHAPES]
    start = dict(zip(names, reference, strict=True))
    total_sent = [np.zeros(s) for s in SMALL_SHAPES]
    total_update = [np.zeros(s) for s in SMALL_SHAPES]

    # Execute
    for t in range(5):
        reply = _arrays(SMALL_SHAPES, 10 + t)
        arrays = compress_reply(reply, start, names, store, "topk", 0.2)
        for i, d in enumerate(_decode_sent(arrays, reference, 0.2)):
            total_sent[i] += d
            total_update[i] += reply[i]
        if t == 0:
            first = store.residual()

    # Assert: sum of what was sent + final residual == sum of the updates.
    residual = store.residual()
    for name, sent, want in zip(names, total_sent, total_update, strict=True):
        np.testing.assert_allclose(sent + residual[name], want, rtol=0, atol=1e-5)
    # Round 1 started from zero: its residual is its own unsent update.
    assert all(np.abs(first[n]).sum() > 0 for n in names)


def test_compress_reply_starts_from_zero_and_keeps_other_residuals() -> None:
    # Prepare: a residual for a weight this reply does not send, and one of a
    # shape that no longer fits (a rank change): neither may be added.
    store = MemoryStore()
    other = np.full((2, 2), 7.0, np.float32)
    store.set_residual({"other": other, "a": np.ones((9, 9), np.float32)})
    reply = [np.arange(10, dtype=np.float32).reshape(2, 5)]

    # Execute
    arrays = compress_reply(reply, {}, ["a"], store, "topk", 0.1)

    # Assert: one entry (the 9) sent against a zero start; the rest stays.
    got = decode_reply("topk", arrays, [np.zeros((2, 5), np.float32)], fraction=0.1)
    want = np.zeros((2, 5), np.float32)
    want[1, 4] = 9.0
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(store.residual()["other"], other)
    np.testing.assert_array_equal(store.residual()["a"], reply[0] - want)


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_only_topk_keeps_a_residual(codec: Any) -> None:
    # Prepare
    store = MemoryStore()
    reply = _arrays(SMALL_SHAPES, 0)

    # Execute
    compress_reply(reply, {}, ["a", "b", "c"], store, codec, 0.1)

    # Assert
    assert store.residual() == {}


def test_the_residual_survives_in_context_state() -> None:
    # Prepare: two client objects of one node share its Context.state.
    state = RecordDict()
    reply = _arrays(SMALL_SHAPES, 0)
    names = ["a", "b", "c"]

    # Execute
    compress_reply(reply, {}, names, ContextStore(state), "topk", 0.3)
    again = ContextStore(state).residual()

    # Assert
    assert sorted(state.array_records[RESIDUAL_KEY]) == names
    total = sum(int((again[n] != 0).sum()) for n in names)
    assert total == 27 - topk_count(27, 0.3) == 27 - 8


# ------------------------------------------------------ strict decoding
def _int8_sent() -> tuple[list, list]:
    reference = _arrays(SMALL_SHAPES, 0)
    reply = _arrays(SMALL_SHAPES, 1)
    return encode_reply("int8", reply, reference).arrays, reference


def _with(arrays: list, i: int, value: Any) -> list:
    out = [a.copy() for a in arrays]
    out[i] = value
    return out


def _bad_int8() -> list[tuple[str, Any, str]]:
    arrays, _ = _int8_sent()
    header, scales, values = arrays
    h = header.copy()
    h[0] = 0
    wrong_codec = header.copy()
    wrong_codec[1] = 1
    count = header.copy()
    count[3] = 2
    size = header.copy()
    size[5] = 15
    neg = scales.copy()
    neg[1] = -1.0
    nan = scales.copy()
    nan[0] = np.nan
    low = values.copy()
    low[3] = -128
    return [
        ("too few", arrays[:2], "2 arrays, compression.codec='int8' sends 3"),
        ("dtype", _with(arrays, 2, values.astype(np.int16)), "dtype int16"),
        ("length", _with(arrays, 2, values[:-1]), r"shape \(26,\), expected \(27,\)"),
        ("2-D", _with(arrays, 1, scales.reshape(1, -1)), "int8 scales: shape"),
        ("magic", _with(arrays, 0, h), "magic 0x0"),
        ("codec", _with(arrays, 0, wrong_codec), "encoded as 'fp16'"),
        ("count", _with(arrays, 0, count), "2 tensors, the plan expects 3"),
        ("size", _with(arrays, 0, size), "tensor 1 has 15 elements"),
        ("negative", _with(arrays, 1, neg), "finite and >= 0"),
        ("nan", _with(arrays, 1, nan), "finite and >= 0"),
        ("-128", _with(arrays, 2, low), "-128 is outside"),
        ("not arrays", _with(arrays, 1, [1.0]), "not a numpy array"),
    ]


@pytest.mark.parametrize(
    ("fault", "arrays", "message"), _bad_int8(), ids=[f for f, _, _ in _bad_int8()]
)
def test_a_malformed_int8_encoding_is_refused(
    fault: str, arrays: list, message: str
) -> None:
    # Prepare
    _, reference = _int8_sent()

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        decode_reply("int8", arrays, reference)


def test_an_update_coded_against_another_start_is_refused() -> None:
    # Prepare
    arrays, reference = _int8_sent()
    other = [r.copy() for r in reference]
    other[2][0] += 1e-3

    # Execute / Assert
    with pytest.raises(ValueError, match="coded against another start"):
        decode_reply("int8", arrays, other)
    assert reference_crc(reference) != reference_crc(other)


def _topk_sent() -> tuple[list, list]:
    reference = [np.zeros(s, np.float32) for s in SMALL_SHAPES]
    reply = _arrays(SMALL_SHAPES, 1)
    return encode_reply("topk", reply, reference, fraction=0.25).arrays, reference


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("unsorted", "not strictly increasing"),
        ("duplicate", "not strictly increasing"),
        ("range", "27 is out of range for 27 entries"),
        ("count", r"shape \(6,\), expected \(7,\)"),
        ("nan", "NaN or Inf"),
    ],
)
def test_a_malformed_topk_encoding_is_refused(fault: str, message: str) -> None:
    # Prepare
    (header, idx, values), reference = _topk_sent()
    idx, values = idx.copy(), values.copy()
    if fault == "unsorted":
        idx[[0, 1]] = idx[[1, 0]]
    elif fault == "duplicate":
        idx[1] = idx[0]
    elif fault == "range":
        idx[-1] = 27
    elif fault == "count":
        idx, values = idx[:-1], values[:-1]
    else:
        values[2] = np.nan

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        decode_reply("topk", [header, idx, values], reference, fraction=0.25)


@pytest.mark.parametrize("codec", ["fp16", "bf16"])
def test_a_non_finite_half_precision_value_is_refused(codec: Any) -> None:
    # Prepare: an infinity in the values section.
    reference = [np.zeros(s, np.float32) for s in SMALL_SHAPES]
    header, values = encode_reply(codec, _arrays(SMALL_SHAPES, 1), reference).arrays
    values = values.copy()
    values[4] = 0x7F80 if codec == "bf16" else np.inf  # bf16 bits of +Inf

    # Execute / Assert
    with pytest.raises(ValueError, match=f"{codec} values: decoded update contains"):
        decode_reply(codec, [header, values], reference)


def test_the_encoder_refuses_what_it_cannot_code() -> None:
    # Prepare
    zero = [np.zeros(3, np.float32)]

    # Execute / Assert
    with pytest.raises(ValueError, match="non-finite update"):
        encode_reply("int8", [np.array([1.0, np.nan, 0.0], np.float32)], zero)
    with pytest.raises(ValueError, match="exceeds the fp16 range"):
        encode_reply("fp16", [np.array([FP16_MAX * 2, 0, 0], np.float32)], zero)
    with pytest.raises(ValueError, match="bf16 range"):
        big = np.finfo(np.float32).max
        encode_reply("bf16", [np.array([big, 0, 0], np.float32)], zero)


def test_the_header_names_the_codec_and_sizes() -> None:
    # Prepare
    arrays, reference = _int8_sent()

    # Execute
    header = parameters_to_ndarrays(ndarrays_to_parameters(arrays))[0]

    # Assert: magic, codec id 3, reference CRC, 3 tensors of 10, 14 and 3 values.
    assert header.dtype == np.dtype("<u4")
    assert list(header) == [MAGIC, 3, reference_crc(reference), 3, 10, 14, 3]
