"""Build the alert for a decided verdict, with a deterministic `alert_id`.

`alert_id` = sha256(media sha256, model set, policy version), so a redelivered record,
a retried batch or a second worker produces the same id and downstream systems can
deduplicate on it.

An alert leaves the system (SIEM, newsroom tools, tickets), so its `url` and `source`
are shown as a SOC wants them: the same URL without credentials or signature-like query
values (`X-Amz-Signature`, `sig`, `token`, ...). The media itself is identified by
`sha256`; a presigned URL's secret part would only let a reader fetch it as the producer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence

from synthwatch.operators.evidence import Bundle, EvidenceFrame, write_bundle
from synthwatch.operators.policy import Policy
from synthwatch.operators.redact import redact_urls
from synthwatch.operators.report import ReportContext
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import ObjectStore
from synthwatch.schemas import Alert, Verdict


def alert_id(media_sha256: str, model_set: str, policy_version: str) -> str:
    # The "v1" names this derivation, not the record's version: alert.v2 records keep
    # the ids alert.v1 gave, so a SIEM deduplicating on them sees no new findings.
    text = f"synthwatch.alert.v1\n{media_sha256}\n{model_set}\n{policy_version}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_alert(verdict: Verdict, *, evidence_uri: str, manifest_sha256: str) -> Alert:
    return Alert(
        alert_id=alert_id(verdict.sha256, verdict.model_set, verdict.policy_version),
        id=verdict.id,
        url=redact_urls(verdict.url),
        source=redact_urls(verdict.source),
        sha256=verdict.sha256,
        media_type=verdict.media_type,
        synthetic_score=verdict.synthetic_score,
        decision=verdict.decision,
        model_set=verdict.model_set,
        policy_version=verdict.policy_version,
        evidence_uri=evidence_uri,
        manifest_sha256=manifest_sha256,
        segments=verdict.segments,
        submitted_at=verdict.submitted_at,
        detected_at=verdict.detected_at,
        decided_by=verdict.decided_by,
    )


def alert_with_evidence(
    verdict: Verdict,
    frames: Callable[[], Sequence[EvidenceFrame]],
    store: ObjectStore,
    *,
    evidence_prefix: str,
    policy: Policy,
    signer: Signer,
    weights: Mapping[str, str] | None = None,
    context: Callable[[], ReportContext] | None = None,
) -> tuple[Alert, Bundle] | None:
    """For a decision the policy alerts on: write the evidence bundle, signed by
    `signer`, then build the alert that points to it; None for any other decision.

    `frames` (and `context`: container facts and decoded audio for the report) are
    called only if the bundle is not in the store yet. `weights`: signal name -> full
    weights sha256, for the manifest.
    """
    if not policy.alerts(verdict.decision):
        return None
    aid = alert_id(verdict.sha256, verdict.model_set, verdict.policy_version)

    def report_context() -> ReportContext:
        given = context() if context is not None else ReportContext()
        # The report shows the thresholds only of the policy that made the decision:
        # during a rolling upgrade this worker's policy may be another version.
        same = policy.version == verdict.policy_version
        return dataclasses.replace(given, policy=policy if same else None)

    bundle = write_bundle(
        store,
        prefix=evidence_prefix,
        alert_id=aid,
        verdict=verdict,
        frames=frames,
        signer=signer,
        weights=weights,
        context=report_context,
    )
    alert = make_alert(
        verdict, evidence_uri=bundle.manifest_uri, manifest_sha256=bundle.manifest_sha256
    )
    return alert, bundle
