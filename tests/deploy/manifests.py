"""Offline checks of the Kubernetes deployment: render the kustomize overlays, validate each
object against the Kubernetes API schemas (kubernetes-validate, strict) or, for KEDA's
objects, against the CRD schemas of the pinned KEDA release.

scripts/validate-k8s obtains the tools (kustomize, the KEDA CRDs) and runs `main`;
tests/deploy/test_manifests.py gets the same tools from it and checks the rendered objects.

    python -m tests.deploy.manifests --kustomize "kubectl kustomize" \\
        --keda-crds .tools/keda/v2.21.0 --kubernetes-version 1.31.0
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kubernetes_validate

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCRIPT = ROOT / "scripts" / "validate-k8s"

RENDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("k8s/overlays/cpu", ()),
    "gpu": ("k8s/overlays/gpu", ()),
    # What an operator gets by adding the component to the cpu overlay.
    "cpu+alert-sink": ("k8s/overlays/cpu", ("k8s/components/alert-sink",)),
    # A model canary stacked on each overlay, its image mapped as k8s/README.md shows
    # ("Canary a model upgrade"; IMAGES below).
    "cpu+detect-canary": ("k8s/overlays/cpu", ("k8s/components/detect-canary",)),
    "gpu+detect-canary": ("k8s/overlays/gpu", ("k8s/components/detect-canary",)),
}
"""Rendered configurations: name -> (overlay, components added on top of it)."""

CANARY_IMAGE = "ghcr.io/synthwatch/synthwatch-canary"
"""The placeholder image of k8s/components/detect-canary."""

IMAGES: dict[str, list[dict[str, str]]] = {
    "cpu+detect-canary": [
        {
            "name": CANARY_IMAGE,
            "newName": "ghcr.io/synthwatch/synthwatch",
            "newTag": "0.1.0-models-2",
        }
    ],
    "gpu+detect-canary": [
        {
            "name": CANARY_IMAGE,
            "newName": "ghcr.io/synthwatch/synthwatch",
            "newTag": "0.1.0-models-2-gpu",
        }
    ],
}
"""`images:` of a render's kustomization (name -> entries), for renders with components."""

KEDA_CRD_FILES = {
    "ScaledObject": "keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda.sh_triggerauthentications.yaml",
}

Obj = dict[str, Any]


@dataclass(frozen=True)
class Tools:
    """What scripts/validate-k8s obtained; empty strings for what it could not."""

    kustomize: str
    """Command that renders a kustomization directory given as its last argument."""
    kustomize_version: str
    keda_version: str
    keda_crds: str
    """Directory holding KEDA_CRD_FILES."""
    kubernetes_version: str
    hadolint: str
    errors: str
    """Why a tool is missing, one reason per line."""


def obtain_tools(timeout_s: float = 600.0) -> Tools:
    """Run `scripts/validate-k8s tools` (downloads and builds on first use, cached after).

    Raises:
        RuntimeError: the script itself failed.
    """
    proc = subprocess.run(
        [str(SCRIPT), "tools"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/validate-k8s tools failed: {proc.stderr.strip()[-2000:]}")
    found: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip()
    return Tools(
        kustomize=found.get("KUSTOMIZE", ""),
        kustomize_version=found.get("KUSTOMIZE_VERSION", ""),
        keda_version=found.get("KEDA_VERSION", ""),
        keda_crds=found.get("KEDA_CRDS", ""),
        kubernetes_version=found.get("KUBERNETES_VERSION", ""),
        hadolint=found.get("HADOLINT", ""),
        errors=proc.stderr.strip(),
    )


def render(kustomize: str, name: str) -> list[Obj]:
    """Objects of one entry of RENDERS, as `kustomize build` prints them.

    Raises:
        RuntimeError: kustomize failed.
    """
    overlay, components = RENDERS[name]
    target = ROOT / overlay
    if components:
        target = wrapper(name, overlay, components, IMAGES.get(name, ()))
    return build(kustomize, target)


def build(kustomize: str, target: Path) -> list[Obj]:
    """Objects of `kustomize build` of one kustomization directory.

    Raises:
        RuntimeError: kustomize failed.
    """
    proc = subprocess.run(
        [*shlex.split(kustomize), str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kustomize} {target} failed: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def wrapper(
    name: str,
    overlay: str,
    components: Sequence[str],
    images: Sequence[Mapping[str, str]] = (),
) -> Path:
    """A kustomization = the overlay + components (+ `images:`), as an operator would
    write it.

    kustomize refuses absolute paths to other kustomizations, so it lives in the repo
    (under the git-ignored .tools/) and refers to them relatively. The overlay's
    namespace is repeated: it applies to what the components add.
    """
    here = ROOT / ".tools" / "render" / name.replace("+", "-")
    here.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((ROOT / overlay / "kustomization.yaml").read_text())
    kustomization: Obj = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / overlay, here)],
        "components": [os.path.relpath(ROOT / c, here) for c in components],
    }
    if spec.get("namespace"):
        kustomization["namespace"] = spec["namespace"]
    if images:
        kustomization["images"] = [dict(i) for i in images]
    (here / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return here


def is_keda(obj: Mapping[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).startswith("keda.sh/")


def validate_core(obj: Obj, kubernetes_version: str) -> list[str]:
    """Errors of one Kubernetes API object against kubernetes-validate's strict schemas
    (unknown fields rejected). A kind without a schema is an error, not a warning."""
    try:
        kubernetes_validate.validate(obj, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        return [f"{_name(obj)}: {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{_name(obj)}: {exc.message}"]
    return []


def keda_schema(crd_dir: Path, kind: str, version: str) -> Obj:
    """openAPIV3Schema of one version of a KEDA CRD, made strict: an object with declared
    properties rejects others, as the API server's strict field validation does."""
    crd = yaml.safe_load((crd_dir / KEDA_CRD_FILES[kind]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: Obj = _strict(v["schema"]["openAPIV3Schema"])
            return schema
    raise KeyError(f"{KEDA_CRD_FILES[kind]} has no version {version}")


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validate_keda(obj: Obj, crd_dir: Path, kubernetes_version: str) -> list[str]:
    """Errors of one KEDA object against its CRD schema; its metadata is checked against
    the Kubernetes ObjectMeta schema (the CRD schema leaves metadata to the API server)."""
    kind = obj.get("kind", "")
    if kind not in KEDA_CRD_FILES:
        return [f"{_name(obj)}: no KEDA CRD schema for kind {kind!r}"]
    version = str(obj["apiVersion"]).split("/", 1)[1]
    validator = jsonschema.Draft4Validator(keda_schema(crd_dir, kind, version))
    errors = [
        f"{_name(obj)}: {'.'.join(str(p) for p in e.path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    for error in validate_core(holder, kubernetes_version):
        errors.append(f"{_name(obj)}: {error.split(': ', 1)[1]}")
    return errors


def validate(objs: Sequence[Obj], crd_dir: Path | None, kubernetes_version: str) -> list[str]:
    errors: list[str] = []
    for obj in objs:
        if is_keda(obj):
            if crd_dir is not None:
                errors += validate_keda(obj, crd_dir, kubernetes_version)
        else:
            errors += validate_core(obj, kubernetes_version)
    return errors


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


def containers(obj: Mapping[str, Any]) -> Iterator[Obj]:
    """Every container (init containers too) of a workload's pod template."""
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kustomize", required=True, help="render command, e.g. 'kustomize build'")
    parser.add_argument("--keda-crds", required=True, type=Path, help="dir of KEDA CRD files")
    parser.add_argument("--kubernetes-version", required=True)
    args = parser.parse_args(argv)
    failed = False
    for name in RENDERS:
        objs = render(args.kustomize, name)
        errors = validate(objs, args.keda_crds, args.kubernetes_version)
        keda = sum(1 for o in objs if is_keda(o))
        for error in errors:
            print(f"FAIL {name}: {error}")
        status = "FAIL" if errors else "ok  "
        print(
            f"{status} {name}: {len(objs)} objects; {len(objs) - keda} against Kubernetes "
            f"{args.kubernetes_version} (strict), {keda} against the KEDA CRDs in "
            f"{args.keda_crds}"
        )
        failed = failed or bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
