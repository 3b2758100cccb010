"""IPTC digital source types (https://cv.iptc.org/newscodes/digitalsourcetype/): the
vocabulary C2PA manifests and XMP metadata use to say how the pixels were made.

The one place that names which types mean what, for the C2PA reader, the metadata
reader and the verdict's interpretation of both.
"""

from __future__ import annotations

from collections.abc import Iterable

GENERATIVE_AI = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})
"""Types that declare generative AI (IPTC's 2023 guidance). `algorithmicMedia` is
deliberately absent: IPTC defines it as media made by an algorithm *without* sampled
training data (procedural or fractal images)."""

SYNTHETIC = GENERATIVE_AI | {"algorithmicMedia", "compositeSynthetic"}
"""Types that declare the pixels were not captured by a camera, trained model or not:
for a scanner of synthetic media, a signed statement saying so is the answer."""


def term(source_type: str) -> str:
    """The IPTC term of a source type given as a full URI or a bare term."""
    return source_type.rstrip("/").rsplit("/", 1)[-1]


def declares_generative_ai(source_types: Iterable[str]) -> bool:
    return any(term(t) in GENERATIVE_AI for t in source_types)


def declares_synthetic(source_types: Iterable[str]) -> list[str]:
    """The synthetic types among `source_types` (URI or bare term), as given."""
    return [t for t in source_types if term(t) in SYNTHETIC]
