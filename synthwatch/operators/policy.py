"""Turn a synthetic score into a decision: `flag`, `review`, `pass` or `inconclusive`.

Thresholds are versioned with the policy: an alert names the policy version that
produced it, so a threshold change is visible in every downstream record and alert ids
change with it (a re-scan under a new policy is a new finding, not a duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from synthwatch.schemas import Decision


class PolicySettings(BaseModel):
    """`SYNTHWATCH_POLICY__*`: the thresholds and which decisions alert."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = "policy.v1"
    flag_threshold: float = Field(default=0.8, ge=0, le=1)
    review_threshold: float = Field(default=0.5, ge=0, le=1)
    alert_on: tuple[Literal["flag", "review", "inconclusive"], ...] = ("flag", "review")
    """Decisions that get an evidence bundle and an alert. Add `inconclusive` to have a
    person look at every item the detectors could not score."""


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

    @classmethod
    def from_settings(cls, settings: PolicySettings) -> Policy:
        return cls(
            version=settings.version,
            flag_threshold=settings.flag_threshold,
            review_threshold=settings.review_threshold,
            alert_on=frozenset(settings.alert_on),
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
