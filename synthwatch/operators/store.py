"""Object storage for blobs and evidence: S3 (any S3-compatible store) or a local directory.

Every write is write-once: `put_if_absent` never replaces an existing object, so a
retried or redelivered batch cannot overwrite evidence. On S3 this is a conditional
PUT with `If-None-Match: *`; locally it is a hard link from a temporary file, which
fails atomically when the name exists.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr

from synthwatch.errors import InvalidRef, StorageFailed


class S3Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint_url: str | None = None
    region: str = "us-east-1"
    bucket: str = "synthwatch"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    blob_prefix: str = "blobs/sha256"
    evidence_prefix: str = "evidence"


def s3_client(s3: S3Settings) -> Any:
    """A boto3 S3 client for `s3`, as every stage and the CLI's store commands use it."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=s3.access_key_id.get_secret_value() if s3.access_key_id else None,
        aws_secret_access_key=(
            s3.secret_access_key.get_secret_value() if s3.secret_access_key else None
        ),
        # A short connect timeout: an unreachable store must read as an outage within
        # seconds (the stage pauses, readiness turns false), not after a minute per call.
        # No SHA-256 of each body for the signature: every upload carries a checksum
        # header that is signed and that the store verifies (the sha256 we record, or
        # botocore's CRC32), as botocore itself decides over HTTPS. Over the HTTP of a
        # private store, signing the body costs another pass over every byte: a 90 MB
        # put to SeaweedFS costs 0.35 CPU-s/GB this way, 1.18 signed with botocore's
        # CRC32 (benchmarks/bench_store.py).
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,511}")


def check_key(key: str) -> str:
    """Keys are built by us from hashes and fixed names; refuse anything else outright.

    ASCII letters, digits, `._-/` only, at most 512 characters, no empty, `.` or `..`
    segment, none longer than a file name may be (255): nothing a filesystem, an HTTP
    path normaliser or a proxy could read as another name (percent-escapes, backslashes,
    NUL, newlines, Unicode look-alikes), the same key on S3 and in a local directory.

    Raises:
        InvalidRef: the key is not one we would have built.
    """
    # fullmatch, not `^...$`: `$` also matches before a final newline.
    segments = key.split("/")
    if not _KEY_RE.fullmatch(key) or any(s in ("", ".", "..") or len(s) > 255 for s in segments):
        raise InvalidRef(f"refused object key {key[:80]!r}")
    return key


def blob_key(prefix: str, sha256: str) -> str:
    """`blobs/sha256/ab/cd/<sha256>`: fan-out by the first bytes keeps listings small."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidRef("blob keys are built from a sha256 hex digest")
    return check_key(f"{prefix}/{sha256[:2]}/{sha256[2:4]}/{sha256}")


def _b64_digest(sha256_hex: str) -> str:
    """S3's checksum headers carry the digest base64-encoded, not hex."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


class ObjectStore(ABC):
    @abstractmethod
    def put_if_absent(
        self, key: str, data: bytes, *, content_type: str, sha256: str | None = None
    ) -> bool:
        """Write `data` at `key` unless an object is there; True if this call wrote it.
        With `sha256` (hex), the store refuses to keep bytes whose digest differs
        (StorageFailed): the object is the one a verdict or manifest names by that hash."""

    @abstractmethod
    def put_file_if_absent(
        self, key: str, path: Path, *, content_type: str, sha256: str | None = None
    ) -> bool:
        """As `put_if_absent`, streaming from a file."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def download(self, key: str, dest: Path) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key directly or indirectly under the folder `prefix` (sorted): what
        `verify` compares with a manifest to find objects added to a bundle."""


class S3Store(ObjectStore):
    """One bucket of an S3-compatible store, through a boto3 client the caller owns."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._s3 = client
        self.bucket = bucket

    @property
    def client(self) -> Any:
        """The boto3 client, for the fetcher's s3:// reads through the same credentials."""
        return self._s3

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self._s3.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StorageFailed(f"cannot create bucket {self.bucket}: {code}") from None

    def _put(self, key: str, body: Any, content_type: str, sha256: str | None = None) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        # The store checks the body against a SHA-256 we give it (x-amz-checksum-sha256)
        # and keeps nothing on a mismatch; botocore then computes no checksum of its own.
        checksum = {"ChecksumSHA256": _b64_digest(sha256)} if sha256 else {}
        try:
            self._s3.put_object(
                Bucket=self.bucket,
                Key=check_key(key),
                Body=body,
                ContentType=content_type,
                IfNoneMatch="*",
                **checksum,
            )
        except ClientError as exc:
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # 412: the key exists, which is what write-once wants to hear. (A 409
            # ConditionalRequestConflict is a concurrent writer: transient, retried.)
            if err.get("Code") == "PreconditionFailed" or status == 412:
                return False
            if err.get("Code") in ("BadDigest", "XAmzContentChecksumMismatch"):
                raise StorageFailed(
                    f"S3 put {key} refused: the bytes sent do not match sha256 {sha256}"
                ) from None
            raise StorageFailed(f"S3 put {key} failed: {err.get('Code', status)}") from None
        except BotoCoreError as exc:
            raise StorageFailed(f"S3 put {key} failed: {type(exc).__name__}") from None
        return True

    def put_if_absent(
        self, key: str, data: bytes, *, content_type: str, sha256: str | None = None
    ) -> bool:
        return self._put(key, data, content_type, sha256)

    def put_file_if_absent(
        self, key: str, path: Path, *, content_type: str, sha256: str | None = None
    ) -> bool:
        with path.open("rb") as fh:
            return self._put(key, fh, content_type, sha256)

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=check_key(key))["Body"]
            data: bytes = body.read()
        except (ClientError, BotoCoreError) as exc:
            raise StorageFailed(f"S3 get {key} failed: {type(exc).__name__}") from None
        return data

    def download(self, key: str, dest: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.download_file(self.bucket, check_key(key), str(dest))
        except (ClientError, BotoCoreError) as exc:
            raise StorageFailed(f"S3 download {key} failed: {type(exc).__name__}") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise StorageFailed(f"S3 head {key} failed") from None
        return True

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{check_key(key)}"

    def list_keys(self, prefix: str) -> list[str]:
        folder = check_key(prefix).rstrip("/") + "/"
        keys: list[str] = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder
            )
            for page in pages:
                keys += [obj["Key"] for obj in page.get("Contents", [])]
        except Exception as exc:
            raise StorageFailed(f"list s3://{self.bucket}/{folder}: {exc}") from None
        return sorted(keys)


class LocalStore(ObjectStore):
    """A directory tree; used by embedded mode for evidence."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidRef(f"refused object key {key[:80]!r}")
        return path

    def put_if_absent(
        self, key: str, data: bytes, *, content_type: str, sha256: str | None = None
    ) -> bool:
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
            raise StorageFailed(f"put {key} refused: the data does not match sha256 {sha256}")
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if the name exists: write-once
            except FileExistsError:
                return False
            return True
        finally:
            os.unlink(tmp)

    def put_file_if_absent(
        self, key: str, path: Path, *, content_type: str, sha256: str | None = None
    ) -> bool:
        return self.put_if_absent(key, path.read_bytes(), content_type=content_type, sha256=sha256)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def download(self, key: str, dest: Path) -> None:
        dest.write_bytes(self.get_bytes(key))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def list_keys(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        root = self.root.resolve()
        return sorted(
            p.relative_to(root).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )


class LocalHandoff:
    """Media this process fetched, kept on local disk for its own detect stage.

    A worker running both stages (`--role all`) otherwise reads back from the store
    every file it has just written there: a second transfer of every item, and on a
    cloud store a paid GET. Files are named by the sha256 the fetcher computed while
    downloading, and only those it handed over can be taken, so a record naming some
    other hash falls back to the store. Thread-safe.

    At most `max_bytes` are held. When a new file would not fit, it is the newcomer that
    is left out (its item is read from the store), not the files already held: detect
    takes each partition in the order fetch handed it over, so the oldest files are the
    ones it needs next. (Dropping the oldest instead, under a backlog, dropped every file
    just before detect reached it.) A file nobody took within `max_age_s` (its partition
    moved to another worker in a rebalance, or its record was dead-lettered) makes room.

    `room()` lets the fetch stage wait until detect has taken enough to make room, so
    that a burst is fetched at detect's pace instead of far ahead of it (beyond the
    allowance every file went to the store and was read back from there).

    The same media handed over again (a viral file submitted many times) is held once
    and counted: each record's detect takes a hard link to the one copy, the last one
    the file itself, so no repeat is read back from the store.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        self._max = max_bytes
        self._max_age = max_age_s
        self._clock = clock
        self._lock = threading.Condition()
        # sha256 -> (bytes, when handed over, records still to take it), oldest first
        self._held: OrderedDict[str, tuple[int, float, int]] = OrderedDict()
        self._bytes = 0
        self._reserved = 0  # bytes promised to fetches in progress (`room`)
        self._taken = 0  # files taken so far: detect's progress
        self._closed = False

    @contextmanager
    def room(self, wait_s: float) -> Iterator[None]:
        """Wait, at most `wait_s`, until a file of the size held files have on average
        fits beside those held and those other fetches in progress were promised; the
        promise lasts until the block ends (`put` inside it). A wait that runs out with
        no file taken meanwhile means nobody may take the held ones soon (their
        partitions moved in a rebalance, or detect is stuck on a long item): they are
        dropped, and their items are read from the store. Either way the block then runs,
        so a fetch is delayed by at most `wait_s`, never refused."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            need = self._bytes // len(self._held) if self._held else 0
            taken = self._taken
            while (
                not self._closed and self._held and self._bytes + self._reserved + need > self._max
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    if self._taken == taken:
                        self._drop_all()
                    break
                self._lock.wait(left)
            self._reserved += need
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= need
                self._lock.notify_all()

    def close(self) -> None:
        """Stop making fetches wait (shutdown)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _drop_all(self) -> None:
        for sha256 in self._held:
            (self._dir / sha256).unlink(missing_ok=True)
        self._held.clear()
        self._bytes = 0
        self._lock.notify_all()

    def put(self, sha256: str, path: Path) -> bool:
        """Move `path` in under `sha256` (same file system); False when it does not fit
        (the caller keeps it). The same media again is counted, not stored twice: True,
        and `path` is left to the caller to delete."""
        size = path.stat().st_size
        with self._lock:
            now = self._clock()
            if sha256 in self._held:  # one copy is enough; one more record will take it
                held_size, since, takers = self._held[sha256]
                self._held[sha256] = (held_size, since, takers + 1)
                return True
            while self._held and self._bytes + size > self._max:
                old, (old_size, since, _) = next(iter(self._held.items()))
                if now - since < self._max_age:
                    break
                del self._held[old]
                (self._dir / old).unlink(missing_ok=True)
                self._bytes -= old_size
            if self._bytes + size > self._max:
                return False
            os.replace(path, self._dir / sha256)
            self._held[sha256] = (size, now, 1)
            self._bytes += size
        return True

    def take(self, sha256: str, dest: Path) -> bool:
        """Move the file handed over under `sha256` to `dest` (a hard link while more
        records of the same media are still to take it); False when there is none."""
        with self._lock:
            held = self._held.get(sha256)
            if held is None:
                return False
            size, since, takers = held
            src = self._dir / sha256
            self._taken += 1
            try:
                if takers > 1:
                    _link_or_copy(src, dest)
                    self._held[sha256] = (size, since, takers - 1)
                    return True
                del self._held[sha256]
                self._bytes -= size
                self._lock.notify_all()
                os.replace(src, dest)
            except FileNotFoundError:
                return False
        return True

    @property
    def held_bytes(self) -> int:
        return self._bytes


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system has them (free), else a copy."""
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise
    except OSError:  # no hard links here (some overlay and network file systems)
        shutil.copyfile(src, dest)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
