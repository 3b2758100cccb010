"""Ed25519 signatures on evidence manifests, and the keys that make and check them.

A bundle's `manifest.json` lists every object with its sha256 and size; signing the
manifest's exact bytes therefore covers every object. The signature travels beside it as
`manifest.sig.json`: the algorithm, the signing key's id, the public key itself and the
signature, so a bundle copied anywhere carries what is needed to check it. A public key
inside the bundle proves nothing on its own (whoever altered the manifest could re-sign
it with a key of their own), so `synthwatch verify` trusts a signature only when its key
is one the verifier holds: the current signing key, the public keys in
`signing.trusted_keys_dir` (where old keys stay after a rotation), or one named on the
command line. Every bundle records its key id in the signed manifest, so a bundle signed
before a rotation keeps verifying against the key that signed it.

Key id: the first 16 hex digits of the sha256 of the raw 32-byte public key.

Where the private key comes from (`SigningSettings`): a PEM file (`key_file`, e.g. a
Kubernetes Secret mounted as a file), or the PEM text itself (`key`, e.g. a Secret
exposed as the environment variable `SYNTHWATCH_SIGNING__KEY`). With neither, a key of
this user's is created once, mode 0600, in `$XDG_CONFIG_HOME/synthwatch/` (or
`~/.config/synthwatch/`), so a journalist's one-machine scans are signed too; a
deployment names its own key so every worker signs with the same one.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, SecretStr

from synthwatch.errors import ConfigError

ALGORITHM = "Ed25519"
SIGNATURE_SCHEMA = "synthwatch.evidence_signature.v1"
SIGNATURE_NAME = "manifest.sig.json"
DEFAULT_KEY_NAME = "evidence-signing-key.pem"


class SigningSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key_file: Path | None = None
    """PEM (PKCS#8) Ed25519 private key, e.g. a Kubernetes Secret mounted as a file."""
    key: SecretStr | None = None
    """The PEM text itself (`SYNTHWATCH_SIGNING__KEY`), when the Secret is an env var."""
    trusted_keys_dir: Path | None = None
    """Public keys (`*.pem`) `verify` trusts besides the current one: keep every key a
    bundle was ever signed with here after a rotation."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public(pem: bytes | str, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, or a ConfigError naming `where`."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: not an Ed25519 public key ({type(key).__name__})")
    return key


def _load_private(pem: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{where}: not an Ed25519 private key ({type(key).__name__})")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "synthwatch" / DEFAULT_KEY_NAME


def write_new_key(path: Path) -> Ed25519PrivateKey:
    """Create a key at `path` (mode 0600, never over an existing file)."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: exists; refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem(key))
    return key


@dataclass(frozen=True)
class Signature:
    key_id: str
    public_key_pem: str
    signature: bytes


class Signer:
    """Signs manifests with one Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey, source: str) -> None:
        self._key = key
        self.public = key.public_key()
        self.key_id = key_id(self.public)
        self.public_pem = public_pem(self.public)
        self.source = source
        """Where the key came from, as `keys show` prints it (never the key itself)."""

    @classmethod
    def generate(cls) -> Signer:
        """A throwaway key (tests)."""
        return cls(Ed25519PrivateKey.generate(), "generated in memory")

    @classmethod
    def from_settings(cls, settings: SigningSettings, *, create: bool = True) -> Signer:
        """The configured key; with none configured, this user's default key, created on
        first use when `create`."""
        if settings.key is not None:
            pem = settings.key.get_secret_value().encode()
            return cls(_load_private(pem, "signing.key"), "signing.key (environment)")
        if settings.key_file is not None:
            path = settings.key_file
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"signing.key_file {path}: cannot read ({exc.strerror or exc})"
                ) from None
            return cls(_load_private(pem, f"signing.key_file {path}"), str(path))
        path = default_key_path()
        if path.exists() or not create:
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
            return cls(_load_private(pem, str(path)), str(path))
        try:
            return cls(write_new_key(path), f"{path} (created now)")
        except ConfigError:  # another process created it first: use theirs
            return cls(_load_private(path.read_bytes(), str(path)), str(path))
        except OSError as exc:  # a read-only home (a container): say what to set
            raise ConfigError(
                f"no evidence signing key configured and none can be created at {path} "
                f"({exc.strerror or exc}): set SYNTHWATCH_SIGNING__KEY_FILE or "
                "SYNTHWATCH_SIGNING__KEY (`synthwatch keys generate` makes one)"
            ) from None

    def sign(self, data: bytes) -> Signature:
        return Signature(self.key_id, self.public_pem, self._key.sign(data))


def signature_document(sig: Signature, manifest_sha256: str) -> dict[str, str]:
    return {
        "schema": SIGNATURE_SCHEMA,
        "algorithm": ALGORITHM,
        "key_id": sig.key_id,
        "public_key": sig.public_key_pem,
        "manifest_sha256": manifest_sha256,
        "signature": base64.b64encode(sig.signature).decode("ascii"),
    }


def check_signature(public: Ed25519PublicKey, signature_b64: str, data: bytes) -> bool:
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def trusted_keys(
    settings: SigningSettings, extra: list[Path] | None = None
) -> dict[str, Ed25519PublicKey]:
    """key id -> public key for every key `verify` trusts: the current signing key (if
    one exists; none is created for a verification), `trusted_keys_dir`'s `*.pem`, and
    `extra` files (public or private PEMs)."""
    keys: dict[str, Ed25519PublicKey] = {}
    try:
        current = Signer.from_settings(settings, create=False)
    except ConfigError:
        current = None
    if current is not None:
        keys[current.key_id] = current.public
    files: list[Path] = []
    if settings.trusted_keys_dir is not None:
        if not settings.trusted_keys_dir.is_dir():
            raise ConfigError(
                f"signing.trusted_keys_dir {settings.trusted_keys_dir}: no such folder"
            )
        files += sorted(settings.trusted_keys_dir.glob("*.pem"))
    files += extra or []
    for path in files:
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if b"PRIVATE KEY" in pem:
            public = _load_private(pem, str(path)).public_key()
        else:
            public = load_public(pem, str(path))
        keys[key_id(public)] = public
    return keys
