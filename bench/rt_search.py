"""The largest load that passes a test (here: every stream real time), found with few tries.

Doubling from 1 (or from the largest load already known to pass) until a load fails or the cap
is reached, then bisection between the last pass and the first fail.  The test is assumed
monotone (a load that fails, fails at any larger one).  Tries are bounded in count and by a
stop test (the time budget), so the answer may be a lower bound: `exact` says whether it is not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class SearchResult:
    n: int  # the largest load that passed (0: none did)
    first_fail: int | None  # the smallest load that failed (None: none did)
    exact: bool  # n + 1 failed or n is the cap: the search finished
    tried: list = field(default_factory=list)  # (load, passed) of each try made, in order
    stopped: str = ""  # why it ended early: "tries" or "time" ("" when it finished)


def max_passing(passes: Callable[[int], bool], cap: int, max_tries: int, known: dict | None = None,
                out_of_time: Callable[[], bool] = lambda: False) -> SearchResult:
    """The largest n in 1..cap with passes(n), trying at most `max_tries` loads (those in
    `known`, {load: passed}, measured already, are not tried again) and none once out_of_time()."""
    known = dict(known or {})
    tried = []
    lo = max((n for n, ok in known.items() if ok and n <= cap), default=0)
    fail = min((n for n, ok in known.items() if not ok and lo < n <= cap), default=cap + 1)

    def stop() -> str:
        return "tries" if len(tried) >= max_tries else "time" if out_of_time() else ""

    def check(n: int) -> bool:
        if n not in known:
            known[n] = bool(passes(n))
            tried.append((n, known[n]))
        return known[n]

    stopped = ""

    def step(n: int) -> bool:
        """Try load n and narrow (lo, fail); False when out of tries or time."""
        nonlocal lo, fail, stopped
        if n not in known and (stopped := stop()):
            return False
        if check(n):
            lo = n
        else:
            fail = n
        return True

    while fail == cap + 1 and lo < cap and step(min(cap, max(1, 2 * lo))):  # doubling
        pass
    while not stopped and fail - lo > 1 and step((lo + fail) // 2):  # bisection
        pass
    return SearchResult(lo, fail if fail <= cap else None, fail - lo <= 1, tried, stopped)
