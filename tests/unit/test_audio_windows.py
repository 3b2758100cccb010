"""Audio windowing: every second of a file reaches the detector in the shape it expects."""

from __future__ import annotations

import numpy as np
import pytest

from synthwatch.models.speech import SAMPLE_RATE
from synthwatch.operators.audio import WINDOW_SAMPLES, windows

SIZE = WINDOW_SAMPLES


def _ramp(n: int) -> np.ndarray:
    """Distinct, exactly representable samples, so a window's content shows where it came
    from."""
    return np.arange(n, dtype=np.float32)


def test_short_audio_is_repeated_from_its_start_to_one_window() -> None:
    audio = _ramp(24000)  # 1.5 s
    out, starts = windows(audio)
    assert out.shape == (1, SIZE) and out.dtype == np.float32
    assert starts == [0.0]
    np.testing.assert_array_equal(out[0, :24000], audio)
    np.testing.assert_array_equal(out[0, 24000:48000], audio)
    np.testing.assert_array_equal(out[0, 48000:], audio[: SIZE - 48000])


def test_very_short_audio_still_fills_a_window() -> None:
    out, starts = windows(np.array([0.5, -0.5, 0.25], dtype=np.float32))
    assert out.shape == (1, SIZE) and starts == [0.0]
    np.testing.assert_array_equal(out[0, :6], [0.5, -0.5, 0.25, 0.5, -0.5, 0.25])


def test_exactly_one_window_is_returned_unchanged() -> None:
    audio = _ramp(SIZE)
    out, starts = windows(audio)
    assert starts == [0.0]
    np.testing.assert_array_equal(out, audio[None, :])


def test_long_audio_is_cut_back_to_back_with_a_padded_tail() -> None:
    tail = 24000  # 1.5 s after three full windows
    audio = _ramp(3 * SIZE + tail)
    out, starts = windows(audio)
    assert out.shape == (4, SIZE)
    assert starts == [0.0, SIZE / SAMPLE_RATE, 2 * SIZE / SAMPLE_RATE, 3 * SIZE / SAMPLE_RATE]
    for i in range(3):
        np.testing.assert_array_equal(out[i], audio[i * SIZE : (i + 1) * SIZE])
    last = audio[3 * SIZE :]
    np.testing.assert_array_equal(out[3, :tail], last)
    np.testing.assert_array_equal(out[3, tail : 2 * tail], last)


@pytest.mark.parametrize(("tail", "expected"), [(SAMPLE_RATE - 1, 2), (SAMPLE_RATE, 3)])
def test_tail_is_kept_only_from_one_second(tail: int, expected: int) -> None:
    out, starts = windows(_ramp(2 * SIZE + tail))
    assert len(out) == len(starts) == expected


def test_overlapping_hop_ends_with_the_window_that_covers_the_end() -> None:
    hop = SIZE // 2
    audio = _ramp(2 * SIZE)
    out, starts = windows(audio, hop=hop)
    # Full windows at 0, hop, 2*hop; the next start (3*hop) leaves half a window (> 1 s).
    assert starts == [i * hop / SAMPLE_RATE for i in range(4)]
    np.testing.assert_array_equal(out[2], audio[2 * hop : 2 * hop + SIZE])
    np.testing.assert_array_equal(out[3, : SIZE - 3 * hop], audio[3 * hop :])


def test_max_windows_spreads_the_choice_over_the_whole_file() -> None:
    audio = _ramp(100 * SIZE)
    out, starts = windows(audio, max_windows=10)
    assert out.shape == (10, SIZE)
    assert starts[0] == 0.0
    assert starts[-1] == 99 * SIZE / SAMPLE_RATE  # the end of the file is scored too
    gaps = np.diff(starts) / (SIZE / SAMPLE_RATE)
    assert set(np.round(gaps).astype(int)) <= {11}  # 99 windows apart / 9 gaps = 11
    for row, start in zip(out, starts, strict=True):
        first = round(start * SAMPLE_RATE)
        np.testing.assert_array_equal(row, audio[first : first + SIZE])
    again, again_starts = windows(audio, max_windows=10)
    assert again_starts == starts and np.array_equal(again, out)


def test_max_windows_of_one_picks_the_start() -> None:
    out, starts = windows(_ramp(5 * SIZE), max_windows=1)
    assert out.shape == (1, SIZE) and starts == [0.0]


def test_silence_is_scored_not_rejected() -> None:
    out, starts = windows(np.zeros(2 * SIZE, dtype=np.float32))
    assert out.shape == (2, SIZE) and starts == [0.0, SIZE / SAMPLE_RATE]
    assert not out.any()


def test_non_finite_samples_become_silence_without_touching_the_input() -> None:
    audio = np.full(SIZE, 0.5, dtype=np.float32)
    audio[[10, 20]] = [np.nan, np.inf]
    out, _ = windows(audio)
    assert np.isfinite(out).all()
    assert out[0, 10] == 0.0 and out[0, 20] == 0.0 and out[0, 11] == 0.5
    assert np.isnan(audio[10])


def test_float64_input_comes_back_float32() -> None:
    out, _ = windows(np.linspace(-1, 1, SIZE + 100))
    assert out.dtype == np.float32


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.full(SIZE, np.nan, dtype=np.float32), "no finite samples"),
        (np.zeros((2, SIZE), dtype=np.float32), "mono"),
        (np.zeros(SIZE, dtype=np.int16), "float samples"),
    ],
)
def test_unusable_audio_is_refused_with_a_reason(audio: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        windows(audio)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"size": 0}, "size"), ({"hop": 0}, "hop"), ({"max_windows": 0}, "max_windows")],
)
def test_bad_parameters_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        windows(_ramp(SIZE), **kwargs)
