"""Offline checks of the Kubernetes deployment: render the kustomize overlays, validate each
object against the Kubernetes API schemas (kubernetes-validate, strict) or, for KEDA's and
the Prometheus Operator's objects, against the CRD schemas of the pinned releases; check the
PrometheusRule's expressions with promtool (`check rules`, and `test rules` with
tests/deploy/promtool/) and its metric names and labels against k8s/metrics.txt.

scripts/validate-k8s obtains the tools (kustomize, the KEDA and Prometheus Operator CRDs,
promtool) and runs `main`; tests/deploy/test_manifests.py gets the same tools from it and
checks the rendered objects.

    python -m tests.deploy.manifests --kustomize "kubectl kustomize" \\
        --keda-crds .tools/keda/v2.21.0 --kubernetes-version 1.31.0 \\
        --prometheus-operator-crds .tools/prometheus-operator/v0.85.0 \\
        --promtool .tools/bin/promtool
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
    # Scraping and alerting through the Prometheus Operator (kube-prometheus-stack).
    "cpu+prometheus-operator": ("k8s/overlays/cpu", ("k8s/components/prometheus-operator",)),
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
PROMETHEUS_OPERATOR_CRD_FILES = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}
"""From example/prometheus-operator-crd/ of the Go module
github.com/prometheus-operator/prometheus-operator."""

METRICS = K8S / "metrics.txt"
RULE_TESTS = ROOT / "tests" / "deploy" / "promtool" / "synthwatch-rules.test.yaml"
RULES_FILE = "synthwatch-rules.yaml"
"""The name RULE_TESTS gives the rendered PrometheusRule's spec in its `rule_files`."""

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
    prometheus_operator_version: str = ""
    prometheus_operator_crds: str = ""
    """Directory holding PROMETHEUS_OPERATOR_CRD_FILES."""
    prometheus_version: str = ""
    """Go module version of github.com/prometheus/prometheus that promtool is built from."""
    promtool: str = ""


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
        prometheus_operator_version=found.get("PROMETHEUS_OPERATOR_VERSION", ""),
        prometheus_operator_crds=found.get("PROMETHEUS_OPERATOR_CRDS", ""),
        prometheus_version=found.get("PROMETHEUS_VERSION", ""),
        promtool=found.get("PROMTOOL", ""),
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


def is_prometheus_operator(obj: Mapping[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).startswith("monitoring.coreos.com/")


def is_custom(obj: Mapping[str, Any]) -> bool:
    """An object of a CRD (KEDA, Prometheus Operator): no schema in kubernetes-validate."""
    return is_keda(obj) or is_prometheus_operator(obj)


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


def crd_schema(crd_file: Path, version: str) -> Obj:
    """openAPIV3Schema of one version of a CRD, made strict: an object with declared
    properties rejects others, as the API server's strict field validation does."""
    crd = yaml.safe_load(crd_file.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema: Obj = _strict(v["schema"]["openAPIV3Schema"])
            return schema
    raise KeyError(f"{crd_file.name} has no version {version}")


def keda_schema(crd_dir: Path, kind: str, version: str) -> Obj:
    """openAPIV3Schema of one version of a KEDA CRD, made strict (crd_schema)."""
    return crd_schema(crd_dir / KEDA_CRD_FILES[kind], version)


_LEADING_FLAGS = re.compile(r"^\^\(\?([a-zA-Z]+)\)")


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
    if isinstance(out.get("pattern"), str):
        # Go's RE2 takes `^(?i)...` (the Prometheus Operator's CRDs have one); Python's
        # re wants global flags first: the same expression as `(?i)^...`.
        out["pattern"] = _LEADING_FLAGS.sub(r"(?\1)^", out["pattern"])
    return out


def validate_custom(obj: Obj, crd_file: Path, kubernetes_version: str) -> list[str]:
    """Errors of one object against its CRD schema; its metadata is checked against the
    Kubernetes ObjectMeta schema (the CRD schema leaves metadata to the API server)."""
    version = str(obj["apiVersion"]).split("/", 1)[1]
    validator = jsonschema.Draft4Validator(crd_schema(crd_file, version))
    errors = [
        f"{_name(obj)}: {'.'.join(str(p) for p in e.path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})}
    for error in validate_core(holder, kubernetes_version):
        errors.append(f"{_name(obj)}: {error.split(': ', 1)[1]}")
    return errors


def validate_keda(obj: Obj, crd_dir: Path, kubernetes_version: str) -> list[str]:
    """Errors of one KEDA object against its CRD schema (validate_custom)."""
    kind = obj.get("kind", "")
    if kind not in KEDA_CRD_FILES:
        return [f"{_name(obj)}: no KEDA CRD schema for kind {kind!r}"]
    return validate_custom(obj, crd_dir / KEDA_CRD_FILES[kind], kubernetes_version)


def validate_prometheus_operator(obj: Obj, crd_dir: Path, kubernetes_version: str) -> list[str]:
    """Errors of one Prometheus Operator object against its CRD schema (validate_custom);
    a PrometheusRule's group names must also be unique (a list-map keyed by name, which
    the API server enforces and JSON Schema cannot express)."""
    kind = obj.get("kind", "")
    if kind not in PROMETHEUS_OPERATOR_CRD_FILES:
        return [f"{_name(obj)}: no Prometheus Operator CRD schema for kind {kind!r}"]
    errors = validate_custom(obj, crd_dir / PROMETHEUS_OPERATOR_CRD_FILES[kind], kubernetes_version)
    if kind == "PrometheusRule":
        names = [g.get("name") for g in obj.get("spec", {}).get("groups", [])]
        errors += [
            f"{_name(obj)}: duplicate rule group {n!r}" for n in set(names) if names.count(n) > 1
        ]
    return errors


def validate(
    objs: Sequence[Obj],
    crd_dir: Path | None,
    kubernetes_version: str,
    prometheus_operator_crds: Path | None = None,
) -> list[str]:
    """Errors of every object: KEDA's and the Prometheus Operator's against their CRDs
    (skipped when the directory is None), the others against the Kubernetes schemas."""
    errors: list[str] = []
    for obj in objs:
        if is_keda(obj):
            if crd_dir is not None:
                errors += validate_keda(obj, crd_dir, kubernetes_version)
        elif is_prometheus_operator(obj):
            if prometheus_operator_crds is not None:
                errors += validate_prometheus_operator(
                    obj, prometheus_operator_crds, kubernetes_version
                )
        else:
            errors += validate_core(obj, kubernetes_version)
    return errors


# -- Prometheus rules ---------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One line of k8s/metrics.txt."""

    name: str
    kind: str
    """counter, gauge or histogram."""
    labels: tuple[str, ...]


def metric_catalogue(path: Path = METRICS) -> dict[str, Metric]:
    """k8s/metrics.txt: name -> Metric."""
    out: dict[str, Metric] = {}
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            name, kind, *labels = fields
            out[name] = Metric(name, kind, tuple(labels[0].split(",")) if labels else ())
    return out


def served_labels(name: str, catalogue: Mapping[str, Metric]) -> set[str] | None:
    """Labels of a series name the workers serve (a histogram as name_bucket, with `le`,
    name_sum and name_count), or None when they serve no such series."""
    if name in catalogue and catalogue[name].kind != "histogram":
        return set(catalogue[name].labels)
    base, _, suffix = name.rpartition("_")
    if base in catalogue and catalogue[base].kind == "histogram":
        if suffix == "bucket":
            return {*catalogue[base].labels, "le"}
        if suffix in ("sum", "count"):
            return set(catalogue[base].labels)
    return None


_PROMQL_TOKEN = re.compile(
    r"""
      (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<duration>(?:[0-9]+(?:ms|[smhdwy]))+)(?![a-zA-Z0-9_:])
    | (?P<number>0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@])
    """,
    re.VERBOSE,
)
_PROMQL_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_PROMQL_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_PROMQL_KEYWORDS = {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"}


@dataclass(frozen=True)
class Selector:
    """A vector selector of a PromQL expression: `name{label op "value", ...}`."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]
    """(label, operator, value) each."""


@dataclass
class PromQLNames:
    """The names a PromQL expression uses, read by a lexer (promtool parses the whole)."""

    selectors: list[Selector] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)
    """Label names of by / without / on / ignoring / group_left / group_right, in order."""
    created: set[str] = field(default_factory=set)
    """Labels written by label_replace (its destination, the first string argument)."""


def promql_names(expr: str) -> PromQLNames:
    """Vector selectors, grouping labels and label_replace destinations of an expression.

    Raises:
        ValueError: a character that is no PromQL token.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _PROMQL_TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"not PromQL at {pos}: {expr[pos : pos + 20]!r}")
        pos = match.end()
        if match.lastgroup != "space":
            tokens.append((str(match.lastgroup), match.group()))
    out = PromQLNames()

    def text(i: int) -> str:
        return tokens[i][1] if i < len(tokens) else ""

    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if value == "[":  # a range or subquery: durations only
            while i < len(tokens) and text(i) != "]":
                i += 1
        elif kind == "ident" and value in _PROMQL_GROUPING:
            if text(i + 1) == "(":
                i += 2
                while i < len(tokens) and text(i) != ")":
                    if tokens[i][0] == "ident":
                        out.grouping.append(tokens[i][1])
                    i += 1
        elif kind == "ident" and value == "label_replace" and text(i + 1) == "(":
            # label_replace(v, "dst", "replacement", "src", "regex"): the first string
            # at this call's own depth is dst.
            depth, j = 0, i + 1
            while j < len(tokens):
                depth += {"(": 1, ")": -1}.get(text(j), 0)
                if depth == 1 and tokens[j][0] == "string" and text(j - 1) == ",":
                    out.created.add(text(j)[1:-1])
                    break
                j += 1
        elif (kind == "ident" and not _not_a_metric(value, text(i + 1))) or value == "{":
            name = value if kind == "ident" else ""
            matchers: list[tuple[str, str, str]] = []
            if kind == "ident" and text(i + 1) == "{":
                i += 1
            if text(i) == "{":
                i += 1
                while i < len(tokens) and text(i) != "}":
                    if tokens[i][0] == "ident" and text(i + 1) in ("=", "!=", "=~", "!~"):
                        matchers.append((text(i), text(i + 1), text(i + 2)[1:-1]))
                        i += 2
                    i += 1
            out.selectors.append(Selector(name, tuple(matchers)))
        i += 1
    return out


def _not_a_metric(word: str, following: str) -> bool:
    """An aggregation, a keyword or a function call, rather than a metric name."""
    return word in _PROMQL_AGGREGATIONS or word.lower() in _PROMQL_KEYWORDS or following == "("


def target_labels(service_monitor: Mapping[str, Any]) -> set[str]:
    """Labels Prometheus puts on every series scraped through a ServiceMonitor, as far as
    the ServiceMonitor itself decides them: job and instance, and what its relabelings
    write."""
    labels = {"job", "instance"}
    for endpoint in service_monitor["spec"]["endpoints"]:
        for relabel in endpoint.get("relabelings", []):
            if relabel.get("action", "replace").lower() == "replace" and "targetLabel" in relabel:
                labels.add(relabel["targetLabel"])
    return labels


def rules(spec: Mapping[str, Any]) -> Iterator[Obj]:
    """Every rule of a PrometheusRule's spec (or a Prometheus rule file)."""
    for group in spec.get("groups", []):
        yield from group.get("rules", [])


def rule_name_errors(
    spec: Mapping[str, Any], catalogue: Mapping[str, Metric], targets: set[str]
) -> list[str]:
    """Errors of a PrometheusRule's expressions against k8s/metrics.txt: a series the
    workers do not serve (`up` and the rules' own recorded series aside), a label matched
    or grouped by that the series involved do not have (their labels in metrics.txt, `le`
    of a histogram's buckets, the target labels), a recorded series used before it is
    recorded. A recorded series has the labels of its expression's first by clause and
    those its label_replace calls write."""
    errors: list[str] = []
    recorded: dict[str, set[str]] = {}
    for rule in rules(spec):
        name = rule.get("alert") or rule.get("record")
        try:
            names = promql_names(str(rule["expr"]))
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
            continue
        available = set(names.created)
        for selector in names.selectors:
            if selector.name == "up":
                labels: set[str] | None = set()
            elif selector.name in recorded:
                labels = recorded[selector.name]
            else:
                labels = served_labels(selector.name, catalogue)
            if labels is None:
                errors.append(
                    f"{name}: {selector.name or '{...}'} is neither in k8s/metrics.txt "
                    "nor recorded by an earlier rule"
                )
                continue
            if selector.name not in recorded:
                labels = labels | targets
            available |= labels
            for label, _, _ in selector.matchers:
                if label not in labels:
                    errors.append(f"{name}: {selector.name} has no label {label!r}")
        for label in names.grouping:
            if label not in available:
                errors.append(f"{name}: groups by {label!r}, which no series in it has")
        if "record" in rule:
            first = _first_by(str(rule["expr"]))
            recorded[str(rule["record"])] = first | names.created
    return errors


def _first_by(expr: str) -> set[str]:
    match = re.search(r"\bby\s*\(([^)]*)\)", expr)
    return {x.strip() for x in match.group(1).split(",") if x.strip()} if match else set()


def promtool_errors(promtool: str, spec: Mapping[str, Any]) -> list[str]:
    """`promtool check rules` (every linter, fatal) on a PrometheusRule's spec, written as
    a rule file, and `promtool test rules` of RULE_TESTS against it."""
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="synthwatch-rules-") as tmp:
        (Path(tmp) / RULES_FILE).write_text(yaml.safe_dump(dict(spec), sort_keys=False))
        (Path(tmp) / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
        for args in (
            ["check", "rules", "--lint=all", "--lint-fatal", RULES_FILE],
            ["test", "rules", RULE_TESTS.name],
        ):
            proc = subprocess.run(
                [promtool, *args],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if proc.returncode != 0:
                output = (proc.stdout + proc.stderr).strip()
                errors.append(f"promtool {args[0]} {args[1]}: {output[-4000:]}")
    return errors


def check_rules(objs: Sequence[Obj], promtool: str | None) -> tuple[int, list[str]]:
    """(rules checked, errors) of every PrometheusRule of a render: names and labels
    against k8s/metrics.txt and the ServiceMonitor's target labels, then promtool."""
    monitors = [o for o in objs if o.get("kind") == "ServiceMonitor"]
    targets = set().union(*(target_labels(o) for o in monitors)) if monitors else {"job"}
    catalogue = metric_catalogue()
    count, errors = 0, []
    for obj in objs:
        if obj.get("kind") != "PrometheusRule":
            continue
        spec = obj["spec"]
        count += sum(1 for _ in rules(spec))
        errors += [f"{_name(obj)}: {e}" for e in rule_name_errors(spec, catalogue, targets)]
        if promtool:
            errors += [f"{_name(obj)}: {e}" for e in promtool_errors(promtool, spec)]
    return count, errors


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
    parser.add_argument(
        "--prometheus-operator-crds",
        required=True,
        type=Path,
        help="dir of the Prometheus Operator's CRD files",
    )
    parser.add_argument("--promtool", required=True, help="promtool binary")
    args = parser.parse_args(argv)
    failed = False
    for name in RENDERS:
        objs = render(args.kustomize, name)
        errors = validate(
            objs, args.keda_crds, args.kubernetes_version, args.prometheus_operator_crds
        )
        n_rules, rule_errors = check_rules(objs, args.promtool)
        errors += rule_errors
        keda = sum(1 for o in objs if is_keda(o))
        operator = sum(1 for o in objs if is_prometheus_operator(o))
        for error in errors:
            print(f"FAIL {name}: {error}")
        status = "FAIL" if errors else "ok  "
        line = (
            f"{status} {name}: {len(objs)} objects; {len(objs) - keda - operator} against "
            f"Kubernetes {args.kubernetes_version} (strict), {keda} against the KEDA CRDs in "
            f"{args.keda_crds}"
        )
        if operator:
            line += (
                f", {operator} against the Prometheus Operator CRDs in "
                f"{args.prometheus_operator_crds}; {n_rules} rules: metrics.txt names and "
                f"labels, promtool check rules, promtool test rules ({RULE_TESTS.name})"
            )
        print(line)
        failed = failed or bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
