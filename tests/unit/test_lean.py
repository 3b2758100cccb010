"""The scan path is lean: it runs without torch, and a scan of nothing usable loads
nothing heavy (issue 18). Each check runs `synthwatch scan` in a fresh interpreter, as
a user would, so what this test process imported cannot hide an import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthwatch.models.registry import BUNDLED_DIR, LBP_CASCADE, MOBILENET_V2

_RUN = textwrap.dedent(
    """
    import json, sys
    {block}
    from synthwatch.pipeline import cli
    sys.argv = ["synthwatch", *sys.argv[1:]]
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    heavy = sorted(m for m in ("torch", "onnxruntime", "av", "scipy", "sklearn")
                   if sys.modules.get(m) is not None)
    print("LEAN " + json.dumps({{"code": code, "heavy": heavy}}))
    """
)


def _scan(args: list[str], tmp_path: Path, *, block_torch: bool) -> dict[str, object]:
    return _run(["scan", *args], tmp_path, block_torch=block_torch)


def _run(
    args: list[str], tmp_path: Path, *, block_torch: bool, env_extra: dict[str, str] | None = None
) -> dict[str, object]:
    # `sys.modules["torch"] = None` makes every `import torch` raise ImportError, so a
    # scan that needs torch anywhere fails here rather than passing on a dev machine.
    block = 'sys.modules["torch"] = None' if block_torch else ""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SYNTHWATCH_MODEL_DIR": str(tmp_path / "no-third-party-weights"),
        "SYNTHWATCH_MODELS__AUDIO_MODELS": "[]",
        **(env_extra or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _RUN.format(block=block), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LEAN ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    out: dict[str, object] = json.loads(lines[-1][5:])
    out["stderr"] = proc.stderr
    return out


def test_scan_of_a_missing_file_answers_without_loading_models(tmp_path: Path) -> None:
    out = _scan([str(tmp_path / "nope.jpg")], tmp_path, block_torch=True)
    assert out["code"] == 1
    assert out["heavy"] == []


@pytest.mark.skipif(
    not (BUNDLED_DIR / MOBILENET_V2.path).is_file()
    or not (BUNDLED_DIR / LBP_CASCADE.path).is_file(),
    reason="bundled third-party files not fetched (python -m synthwatch.models.fetch)",
)
def test_a_scan_with_the_bundled_models_runs_without_torch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)).save(image)
    verdicts = tmp_path / "v.jsonl"
    out = _scan([str(image), "--json", str(verdicts)], tmp_path, block_torch=True)
    assert out["code"] == 0, out["stderr"]
    assert "torch" not in out["heavy"] and "onnxruntime" in out["heavy"]
    (record,) = [json.loads(line) for line in verdicts.read_text().splitlines()]
    scored = {s["name"] for s in record["signals"] if s.get("score") is not None}
    assert {"fingerprint", "scene_probe"} <= scored


def test_eval_reads_labels_and_train_says_what_to_install_without_torch(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{tmp_path / 'missing.jpg'},real\n")
    # eval reaches the labels (synthwatch.train.labels) and reports the missing file,
    # rather than dying on an import of the training code.
    out = _run(["eval", "--labels", str(labels)], tmp_path, block_torch=True)
    assert "No module named" not in str(out["stderr"]), out["stderr"]
    assert "missing.jpg" in str(out["stderr"])
    out = _run(
        ["train", "sbi", "--real", str(tmp_path), "--out", str(tmp_path / "o")],
        tmp_path,
        block_torch=True,
    )
    assert out["code"] == 2
    assert "pip install 'synthwatch[train]'" in str(out["stderr"])


def test_the_torch_backend_without_torch_is_refused_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    out = _run(
        ["scan", str(image)],
        tmp_path,
        block_torch=True,
        env_extra={"SYNTHWATCH_MODELS__BACKEND": "torch"},
    )
    assert out["code"] == 2
    assert "needs torch" in str(out["stderr"]) and "Traceback" not in str(out["stderr"])
