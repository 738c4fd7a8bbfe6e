"""What one program call costs: its LM calls, tokens and dollars, counted as `ProjectLM` records each response.

`metered()` opens a meter for the calls made inside it, in this thread and in threads that run in a copy
of its context (an ensemble's members). A response answered from DSPy's cache still counts: DSPy clears
a cached response's token counts, so `keep_usage` files them inside the response before it is cached and
reads them back on a hit. The figures are then what the question costs on a cold cache, so a rerun
compares programs by the same numbers as the first run did.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

KEPT = "ragqa_usage"  # key in a response's `_hidden_params`, which DSPy's cache keeps


@dataclass
class Meter:
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None  # None: no call had a price (a local or unknown model)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: dict, cost: float | None, cached: bool) -> None:
        with self._lock:
            self.calls += 1
            self.cached_calls += cached
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
            if cost is not None:
                self.cost_usd = (self.cost_usd or 0.0) + float(cost)

    def as_row(self) -> dict[str, float | int | None]:
        return {"lm_calls": self.calls, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": self.cost_usd}


_current: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("ragqa_meter", default=None)


@contextlib.contextmanager
def metered() -> Iterator[Meter]:
    meter = Meter()
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)


def keep_usage(response) -> tuple[dict, bool]:
    """The response's token counts and whether it came from the cache; a fresh response's counts are
    filed inside it, where DSPy's cache keeps them."""
    hidden = getattr(response, "_hidden_params", None)
    usage = dict(getattr(response, "usage", None) or {})
    if not isinstance(hidden, dict):
        return usage, False
    if usage:
        hidden[KEPT] = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}
        return usage, False
    return dict(hidden.get(KEPT) or {}), KEPT in hidden


def record(response) -> None:
    """Count one LM response in the meter of the calling context, if there is one."""
    usage, cached = keep_usage(response)
    meter = _current.get()
    if meter is not None:
        hidden = getattr(response, "_hidden_params", None) or {}
        meter.add(usage, hidden.get("response_cost") if isinstance(hidden, dict) else None, cached)
