"""Cut decoded audio into the fixed-length windows that speech detectors score.

AASIST-style detectors see exactly 64,600 samples (about 4 s at 16 kHz) at a time, so a
file is scored window by window and the window scores are aggregated by the caller.
Short inputs are repeated up to one window rather than zero-padded, as the AASIST
authors did (``pad`` in clovaai/aasist data_utils.py): the weights never saw long
stretches of digital silence, and a zero tail shifts their scores.

This module needs only numpy, so it can run where torch is not installed.
"""

from __future__ import annotations

import numpy as np

from synthwatch.models.speech import INPUT_SAMPLES, SAMPLE_RATE

WINDOW_SAMPLES = INPUT_SAMPLES
"""A speech model's input length (`models.speech`)."""

MIN_TAIL_S = 1.0
"""A trailing partial window shorter than this is dropped: filling four seconds with a
sub-second loop makes audio unlike anything the detector was trained on, and at most a
second at the end of a file goes unscored."""


def windows(
    audio: np.ndarray,
    *,
    size: int = WINDOW_SAMPLES,
    hop: int | None = None,
    max_windows: int = 64,
) -> tuple[np.ndarray, list[float]]:
    """Split mono 16 kHz `audio` into (N, size) float32 windows and their start times (s).

    Windows start every `hop` samples (default `size`: no overlap). The first window that
    runs past the end is kept, filled by repeating its own samples, when it holds at
    least `MIN_TAIL_S` of audio; audio shorter than one window is repeated up to one
    window whatever its length. With more than `max_windows` windows, `max_windows` are
    taken evenly spread from the first to the last, so a long file is still sampled end
    to end and the cost per file is bounded; the choice is deterministic.

    Non-finite samples are replaced by 0 (a decoder glitch should not poison a whole
    window's score). Raises ValueError for empty, multi-channel, integer or entirely
    non-finite input, and for non-positive `size`, `hop` or `max_windows`.
    """
    if size <= 0:
        raise ValueError(f"window size must be positive, got {size}")
    step = size if hop is None else hop
    if step <= 0:
        raise ValueError(f"hop must be positive, got {hop}")
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, got {max_windows}")
    signal = _clean(audio)

    n = len(signal)
    if n <= size:
        return _repeat_to(signal, size)[None, :], [0.0]

    min_tail = round(MIN_TAIL_S * SAMPLE_RATE)
    starts = list(range(0, n - size + 1, step))
    tail = starts[-1] + step
    if tail < n and n - tail >= min_tail:
        starts.append(tail)
    if len(starts) > max_windows:
        picks = np.rint(np.linspace(0, len(starts) - 1, max_windows)).astype(int)
        starts = [starts[i] for i in picks]

    out = np.empty((len(starts), size), dtype=np.float32)
    for row, start in enumerate(starts):
        out[row] = _repeat_to(signal[start : start + size], size)
    return out, [start / SAMPLE_RATE for start in starts]


def _clean(audio: np.ndarray) -> np.ndarray:
    """`audio` as finite float32 mono, or ValueError saying what is wrong with it."""
    array = np.asarray(audio)
    if array.ndim != 1:
        raise ValueError(f"expected mono audio (1-D samples), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        # Integer PCM would need scaling to [-1, 1]; refusing beats scoring it 32768x loud.
        raise ValueError(f"expected float samples in [-1, 1], got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError("audio is empty: nothing to score")
    signal = array.astype(np.float32)
    finite = np.isfinite(signal)
    if not finite.any():
        raise ValueError("audio has no finite samples (all NaN or infinite): nothing to score")
    if not finite.all():
        signal = np.where(finite, signal, np.float32(0.0))
    return signal


def _repeat_to(segment: np.ndarray, size: int) -> np.ndarray:
    """`segment` tiled from its start and cut to `size` samples."""
    if len(segment) >= size:
        return segment[:size]
    reps = -(-size // len(segment))
    tiled: np.ndarray = np.tile(segment, reps)[:size]
    return tiled
