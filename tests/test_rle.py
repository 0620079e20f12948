"""Brush RLE: byte-identical to the Label Studio SDK encoder, lossless, and strict on bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle
from label_studio_sdk.converter.brush import encode_rle as sdk_encode_rle
from label_studio_sdk.converter.brush import mask2rle as sdk_mask2rle

from backend.rle import decode_rle, encode_rle, mask_to_rle, rle_to_mask

MASK_KINDS = ("empty", "full", "single_pixel", "noise", "blobs", "rows")


def make_mask(kind: str, height: int, width: int, seed: int) -> np.ndarray:
    """A (height, width) bool mask of the given kind, reproducible from seed."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    if kind == "full":
        mask[:] = True
    elif kind == "single_pixel":
        mask[rng.integers(height), rng.integers(width)] = True
    elif kind == "noise":
        mask = rng.random((height, width)) < rng.random()
    elif kind == "blobs":  # a few filled rectangles: long runs with ragged edges
        for _ in range(rng.integers(1, 5)):
            y0, x0 = rng.integers(height), rng.integers(width)
            mask[y0 : y0 + rng.integers(1, height + 1), x0 : x0 + rng.integers(1, width + 1)] = True
    elif kind == "rows":  # whole rows on or off: runs that are multiples of the width
        mask[rng.random(height) < 0.5] = True
    return mask


def sdk_rle(mask: np.ndarray) -> list[int]:
    return sdk_mask2rle(mask.astype(np.uint8) * 255)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(MASK_KINDS),
    height=st.integers(1, 64),
    width=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_mask_to_rle_matches_sdk_and_round_trips(kind, height, width, seed):
    mask = make_mask(kind, height, width, seed)
    rle = mask_to_rle(mask)
    assert rle == sdk_rle(mask)
    decoded = rle_to_mask(rle, height, width)
    assert decoded.dtype == np.bool_ and decoded.shape == (height, width)
    assert np.array_equal(decoded, mask)


@pytest.mark.parametrize(
    "shape, kind",
    [
        ((128, 128), "full"),  # 16384 px = 65536 RGBA bytes: exactly one maximal run
        ((1, 16385), "full"),  # one byte-run of 65540: a maximal token plus a short remainder
        ((300, 301), "full"),  # runs far past the maximum, split into several tokens
        ((300, 301), "empty"),
        ((257, 255), "blobs"),
        ((333, 217), "rows"),
        ((1, 1), "full"),
        ((1, 1), "empty"),
    ],
)
def test_long_runs_and_edge_shapes_match_sdk(shape, kind):
    mask = make_mask(kind, *shape, seed=sum(shape))
    rle = mask_to_rle(mask)
    assert rle == sdk_rle(mask)
    assert np.array_equal(rle_to_mask(rle, *shape), mask)


@pytest.mark.parametrize("run", [1, 2, 8, 9, 16, 17, 256, 257, 65535, 65536, 65537, 131072, 131073, 200001])
def test_encode_rle_run_length_boundaries_match_sdk(run):
    # A run of `run` zeros between single literal values exercises every count-field size.
    values = np.concatenate([[7], np.zeros(run, dtype=np.uint8), [9, 9, 3]]).astype(np.uint8)
    rle = encode_rle(values)
    assert rle == sdk_encode_rle(values)
    assert np.array_equal(decode_rle(rle), values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(1, 40)), min_size=1, max_size=60))
def test_encode_rle_of_arbitrary_bytes_matches_sdk(runs):
    values = np.repeat([v for v, _ in runs], [n for _, n in runs]).astype(np.uint8)
    rle = encode_rle(values)
    assert rle == sdk_encode_rle(values)
    assert np.array_equal(decode_rle(rle), values)


def test_mask_accepts_integer_dtypes_and_nonzero_values():
    mask = make_mask("blobs", 40, 30, seed=3)
    expected = sdk_rle(mask)
    for as_dtype in (np.uint8, np.int32, np.int64):
        assert mask_to_rle(mask.astype(as_dtype)) == expected
    assert mask_to_rle(mask.astype(np.uint8) * 7) == expected  # any non-zero value is foreground
    # A non-contiguous view encodes like its copy.
    noise = make_mask("noise", 50, 60, seed=5)
    assert mask_to_rle(noise[:, ::2]) == sdk_rle(np.ascontiguousarray(noise[:, ::2]))


class BitWriter:
    """Reference rle-pack writer for streams the SDK encoder never makes (literal runs, other sizes)."""

    def __init__(self) -> None:
        self.bits: list[str] = []

    def write(self, value: int, width: int) -> None:
        assert 0 <= value < 2**width
        self.bits.append(format(value, f"0{width}b"))

    def to_bytes(self) -> list[int]:
        stream = "".join(self.bits)
        stream += "0" * (-len(stream) % 8)
        return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def write_stream(tokens, rle_sizes, word_size=8) -> list[int]:
    """tokens: list of (is_repeat, size_index, values); a repeat token repeats values[0] len(values) times."""
    writer = BitWriter()
    writer.write(sum(len(values) for _, _, values in tokens), 32)
    writer.write(word_size - 1, 5)
    for size in rle_sizes:
        writer.write(size - 1, 4)
    for is_repeat, size_index, values in tokens:
        writer.write(int(is_repeat), 1)
        writer.write(size_index, 2)
        writer.write(len(values) - 1, rle_sizes[size_index])
        for value in values[:1] if is_repeat else values:
            writer.write(value, word_size)
    return writer.to_bytes()


@st.composite
def rle_pack_streams(draw):
    rle_sizes = draw(st.lists(st.integers(1, 16), min_size=4, max_size=4))
    word_size = draw(st.integers(1, 8))
    tokens = []
    for _ in range(draw(st.integers(1, 30))):
        size_index = draw(st.integers(0, 3))
        count = draw(st.integers(1, min(2 ** rle_sizes[size_index], 300)))
        is_repeat = draw(st.booleans())
        values = draw(st.lists(st.integers(0, 2**word_size - 1), min_size=count, max_size=count))
        tokens.append((is_repeat, size_index, [values[0]] * count if is_repeat else values))
    return write_stream(tokens, rle_sizes, word_size), tokens


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(rle_pack_streams())
def test_decode_rle_matches_sdk_on_general_streams(stream_and_tokens):
    stream, tokens = stream_and_tokens
    expected = np.concatenate([np.asarray(values, dtype=np.uint8) for _, _, values in tokens])
    decoded = decode_rle(stream)
    assert np.array_equal(decoded, expected)
    assert np.array_equal(decoded, sdk_decode_rle(stream))


def test_rle_to_mask_reads_alpha_channel_only():
    # Label Studio draws a pixel wherever alpha is non-zero, whatever the RGB bytes hold.
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[0, 1] = (255, 0, 0, 0)  # colour without alpha: not drawn
    rgba[1, 2] = (0, 0, 0, 1)  # faint alpha: drawn
    rgba[2, 3] = (12, 34, 56, 255)
    mask = rle_to_mask(encode_rle(rgba.reshape(-1)), 3, 4)
    expected = np.zeros((3, 4), dtype=bool)
    expected[1, 2] = expected[2, 3] = True
    assert np.array_equal(mask, expected)


def test_rle_to_mask_rejects_size_mismatch():
    rle = mask_to_rle(np.ones((10, 20), dtype=bool))
    with pytest.raises(ValueError, match="holds 800 values but a 10x21 RGBA mask needs 840"):
        rle_to_mask(rle, 10, 21)
    with pytest.raises(ValueError, match="positive"):
        rle_to_mask(rle, 0, 20)


def test_decode_rejects_corrupt_rle():
    rle = mask_to_rle(make_mask("noise", 30, 30, seed=1))
    with pytest.raises(ValueError, match="truncated"):
        decode_rle(rle[: len(rle) // 2])
    with pytest.raises(ValueError, match="0..255"):
        decode_rle(rle[:-1] + [256])
    with pytest.raises(ValueError, match="0..255"):
        decode_rle(rle[:-1] + [-1])
    with pytest.raises(ValueError, match="integers"):
        decode_rle(["a", "b"] * 5)
    with pytest.raises(ValueError, match="at least 7 bytes"):
        decode_rle([0, 0, 0])
    with pytest.raises(ValueError, match="at least 7 bytes"):
        decode_rle([[0] * 8])
    # Header declaring 16-bit words: not RGBA bytes.
    with pytest.raises(ValueError, match="word size 16"):
        decode_rle(write_stream([(True, 0, [1, 1])], (3, 4, 8, 16), word_size=16))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(MASK_KINDS),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    box_fractions=st.tuples(*[st.floats(0, 1)] * 4),
    full_width=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_mask_to_rle_of_a_box_equals_the_whole_masks_rle(kind, height, width, box_fractions, full_width, seed):
    """A mask given as its box is encoded exactly like the whole mask (and like the SDK)."""
    a, b, c, d = box_fractions
    y0, y1 = sorted((round(a * height), round(b * height)))
    x0, x1 = (0, width) if full_width else sorted((round(c * width), round(d * width)))
    crop = make_mask(kind, max(y1 - y0, 1), max(x1 - x0, 1), seed)[: y1 - y0, : x1 - x0]
    whole = np.zeros((height, width), dtype=bool)
    whole[y0:y1, x0:x1] = crop
    rle = mask_to_rle(crop, box=(y0, y1, x0, x1), shape=(height, width))
    assert rle == mask_to_rle(whole) == sdk_rle(whole)


def test_mask_to_rle_rejects_a_box_that_does_not_fit():
    with pytest.raises(ValueError, match="go together"):
        mask_to_rle(np.ones((2, 2), bool), box=(0, 2, 0, 2))
    with pytest.raises(ValueError, match="does not fit"):
        mask_to_rle(np.ones((2, 2), bool), box=(0, 2, 0, 3), shape=(4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        mask_to_rle(np.ones((2, 2), bool), box=(3, 5, 0, 2), shape=(4, 4))


def test_mask_to_rle_rejects_bad_masks():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 3), dtype=bool))
    with pytest.raises(ValueError, match="at least one pixel"):
        mask_to_rle(np.zeros((0, 5), dtype=bool))
    with pytest.raises(ValueError, match="threshold"):
        mask_to_rle(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="0..255"):
        encode_rle(np.array([1, 300]))
