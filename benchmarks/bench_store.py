"""Uploading fetched media to the store: client CPU per GB, ours against the old way.

Usage: `python -m benchmarks.bench_store [--quick] [--repeats N]`.

Ours is what the fetch stage does: `S3Store.put_file_if_absent` with the sha256 the
fetcher computed, through the pipeline's own client (`store.s3_client`), which sends
that digest as a signed checksum header and does not sign the body. The baseline is
the client before that change: the body signed with a SHA-256 of its own (botocore
always does so over plain HTTP unless told otherwise) and botocore's CRC32 checksum.
Both put the largest clip of bench_e2e's mixed set to a private SeaweedFS on
127.0.0.1, interleaved, `--repeats` times each; medians of the client's CPU time (all
threads). A put with a wrong digest is tried as well, and must be refused.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
import uuid
from typing import Any

from benchmarks import bench_e2e
from benchmarks._common import Report, Target
from tests.private_services import private_services


def _clients(env: dict[str, str]) -> tuple[Any, Any, str]:
    """(ours, the old client, bucket) for the private store's client settings."""
    import boto3
    from botocore.config import Config
    from pydantic import SecretStr

    from synthwatch.operators.store import S3Settings, s3_client

    s3 = S3Settings(
        endpoint_url=env["SYNTHWATCH_S3__ENDPOINT_URL"],
        bucket=env["SYNTHWATCH_S3__BUCKET"],
        access_key_id=SecretStr(env["SYNTHWATCH_S3__ACCESS_KEY_ID"]),
        secret_access_key=SecretStr(env["SYNTHWATCH_S3__SECRET_ACCESS_KEY"]),
    )
    old = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        aws_access_key_id=env["SYNTHWATCH_S3__ACCESS_KEY_ID"],
        aws_secret_access_key=env["SYNTHWATCH_S3__SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    return s3_client(s3), old, s3.bucket


def main(argv: list[str] | None = None) -> int:
    from synthwatch.errors import StorageFailed
    from synthwatch.operators.store import S3Store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 5")
    ap.add_argument("--repeats", type=int, default=0, help="puts per configuration")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)

    path = max(bench_e2e.media_set(quick=True), key=lambda p: p.stat().st_size)
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cpu: dict[str, list[float]] = {"ours": [], "old": []}
    with private_services() as svc:
        ours_client, old_client, bucket = _clients(svc.client_env)
        ours, old = S3Store(ours_client, bucket), S3Store(old_client, bucket)
        ours.ensure_bucket()

        def put(which: str) -> None:
            key = f"bench/{uuid.uuid4().hex}"
            t0 = time.process_time()
            if which == "ours":
                ours.put_file_if_absent(key, path, content_type="video/mp4", sha256=digest)
            else:
                old.put_file_if_absent(key, path, content_type="video/mp4")
            cpu[which].append(time.process_time() - t0)

        put("ours")  # warm: connection pools, credential and endpoint resolution
        put("old")
        cpu = {"ours": [], "old": []}
        for i in range(args.repeats):
            for which in ("ours", "old") if i % 2 == 0 else ("old", "ours"):
                put(which)
        try:
            other = hashlib.sha256(b"other media").hexdigest()
            ours.put_file_if_absent("bench/wrong", path, content_type="video/mp4", sha256=other)
            refused = False
        except StorageFailed:
            refused = True

    gb = size / 1e9
    per_gb = {k: statistics.median(v) / gb for k, v in cpu.items()}
    report = Report(
        name="bench_store",
        title=f"S3 upload of a {size / 1e6:.0f} MB clip, client CPU (medians of {args.repeats})",
        columns=["configuration", "CPU-s/GB", "vs old"],
        rows=[
            {
                "configuration": "ours: sha256 checksum header, body not signed",
                "CPU-s/GB": per_gb["ours"],
                "vs old": per_gb["ours"] / per_gb["old"],
            },
            {
                "configuration": "old: body signed (SHA-256), botocore CRC32",
                "CPU-s/GB": per_gb["old"],
                "vs old": 1.0,
            },
        ],
        targets=[Target("a body that does not match its sha256 is refused", float(refused), 1.0)],
        notes=[
            f"store: private SeaweedFS on 127.0.0.1 over HTTP; file {path.name}",
            "client CPU only (time.process_time of this process, all threads)",
        ],
        params={"repeats": args.repeats, "bytes": size},
    )
    report.save()
    return 0 if refused else 1


if __name__ == "__main__":
    raise SystemExit(main())
