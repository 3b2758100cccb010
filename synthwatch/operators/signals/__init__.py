"""Non-learned signals: C2PA content credentials, generator metadata and forensic maps.

Each module is a set of pure functions of a file path or a decoded uint8 RGB image that
return frozen dataclasses, so the pipeline can run them anywhere (a worker, a test, a
notebook) and fuse or archive their outputs without knowing how they were computed.
None of them decides anything: a declaration in metadata or a manifest is a fact about
what the file *says*, and a forensic score is a feature for calibration and fusion.
"""

from __future__ import annotations

from synthwatch.operators.signals.forensic import ForensicMap, error_level, residual_spectrum
from synthwatch.operators.signals.metadata import GeneratorMetadata, generator_metadata
from synthwatch.operators.signals.provenance import Credentials, read_credentials

__all__ = [
    "Credentials",
    "ForensicMap",
    "GeneratorMetadata",
    "error_level",
    "generator_metadata",
    "read_credentials",
    "residual_spectrum",
]
