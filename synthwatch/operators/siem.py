"""SOC outputs: an `Alert` as native JSON, an OCSF Detection Finding, or a Splunk HEC event.

Every formatter is a pure function of the alert: the same alert (a redelivery, a retried
batch, a second worker) gives byte-identical output from the same synthwatch version, so
a SIEM can deduplicate on `finding_info.uid` (= `alert_id`) and on the bytes. Nothing
reads a clock, the environment or a random source.

Formats (`SinkSettings.format`):

- `native`: the alert.v2 record exactly as it travels on `media.alerts`.
- `ocsf`: an OCSF 1.5.0 Detection Finding (class_uid 2004, category_uid 2 Findings,
  activity_id 1 Create, type_uid 200401). 1.5.0 is the schema version py-ocsf-models
  0.10.0 models (its `OCSF_VERSION`), against which the tests validate our output. The
  enum ids below are those of the OCSF 1.5.0 schema (schema.ocsf.io, ocsf/ocsf-schema:
  `events/findings/detection_finding.json`, `objects/analytic.json`, `objects/file.json`,
  `objects/fingerprint.json`, `objects/observable.json`); the tests compare each with
  py-ocsf-models' enums, so none is typed from memory alone. This module does not import
  py-ocsf-models: it is a development dependency, not a runtime one.
- `splunk_hec`: the OCSF finding wrapped in a Splunk HTTP Event Collector envelope for
  `/services/collector/event` (Splunk docs, "Format events for HTTP Event Collector").

Severity and confidence, from the alert's decision and synthetic score:

    decision      severity_id / severity  confidence_score   confidence_id / confidence
    flag          4 High                  80..100            3 High
    review        3 Medium                50..79             2 Medium
    pass          1 Informational         0..49              1 Low
    inconclusive  0 Unknown               (no score)         0 Unknown, no confidence_score

An `inconclusive` alert (sent only where the policy's `alert_on` asks for them) says
that the detectors could not score the item: its severity is OCSF's Unknown, not
Informational, because nothing was found either way, and it carries no confidence.

`confidence_score` is the synthetic score in percent, rounded half up and clamped to
0..100 (0.0 -> 0, 0.5 -> 50, 0.8 -> 80, 1.0 -> 100), and the confidence band is read
from that rounded number, so `confidence` and `confidence_score` never disagree.
Severity follows the policy's decision (what the SOC must do); confidence follows the
score (how sure the detectors are), so a verdict decided by a signal on its own (a C2PA
manifest declaring generative AI) keeps its own score. The bands sit at the default
policy thresholds (`PolicySettings`: review 0.5, flag 0.8), fixed here so that the
mapping does not move when a deployment tunes its policy.

Time: OCSF `time` and `finding_info.created_time` are milliseconds since the epoch of
`detected_at`; an alert from a producer that predates that field (0.0) falls back to
`submitted_at`, and when both are 0.0 the time is unknown: OCSF `time` (required) is 0
and the HEC envelope leaves `time` out, so Splunk stamps the event on receipt. A clock
read here would make a redelivery differ from the original.

Where the media and its evidence go:

- `evidences[0]`: the media item: `file` (name from the URL's or path's last segment,
  `hashes` = its sha256 as an OCSF fingerprint, algorithm_id 3 SHA-256) and `url`.
- `evidences[1]`: the evidence bundle's signed `manifest.json`: `file.hashes` = the
  manifest's sha256, `url` (or `file.path` for a local bundle) = `evidence_uri`.
- `resources[0]`: the scanned item as the affected resource (uid = the media id).
- `observables`: the two sha256 values (type Hash), the URL (URL String), the media id
  (Resource UID), so a SIEM can pivot on them.
- `unmapped`: what OCSF has no attribute for: decision, raw score, model set, policy
  version, segments, decided_by, submitted_at.

URLs in an alert are already redacted (`operators/alert.py`); they are passed through
`redact_urls` again, which leaves a redacted URL unchanged, so an alert line from
anywhere else (`synthwatch alerts convert`) cannot carry a signature into a SIEM either.
"""

from __future__ import annotations

import math
import urllib.parse
from typing import Any, Literal, get_args

import msgspec

import synthwatch
from synthwatch.operators.redact import redact_urls
from synthwatch.schemas import Alert, Decision, encode

Format = Literal["native", "ocsf", "splunk_hec"]
FORMATS: tuple[Format, ...] = get_args(Format)

OCSF_VERSION = "1.5.0"
"""The OCSF schema version of our findings (`metadata.version`)."""
PRODUCT_NAME = "synthwatch"
VENDOR_NAME = "synthwatch"
HEC_SOURCE = "synthwatch"
DEFAULT_SOURCETYPE = "synthwatch:alert"

# OCSF 1.5.0, events/findings/detection_finding.json and the Findings category:
# type_uid = class_uid * 100 + activity_id.
CATEGORY_UID, CATEGORY_NAME = 2, "Findings"
CLASS_UID, CLASS_NAME = 2004, "Detection Finding"
ACTIVITY_ID, ACTIVITY_NAME = 1, "Create"
TYPE_UID, TYPE_NAME = CLASS_UID * 100 + ACTIVITY_ID, f"{CLASS_NAME}: {ACTIVITY_NAME}"
STATUS_ID, STATUS_NAME = 1, "New"

# OCSF 1.5.0 severity_id: 1 Informational, 3 Medium, 4 High (2 Low, 5 Critical unused).
SEVERITY: dict[Decision, tuple[int, str]] = {
    "flag": (4, "High"),
    "review": (3, "Medium"),
    "pass": (1, "Informational"),
    "inconclusive": (0, "Unknown"),
}
# OCSF 1.5.0 confidence_id: 0 Unknown, 1 Low, 2 Medium, 3 High.
CONFIDENCE_UNKNOWN = (0, "Unknown")
CONFIDENCE_BANDS: tuple[tuple[int, tuple[int, str]], ...] = (
    (80, (3, "High")),
    (50, (2, "Medium")),
    (0, (1, "Low")),
)
"""(lowest confidence_score, (confidence_id, caption)), highest band first."""

# OCSF 1.5.0 analytic.type_id 4 "Learning (ML/DL)" (objects/analytic.json).
ANALYTIC_TYPE_ID, ANALYTIC_TYPE = 4, "Learning (ML/DL)"
# OCSF 1.5.0 fingerprint.algorithm_id 3 "SHA-256" (objects/fingerprint.json).
SHA256_ALGORITHM_ID, SHA256_ALGORITHM = 3, "SHA-256"
# OCSF 1.5.0 file.type_id 1 "Regular File" (objects/file.json; `name`, `type_id` required).
REGULAR_FILE_ID, REGULAR_FILE = 1, "Regular File"
# OCSF 1.5.0 observable.type_id: 6 URL String, 8 Hash, 10 Resource UID.
OBSERVABLE_URL = (6, "URL String")
OBSERVABLE_HASH = (8, "Hash")
OBSERVABLE_RESOURCE_UID = (10, "Resource UID")

TITLES: dict[Decision, str] = {
    "flag": "Synthetic media detected: {media_type}",
    "review": "Possible synthetic media, needs review: {media_type}",
    "pass": "No synthetic media detected: {media_type}",
    "inconclusive": "Synthetic-media scan inconclusive, needs review: {media_type}",
}

_encoder = msgspec.json.Encoder(order="deterministic")
RECORD_TYPE = Alert.__struct_config__.tag


def finite(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def severity(decision: Decision) -> tuple[int, str]:
    """OCSF (severity_id, severity) for a policy decision."""
    return SEVERITY[decision]


def confidence(score: float | None) -> tuple[int, str, int | None]:
    """OCSF (confidence_id, confidence, confidence_score) for a synthetic score."""
    if score is None or not math.isfinite(score):
        return (*CONFIDENCE_UNKNOWN, None)
    percent = min(100, max(0, math.floor(score * 100.0 + 0.5)))
    for lowest, (cid, caption) in CONFIDENCE_BANDS:
        if percent >= lowest:
            return cid, caption, percent
    raise AssertionError("the last confidence band takes every finite score")


def event_time_s(alert: Alert) -> float | None:
    """Unix time of the finding: `detected_at`, else `submitted_at`, else unknown."""
    for t in (alert.detected_at, alert.submitted_at):
        if math.isfinite(t) and t > 0.0:
            return t
    return None


def _ms(t: float | None) -> int:
    return 0 if t is None else round(t * 1000.0)


def _is_url(text: str) -> bool:
    return "://" in text


def _last_segment(location: str) -> str:
    path = urllib.parse.urlsplit(location).path if _is_url(location) else location
    return path.rstrip("/").rsplit("/", 1)[-1]


def _url_object(url: str) -> dict[str, Any]:
    """An OCSF `url` object; the parts are taken from the (already redacted) URL."""
    parts = urllib.parse.urlsplit(url)
    out: dict[str, Any] = {"url_string": url}
    if parts.scheme:
        out["scheme"] = parts.scheme
    if parts.hostname:
        out["hostname"] = parts.hostname
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        out["port"] = port
    if parts.path:
        out["path"] = parts.path
    if parts.query:
        out["query_string"] = parts.query
    return out


def _fingerprint(sha256: str) -> dict[str, Any]:
    return {"algorithm": SHA256_ALGORITHM, "algorithm_id": SHA256_ALGORITHM_ID, "value": sha256}


def _file(name: str, sha256: str, location: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name or sha256,
        "type": REGULAR_FILE,
        "type_id": REGULAR_FILE_ID,
        "hashes": [_fingerprint(sha256)],
    }
    if location and not _is_url(location):
        out["path"] = location
    return out


def _observable(name: str, kind: tuple[int, str], value: str) -> dict[str, Any]:
    return {"name": name, "type": kind[1], "type_id": kind[0], "value": value}


def ocsf_finding(alert: Alert) -> dict[str, Any]:
    """The alert as an OCSF 1.5.0 Detection Finding (class_uid 2004)."""
    url = redact_urls(alert.url)
    source = redact_urls(alert.source)
    evidence_uri = redact_urls(alert.evidence_uri)
    media_name = _last_segment(url)
    t_ms = _ms(event_time_s(alert))
    sev_id, sev = severity(alert.decision)
    conf_id, conf, conf_score = confidence(alert.synthetic_score)
    title = TITLES[alert.decision].format(media_type=alert.media_type)
    score = alert.synthetic_score if finite(alert.synthetic_score) else None
    score_text = "unknown" if score is None else f"{score:.3f}"

    media_evidence: dict[str, Any] = {
        "name": "media",
        "file": _file(media_name, alert.sha256, url),
    }
    if _is_url(url):
        media_evidence["url"] = _url_object(url)
    bundle_evidence: dict[str, Any] = {
        "name": "evidence_bundle",
        "file": _file(_last_segment(evidence_uri) or "manifest.json", alert.manifest_sha256, ""),
        "data": {"manifest_uri": evidence_uri},
    }
    if _is_url(evidence_uri):
        bundle_evidence["url"] = _url_object(evidence_uri)
    elif evidence_uri:
        bundle_evidence["file"]["path"] = evidence_uri

    resource_data: dict[str, Any] = {"sha256": alert.sha256, "url": url}
    if source:
        resource_data["source"] = source

    observables = [
        _observable("evidences.file.hashes.value", OBSERVABLE_HASH, alert.sha256),
        _observable("evidences.file.hashes.value", OBSERVABLE_HASH, alert.manifest_sha256),
        _observable("resources.uid", OBSERVABLE_RESOURCE_UID, alert.id),
    ]
    if _is_url(url):
        observables.append(_observable("evidences.url.url_string", OBSERVABLE_URL, url))

    data_sources = [f"{alert.media_type} media"]
    if source:
        data_sources.append(source)

    finding: dict[str, Any] = {
        "activity_id": ACTIVITY_ID,
        "activity_name": ACTIVITY_NAME,
        "category_uid": CATEGORY_UID,
        "category_name": CATEGORY_NAME,
        "class_uid": CLASS_UID,
        "class_name": CLASS_NAME,
        "type_uid": TYPE_UID,
        "type_name": TYPE_NAME,
        "time": t_ms,
        "severity_id": sev_id,
        "severity": sev,
        "status_id": STATUS_ID,
        "status": STATUS_NAME,
        "confidence_id": conf_id,
        "confidence": conf,
        "message": f"{title} (synthetic score {score_text}, decision {alert.decision})",
        "metadata": {
            "version": OCSF_VERSION,
            "uid": alert.alert_id,
            "correlation_uid": alert.sha256,
            "product": {
                "name": PRODUCT_NAME,
                "vendor_name": VENDOR_NAME,
                "version": synthwatch.__version__,
            },
        },
        "finding_info": {
            "uid": alert.alert_id,
            "title": title,
            "desc": (
                (
                    f"synthwatch scored this {alert.media_type} {score_text} synthetic "
                    if score is not None
                    else f"No synthwatch detector could score this {alert.media_type} "
                )
                + f"(decision {alert.decision} under policy {alert.policy_version}, "
                f"model set {alert.model_set}); {len(alert.segments)} time segment(s) "
                f"drove the score. Evidence bundle: {evidence_uri} "
                f"(manifest sha256 {alert.manifest_sha256})."
            ),
            "types": ["Synthetic Media", f"Synthetic Media/{alert.media_type.capitalize()}"],
            "analytic": {
                "name": "synthwatch detectors",
                "uid": alert.model_set,
                "type_id": ANALYTIC_TYPE_ID,
                "type": ANALYTIC_TYPE,
                "desc": (
                    "Calibrated detector and provenance signals fused into one synthetic "
                    f"score, decided under policy {alert.policy_version}"
                ),
            },
            "created_time": t_ms,
            "data_sources": data_sources,
        },
        "evidences": [media_evidence, bundle_evidence],
        "resources": [
            {
                "uid": alert.id,
                "name": media_name or alert.sha256,
                "type": alert.media_type,
                "data": resource_data,
            }
        ],
        "observables": observables,
        "unmapped": {
            "record_type": RECORD_TYPE,
            "decision": alert.decision,
            "synthetic_score": score,
            "model_set": alert.model_set,
            "policy_version": alert.policy_version,
            "segments": [
                {"start_s": s.start_s, "end_s": s.end_s, "score": s.score} for s in alert.segments
            ],
            "decided_by": list(alert.decided_by),
            "submitted_at": alert.submitted_at,
            "matches": [
                {
                    "list": m.list,
                    "entry": m.entry,
                    "label": m.label,
                    "algorithm": m.algorithm,
                    "distance": m.distance,
                    "threshold": m.threshold,
                    "reference": m.reference,
                    "source": m.source,
                }
                for m in alert.matches
            ],
        },
    }
    if conf_score is not None:
        finding["confidence_score"] = conf_score
    return finding


def splunk_hec_event(
    alert: Alert,
    *,
    sourcetype: str = DEFAULT_SOURCETYPE,
    index: str | None = None,
    host: str | None = None,
) -> dict[str, Any]:
    """A Splunk HEC event for `/services/collector/event` with the OCSF finding as `event`.

    Per Splunk's "Format events for HTTP Event Collector": `time` is epoch seconds with
    up to millisecond precision (`<sec>.<ms>`), and Splunk uses the receipt time when it
    is absent; `host`, `source`, `sourcetype` and `index` are optional metadata (`index`
    must be one the token may write to). Unset optional keys are left out.
    """
    envelope: dict[str, Any] = {}
    t = event_time_s(alert)
    if t is not None:
        envelope["time"] = round(t, 3)
    if host:
        envelope["host"] = host
    envelope["source"] = HEC_SOURCE
    envelope["sourcetype"] = sourcetype
    if index:
        envelope["index"] = index
    envelope["event"] = ocsf_finding(alert)
    return envelope


def format_alert(
    alert: Alert,
    fmt: Format,
    *,
    sourcetype: str = DEFAULT_SOURCETYPE,
    index: str | None = None,
    host: str | None = None,
) -> bytes:
    """The alert as one JSON document (no trailing newline) in format `fmt`."""
    if fmt == "native":
        return encode(alert)
    if fmt == "ocsf":
        return _encoder.encode(ocsf_finding(alert))
    if fmt == "splunk_hec":
        return _encoder.encode(
            splunk_hec_event(alert, sourcetype=sourcetype, index=index, host=host)
        )
    raise ValueError(f"unknown alert format {fmt!r}: use one of {', '.join(FORMATS)}")
