"""Wire records and their exported JSON Schema files (`*.schema.json` beside this file)."""

from synthwatch.schemas.records import (
    RECORDS,
    Alert,
    DeadLetter,
    Decision,
    FaceBox,
    FetchedMedia,
    FrameResult,
    MediaRef,
    MediaType,
    Segment,
    Signal,
    Verdict,
    decode,
    encode,
    to_builtins,
)

__all__ = [
    "RECORDS",
    "Alert",
    "DeadLetter",
    "Decision",
    "FaceBox",
    "FetchedMedia",
    "FrameResult",
    "MediaRef",
    "MediaType",
    "Segment",
    "Signal",
    "Verdict",
    "decode",
    "encode",
    "to_builtins",
]
