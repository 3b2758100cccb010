"""The sha256 of a file, read in chunks: media can be gigabytes, and weights, labelled
sets and calibration files are hashed the same way everywhere they are named by hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file at `path`; raises OSError as `open` does."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
