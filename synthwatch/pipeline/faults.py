"""Fault points: named places in a stage where the fault suite kills or stalls a worker.

The fault suite (tests/faults) has to kill a worker at an exact moment, for instance
after the evidence bundle is in S3 but before the alert is on its topic, to show that a
restarted worker finishes the work with the same alert id and no duplicate evidence.
A signal sent from outside at the right microsecond cannot hit such a window reliably,
so the worker names its windows and `Settings.fault_points` arms them, in the manner of
FreeBSD's fail points and TiKV's `fail` crate. Unarmed (the default, and always in
production), `hit` is a dictionary lookup that finds nothing.

Spec syntax, one entry per point: `<point>=kill` sends SIGKILL to this very process
(no cleanup, no commit, exactly what an OOM kill or a node loss does), and
`<point>=sleep:<seconds>` stalls the stage there (a batch slower than the poll interval).
`<point>@<media id>=<action>` arms the point for that one record only (the id the stage
bound to its log context), so a test can make one record of a partition slow while the
next one finishes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

POINTS: dict[str, str] = {
    "fetch.after_store": "the blob is in S3; media.fetched not yet sent",
    "detect.before": "a fetched record was taken; nothing scored yet",
    "detect.after_verdict": "the verdict is acknowledged by the broker; offset not committed",
    "decide.after_evidence": "the evidence bundle is in S3; the alert not yet sent",
    "decide.after_alert": "the alert is acknowledged by the broker; offset not committed",
}
"""Every point a stage passes, with the state the pipeline is in when it is hit."""
KILL_ONLY = frozenset({"detect.after_verdict", "decide.after_alert"})
"""Points passed on the event loop, where a sleep would stall every partition rather
than model a slow record."""

log = structlog.get_logger("synthwatch.faults")


@dataclass(frozen=True)
class _Action:
    kind: str
    seconds: float = 0.0


class FaultPoints:
    """The armed fault points of one worker process."""

    def __init__(self, specs: Sequence[str] = ()) -> None:
        """Parse `specs`.

        Raises:
            ValueError: an unknown point or action, so a typo in a test cannot pass
                silently by arming nothing.
        """
        self._armed: dict[tuple[str, str | None], _Action] = {}
        for spec in specs:
            target, sep, action = spec.partition("=")
            point, at, record = target.strip().partition("@")
            action = action.strip()
            if not sep or point not in POINTS or (at and not record):
                known = ", ".join(sorted(POINTS))
                raise ValueError(
                    f"fault point {spec!r}: use <point>[@<media id>]=kill|sleep:<s>, "
                    f"<point> one of {known}"
                )
            key = (point, record or None)
            if action == "kill":
                self._armed[key] = _Action("kill")
            elif action.startswith("sleep:") and point in KILL_ONLY:
                raise ValueError(f"fault point {spec!r}: {point} only takes kill")
            elif action.startswith("sleep:"):
                try:
                    seconds = float(action.removeprefix("sleep:"))
                except ValueError:
                    raise ValueError(f"fault point {spec!r}: sleep needs seconds") from None
                if seconds < 0:
                    raise ValueError(f"fault point {spec!r}: negative sleep")
                self._armed[key] = _Action("sleep", seconds)
            else:
                raise ValueError(f"fault point {spec!r}: action must be kill or sleep:<s>")

    @property
    def armed(self) -> bool:
        return bool(self._armed)

    def hit(self, point: str) -> None:
        """Pass `point`: nothing, unless the fault suite armed it (for every record, or
        for the one whose media id the stage bound to its log context)."""
        if not self._armed:
            return
        record = structlog.contextvars.get_contextvars().get("id")
        action = self._armed.get((point, record)) or self._armed.get((point, None))
        if action is None:
            return
        if action.kind == "sleep":
            log.warning("fault point: sleeping", point=point, seconds=action.seconds)
            time.sleep(action.seconds)
            return
        log.warning("fault point: SIGKILL", point=point, state=POINTS[point])
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
