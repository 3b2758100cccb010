"""Turn a synthetic score into a decision: `flag`, `review` or `pass`.

Thresholds are versioned with the policy: an alert names the policy version that
produced it, so a threshold change is visible in every downstream record and alert ids
change with it (a re-scan under a new policy is a new finding, not a duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass

from synthwatch.schemas import Decision


@dataclass(frozen=True)
class Policy:
    version: str
    flag_threshold: float
    review_threshold: float
    alert_on: frozenset[Decision] = frozenset({"flag", "review"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.review_threshold <= self.flag_threshold <= 1.0:
            raise ValueError(
                "policy thresholds must satisfy 0 <= review_threshold <= flag_threshold <= 1, "
                f"got review={self.review_threshold} flag={self.flag_threshold}"
            )

    def decide(self, synthetic_score: float, *, minimum: Decision | None = None) -> Decision:
        """The decision for a score; never below `minimum` (set by a finding such as a
        C2PA manifest that fails validation, which a low model score cannot clear)."""
        if synthetic_score >= self.flag_threshold or minimum == "flag":
            return "flag"
        if synthetic_score >= self.review_threshold or minimum == "review":
            return "review"
        return "pass"

    def alerts(self, decision: Decision) -> bool:
        """Whether this decision gets an evidence bundle and an alert."""
        return decision in self.alert_on
