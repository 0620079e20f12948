"""Label Studio brush RLE (the `@thi.ng/rle-pack` bit stream), vectorised with numpy.

A brush mask travels as the RLE of the flattened RGBA image (H, W, 4), uint8; Label Studio
draws a pixel wherever its alpha byte is non-zero. The bit stream is

    header: num values (32 bits) | word size - 1 (5) | 4 x (run-length field size - 1) (4 each)
    tokens: flag (1) | size index (2) | count - 1 (rle_sizes[index] bits) | value(s) (word size each)

flag 1 repeats one value `count` times, flag 0 lists `count` literal values. The stream is
zero-padded to whole bytes and sent as a list of ints in 0..255.

`mask_to_rle` is byte-identical to `label_studio_sdk.converter.brush.mask2rle` applied to the
mask scaled to 0/255 (the SDK is the test oracle); `rle_to_mask` decodes any rle-pack stream.
Run `python -m backend.rle` for the encode/decode benchmark against the SDK.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from model.boxes import Box, check_box

# Encoder parameters, the same as the SDK's `encode_rle` defaults and rle-pack's.
WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
MAX_RUN = 2**16  # longest run one token with a 16-bit count field can hold
MASK_VALUE = 255  # alpha (and RGB) byte of a foreground pixel
CHANNELS = 4  # RGBA

_HEADER_BITS = 32 + 5 + 4 * 4
_MASK64 = (1 << 64) - 1


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths (int64) and run values of a non-empty 1-D array."""
    change = np.flatnonzero(values[1:] != values[:-1])
    ends = np.empty(change.size + 1, dtype=np.int64)
    ends[:-1] = change + 1
    ends[-1] = values.size
    lengths = np.diff(ends, prepend=0)
    return lengths, values[ends - 1]


def _encode_runs(lengths: np.ndarray, run_values: np.ndarray, num: int) -> list[int]:
    """Pack runs into the RLE byte list exactly as the SDK's `encode_rle` does.

    lengths: (R,) int64 >= 1, run_values: (R,) ints in 0..255, num: sum of lengths.
    """
    run_values = run_values.astype(np.uint64)
    # Runs longer than 256 use the 16-bit count field; past MAX_RUN they are split into
    # MAX_RUN-long tokens followed by the remainder (1..MAX_RUN), like the SDK.
    chunks = np.where(lengths > 256, (lengths + MAX_RUN - 1) // MAX_RUN, 1)
    if chunks.max(initial=1) > 1:
        token_values = np.repeat(run_values, chunks)
        token_lengths = np.full(int(chunks.sum()), MAX_RUN, dtype=np.int64)
        last = np.cumsum(chunks) - 1
        token_lengths[last] = lengths - (chunks - 1) * MAX_RUN
        is_long = np.repeat(lengths > 256, chunks)
    else:
        token_values, token_lengths, is_long = run_values, lengths, lengths > 256

    # Size index: 0 for 1..8, 1 for 9..16, 2 for 17..256, 3 for long runs (whatever their chunk).
    size_index = np.where(is_long, 3, np.searchsorted(np.array([8, 16]), token_lengths, side="left"))
    size_index = size_index.astype(np.uint64)
    field_bits = np.array(RLE_SIZES, dtype=np.uint64)[size_index]
    # A single value is a 1-long literal, except the 1-long remainder of a split long run.
    flag = ((token_lengths > 1) | is_long).astype(np.uint64)
    count_field = (token_lengths - 1).astype(np.uint64)
    codes = (
        (flag << (field_bits + np.uint64(WORD_SIZE + 2)))
        | (size_index << (field_bits + np.uint64(WORD_SIZE)))
        | (count_field << np.uint64(WORD_SIZE))
        | token_values
    )
    widths = (field_bits + np.uint64(3 + WORD_SIZE)).astype(np.int64)

    ends = _HEADER_BITS + np.cumsum(widths)  # bit position just past each token
    total_bits = int(ends[-1])
    n_bytes = total_bits // 8 + 1  # the SDK always pads with 1..8 zero bits
    # Align each token so that its last bit is the last bit of byte `last_byte`; a token
    # then spans at most 5 bytes (27 bits + 7 bits of shift). Tokens never share a bit,
    # so summing their per-byte parts equals OR-ing them.
    last_byte = (ends - 1) >> 3
    aligned = codes << (8 * (last_byte + 1) - ends).astype(np.uint64)
    out = np.zeros(n_bytes, dtype=np.float64)
    for k in range(5):
        part = ((aligned >> np.uint64(8 * k)) & np.uint64(0xFF)).astype(np.float64)
        out += np.bincount(np.maximum(last_byte - k, 0), weights=part, minlength=n_bytes)

    header = (num << 21) | ((WORD_SIZE - 1) << 16)
    for i, size in enumerate(RLE_SIZES):
        header |= (size - 1) << (12 - 4 * i)
    header_bytes = np.frombuffer((header << 3).to_bytes(7, "big"), dtype=np.uint8)
    out[:7] += header_bytes  # byte 6 holds the header's last 5 bits and the first token's first 3
    return out.astype(np.uint8).tolist()


def encode_rle(values: np.ndarray) -> list[int]:
    """RLE of a flat uint8 array (N,), N >= 1; same bytes as the SDK's `encode_rle(values)`."""
    values = np.asarray(values)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"encode_rle needs a non-empty 1-D array, got shape {values.shape}")
    if values.dtype != np.uint8:
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > 255:
            raise ValueError("encode_rle needs values in 0..255")
        values = values.astype(np.uint8)
    if values.size >= 2**32:
        raise ValueError(f"RLE can hold at most 2**32 - 1 values, got {values.size}")
    lengths, run_values = _runs(values)
    return _encode_runs(lengths, run_values, values.size)


def _box_runs(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel runs (lengths, values 0/1) of a (height, width) frame that is zero outside bool
    ``crop`` placed at (y0, x0), computed from the crop alone."""
    h, w = crop.shape
    padded = np.zeros((h, w + 2), dtype=np.uint8)  # a zero on each side: every row starts and ends at 0
    padded[:, 1:-1] = crop
    flat = padded.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # first index after each change: 0->1, 1->0, ...
    rows, cols = np.divmod(change, w + 2)
    positions = (y0 + rows) * width + x0 + cols - 1
    starts, ends = positions[0::2], positions[1::2]
    if starts.size == 0:
        return np.array([height * width], dtype=np.int64), np.zeros(1, dtype=np.uint8)
    joined = starts[1:] == ends[:-1]  # a full-width box: a row's run goes on in the next row
    starts = np.concatenate([starts[:1], starts[1:][~joined]])
    ends = np.concatenate([ends[:-1][~joined], ends[-1:]])
    # zero run before each run of ones (none before a run starting at 0), then the trailing zeros
    bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
    bounds[0], bounds[1:-1:2], bounds[2:-1:2], bounds[-1] = 0, starts, ends, height * width
    lengths = np.diff(bounds)
    values = np.zeros(lengths.size, dtype=np.uint8)
    values[1::2] = 1
    keep = lengths > 0
    return lengths[keep], values[keep]


def mask_to_rle(mask: np.ndarray, *, box: Box | None = None,
                shape: tuple[int, int] | None = None) -> list[int]:
    """Label Studio brush RLE of a binary mask.

    mask: (H, W) bool or integer array; non-zero pixels are foreground. With ``box`` =
    (y0, y1, x0, x1) and ``shape`` = (H, W), ``mask`` is only the part inside the box of an
    (H, W) mask that is zero elsewhere (the encoding then costs the box, not the image).
    Returns the byte list that `label_studio_sdk.converter.brush.mask2rle(mask01 * 255)` gives:
    every pixel becomes 4 RGBA bytes, 255 for foreground and 0 for background.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        raise ValueError(f"mask must be bool or integer (threshold probabilities first), got {mask.dtype}")
    if (box is None) != (shape is None):
        raise ValueError("box and shape go together: the box's mask and the whole mask's (H, W)")
    height, width = mask.shape if shape is None else (int(shape[0]), int(shape[1]))
    if height * width == 0:
        raise ValueError(f"mask must have at least one pixel, got shape {(height, width)}")
    if height * width * CHANNELS >= 2**32:
        raise ValueError(f"mask of {height * width} pixels is too large for the 32-bit RLE length")
    if box is None:
        flat = np.ascontiguousarray(mask).reshape(-1)
        flat = flat.view(np.uint8) if flat.dtype == np.bool_ else flat != 0
        lengths, run_values = _runs(flat)
    else:
        y0, _, x0, _ = check_box(box, mask.shape, (height, width))
        lengths, run_values = _box_runs(mask != 0, y0, x0, height, width)
    # Runs of the pixels are the runs of the RGBA bytes divided by 4: no need to expand 4x.
    return _encode_runs(lengths * CHANNELS, run_values.astype(bool) * MASK_VALUE, height * width * CHANNELS)


def rle_value_count(rle: bytes) -> int:
    """The number of values an RLE's header declares (its first 32 bits), without decoding.

    Raises ValueError when ``rle`` is shorter than its 7-byte header.
    """
    if len(rle) < 7:
        raise ValueError(f"RLE must hold at least 7 bytes (its header), got {len(rle)}")
    return int.from_bytes(rle[:4], "big")


def decode_rle(rle: Sequence[int] | np.ndarray) -> np.ndarray:
    """Decode an rle-pack byte list (any header, word size <= 8) to its flat uint8 values (num,).

    Raises ValueError when the list is not bytes or the stream is truncated or malformed.
    Like rle-pack's own decoder, a last run that overshoots `num` is clipped.
    """
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"RLE must be a list of integers 0..255: {exc}") from None
    if data.ndim != 1 or data.size < 7:
        raise ValueError(f"RLE must be a flat list of at least 7 bytes (its header), got shape {data.shape}")
    if data.min() < 0 or data.max() > 255:
        raise ValueError("RLE must be a list of integers 0..255")
    n_bits = data.size * 8
    # windows[b] = the 64 bits starting at byte b, so any field of <= 57 bits starting
    # at bit p is read from windows[p >> 3] without touching the bytes again.
    padded = np.concatenate([data.astype(np.uint64), np.zeros(8, dtype=np.uint64)])
    win = np.zeros(data.size, dtype=np.uint64)
    for k in range(8):
        win |= padded[k : k + data.size] << np.uint64(56 - 8 * k)
    windows = win.tolist()

    header = windows[0] >> (64 - _HEADER_BITS)
    num = header >> 21
    word_size = ((header >> 16) & 31) + 1
    sizes = [((header >> (12 - 4 * i)) & 15) + 1 for i in range(4)]
    if word_size > 8:
        raise ValueError(f"RLE word size {word_size} does not fit 8-bit RGBA data")
    value_shift = 64 - word_size

    values: list[int] = []
    counts: list[int] = []
    pos, filled = _HEADER_BITS, 0
    while filled < num:
        if pos + 3 > n_bits:
            raise ValueError(f"RLE stream ends after {filled} of {num} values (truncated or corrupt)")
        w = (windows[pos >> 3] << (pos & 7)) & _MASK64
        size = sizes[(w >> 61) & 3]
        count = ((w >> (61 - size)) & ((1 << size) - 1)) + 1
        repeat = w >> 63
        pos += 3 + size
        if pos + word_size * (1 if repeat else count) > n_bits:
            raise ValueError(f"RLE stream ends inside a run after {filled} of {num} values (truncated or corrupt)")
        if repeat:  # one value `count` times
            values.append(((windows[pos >> 3] << (pos & 7)) & _MASK64) >> value_shift)
            counts.append(count)
            pos += word_size
        else:  # `count` literal values
            for _ in range(count):
                values.append(((windows[pos >> 3] << (pos & 7)) & _MASK64) >> value_shift)
                counts.append(1)
                pos += word_size
        filled += count
    if not values:
        return np.zeros(0, dtype=np.uint8)
    return np.repeat(np.array(values, dtype=np.uint8), counts)[:num]


def rle_to_mask(rle: Sequence[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode a Label Studio brush RLE to a bool mask (height, width): alpha byte > 0.

    Raises ValueError on corrupt RLE or when it does not hold height * width RGBA pixels.
    """
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    values = decode_rle(rle)
    expected = int(height) * int(width) * CHANNELS
    if values.size != expected:
        raise ValueError(
            f"RLE holds {values.size} values but a {height}x{width} RGBA mask needs {expected}"
            f" (is original_width/original_height right?)"
        )
    return values.reshape(int(height), int(width), CHANNELS)[:, :, 3] > 0


def _benchmark_mask(height: int = 3000, width: int = 4000, seed: int = 0) -> np.ndarray:
    """Random smooth blobs (H, W) bool: thresholded bicubic upsampling of coarse noise."""
    coarse = np.random.default_rng(seed).random((height // 100, width // 100), dtype=np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC))
    return smooth > 0.6


def _benchmark() -> None:
    # the SDK's converter takes ~1.7 s to import; only this comparison needs it, never serving
    from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle
    from label_studio_sdk.converter.brush import mask2rle

    def best_ms(fn, repeat):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1000)
        return min(times), result

    mask = _benchmark_mask()
    mask255 = mask.astype(np.uint8) * MASK_VALUE
    print(f"mask {mask.shape[0]}x{mask.shape[1]}, {mask.mean():.1%} foreground")
    ours_enc, rle = best_ms(lambda: mask_to_rle(mask), 5)
    ours_dec, decoded = best_ms(lambda: rle_to_mask(rle, *mask.shape), 5)
    sdk_enc, sdk_rle = best_ms(lambda: mask2rle(mask255), 1)
    sdk_dec, sdk_values = best_ms(lambda: sdk_decode_rle(sdk_rle), 1)
    assert rle == sdk_rle, "encoders disagree"
    assert np.array_equal(decoded, mask) and np.array_equal(sdk_values.reshape(*mask.shape, 4)[:, :, 3] > 0, mask)
    print(f"RLE: {len(rle)} bytes")
    print(f"encode  ours {ours_enc:8.1f} ms   sdk {sdk_enc:8.1f} ms   ({sdk_enc / ours_enc:.0f}x)")
    print(f"decode  ours {ours_dec:8.1f} ms   sdk {sdk_dec:8.1f} ms   ({sdk_dec / ours_dec:.0f}x)")


if __name__ == "__main__":
    _benchmark()
