"""C2PA content credentials of a media file, read and validated offline.

A C2PA manifest is the one signal in this package that a generator signs: OpenAI,
Adobe Firefly, Google and others embed one declaring the IPTC digital source type
`trainedAlgorithmicMedia`, so a valid manifest saying so is close to a confession, and
a manifest whose hashes no longer match says the file was edited after signing.

Reading is strictly offline. c2pa-rs fetches by default (the c2pa-python 0.38 / c2pa-rs
0.91 defaults have `verify.remote_manifest_fetch` on; see c2pa-python docs/settings.md),
and a fetch would let whoever crafted the file learn that we scanned it and steer what we
read. `OFFLINE_SETTINGS` turns off remote manifests and OCSP and, as a second lock, sets
`core.allowed_network_hosts` to an empty list, which c2pa-rs reads as "no host allowed"
(checked against a local server in tests/unit/test_signals_provenance.py). A manifest
that lives only at a remote URL is therefore reported as present but unverified.

What "valid" means here: the manifest parsed, the claim signature verifies against the
certificate embedded in it, and every hash it records (assertions, ingredients and the
asset bytes) matches. That is c2pa-rs's own `validation_state` "Valid" (or "Trusted",
which adds trust-list membership). Trust-list membership of the signer is *not* required:
no trust list is configured, and loading the C2PA trust list would be either a network
fetch or a snapshot that goes stale. Without it every signer, including the C2PA test
certificates and a certificate anyone can mint, comes back `signingCredential.untrusted`;
that is reported separately in `signer_trusted`, never as a validation error. So a valid
manifest proves integrity since signing, not who signed: its declarations are claims.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import c2pa

from synthwatch.operators.signals import iptc

OFFLINE_SETTINGS: Mapping[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}
"""c2pa-rs settings applied to every read: no remote manifests, no OCSP, no hosts at all."""

TRUST_CODES = frozenset({"signingCredential.untrusted", "timeStamp.untrusted"})
"""C2PA status codes that only say a certificate is on no configured trust list."""

INGREDIENT_RELATIONSHIPS = frozenset({"parentOf", "componentOf"})
"""Ingredient relationships whose content ends up in the asset (C2PA 2.x, 8.3). An
`inputTo` ingredient (a prompt image, a style reference) only influenced the output, so
its own source type says nothing about the asset's pixels and is not followed."""

MAX_INGREDIENT_DEPTH = 16
JUMBF_SCAN_BYTES = 8 << 20
_C2PA_JUMBF = b"jumdc2pa"  # JUMBF description box of a C2PA manifest store (its UUID starts 'c2pa')
_EXPLANATION_CHARS = 300
_URL = re.compile(r"https?://[^\s\"']+")

# SDK errors that mean the manifest itself is broken: a finding about the file.
_MALFORMED = (
    c2pa.C2paError.Verify,
    c2pa.C2paError.Manifest,
    c2pa.C2paError.Decoding,
    c2pa.C2paError.Json,
    c2pa.C2paError.Assertion,
    c2pa.C2paError.AssertionNotFound,
    c2pa.C2paError.ResourceNotFound,
    c2pa.C2paError.Signature,
    c2pa.C2paError.Encoding,
)


@dataclass(frozen=True)
class Credentials:
    """What the C2PA manifest store of one file says, and whether it still holds.

    `present` is true whenever the file carries (or points to) a manifest store, even one
    too broken to parse: a broken manifest is itself evidence of tampering. `valid` is
    None when there is nothing to validate (no manifest, or a remote one not fetched).
    `error` is set when reading failed for a reason that is not itself a finding: the
    file could not be opened, or its bytes are not the declared type. When the container
    does not parse but still holds a C2PA manifest box (a truncated signed file), both
    `error` and the invalid finding are set.
    """

    present: bool
    valid: bool | None = None
    validation_state: str | None = None
    validation_errors: tuple[str, ...] = ()
    signer: str | None = None
    signer_common_name: str | None = None
    signer_trusted: bool | None = None
    claim_generator: str | None = None
    ai_declared: bool = False
    ai_declared_by_ingredient: bool = False
    digital_source_types: tuple[str, ...] = ()
    remote_url: str | None = None
    error: str | None = None

    def summary(self) -> str:
        """One line for an analyst: presence, validity, signer, generator, AI declaration."""
        if not self.present:
            return f"C2PA: unreadable ({self.error})" if self.error else "C2PA: no manifest"
        if self.valid is None:
            if self.remote_url:
                return f"C2PA: remote manifest at {self.remote_url} (not fetched, offline)"
            return f"C2PA: manifest present, not validated ({self.error})"
        parts = ["C2PA: " + ("valid" if self.valid else "INVALID")]
        if self.validation_errors:
            parts.append("errors: " + "; ".join(self.validation_errors[:3]))
        if self.signer or self.signer_common_name:
            trust = {True: "trusted", False: "untrusted", None: "trust unknown"}
            who = self.signer or self.signer_common_name
            parts.append(f"signed by {who!r} ({trust[self.signer_trusted]})")
        if self.claim_generator:
            parts.append(f"claim generator {self.claim_generator!r}")
        if self.ai_declared:
            where = " by an ingredient" if self.ai_declared_by_ingredient else ""
            parts.append(f"declares generative AI{where}")
        elif self.digital_source_types:
            parts.append(
                "source type " + ", ".join(iptc.term(t) for t in self.digital_source_types)
            )
        return ", ".join(parts)


def read_credentials(path: Path, mime: str) -> Credentials:
    """Read and validate the C2PA manifest store of `path`, declared as `mime`, offline.

    Never raises for a file's content: an unsupported type or a file without a manifest
    is `present=False` without error, and a malformed manifest is `present=True,
    valid=False` with the SDK's message in `validation_errors`.
    """
    mime = mime.split(";", 1)[0].strip().lower()
    if mime not in c2pa.Reader.get_supported_mime_types():
        return Credentials(present=False)
    context = c2pa.Context.from_dict(dict(OFFLINE_SETTINGS))
    try:
        with path.open("rb") as fh, c2pa.Reader(mime, fh, context=context) as reader:
            store = json.loads(reader.json())
    except OSError as exc:
        return Credentials(present=False, error=f"cannot read {path.name}: {exc}")
    except c2pa.C2paError.ManifestNotFound:
        return Credentials(present=False)
    except c2pa.C2paError as exc:
        return _from_sdk_error(path, mime, exc)
    except ValueError as exc:  # the SDK's JSON did not parse
        return Credentials(present=True, valid=False, validation_errors=(f"manifest JSON: {exc}",))
    finally:
        context.close()
    if not isinstance(store, dict):
        return Credentials(
            present=True, valid=False, validation_errors=("manifest store is not an object",)
        )
    return _from_store(store)


def _from_sdk_error(path: Path, mime: str, exc: c2pa.C2paError) -> Credentials:
    message = str(exc)
    if isinstance(exc, c2pa.C2paError.RemoteManifest) or message.startswith("Remote"):
        url = _URL.search(message)
        if url is None:
            return Credentials(present=True, error=message)
        return Credentials(present=True, remote_url=url.group(0).rstrip('".,)'))
    if isinstance(exc, _MALFORMED):
        return Credentials(present=True, valid=False, validation_errors=(message,))
    if isinstance(exc, c2pa.C2paError.NotSupported):
        return Credentials(present=False, error=f"not a readable {mime}: {message}")
    # Io, Other ("asset could not be parsed") and untyped errors: the container did not
    # parse. If the bytes still hold a C2PA manifest store, the damage is a finding.
    if _has_c2pa_jumbf(path):
        return Credentials(present=True, valid=False, validation_errors=(message,), error=message)
    return Credentials(present=False, error=message)


def _has_c2pa_jumbf(path: Path) -> bool:
    """Whether the first or last `JUMBF_SCAN_BYTES` hold a C2PA manifest store box.

    Manifests sit near the start of JPEG/PNG/BMFF files and at the end of RIFF/WAV ones,
    so both ends are scanned; the middle of a large video is not.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(JUMBF_SCAN_BYTES)
            size = fh.seek(0, 2)
            tail = b""
            if size > len(head):
                # Overlap by the marker's length so a box straddling the boundary is seen.
                fh.seek(max(len(head) - len(_C2PA_JUMBF), size - JUMBF_SCAN_BYTES))
                tail = fh.read(JUMBF_SCAN_BYTES)
    except OSError:
        return False
    return _C2PA_JUMBF in head or _C2PA_JUMBF in tail


def _from_store(store: dict[str, Any]) -> Credentials:
    manifests = store.get("manifests")
    manifests = manifests if isinstance(manifests, dict) else {}
    active = manifests.get(store.get("active_manifest"))
    state = store.get("validation_state")
    state = state if isinstance(state, str) else None
    failures, trust_failures = _failures(store)
    if state in ("Valid", "Trusted"):
        valid = True
    elif state == "Invalid":
        valid = False
    else:  # an SDK without validation_state: judge by the failure codes alone
        valid = not failures
    if not valid and not failures:
        failures = (f"validation_state={state}",)
    signer_trusted: bool | None = None
    if "signingCredential.untrusted" in trust_failures:
        signer_trusted = False
    elif state == "Trusted":
        signer_trusted = True
    if not isinstance(active, dict):
        return Credentials(
            present=True,
            valid=False,
            validation_state=state,
            validation_errors=(*failures, "no active manifest in the store"),
            signer_trusted=signer_trusted,
        )
    own = tuple(_source_types(active))
    inherited = tuple(t for t in _ingredient_source_types(active, manifests) if t not in own)
    ai_own = iptc.declares_generative_ai(own)
    ai_inherited = iptc.declares_generative_ai(inherited)
    signature = active.get("signature_info")
    signature = signature if isinstance(signature, dict) else {}
    return Credentials(
        present=True,
        valid=valid,
        validation_state=state,
        validation_errors=failures,
        signer=_str_or_none(signature.get("issuer")),
        signer_common_name=_str_or_none(signature.get("common_name")),
        signer_trusted=signer_trusted,
        claim_generator=_claim_generator(active),
        ai_declared=ai_own or ai_inherited,
        ai_declared_by_ingredient=ai_inherited and not ai_own,
        digital_source_types=tuple(dict.fromkeys(own + inherited)),
    )


def _failures(store: dict[str, Any]) -> tuple[tuple[str, ...], frozenset[str]]:
    """(failure messages that break integrity, trust-only failure codes).

    The active manifest's failures come from `validation_results` (C2PA 2.x); an SDK that
    only reports the flat `validation_status` list is read from that instead. Failures
    recorded for ingredients are kept, prefixed, because an ingredient whose hash no
    longer matches means the provenance chain was edited.
    """
    results = store.get("validation_results")
    statuses: list[Any]
    if isinstance(results, dict) and isinstance(results.get("activeManifest"), dict):
        statuses = _list(results["activeManifest"].get("failure"))
    else:
        statuses = _list(store.get("validation_status"))
    errors: list[str] = []
    trust: set[str] = set()
    for status in statuses:
        code, text = _status_text(status)
        if code in TRUST_CODES:
            trust.add(code)
        elif code:
            errors.append(text)
    if isinstance(results, dict):
        for delta in _list(results.get("ingredientDeltas")):
            if not isinstance(delta, dict):
                continue
            uri = str(delta.get("ingredientAssertionURI", "?")).rsplit("/", 1)[-1]
            deltas = delta.get("validationDeltas")
            for status in _list(deltas.get("failure") if isinstance(deltas, dict) else None):
                code, text = _status_text(status)
                if code and code not in TRUST_CODES:
                    errors.append(f"ingredient {uri}: {text}")
    return tuple(errors), frozenset(trust)


def _status_text(status: Any) -> tuple[str, str]:
    if not isinstance(status, dict):
        return "", ""
    code = str(status.get("code", ""))
    explanation = str(status.get("explanation") or "")[:_EXPLANATION_CHARS]
    return code, f"{code}: {explanation}" if explanation else code


def _source_types(manifest: dict[str, Any]) -> Iterator[str]:
    """Every digital source type an assertion of `manifest` declares.

    Searched by key anywhere in the assertion data, not only in `c2pa.actions`, because
    the same declaration also appears in IPTC photo-metadata assertions
    (`Iptc4xmpExt:DigitalSourceType`) and in vendor assertions.
    """
    for assertion in _list(manifest.get("assertions")):
        if isinstance(assertion, dict):
            yield from _find_source_types(assertion.get("data"), depth=0)


def _find_source_types(node: Any, depth: int) -> Iterator[str]:
    if depth > 12:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).lower().endswith("digitalsourcetype") and isinstance(value, str):
                yield value
            else:
                yield from _find_source_types(value, depth + 1)
    elif isinstance(node, list):
        for item in node[:1000]:
            yield from _find_source_types(item, depth + 1)


def _ingredient_source_types(active: dict[str, Any], manifests: dict[str, Any]) -> Iterator[str]:
    """Source types declared by the manifests of ingredients whose content is in the asset.

    Followed because an editor that composites an AI-generated layer does not always
    declare `compositeWithTrainedAlgorithmicMedia` itself; the ingredient's own signed
    manifest still says what it was (see INGREDIENT_RELATIONSHIPS for what is skipped).
    """
    seen = {id(active)}
    frontier = [active]
    for _ in range(MAX_INGREDIENT_DEPTH):
        nxt: list[dict[str, Any]] = []
        for manifest in frontier:
            for ingredient in _list(manifest.get("ingredients")):
                if not isinstance(ingredient, dict):
                    continue
                if ingredient.get("relationship", "componentOf") not in INGREDIENT_RELATIONSHIPS:
                    continue
                label = ingredient.get("active_manifest")
                child = manifests.get(label) if isinstance(label, str) else None
                if isinstance(child, dict) and id(child) not in seen:
                    seen.add(id(child))
                    nxt.append(child)
                    yield from _source_types(child)
        if not nxt:
            return
        frontier = nxt


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    if isinstance(manifest.get("claim_generator"), str):
        return str(manifest["claim_generator"])
    names = []
    for info in _list(manifest.get("claim_generator_info")):
        if isinstance(info, dict) and info.get("name"):
            version = info.get("version")
            names.append(f"{info['name']}/{version}" if version else str(info["name"]))
    return " ".join(names) or None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
