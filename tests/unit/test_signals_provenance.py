"""C2PA credentials: shared fixtures, self-signed round trips, hostile input, no network."""

from __future__ import annotations

import datetime as dt
import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import c2pa
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from PIL import Image

from synthwatch.operators.signals.provenance import Credentials, read_credentials

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
SIGNER_ORG = "synthwatch tests"
CAPTURE = IPTC + "digitalCapture"


# --- helpers ----------------------------------------------------------------------------


def _jpeg(seed: int = 0, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SIGNER_ORG),
        ]
    )


def _usage(*, signer: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signer,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not signer,
        crl_sign=not signer,
        encipher_only=False,
        decipher_only=False,
    )


def _signer(ocsp_url: str | None = None) -> Any:
    """A c2pa Signer whose CA and leaf certificate are minted here, on no trust list."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("synthwatch test CA"))
        .issuer_name(_name("synthwatch test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(signer=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("synthwatch test signer"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(signer=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if ocsp_url:
        access = x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
        )
        leaf = leaf.add_extension(x509.AuthorityInformationAccess([access]), False)
    pem = leaf.sign(ca_key, hashes.SHA256()).public_bytes(
        serialization.Encoding.PEM
    ) + ca.public_bytes(serialization.Encoding.PEM)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, pem, private, None))


def _manifest(source_type: str) -> dict[str, Any]:
    """A manifest for new content: C2PA 2.x wants `c2pa.created` with a source type first."""
    return _edit_manifest({"action": "c2pa.created", "digitalSourceType": source_type})


def _edit_manifest(*actions: dict[str, Any]) -> dict[str, Any]:
    return {
        "claim_generator_info": [{"name": "synthwatch-test", "version": "1"}],
        "title": "image.jpg",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": list(actions)}}],
    }


def _sign(
    source: bytes,
    manifest: dict[str, Any],
    signer: Any,
    *,
    remote_url: str | None = None,
    ingredient: tuple[bytes, str] | None = None,
) -> bytes:
    # The test's own Context: signing must not reach out either (verify_after_sign would
    # otherwise verify, and may fetch, with the SDK's defaults).
    context = c2pa.Context.from_dict(
        {
            "verify": {
                "verify_after_sign": False,
                "remote_manifest_fetch": False,
                "ocsp_fetch": False,
            }
        }
    )
    builder = c2pa.Builder(manifest, context=context)
    if ingredient:
        data, relationship = ingredient
        builder.add_ingredient(
            {"title": "ingredient.jpg", "relationship": relationship, "label": "parent"},
            "image/jpeg",
            io.BytesIO(data),
        )
    if remote_url:
        builder.set_no_embed()
        builder.set_remote_url(remote_url)
    out = io.BytesIO()
    builder.sign(signer, "image/jpeg", io.BytesIO(source), out)
    return out.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def signer() -> Any:
    return _signer()


class _CountingServer:
    """A local HTTP endpoint that records every connection made to it."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(4096))
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    self.requests.append(b"")

    def close(self) -> None:
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[_CountingServer]:
    srv = _CountingServer()
    yield srv
    srv.close()


# --- shared fixtures (third-party files in ../shared) -----------------------------------


@pytest.mark.shared
def test_shared_generated_gradient_is_valid_and_declares_algorithmic_not_trained_media(
    shared_dir: Path,
) -> None:
    # The file is named "ai_declared", but its only action declares IPTC
    # algorithmicMedia (a procedural gradient from c2pa-rs's make_test_images), which
    # IPTC defines as made without training data: not a generative-AI declaration.
    creds = read_credentials(
        shared_dir / "media/provenance/c2pa_ai_declared_valid_C.jpg", "image/jpeg"
    )
    assert creds.present and creds.valid is True and creds.error is None
    assert creds.validation_state == "Valid" and creds.validation_errors == ()
    assert creds.digital_source_types == (IPTC + "algorithmicMedia",)
    assert creds.ai_declared is False
    assert creds.signer == "C2PA Test Signing Cert" and creds.signer_trusted is False
    assert creds.claim_generator == "make_test_images/0.26.0 c2pa-rs/0.26.0"


@pytest.mark.shared
def test_shared_tampered_jpeg_is_invalid_with_a_data_hash_mismatch(shared_dir: Path) -> None:
    creds = read_credentials(
        shared_dir / "media/provenance/c2pa_tampered_invalid_XCA.jpg", "image/jpeg"
    )
    assert creds.present and creds.valid is False and creds.validation_state == "Invalid"
    assert any(e.startswith("assertion.dataHash.mismatch") for e in creds.validation_errors)
    assert "INVALID" in creds.summary()


@pytest.mark.shared
def test_shared_jpeg_without_manifest_is_absent(shared_dir: Path) -> None:
    creds = read_credentials(shared_dir / "media/provenance/no_manifest_A.jpg", "image/jpeg")
    assert creds == Credentials(present=False)


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "mime", "generator"),
    [
        ("c2pa_signed_sample1.wav", "audio/wav", "c2pa-c test/0.2"),
        ("c2pa_signed_video1.mp4", "video/mp4", "TestApp c2patool/0.6.2 c2pa-rs/0.28.2"),
    ],
)
def test_shared_signed_audio_and_video_are_valid_without_ai_declaration(
    shared_dir: Path, name: str, mime: str, generator: str
) -> None:
    creds = read_credentials(shared_dir / "media/provenance" / name, mime)
    assert creds.present and creds.valid is True and creds.validation_errors == ()
    assert creds.claim_generator == generator
    assert creds.ai_declared is False


# --- no manifest, hostile input ---------------------------------------------------------


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_generated_image_without_manifest_is_absent_without_error(
    tmp_path: Path, fmt: str, mime: str
) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, fmt)
    creds = read_credentials(_write(tmp_path, f"plain.{fmt.lower()}", buf.getvalue()), mime)
    assert creds == Credentials(present=False)
    assert creds.summary() == "C2PA: no manifest"


@pytest.mark.parametrize(
    "garbage",
    [
        b"this is not a jpeg " * 300,
        b"\xff\xd8\xff" + np.random.default_rng(1).bytes(5000),
        np.random.default_rng(2).bytes(5000),
        b"",
    ],
)
def test_garbage_named_jpg_is_absent_and_never_raises(tmp_path: Path, garbage: bytes) -> None:
    creds = read_credentials(_write(tmp_path, "garbage.jpg", garbage), "image/jpeg")
    assert creds.present is False and creds.valid is None


def test_text_named_jpg_is_reported_as_unreadable(tmp_path: Path) -> None:
    path = _write(tmp_path, "garbage.jpg", b"this is not a jpeg " * 300)
    creds = read_credentials(path, "image/jpeg")
    assert creds.error is not None and "image/jpeg" in creds.error
    assert creds.summary().startswith("C2PA: unreadable")


def test_unsupported_mime_is_absent_even_when_the_bytes_carry_a_manifest(
    tmp_path: Path, signer: Any
) -> None:
    path = _write(tmp_path, "signed.bin", _sign(_jpeg(), _manifest(CAPTURE), signer))
    assert read_credentials(path, "application/x-synthwatch-unknown") == Credentials(present=False)
    assert read_credentials(path, "image/jpeg").present


def test_missing_file_is_an_error_not_an_exception(tmp_path: Path) -> None:
    creds = read_credentials(tmp_path / "gone.jpg", "image/jpeg")
    assert creds.present is False and creds.error and "gone.jpg" in creds.error


# --- self-signed round trips ------------------------------------------------------------


def test_signed_ai_declaration_is_read_and_valid_with_untrusted_signer(
    tmp_path: Path, signer: Any
) -> None:
    source_type = IPTC + "trainedAlgorithmicMedia"
    path = _write(tmp_path, "ai.jpg", _sign(_jpeg(), _manifest(source_type), signer))
    creds = read_credentials(path, "image/jpeg")
    assert creds.present and creds.valid is True and creds.validation_errors == ()
    assert creds.ai_declared is True and creds.ai_declared_by_ingredient is False
    assert creds.digital_source_types == (source_type,)
    assert creds.signer == SIGNER_ORG and creds.signer_common_name == "synthwatch test signer"
    assert creds.signer_trusted is False  # no trust list offline: reported, not an error
    assert creds.claim_generator == "synthwatch-test/1"
    assert "declares generative AI" in creds.summary()


def test_bare_composite_term_in_an_iptc_assertion_is_an_ai_declaration(
    tmp_path: Path, signer: Any
) -> None:
    # c2pa-rs rewrites a bare term in c2pa.actions to the full IPTC URI, but not in other
    # assertions, where IPTC photo metadata carries the same field.
    manifest = _manifest(CAPTURE)
    manifest["assertions"].append(
        {
            "label": "stds.iptc.photo-metadata",
            "data": {"Iptc4xmpExt:DigitalSourceType": "compositeWithTrainedAlgorithmicMedia"},
        }
    )
    creds = read_credentials(
        _write(tmp_path, "comp.jpg", _sign(_jpeg(), manifest, signer)), "image/jpeg"
    )
    assert creds.valid is True and creds.ai_declared is True
    assert creds.digital_source_types == (CAPTURE, "compositeWithTrainedAlgorithmicMedia")


def test_signed_digital_capture_is_not_an_ai_declaration(tmp_path: Path, signer: Any) -> None:
    path = _write(tmp_path, "photo.jpg", _sign(_jpeg(), _manifest(IPTC + "digitalCapture"), signer))
    creds = read_credentials(path, "image/jpeg")
    assert creds.valid is True and creds.ai_declared is False


def test_flipping_one_image_byte_after_signing_invalidates_the_manifest(
    tmp_path: Path, signer: Any
) -> None:
    signed = bytearray(_sign(_jpeg(), _manifest(IPTC + "trainedAlgorithmicMedia"), signer))
    signed[-100] ^= 0x01  # inside the entropy-coded scan, far from the manifest
    creds = read_credentials(_write(tmp_path, "edited.jpg", bytes(signed)), "image/jpeg")
    assert creds.present and creds.valid is False and creds.validation_state == "Invalid"
    assert any(e.startswith("assertion.dataHash.mismatch") for e in creds.validation_errors)
    assert creds.ai_declared is True  # the claim is still readable, just no longer bound


def test_corrupt_manifest_box_is_an_invalid_finding_not_an_exception(
    tmp_path: Path, signer: Any
) -> None:
    signed = bytearray(_sign(_jpeg(), _manifest(CAPTURE), signer))
    at = signed.index(b"jumb")
    signed[at] ^= 0xFF  # break the JUMBF superbox header of the manifest store
    creds = read_credentials(_write(tmp_path, "broken.jpg", bytes(signed)), "image/jpeg")
    assert creds.present is True and creds.valid is False
    assert creds.validation_errors and creds.error is None


def test_truncated_signed_file_is_still_reported_as_carrying_a_broken_manifest(
    tmp_path: Path, signer: Any
) -> None:
    signed = _sign(_jpeg(size=256), _manifest(CAPTURE), signer)
    creds = read_credentials(_write(tmp_path, "cut.jpg", signed[: len(signed) // 2]), "image/jpeg")
    assert creds.present is True and creds.valid is False and creds.error is not None


def test_ai_declared_by_a_parent_ingredient_counts_but_an_input_does_not(
    tmp_path: Path, signer: Any
) -> None:
    generated = _sign(_jpeg(seed=2), _manifest(IPTC + "trainedAlgorithmicMedia"), signer)

    # An edit of the generated image that does not repeat the declaration itself.
    opened = {"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}}
    edit = _edit_manifest(opened, {"action": "c2pa.color_adjustments"})
    parent = _sign(generated, edit, signer, ingredient=(generated, "parentOf"))
    creds = read_credentials(_write(tmp_path, "edited.jpg", parent), "image/jpeg")
    assert creds.valid is True, creds.validation_errors
    assert creds.ai_declared is True and creds.ai_declared_by_ingredient is True
    assert IPTC + "trainedAlgorithmicMedia" in creds.digital_source_types

    # A human-made image that only used the generated one as a reference.
    drawn = _manifest(IPTC + "digitalCreation")
    reference = _sign(_jpeg(seed=3), drawn, signer, ingredient=(generated, "inputTo"))
    creds = read_credentials(_write(tmp_path, "inspired.jpg", reference), "image/jpeg")
    assert creds.valid is True, creds.validation_errors
    assert creds.ai_declared is False
    assert creds.digital_source_types == (IPTC + "digitalCreation",)


# --- offline ----------------------------------------------------------------------------


def test_reading_opens_no_python_socket(
    tmp_path: Path, signer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("read_credentials opened a network connection")

    path = _write(
        tmp_path, "ai.jpg", _sign(_jpeg(), _manifest(IPTC + "trainedAlgorithmicMedia"), signer)
    )
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    assert read_credentials(path, "image/jpeg").valid is True


def test_native_sdk_fetches_nothing_for_ocsp_urls_or_remote_manifests(
    tmp_path: Path, server: _CountingServer
) -> None:
    # c2pa-rs is native code, so a Python socket patch cannot see its connections. A
    # local server named in the certificate's OCSP URL and in a remote-manifest
    # reference can: the two controls prove the SDK would connect if allowed.
    signer = _signer(ocsp_url=f"{server.url}/ocsp")
    embedded = _sign(_jpeg(), _manifest(IPTC + "trainedAlgorithmicMedia"), signer)
    remote = _sign(_jpeg(), _manifest(CAPTURE), signer, remote_url=f"{server.url}/manifest.c2pa")

    with c2pa.Reader(
        "image/jpeg",
        io.BytesIO(embedded),
        context=c2pa.Context.from_dict({"verify": {"ocsp_fetch": True}}),
    ) as control:
        assert control.json()  # reading with OCSP fetching on is what contacts the server
    with pytest.raises(c2pa.C2paError):
        c2pa.Reader("image/jpeg", io.BytesIO(remote), context=c2pa.Context())
    assert len(server.requests) == 2, "control: the SDK should have asked the server twice"
    server.requests.clear()

    embedded_creds = read_credentials(_write(tmp_path, "ocsp.jpg", embedded), "image/jpeg")
    remote_creds = read_credentials(_write(tmp_path, "remote.jpg", remote), "image/jpeg")
    assert server.requests == []
    assert embedded_creds.valid is True and embedded_creds.ai_declared is True
    assert remote_creds.present is True and remote_creds.valid is None
    assert remote_creds.remote_url == f"{server.url}/manifest.c2pa"
    assert "not fetched" in remote_creds.summary()
