"""Shortcut controls for scene_probe on ml72 (docs/EVALUATION.md, "ml72").

    .venv/bin/python scripts/ml72_controls.py ../shared/media/ml72

Every AI image in ml72 is a 559x559 JPEG at quality about 75 and every camera photo is
larger (../shared/DATA.md). The probe sees every image as a 224 px centre square, but a
photo shrinks 3-18x on the way and an AI image 2.5x, so its JPEG blocks partly survive.
Each control retrains the probe with `synthwatch train scene`'s cross-validation on a
copy of ml72 in which the real photos are first given the AI images' form, and prints
the cross-validated AUC:

- original: ml72 as it is;
- reals at 559 px: every real photo resized to 559x559 (Lanczos), saved losslessly;
- reals as AI files: every real photo resized to 559x559 and saved as JPEG quality 75.

A detector that separated the classes by size would collapse in the second; one that
reads compression at the analysis scale loses in the third.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageOps

from synthwatch.models.registry import MOBILENET_V2, ModelStore
from synthwatch.train.scene import train_scene

AI_SIDE = 559


def variant(src: Path, dest: Path, form: str) -> Path:
    """A copy of the labelled set at `src` with its reals in `form` (png | jpeg75)."""
    rows = list(csv.DictReader((src / "labels.csv").open()))
    out = ["path,label,group"]
    for row in rows:
        rel = row["path"]
        group = rel.rsplit("_", 1)[0]
        if row["label"] == "fake":
            out.append(f"{(src / rel).resolve()},fake,{group}")
            continue
        with Image.open(src / rel) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        side = min(rgb.size)
        left, top = (rgb.size[0] - side) // 2, (rgb.size[1] - side) // 2
        square = rgb.crop((left, top, left + side, top + side))
        small = square.resize((AI_SIDE, AI_SIDE), Image.Resampling.LANCZOS)
        name = dest / (Path(rel).stem + (".png" if form == "png" else ".jpg"))
        if form == "png":
            small.save(name, format="PNG")
        else:
            small.save(name, format="JPEG", quality=75)
        out.append(f"{name},real,{group}")
    labels = dest / "labels.csv"
    labels.write_text("\n".join(out) + "\n")
    return labels


def main(ml72: Path) -> None:
    backbone = ModelStore(Path("/nonexistent")).file_path(MOBILENET_V2)
    print("| ml72 variant | cross-validated AUC | FPR at 0.5 | recall at 0.5 |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="synthwatch-ml72-") as tmp:
        root = Path(tmp)
        sets = {"original": ml72 / "labels.csv"}
        for form, title in (("png", "reals at 559 px"), ("jpeg75", "reals as AI files")):
            (root / form).mkdir()
            sets[title] = variant(ml72, root / form, form)
        for title, labels in sets.items():
            report = train_scene([labels], root / "out" / title, backbone=backbone, seed=0)
            m = report.details["cross_validated"]["overall"]
            print(
                f"| {title} | {m['auc']:.3f} | {m['fpr_at_0.5']:.2f} | {m['recall_at_0.5']:.2f} |"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
