"""The watchdog's arithmetic (pure): per-workflow run-time statistics and the stall limit they give.

A task that gets no word from ComfyUI (no event about it, and it is the oldest of ours on that server) for
longer than its workflow's stall limit is interrupted and requeued by its server worker (core.scheduler):
max(5 x p95 of the workflow's measured run times, COMFYBATCH_STALL_FLOOR) once at least MIN_SAMPLES tasks of
it have finished, else the plain COMFYBATCH_STALL_CEILING. The same numbers give the ETA (core.service).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.config import Settings

MIN_SAMPLES = 5  # finished tasks of a workflow before its p95 is trusted
P95_FACTOR = 5.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; values need not be sorted."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class StallLimit:
    seconds: float
    reason: str  # how the limit was set, for the message of a requeued task


def stall_limit(durations: list[float], settings: Settings) -> StallLimit:
    if len(durations) < MIN_SAMPLES:
        return StallLimit(settings.stall_ceiling, f"the ceiling for a workflow with fewer than {MIN_SAMPLES} "
                                                  "finished tasks, COMFYBATCH_STALL_CEILING")
    p95 = percentile(durations, 95)
    if P95_FACTOR * p95 >= settings.stall_floor:
        return StallLimit(P95_FACTOR * p95, f"5 x the workflow's p95 run time of {p95:.1f} s")
    return StallLimit(settings.stall_floor, f"the floor, COMFYBATCH_STALL_FLOOR (5 x p95 = {P95_FACTOR * p95:.1f} s "
                                            "is less)")
