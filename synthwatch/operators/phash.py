"""Perceptual hashes of what was scanned: PDQ for every still and every sampled video frame.

PDQ (Meta's photo hash; the format ThreatExchange and hasher-matcher-actioner exchange)
turns an image into 256 bits that change little under re-encoding, resizing and small
crops, and a quality from 0 to 100 saying how much structure the image has. Facts from
the PDQ description in facebook/ThreatExchange (pdq/README and hashing.pdf): two images
are taken as the same when their hashes differ in at most 31 of the 256 bits, and a
hash of quality under 50 (a flat or nearly blank image) should not be matched on.
The hashing itself is the `pdqhash` package (Cython bindings to Meta's C++ reference
implementation), so our hashes are the exchange's hashes, bit for bit.

Measured on scikit-image's astronaut photo (tests/unit/test_phash.py): a JPEG at quality
60 moves 2 bits, half the size 12, 1% cut off each side 18; 2% off each side moves 34,
past the threshold: PDQ matches re-encodes and resizes, and only slight crops.

Every hash is recorded in the verdict (`Verdict.hashes`, hex as ThreatExchange writes
it), with the quality and, for video, the frame's time, so a match found later can be
traced to the frame it came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from synthwatch.operators.sample.common import Frame
from synthwatch.schemas import MediaHash

MATCH_DISTANCE = 31
"""PDQ: hashes within this many differing bits (of 256) are taken as the same image."""
MIN_QUALITY = 50
"""PDQ: hashes of lower quality carry too little structure to be matched on."""


def pdq(image: npt.NDArray[np.uint8]) -> tuple[str, int]:
    """(64 hex digits, quality) of an RGB uint8 image."""
    import pdqhash  # a compiled extension: loaded on the first item, not at import

    bits, quality = pdqhash.compute(np.ascontiguousarray(image))
    # ThreatExchange's own pdq_from_file joins the 256 bits in order into one binary
    # number and writes it as 64 lowercase hex digits: the first bit is the most
    # significant, which is what packbits does, eight bits to a byte.
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes().hex(), int(quality)


def distance(a: str, b: str) -> int:
    """Hamming distance between two hex PDQ hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def frame_hashes(frames: Sequence[Frame], *, still: bool) -> list[MediaHash]:
    """PDQ of each sampled frame; a still's one hash carries no time."""
    out = []
    for frame in frames:
        digest, quality = pdq(frame.image)
        out.append(
            MediaHash(
                algorithm="pdq",
                hash=digest,
                quality=quality,
                time_s=None if still else round(frame.time_s, 3),
            )
        )
    return out
