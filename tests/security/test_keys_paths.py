"""Hostile names never become a path outside the work directory, nor shape an object key.

Outside input reaches the code as MediaRef fields (id, url path, source), as HTTP headers
(Content-Disposition), as s3:// keys, and, in the decide stage, as fields of records read
back from a topic (verdict.blob, verdict.sha256, alert ids). The rules pinned here:

- object keys are built from hashes and fixed names; `check_key` refuses anything else
  with `InvalidRef`, and every store operation goes through it before any I/O;
- `LocalStore` never touches a file outside its root;
- a record whose `sha256` (or `alert_id`) is not the hex digest it claims to be is
  `SchemaInvalid` at decode, before any stage builds a path from it;
- fetched media is named by its sha256 alone, whatever the URL, the headers or the
  s3:// key said.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from synthwatch.errors import InvalidRef, SchemaInvalid
from synthwatch.operators.alert import alert_id, make_alert
from synthwatch.operators.evidence import EvidenceFrame, write_bundle
from synthwatch.operators.fetch import Fetcher, FetchSettings
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import LocalStore, S3Store, blob_key, check_key
from synthwatch.pipeline.settings import Settings
from synthwatch.pipeline.topology import Pipeline
from synthwatch.schemas import (
    Alert,
    FaceBox,
    FetchedMedia,
    FrameResult,
    MediaRef,
    Verdict,
    decode,
    encode,
)

PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 20
PNG_SHA = hashlib.sha256(PNG).hexdigest()
SHA = "ab" * 32

# Every entry is a name an attacker could put in a ref, a header or a record field.
# None of them is a key we would build, so each must be refused as one.
HOSTILE_NAMES: list[str] = [
    # traversal
    "..",
    ".",
    "../x",
    "../../etc/passwd",
    "a/../../x",
    "blobs/sha256/../../x",
    "evidence/../../../../tmp/pwned",
    "./x",
    "a/./b",
    "a/.",
    "a/..",
    # absolute, UNC, drive letters, empty segments
    "/etc/passwd",
    "/",
    "//server/share/x",
    "a//b",
    "a/",
    "",
    "C:\\Windows\\win.ini",
    "C:/x",
    # backslashes
    "..\\..\\etc\\passwd",
    "a\\b",
    "\\\\server\\share",
    # NUL and other control characters
    "\x00",
    "a\x00b",
    "x.png\x00/../../etc/passwd",
    "abc\n",
    "a\nb",
    "abc\r\n",
    "a\tb",
    "\x1b[31mred",
    # odd Unicode: bidi overrides, zero-width, BOM, NFC/NFD confusables, look-alike dots/slashes
    "x\u202egnp.exe",
    "\u202e../x",
    "a\u200bb",
    "\u200d..",
    "\ufeff../x",
    "caf\u00e9",
    "cafe\u0301",
    "\uff0e\uff0e\uff0fetc\uff0fpasswd",
    "..\uff0fx",
    "\u2024\u2024/x",
    "\u2215etc\u2215passwd",
    "\u0430dmin",
    # percent-encoding, single and double
    "%2e%2e%2fetc%2fpasswd",
    "%2e%2e/x",
    "..%2f..%2fx",
    "%252e%252e%252f",
    "..%c0%afetc",
    # URLs, shell and home-directory tricks, leading dot or dash, spaces
    "file:///etc/passwd",
    "s3://other-bucket/key",
    "http://169.254.169.254/latest/meta-data",
    "~/.ssh/id_rsa",
    "$HOME/x",
    "`id`",
    "a;rm -rf /",
    "-rf",
    ".hidden",
    " leading",
    "trailing ",
    "a b",
    # overlong
    "a" * 513,
    "a" * 4096,
    "a/" * 2048 + "x",
]

# sha256 values a record could claim: each is not 64 lowercase hex characters.
HOSTILE_SHA256: list[str] = [
    "../../etc/passwd",
    "blobs/sha256/../../x",
    "",
    "A" * 64,
    "ab" * 31 + "a",
    "ab" * 32 + "0",
    "ab" * 32 + "\n",
    "../" + "a" * 61,
    "g" * 64,
    "ab" * 31 + "/x",
    "\uff41" * 64,
    "ab" * 31 + "\x00\x00",
]


def _ids(values: list[str]) -> list[str]:
    return [ascii(v)[:40] for v in values]


def _legal(key: str) -> bool:
    try:
        check_key(key)
    except InvalidRef:
        return False
    return True


def _files_under(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")} if directory.exists() else set()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(sandbox, root): a store root inside a sandbox; nothing but root may change."""
    root = tmp_path / "sandbox" / "root"
    root.mkdir(parents=True)
    (tmp_path / "sandbox" / "bystander.txt").write_text("untouched")
    before = _files_under(tmp_path) - _files_under(root)
    yield tmp_path, root
    after = _files_under(tmp_path) - _files_under(root)
    assert after == before, f"written outside the store root: {sorted(after - before)}"
    assert (tmp_path / "sandbox" / "bystander.txt").read_text() == "untouched"


# --- object keys ----------------------------------------------------------------------


def test_corpus_is_large_enough() -> None:
    assert len(set(HOSTILE_NAMES)) == len(HOSTILE_NAMES) >= 40


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_hostile_name_is_refused_as_an_object_key(name: str) -> None:
    with pytest.raises(InvalidRef, match="refused object key"):
        check_key(name)


@pytest.mark.parametrize(
    "name", HOSTILE_NAMES + HOSTILE_SHA256, ids=_ids(HOSTILE_NAMES + HOSTILE_SHA256)
)
def test_blob_keys_are_built_from_a_sha256_only(name: str) -> None:
    with pytest.raises(InvalidRef):
        blob_key("blobs/sha256", name)


def test_blob_key_of_a_digest_is_a_fixed_fan_out() -> None:
    assert blob_key("blobs/sha256", SHA) == f"blobs/sha256/ab/ab/{SHA}"


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_local_store_refuses_hostile_keys_before_touching_the_disk(
    name: str, sandbox: tuple[Path, Path]
) -> None:
    _, root = sandbox
    store = LocalStore(root)
    for key in (name, f"evidence/{name}", f"{name}/manifest.json"):
        if _legal(key):
            continue  # e.g. `evidence/-rf`: a legal key inside the root, nothing to refuse
        with pytest.raises(InvalidRef):
            store.put_if_absent(key, b"pwned", content_type="text/plain")
        with pytest.raises(InvalidRef):
            store.get_bytes(key)
        with pytest.raises(InvalidRef):
            store.exists(key)
        with pytest.raises(InvalidRef):
            store.uri(key)
    assert _files_under(root) == set()


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_local_store_keeps_even_legal_keys_inside_its_root(
    name: str, sandbox: tuple[Path, Path]
) -> None:
    """Prefixing a hostile name may make a legal key; it then lands under the root."""
    _, root = sandbox
    store = LocalStore(root)
    for key in (f"evidence/{name}", f"{name}/manifest.json", f"e/{name}/x"):
        with contextlib.suppress(InvalidRef):
            store.put_if_absent(key, b"data", content_type="text/plain")
    for path in _files_under(root):
        assert path.resolve().is_relative_to(root.resolve())


def test_local_store_does_not_follow_a_symlink_out_of_its_root(
    sandbox: tuple[Path, Path],
) -> None:
    box, root = sandbox
    (root / "evidence").symlink_to(box / "sandbox")
    store = LocalStore(root)
    with pytest.raises(InvalidRef):
        store.put_if_absent("evidence/bystander.txt", b"pwned", content_type="text/plain")
    (root / "evidence").unlink()


class _RecordingS3:
    """A boto3 stand-in that records every call; hostile keys must never reach it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, op: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((op, {"args": args, **kwargs}))
            raise AssertionError(f"S3 {op} reached with {args} {kwargs}")

        return call


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_s3_store_refuses_hostile_keys_before_any_request(name: str, tmp_path: Path) -> None:
    client = _RecordingS3()
    store = S3Store(client, "synthwatch")
    with pytest.raises(InvalidRef):
        store.put_if_absent(name, b"x", content_type="text/plain")
    with pytest.raises(InvalidRef):
        store.put_file_if_absent(name, Path(__file__), content_type="text/plain")
    with pytest.raises(InvalidRef):
        store.get_bytes(name)
    with pytest.raises(InvalidRef):
        store.download(name, tmp_path / "dest")
    with pytest.raises(InvalidRef):
        store.exists(name)
    with pytest.raises(InvalidRef):
        store.uri(name)
    assert client.calls == []
    assert not (tmp_path / "dest").exists()


# --- records read back from a topic ---------------------------------------------------


def _fetched(**fields: Any) -> dict[str, Any]:
    rec = FetchedMedia(
        id="m1",
        url="https://example.org/a.png",
        sha256=SHA,
        size=3,
        mime="image/png",
        media_type="image",
        blob=blob_key("blobs/sha256", SHA),
    )
    return {**json.loads(encode(rec)), **fields}


def _verdict(**fields: Any) -> Verdict:
    box = FaceBox(x0=10, y0=10, x1=60, y1=70, confidence=0.99, score=0.95)
    defaults: dict[str, Any] = {
        "id": "m1",
        "url": "https://example.org/v.mp4",
        "sha256": SHA,
        "media_type": "video",
        "synthetic_score": 0.9,
        "decision": "flag",
        "signals": [],
        "segments": [],
        "frames": [
            FrameResult(index=0, time_s=0.5, score=0.2, region="faces", faces=[box]),
            FrameResult(index=1, time_s=1.5, score=0.95, region="faces", faces=[box]),
        ],
        "duration_s": 2.0,
        "faces_found": 2,
        "has_audio": False,
        "model_set": "ms1",
        "policy_version": "policy.v1",
        "blob": blob_key("blobs/sha256", SHA),
    }
    return Verdict(**{**defaults, **fields})


def _alert_json(**fields: Any) -> bytes:
    alert = make_alert(_verdict(), evidence_uri="s3://b/k", manifest_sha256="cd" * 32)
    return json.dumps({**json.loads(encode(alert)), **fields}).encode()


def test_well_formed_records_still_decode() -> None:
    assert decode(json.dumps(_fetched()).encode(), FetchedMedia).sha256 == SHA
    assert decode(encode(_verdict()), Verdict).sha256 == SHA
    assert decode(_alert_json(), Alert).sha256 == SHA


@pytest.mark.parametrize("sha", HOSTILE_SHA256, ids=_ids(HOSTILE_SHA256))
def test_record_with_a_hostile_sha256_is_schema_invalid_at_decode(sha: str) -> None:
    with pytest.raises(SchemaInvalid, match="sha256"):
        decode(json.dumps(_fetched(sha256=sha)).encode(), FetchedMedia)
    verdict = {**json.loads(encode(_verdict())), "sha256": sha}
    with pytest.raises(SchemaInvalid, match="sha256"):
        decode(json.dumps(verdict).encode(), Verdict)
    with pytest.raises(SchemaInvalid, match="sha256"):
        decode(_alert_json(sha256=sha), Alert)
    with pytest.raises(SchemaInvalid, match="manifest_sha256"):
        decode(_alert_json(manifest_sha256=sha), Alert)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_alert_with_a_hostile_alert_id_is_schema_invalid_at_decode(name: str) -> None:
    with pytest.raises(SchemaInvalid, match="alert_id"):
        decode(_alert_json(alert_id=name), Alert)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_decide_stage_refuses_a_hostile_blob_before_any_io(name: str, tmp_path: Path) -> None:
    """What `Pipeline._decide` and `_detect` do with a record's blob: download it from the
    store into the work directory. A hostile blob stops at the store's key check."""
    verdict = decode(encode(_verdict(blob=name)), Verdict)
    fetched = decode(json.dumps(_fetched(blob=name)).encode(), FetchedMedia)
    work = tmp_path / "work"
    work.mkdir()
    client = _RecordingS3()
    pipeline: Any = SimpleNamespace(
        store=S3Store(client, "synthwatch"), work_dir=work, settings=Settings()
    )
    for blob, sha in ((verdict.blob, verdict.sha256), (fetched.blob, fetched.sha256)):
        # Refused as "not the blob of this hash" (the record) or by the key check (store).
        with (
            pytest.raises((SchemaInvalid, InvalidRef)),
            Pipeline._local_blob(pipeline, blob, sha),
        ):
            raise AssertionError("a hostile blob was downloaded")
    assert client.calls == []
    assert list(tmp_path.rglob("*")) == [work]


def test_local_blob_path_is_inside_the_work_directory_for_a_decoded_record(
    tmp_path: Path,
) -> None:
    verdict = decode(encode(_verdict()), Verdict)
    pipeline: Any = SimpleNamespace(
        store=None, work_dir=tmp_path, settings=Settings(), handoff=None
    )
    blob_file = Pipeline._local_blob(pipeline, verdict.blob, verdict.sha256)
    assert blob_file.path.parent == tmp_path
    assert re.fullmatch(rf"{SHA}-\d+", blob_file.path.name)


# --- evidence bundles -----------------------------------------------------------------


def _frames() -> list[EvidenceFrame]:
    rng = np.random.default_rng(0)
    return [
        EvidenceFrame(time_s=t, image=rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
        for t in (0.5, 1.5)
    ]


_BUNDLE_OBJECT = re.compile(
    r"[0-9a-f]{16}_(report\.json|report\.html|frame_\d{2}_[0-9.\-]+s\.jpg|frame_\d{2}_[0-9.\-]+s_\w+\.png)"
    r"|manifest\.json|manifest\.sig\.json"
)
_BUNDLE_FOLDER = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,47}_)?[0-9a-f]{32}")
"""A bundle folder: an optional readable prefix from the item's name, then the alert id."""


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_evidence_keys_derive_from_hashes_whatever_the_verdict_says(
    name: str, sandbox: tuple[Path, Path]
) -> None:
    _, root = sandbox
    verdict = _verdict(
        id=name,
        url=f"https://example.org/{urllib.parse.quote(name)}",
        source=name,
        blob=name,
        model_set=name,
        policy_version=name,
    )
    aid = alert_id(verdict.sha256, verdict.model_set, verdict.policy_version)
    bundle = write_bundle(
        LocalStore(root),
        prefix="evidence",
        alert_id=aid,
        verdict=verdict,
        frames=_frames,
        signer=Signer.generate(),
    )
    assert bundle.created
    files = [p for p in _files_under(root) if p.is_file()]
    # two frames, the report (JSON and HTML), the manifest, its signature; the public
    # key beside them
    assert len(files) == 7
    folder = bundle.manifest_key.split("/")[1]
    assert folder.endswith(aid) and _BUNDLE_FOLDER.fullmatch(folder), folder
    for path in files:
        rel = path.relative_to(root)
        if rel.parts[:2] == ("evidence", "keys"):
            assert len(rel.parts) == 3 and re.fullmatch(r"[0-9a-f]{16}\.pem", rel.parts[2])
            continue
        assert rel.parts[:2] == ("evidence", folder), rel
        assert len(rel.parts) == 3 and _BUNDLE_OBJECT.fullmatch(rel.parts[2]), rel


@pytest.mark.parametrize(
    ("time_s", "refused"), [(-5.0, False), (123456789.125, False), (1e300, True)]
)
def test_evidence_frame_names_from_hostile_times_stay_in_the_bundle(
    time_s: float, refused: bool, sandbox: tuple[Path, Path]
) -> None:
    """A verdict's frame times name the evidence frames; an absurd one makes a name too
    long for any filesystem, refused as `InvalidRef` (a clear DLQ reason), not `OSError`."""
    _, root = sandbox
    raw = json.loads(encode(_verdict()))
    for fr in raw["frames"]:
        fr["time_s"] = time_s
    verdict = decode(json.dumps(raw).encode(), Verdict)
    image = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(InvalidRef) if refused else contextlib.nullcontext():
        write_bundle(
            LocalStore(root),
            prefix="evidence",
            alert_id="cd" * 16,
            verdict=verdict,
            frames=lambda: [EvidenceFrame(time_s=time_s, image=image)],
            signer=Signer.generate(),
        )
    files = [p for p in _files_under(root) if p.is_file() and p.parent.name != "keys"]
    # two frames, report.json, report.html, the manifest, its signature
    assert len(files) == (0 if refused else 6)
    for path in files:
        rel = path.relative_to(root)
        assert rel.parts[0] == "evidence" and rel.parts[1].endswith("cd" * 16), rel


# --- fetch: names come from the content hash, never from the ref ---------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    disposition = ""
    """The Content-Disposition header every response carries."""


class _AnyPath(BaseHTTPRequestHandler):
    """Serves the PNG at every path, with a hostile Content-Disposition file name."""

    server: _Server

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.send_header("Content-Disposition", self.server.disposition)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(PNG)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test server's access log out of the test output."""


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _AnyPath)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _disposition(name: str) -> str:
    ascii_name = name.encode("ascii", "backslashreplace").decode().replace('"', "")
    ascii_name = re.sub(r"[\x00-\x1f\x7f]", "_", ascii_name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name)}"


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_fetched_media_is_named_by_its_hash_not_by_url_or_headers(
    name: str, server: _Server, sandbox: tuple[Path, Path]
) -> None:
    _, root = sandbox
    server.disposition = _disposition(name)
    port = server.server_address[1]
    quoted = urllib.parse.quote(name, safe="/%")
    url = f"http://127.0.0.1:{port}/media/{quoted}?name={urllib.parse.quote(name)}"
    ref = MediaRef(id=name, url=url, source=name)
    dest = root / "item"
    with Fetcher(FetchSettings(allow_private=True), embedded=False) as fetcher:
        got = fetcher.fetch(decode(encode(ref), MediaRef).url, dest)
    assert got.sha256 == PNG_SHA
    assert got.path == dest / f"{PNG_SHA}.png"
    assert [p.name for p in dest.iterdir()] == [f"{PNG_SHA}.png"]
    assert blob_key("blobs/sha256", got.sha256).endswith(f"/{PNG_SHA}")


class _AnyKeyS3:
    """An s3 client that answers every GetObject with the PNG and records the keys."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str]] = []

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self.keys.append((Bucket, Key))
        return {"Body": _Body(PNG), "ContentLength": len(PNG)}


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def iter_chunks(self, chunk_size: int) -> Iterator[bytes]:
        yield self.data

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=_ids(HOSTILE_NAMES))
def test_s3_ref_key_never_names_the_local_file_or_the_blob(
    name: str, sandbox: tuple[Path, Path]
) -> None:
    _, root = sandbox
    dest = root / "item"
    with Fetcher(FetchSettings(), embedded=False, s3_client=_AnyKeyS3()) as fetcher:
        try:
            got = fetcher.fetch(f"s3://media/{name}", dest)
        except InvalidRef:
            return  # e.g. an empty key: refused outright
    assert got.path == dest / f"{PNG_SHA}.png"
    assert [p.name for p in dest.iterdir()] == [f"{PNG_SHA}.png"]
