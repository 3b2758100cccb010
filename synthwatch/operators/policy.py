"""Turn a synthetic score into a decision: `flag`, `review`, `pass` or `inconclusive`.

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

    def decide(self, synthetic_score: float | None, *, minimum: Decision | None = None) -> Decision:
        """The decision for a score; never below `minimum` (set by a finding such as a
        C2PA manifest that fails validation, which a low model score cannot clear).

        No score (nothing measured the item) is `inconclusive`, unless a finding forces
        a decision on its own: it is never `pass`, because nothing showed the item real.
        """
        if minimum == "flag" or (
            synthetic_score is not None and synthetic_score >= self.flag_threshold
        ):
            return "flag"
        if minimum == "review" or (
            synthetic_score is not None and synthetic_score >= self.review_threshold
        ):
            return "review"
        return "pass" if synthetic_score is not None else "inconclusive"

    def alerts(self, decision: Decision) -> bool:
        """Whether this decision gets an evidence bundle and an alert."""
        return decision in self.alert_on
