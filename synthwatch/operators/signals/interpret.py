"""The non-learned signals as verdict `Signal`s: C2PA, generator metadata, forensic maps.

The other modules of `synthwatch.operators.signals` say what a file contains; this one
decides what that means for a verdict:

- a valid C2PA manifest that declares the media synthetic decides the verdict on its
  own (`decides="flag"`): the creator signed that statement. Synthetic means an IPTC
  digital source type in `iptc.SYNTHETIC`: generative AI, and also media made by an
  algorithm without training data: for a scanner of synthetic media, a signed
  statement that the pixels were not captured by a camera is the answer whether or
  not a model was trained;
- a manifest that fails validation is a finding in itself (`decides="review"`):
  content credentials were attached and then the content or the manifest changed;
- a valid manifest that declares nothing about AI is reported and not fused: anyone can
  sign anything, so it is not evidence of authenticity;
- generator metadata (a Stable Diffusion `parameters` chunk, `Software: Midjourney`,
  an IPTC digital source type) is a strong but unsigned claim: it enters fusion as the
  `metadata` modality with a fixed score of 0.99, below the certainty of a signature;
- the forensic features (error level, residual spectrum) are not probabilities: they
  are reported, and fused only once a calibration has been fitted for them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from synthwatch.operators.evidence import Overlay
from synthwatch.operators.signals import forensic, iptc, metadata, provenance
from synthwatch.schemas import Provenance, Signal

METADATA_SCORE = 0.99
_JPEG_MAGIC = b"\xff\xd8\xff"


def _c2pa_version() -> str:
    try:
        return importlib.metadata.version("c2pa-python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


C2PA_MODEL = f"c2pa-python@{_c2pa_version()}"


def _c2pa(score: float, decides: Literal["", "flag", "review"], note: str) -> Signal:
    """A C2PA signal: a fact that decides or floors the verdict, or is only reported
    (weight 0: a valid manifest without a synthetic declaration proves nothing)."""
    return Signal(
        name="c2pa",
        model=C2PA_MODEL,
        score=score,
        weight=1.0 if decides == "flag" else 0.0,
        modality="provenance",
        decides=decides,
        note=note,
    )


def provenance_signals(path: Path, mime: str) -> tuple[Provenance, list[Signal], list[str]]:
    """(provenance summary, signals, notes) from content credentials and metadata."""
    notes: list[str] = []
    signals: list[Signal] = []
    cred = provenance.read_credentials(path, mime)
    prov = Provenance(
        present=cred.present,
        valid=cred.valid,
        signer=cred.signer,
        claim_generator=cred.claim_generator,
        ai_declared=cred.ai_declared,
        digital_source_types=list(cred.digital_source_types),
        errors=list(cred.validation_errors),
    )
    if cred.error:
        notes.append(f"C2PA manifest could not be read: {cred.error}")
    synthetic = iptc.declares_synthetic(cred.digital_source_types)
    if cred.present and cred.valid and (cred.ai_declared or synthetic):
        signals.append(
            _c2pa(
                1.0,
                "flag",
                f"valid C2PA manifest declares synthetic media "
                f"({', '.join(synthetic) or 'generative AI'}); signed by "
                f"{cred.signer or 'an unnamed signer'}"
                + (" (not on a trust list)" if cred.signer_trusted is False else ""),
            )
        )
    elif cred.present and cred.valid is False:
        detail = "; ".join(cred.validation_errors[:5]) or "no detail from the SDK"
        signals.append(_c2pa(0.0, "review", f"C2PA manifest fails validation: {detail}"))
    elif cred.present and cred.valid is None:
        notes.append(f"C2PA manifest present but not validated: {cred.summary()}")
    elif cred.present:
        signals.append(
            _c2pa(
                0.0,
                "",
                f"valid C2PA manifest, no synthetic source declared (claim generator "
                f"{cred.claim_generator or 'unnamed'}); not evidence of authenticity",
            )
        )
    meta = metadata.generator_metadata(path)
    if meta.generator or meta.ai_declared:
        signals.append(
            Signal(
                name="generator_metadata",
                model="metadata@1",
                score=METADATA_SCORE,
                weight=1.0,
                modality="metadata",
                note="; ".join(meta.evidence[:4]),
            )
        )
    return prov, signals, notes


def _is_jpeg(path: Path | None) -> bool:
    if path is None:
        return False
    try:
        with path.open("rb") as fh:
            return fh.read(3) == _JPEG_MAGIC
    except OSError:
        return False


def forensic_maps(
    path: Path | None, image: npt.NDArray[np.uint8]
) -> tuple[forensic.ForensicMap | None, forensic.ForensicMap | None]:
    """(error level map for a JPEG, residual spectrum), each None where it cannot be
    computed: a JPEG Pillow cannot re-encode (truncated, huge), an image under 64 px."""
    ela: forensic.ForensicMap | None = None
    if _is_jpeg(path):
        assert path is not None
        with contextlib.suppress(ValueError):
            ela = forensic.error_level(path)
    spec: forensic.ForensicMap | None = None
    with contextlib.suppress(ValueError):
        spec = forensic.residual_spectrum(image)
    return ela, spec


def forensic_signals(path: Path, image: npt.NDArray[np.uint8]) -> list[Signal]:
    """Error level (JPEG only), residual-spectrum and lattice-energy features of a still."""
    ela, spec = forensic_maps(path, image)
    found = [
        ("ela", "ela@q90", ela, "error level non-uniformity"),
        (
            "residual_spectrum",
            "residual_spectrum@1",
            spec,
            "periodic peaks in the noise residual's spectrum",
        ),
    ]
    scored = [(name, model, m.score, what) for name, model, m, what in found if m is not None]
    if spec is not None:
        scored.append(
            (
                "spectral_grid",
                "spectral_grid@1",
                spec.features["grid_energy"],
                "share of the noise residual's power on the 1/8-period lattice",
            )
        )
    return [
        Signal(
            name=name,
            model=model,
            score=round(score, 6),
            weight=1.0,
            modality="image",
            note=f"{what} (not a probability until calibrated)",
        )
        for name, model, score, what in scored
    ]


def forensic_overlays(path: Path | None, image: npt.NDArray[np.uint8]) -> list[Overlay]:
    """The forensic maps as evidence images for a still image's frame."""
    ela, spec = forensic_maps(path, image)
    shown = [
        (ela, "ela", "error level analysis (re-saved at quality 90), score"),
        (spec, "residual_spectrum", "log spectrum of the noise residual, peak score"),
    ]
    return [
        Overlay(
            name=name,
            role="forensic_map",
            png=m.png(),
            # The raw feature, not the calibrated score the verdict's signal carries.
            note=f"{what} {m.score:.3f} (raw feature value, before calibration)",
        )
        for m, name, what in shown
        if m is not None
    ]
