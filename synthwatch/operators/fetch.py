"""The fetch operator: turn a media reference into a local file named by its sha256.

http(s) goes through the SSRF-guarded client from `netguard` and follows redirects by
hand so every hop is re-checked; s3:// goes through the boto3 client the caller owns;
local paths and file:// are read only in embedded mode (`synthwatch scan`), where the
user already has the files. Every path hashes while streaming, caps decoded bytes and
wall time, and sniffs the type from the bytes themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import httpcore
import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from synthwatch.errors import (
    FetchFailed,
    FetchTimeout,
    InvalidRef,
    RefusedAddress,
    SynthwatchError,
    TooLarge,
    UnsupportedMedia,
)
from synthwatch.operators import netguard
from synthwatch.operators.redact import redact_url
from synthwatch.operators.sniff import EXTENSIONS, HEAD_BYTES, sniff
from synthwatch.schemas import MediaType


class FetchSettings(BaseModel):
    """`SYNTHWATCH_FETCH__*`: where and how much `Fetcher` may fetch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_private: bool = False
    """Allow loopback/private/link-local destinations. Only for trusted deployments and tests."""
    allow_networks: tuple[str, ...] = ()
    """CIDRs allowed although not public (e.g. an internal media server, `10.20.0.0/16`):
    narrower than `allow_private`, which opens every non-public range at once."""
    max_bytes: int = 512 * 1024 * 1024
    """Cap on decoded (not wire) body bytes."""
    timeout_s: float = 120.0
    """Cap on the whole transfer, redirects included."""
    connect_timeout_s: float = 10.0
    max_redirects: int = 5
    user_agent: str = "synthwatch/0.1 (+https://github.com/synthwatch/synthwatch)"


CHUNK_BYTES = 64 * 1024

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Media is already compressed, so we ask for identity; a server that compresses anyway is
# decoded by `_inflate`, one layer of gzip or deflate. Anything else is refused before the
# body is read: br and zstd need libraries we do not install, and stacked encodings
# ("gzip, gzip") carry no media a single layer could not.
_ACCEPTED_ENCODINGS = frozenset({"", "identity", "gzip", "x-gzip", "deflate"})
# S3 error codes that a retry cannot fix.
_S3_PERMANENT_CODES = frozenset(
    {"NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidObjectState", "InvalidBucketName"}
)


@dataclass(frozen=True)
class Fetched:
    """A fetched item: where its bytes are and what they are."""

    path: Path
    sha256: str
    size: int
    mime: str
    media_type: MediaType
    url: str
    """Final URL after redirects (for local files, the file:// URI of the resolved path)."""


@dataclass(frozen=True)
class _Digest:
    sha256: str
    size: int
    mime: str
    media_type: MediaType


class Fetcher:
    """Owns the guarded HTTP client (and borrows an S3 client) for fetching references.

    Not thread-safe: give each worker thread its own Fetcher. Every failure is one of the
    `synthwatch.errors` types, with a one-line message that never contains URL credentials
    or signature query values.
    """

    def __init__(
        self, settings: FetchSettings, *, embedded: bool, s3_client: Any | None = None
    ) -> None:
        self._settings = settings
        self._embedded = embedded
        self._s3 = s3_client
        self._networks = netguard.parse_networks(settings.allow_networks)
        self._client = netguard.guarded_client(
            allow_private=settings.allow_private,
            allow_networks=settings.allow_networks,
            user_agent=settings.user_agent,
            timeout_s=settings.timeout_s,
            connect_timeout_s=settings.connect_timeout_s,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str, dest_dir: Path) -> Fetched:
        """Fetch `url` into `dest_dir` as `<sha256><ext>` (local files stay where they are).

        Raises:
            InvalidRef: unusable reference (scheme, credentials, local path outside embedded mode).
            RefusedAddress: the destination, or a redirect's, is not an allowed address.
            FetchFailed: HTTP/S3 error or broken transfer; `permanent` says if a retry may help.
            FetchTimeout: the whole transfer exceeded `timeout_s`.
            TooLarge: more than `max_bytes` decoded bytes.
            UnsupportedMedia: the bytes are not a format we decode.
        """
        shown = redact_url(url)
        try:
            scheme = urllib.parse.urlsplit(url).scheme.lower()
        except ValueError:
            raise InvalidRef(f"refused {shown}: malformed URL") from None
        if scheme in ("http", "https"):
            return self._fetch_http(url, dest_dir)
        if scheme == "s3":
            return self._fetch_s3(url, dest_dir)
        if scheme in ("", "file"):
            return self._fetch_local(url, is_uri=scheme == "file")
        raise InvalidRef(
            f"refused {shown}: scheme {scheme!r} is not fetched; use http://, https:// or s3://"
        )

    def precheck(self, url: str) -> None:
        """Refuse a reference `fetch` would refuse, without transferring anything: a
        malformed URL or scheme, a local file that is missing or unreadable, a host that
        is or resolves only to a refused address. Cheap enough to run on every input
        before loading models, so a typo is reported in a moment. A name that does not
        resolve is left to `fetch`, which says so with the transfer's other errors.

        Raises InvalidRef and RefusedAddress as `fetch` does.
        """
        shown = redact_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            raise InvalidRef(f"refused {shown}: malformed URL") from None
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            target = netguard.check_url(
                url,
                allow_private=self._settings.allow_private,
                allow_networks=self._networks,
            )
            guard = netguard.GuardedBackend(
                allow_private=self._settings.allow_private, allow_networks=self._networks
            )
            try:
                guard.vet(target.host, target.port or (443 if scheme == "https" else 80))
            except RefusedAddress as exc:
                raise RefusedAddress(f"refused {shown}: {exc}") from None
            except httpcore.ConnectError:
                return
        elif scheme == "s3":
            if not parts.netloc or not parts.path.strip("/"):
                raise InvalidRef(f"refused {shown}: expected s3://bucket/key")
        elif scheme in ("", "file"):
            self._local_path(url, is_uri=scheme == "file", shown=shown)
        else:
            raise InvalidRef(
                f"refused {shown}: scheme {scheme!r} is not fetched; use http://, https:// or s3://"
            )

    # --- http(s) ---------------------------------------------------------------------

    def _fetch_http(self, url: str, dest_dir: Path) -> Fetched:
        s = self._settings
        deadline = time.monotonic() + s.timeout_s
        current = url
        previous: str | None = None
        with netguard.transfer_deadline(deadline):
            for _hop in range(s.max_redirects + 1):
                try:
                    target = netguard.check_url(
                        current, allow_private=s.allow_private, allow_networks=self._networks
                    )
                    shown = redact_url(current)
                    with self._open(target, shown, deadline) as response:
                        if response.status_code in _REDIRECT_STATUSES:
                            previous, current = current, self._redirect_target(response, shown)
                            continue
                        self._check_status(response, shown)
                        return self._receive(response, str(response.url), dest_dir, deadline)
                except (InvalidRef, RefusedAddress) as exc:
                    if previous is None:
                        raise
                    # The user only sees the URL they submitted; name the hop that led here.
                    where = redact_url(previous)
                    raise type(exc)(f"{exc} (redirected from {where})") from None
        raise FetchFailed(
            f"fetch of {redact_url(url)} failed: more than {s.max_redirects} redirects "
            "(SYNTHWATCH_FETCH__MAX_REDIRECTS)",
            permanent=True,
        )

    @contextlib.contextmanager
    def _open(self, target: httpx.URL, shown: str, deadline: float) -> Iterator[httpx.Response]:
        left = max(deadline - time.monotonic(), 0.001)
        timeout = httpx.Timeout(left, connect=min(self._settings.connect_timeout_s, left))
        request = self._client.build_request(
            "GET", target, headers={"Accept-Encoding": "identity"}, timeout=timeout
        )
        try:
            response = self._client.send(request, stream=True)
        except RefusedAddress as exc:
            # Raised by the guarded backend, which knows the host but not the URL.
            raise RefusedAddress(f"refused {shown}: {exc}") from None
        except httpx.RemoteProtocolError as exc:
            if str(exc).startswith("Invalid URL in location header"):
                # httpx builds the next request of a redirect even when not following it,
                # and its message quotes the unparseable part, which may be a password
                # ("Invalid port: 'hunter'"); a malformed Location is the server's doing.
                raise InvalidRef(f"refused {shown}: it redirects to a malformed URL") from None
            raise self._http_error(exc, shown, deadline) from None
        except httpx.HTTPError as exc:
            raise self._http_error(exc, shown, deadline) from None
        try:
            yield response
        except httpx.HTTPError as exc:
            raise self._http_error(exc, shown, deadline) from None
        finally:
            response.close()

    def _http_error(self, exc: httpx.HTTPError, shown: str, deadline: float) -> SynthwatchError:
        if isinstance(exc, httpx.ConnectTimeout) and time.monotonic() < deadline:
            return FetchFailed(
                f"fetch of {shown} failed: no connection within "
                f"{self._settings.connect_timeout_s:g} s",
                permanent=False,
            )
        if isinstance(exc, httpx.TimeoutException):
            return FetchTimeout(
                f"fetch of {shown} exceeded its {self._settings.timeout_s:g} s budget "
                "(SYNTHWATCH_FETCH__TIMEOUT_S)"
            )
        if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
            return InvalidRef(f"refused {shown}: malformed URL")
        # The exception text comes from the socket layer and names no URL.
        return FetchFailed(f"fetch of {shown} failed: {type(exc).__name__}: {exc}", permanent=False)

    @staticmethod
    def _redirect_target(response: httpx.Response, shown: str) -> str:
        location = response.headers.get("Location")
        if not location:
            raise FetchFailed(
                f"fetch of {shown} failed: HTTP {response.status_code} without a Location",
                permanent=True,
            )
        try:
            return str(response.url.join(location))
        except httpx.InvalidURL:
            raise InvalidRef(f"refused {shown}: it redirects to a malformed URL") from None

    @staticmethod
    def _check_status(response: httpx.Response, shown: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in (408, 429)
        raise FetchFailed(
            f"fetch of {shown} failed: HTTP {status} {response.reason_phrase}".rstrip(),
            permanent=not retryable,
        )

    def _receive(
        self, response: httpx.Response, final_url: str, dest_dir: Path, deadline: float
    ) -> Fetched:
        shown = redact_url(final_url)
        # Several Content-Encoding lines arrive joined with ", ", as stacked encodings.
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _ACCEPTED_ENCODINGS:
            raise FetchFailed(
                f"fetch of {shown} failed: unsupported Content-Encoding {encoding!r} "
                "(synthwatch asks for identity and decodes only gzip or deflate)",
                permanent=True,
            )
        if encoding in ("", "identity"):
            # Content-Length counts wire bytes, so it only proves "too large" when nothing
            # is decoded; it is never trusted to prove "small enough".
            self._check_declared_size(response.headers.get("Content-Length"), shown)
        # Raw bytes, decoded here: httpx inflates each 64 KiB network read in one call,
        # which for a deflate bomb is ~64 MiB in memory before any cap can look at it.
        chunks = _inflate(response.iter_raw(), encoding, shown)
        return self._store(chunks, dest_dir, shown, final_url, deadline)

    # --- s3:// -------------------------------------------------------------------------

    def _fetch_s3(self, url: str, dest_dir: Path) -> Fetched:
        shown = redact_url(url)
        if self._s3 is None:
            raise InvalidRef(
                f"refused {shown}: s3:// references need object-store credentials; "
                "this fetcher was built without an S3 client (configure SYNTHWATCH_S3__*)"
            )
        # s3:// URIs are not percent-encoded (aws cli semantics): the key is taken verbatim.
        bucket, _, key = url[len("s3://") :].partition("/")
        if not bucket or not key:
            raise InvalidRef(f"refused {shown}: expected s3://bucket/key")
        deadline = time.monotonic() + self._settings.timeout_s
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise self._s3_error(exc, shown) from None
        except BotoCoreError as exc:
            raise FetchFailed(f"fetch of {shown} failed: {exc}", permanent=False) from None
        body = obj["Body"]
        try:
            self._check_declared_size(obj.get("ContentLength"), shown)
            return self._store(body.iter_chunks(CHUNK_BYTES), dest_dir, shown, url, deadline)
        except ClientError as exc:
            raise self._s3_error(exc, shown) from None
        except BotoCoreError as exc:
            raise FetchFailed(f"fetch of {shown} failed: {exc}", permanent=False) from None
        finally:
            body.close()

    @staticmethod
    def _s3_error(exc: Any, shown: str) -> FetchFailed:
        response = getattr(exc, "response", {}) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        permanent = code in _S3_PERMANENT_CODES or (
            400 <= status < 500 and status not in (408, 429)
        )
        what = code or f"HTTP {status}"
        return FetchFailed(f"fetch of {shown} failed: S3 {what}", permanent=permanent)

    # --- local files (embedded mode) ---------------------------------------------------

    def _fetch_local(self, ref: str, *, is_uri: bool) -> Fetched:
        shown = redact_url(ref) if is_uri else ref
        resolved = self._local_path(ref, is_uri=is_uri, shown=shown)
        # O_NONBLOCK so that a FIFO swapped in after resolve() cannot block the open;
        # fstat on the open descriptor is the check that counts.
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidRef(f"cannot read {shown}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRef(f"cannot read {shown}: not a regular file")
            self._check_declared_size(st.st_size, shown)
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            digest = self._digest(_read_chunks(f), None, shown, None)
        return Fetched(
            path=resolved,
            sha256=digest.sha256,
            size=digest.size,
            mime=digest.mime,
            media_type=digest.media_type,
            url=resolved.as_uri(),
        )

    def _local_path(self, ref: str, *, is_uri: bool, shown: str) -> Path:
        """The file a local reference names, resolved; InvalidRef when it is not one we
        may read (outside embedded mode, missing, not a regular file, unreadable)."""
        if not self._embedded:
            raise InvalidRef(
                f"refused {shown}: local files are read only by `synthwatch scan` "
                "(embedded mode); workers fetch http(s):// and s3:// references"
            )
        if is_uri:
            parts = urllib.parse.urlsplit(ref)
            if parts.netloc not in ("", "localhost"):
                raise InvalidRef(f"refused {shown}: file:// URLs must name a local file")
            path = Path(urllib.request.url2pathname(parts.path))
        else:
            path = Path(ref).expanduser()
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise InvalidRef(f"cannot read {shown}: no such file") from None
        if not resolved.is_file():
            raise InvalidRef(f"cannot read {shown}: not a regular file")
        if not os.access(resolved, os.R_OK):
            raise InvalidRef(f"cannot read {shown}: permission denied")
        return resolved

    # --- shared ------------------------------------------------------------------------

    def _check_declared_size(self, declared: object, shown: str) -> None:
        try:
            size = int(str(declared)) if declared is not None else None
        except ValueError:
            size = None
        if size is not None and size > self._settings.max_bytes:
            raise TooLarge(self._too_large(shown, f"it declares {size} bytes"))

    def _too_large(self, shown: str, detail: str) -> str:
        return (
            f"refused {shown}: {detail}, over the cap of {self._settings.max_bytes} bytes "
            "(SYNTHWATCH_FETCH__MAX_BYTES)"
        )

    def _store(
        self,
        chunks: Iterable[bytes],
        dest_dir: Path,
        shown: str,
        url: str,
        deadline: float,
    ) -> Fetched:
        """Stream `chunks` into `dest_dir/<sha256><ext>` atomically; no partial file survives."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".fetch-", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self._digest(chunks, out, shown, deadline)
            final = dest_dir / f"{digest.sha256}{EXTENSIONS.get(digest.mime, '')}"
            # Same name means same bytes, so replacing an earlier copy is harmless.
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return Fetched(
            path=final,
            sha256=digest.sha256,
            size=digest.size,
            mime=digest.mime,
            media_type=digest.media_type,
            url=url,
        )

    def _digest(
        self,
        chunks: Iterable[bytes],
        out: BinaryIO | None,
        shown: str,
        deadline: float | None,
    ) -> _Digest:
        """Hash, count and sniff `chunks`, copying them to `out`, under the cap and deadline."""
        cap = self._settings.max_bytes
        hasher = hashlib.sha256()
        size = 0
        head = b""
        kind: tuple[str, MediaType] | None = None
        for chunk in chunks:
            # The socket layer also clamps each read to the deadline; this check catches a
            # stream that keeps producing data without ever blocking long enough to time out.
            if deadline is not None and time.monotonic() > deadline:
                raise FetchTimeout(
                    f"fetch of {shown} exceeded its {self._settings.timeout_s:g} s budget "
                    "(SYNTHWATCH_FETCH__TIMEOUT_S)"
                )
            size += len(chunk)
            if size > cap:
                raise TooLarge(self._too_large(shown, "the body is larger"))
            if kind is None:
                head += chunk[: HEAD_BYTES - len(head)]
                if len(head) >= HEAD_BYTES:
                    # Decide as soon as the head is in, so junk costs 4 KiB, not max_bytes.
                    kind = self._sniff(head, shown)
            hasher.update(chunk)
            if out is not None:
                out.write(chunk)
        if kind is None:
            kind = self._sniff(head, shown)
        return _Digest(hasher.hexdigest(), size, kind[0], kind[1])

    @staticmethod
    def _sniff(head: bytes, shown: str) -> tuple[str, MediaType]:
        kind = sniff(head)
        if kind is None:
            detail = (
                "it is empty"
                if not head
                else "its bytes are not an image, video or audio format we decode"
            )
            raise UnsupportedMedia(f"refused {shown}: {detail}")
        return kind


def _inflate(raw: Iterable[bytes], encoding: str, shown: str) -> Iterator[bytes]:
    """The decoded body: `raw` through one gzip or deflate layer, in pieces of at most
    CHUNK_BYTES, so a caller that counts the pieces holds O(CHUNK_BYTES) whatever the ratio.

    Raises:
        FetchFailed: the bytes are not valid for `encoding`, stop before the end of the
            compressed stream, or go on after it.
    """
    if encoding in ("", "identity"):
        yield from raw
        return
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding != "deflate" else None
    head = b""
    received = False
    for data in raw:
        received = True
        if inflater is None:
            # RFC 9110 deflate is zlib-wrapped, but servers also send raw deflate; the
            # two-byte zlib header tells them apart.
            head += data
            if len(head) < 2:
                continue
            inflater = zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(head) else -zlib.MAX_WBITS)
            data, head = head, b""
        yield from _inflate_piece(inflater, data, shown)
    if not received:
        return  # an empty body; the sniffer reports it as such
    if inflater is None or not inflater.eof:
        # zlib verifies the gzip CRC and length only at the end of the stream; a body
        # cut before it would otherwise be stored as if it were whole.
        raise FetchFailed(
            f"fetch of {shown} failed: the {encoding} body ends before its end-of-stream marker",
            permanent=False,
        )


def _inflate_piece(inflater: zlib._Decompress, data: bytes, shown: str) -> Iterator[bytes]:
    while True:
        if inflater.eof:
            if data or inflater.unused_data:
                raise FetchFailed(
                    f"fetch of {shown} failed: bytes follow the end of the compressed body",
                    permanent=True,
                )
            return
        try:
            out = inflater.decompress(data, CHUNK_BYTES)
        except zlib.error:
            raise FetchFailed(
                f"fetch of {shown} failed: the body does not decode as its Content-Encoding",
                permanent=True,
            ) from None
        if out:
            yield out
        data = inflater.unconsumed_tail
        # A full piece may leave output inside zlib even when all input was consumed.
        if not data and len(out) < CHUNK_BYTES and not inflater.eof:
            return


def _zlib_header(head: bytes) -> bool:
    """Whether `head` starts with an RFC 1950 header: method 8 and a check multiple of 31."""
    return head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0


def _read_chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_BYTES):
        yield chunk
