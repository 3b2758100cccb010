"""Build the alert for a decided verdict, with a deterministic `alert_id`.

`alert_id` = sha256(media sha256, model set, policy version), so a redelivered record,
a retried batch or a second worker produces the same id and downstream systems can
deduplicate on it.

An alert leaves the system (SIEM, newsroom tools, tickets), so its `url` and `source`
are shown as a SOC wants them: the same URL without credentials or signature-like query
values (`X-Amz-Signature`, `sig`, `token`, ...). The media itself is identified by
`sha256`; a presigned URL's secret part would only let a reader fetch it as the producer.

A re-scan (`synthwatch rescan`) whose decision differs from the item's earlier one is
alerted whatever the new decision: downstream tools hold the earlier finding, and a
`pass` (or `inconclusive`) here is what withdraws it. Such an alert carries the
`rescan` marker; a re-scan whose decision did not change follows the policy as usual.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence

from msgspec.structs import replace

from synthwatch.operators.evidence import Bundle, EvidenceFrame, write_bundle
from synthwatch.operators.policy import Policy
from synthwatch.operators.redact import redact_urls
from synthwatch.operators.report import ReportContext
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import ObjectStore
from synthwatch.schemas import Alert, Verdict


def alert_id(
    media_sha256: str, model_set: str, policy_version: str, *, decision: str | None = None
) -> str:
    """The deterministic id; `decision` only for a flipped re-scan that would otherwise
    share its id with the item's earlier alert (see `verdict_alert_id`)."""
    # The "v1" names this derivation, not the record's version: alert.v2 records keep
    # the ids alert.v1 gave, so a SIEM deduplicating on them sees no new findings.
    text = f"synthwatch.alert.v1\n{media_sha256}\n{model_set}\n{policy_version}"
    if decision is not None:
        text += f"\nrescan-decision={decision}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def rescan_flipped(verdict: Verdict) -> bool:
    """Whether this verdict is a re-scan whose decision differs from the earlier one."""
    return verdict.rescan is not None and verdict.decision != verdict.rescan.previous_decision


def alerts_on(verdict: Verdict, policy: Policy) -> bool:
    """Whether `verdict` gets an evidence bundle and an alert: the policy's decisions,
    and every re-scan that changed the decision (its alert replaces the earlier one)."""
    return policy.alerts(verdict.decision) or rescan_flipped(verdict)


def verdict_alert_id(verdict: Verdict) -> str:
    """The verdict's alert id: hash(media, model set, policy version), as for every
    alert, so a redelivery yields the same id.

    A flipped re-scan made with the same model set and policy version as the earlier
    verdict (a new list of known fakes, thresholds changed without a new version) would
    get the earlier alert's id: a SIEM would drop it as a duplicate and the write-once
    bundle under that id holds the earlier decision. Its id therefore also hashes the new
    decision, which is still deterministic for a redelivered record."""
    r = verdict.rescan
    same_identity = r is not None and (r.previous_model_set, r.previous_policy_version) == (
        verdict.model_set,
        verdict.policy_version,
    )
    decision = verdict.decision if same_identity and rescan_flipped(verdict) else None
    return alert_id(verdict.sha256, verdict.model_set, verdict.policy_version, decision=decision)


def make_alert(verdict: Verdict, *, evidence_uri: str, manifest_sha256: str) -> Alert:
    return Alert(
        alert_id=verdict_alert_id(verdict),
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
        rescan=verdict.rescan if rescan_flipped(verdict) else None,
        matches=[replace(m, reference=redact_urls(m.reference)) for m in verdict.matches],
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
    """For a decision the policy alerts on, or a re-scan that changed the decision
    (`alerts_on`): write the evidence bundle, signed by `signer`, then build the alert
    that points to it; None for any other verdict.

    `frames` (and `context`: container facts and decoded audio for the report) are
    called only if the bundle is not in the store yet. `weights`: signal name -> full
    weights sha256, for the manifest.
    """
    if not alerts_on(verdict, policy):
        return None
    aid = verdict_alert_id(verdict)

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
