"""What one program call costs: its LM calls, tokens and dollars, counted as `ProjectLM` records each call.

`metered()` opens a meter for the calls made inside it, in this thread and in threads that run in a copy
of its context (an ensemble's members). A call answered from DSPy's cache still counts, at what it cost
when it was made: DSPy clears a cached response's token counts, but keeps the response itself (whose
usage DSPy's native engine leaves in place) and its hidden params (where `keep_usage` files the counts of
a LiteLLM response before it is cached). The figures are then what a question costs on a cold cache, so a
rerun compares programs by the same numbers as the first run did.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

KEPT = "ragqa_usage"  # key in a LiteLLM response's `_hidden_params`, which DSPy's cache keeps


@dataclass
class Meter:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None  # None: no call had a price (a local or unknown model)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: dict, cost: float | None) -> None:
        with self._lock:
            self.calls += 1
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


def keep_usage(response) -> None:
    """File a fresh LiteLLM response's token counts inside it, where DSPy's cache keeps them."""
    hidden = getattr(response, "_hidden_params", None)
    usage = dict(getattr(response, "usage", None) or {})
    if isinstance(hidden, dict) and usage:
        hidden[KEPT] = {k: usage.get(k) for k in ("prompt_tokens", "completion_tokens")}


def call_usage(entry: dict) -> dict:
    """Token counts of one LM call from its history entry, also when DSPy's cache answered it."""
    if entry.get("usage"):
        return entry["usage"]
    response = entry.get("response")
    hidden = getattr(response, "_hidden_params", None)
    if isinstance(hidden, dict) and KEPT in hidden:
        return hidden[KEPT]
    usage = getattr(response, "usage", None)  # DSPy's native engine: the cached response keeps its usage
    if getattr(usage, "input_tokens", None) is not None:
        return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens}
    return {}


def record(entry: dict) -> None:
    """Count one LM call (its history entry) in the meter of the calling context, if there is one."""
    meter = _current.get()
    if meter is not None:
        meter.add(call_usage(entry), entry.get("cost"))
