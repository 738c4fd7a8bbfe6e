"""What a step returns: frozen, keyword-only results that all answer `StepOutcome`, the protocol the command
line (`pipelines.cli`) and Hydra sweeps read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pipelines.evaluation.result import EvalResult
    from pipelines.evaluation.stats import Comparison, Estimate
    from pipelines.judging.agreement import Agreement
    from pipelines.scale.batch import Predictions
    from pipelines.tracking.judging.registry import RegisteredJudge


class StepOutcome(Protocol):
    """A step's result as the command line prints it and a sweep compares it."""

    run_id: str

    @property
    def score(self) -> float | None:
        """The primary metric a Hydra sweep compares jobs by; None where a step scores nothing."""

    def headline(self) -> str:
        """One line for the console."""


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    """What every step returns: at least the run it logged to."""

    run_id: str


class Unscored(RunOutcome):
    """A step that scores no program: a Hydra sweep has nothing to compare its jobs by."""

    @property
    def score(self) -> None:
        return None


@dataclass(frozen=True, kw_only=True)
class StepResult(RunOutcome):
    """A step that scored a program: its final evaluation, and the program as logged and registered."""

    name: str
    result: EvalResult  # the step's final evaluation: estimates and per-example rows
    model_uri: str | None = None
    version: str | None = None

    @property
    def score(self) -> float | None:
        return self.result.score

    def headline(self) -> str:
        return self.result.headline()


@dataclass(frozen=True, kw_only=True)
class PredictResult(Unscored):
    """A batch prediction: what was answered, how fast, and where it went."""

    predictions: Predictions
    output: Path

    def headline(self) -> str:
        p = self.predictions
        return f"{p.rows} rows, {p.failed} failed, {p.rows / max(p.seconds, 1e-9):.1f} rows/s -> {self.output}"


@dataclass(frozen=True, kw_only=True)
class ReviewResult(Unscored):
    """Traces queued for people's labels."""

    queue: str
    items: int

    def headline(self) -> str:
        return (f"{self.items} traces in the review queue {self.queue!r}: label them on the experiment's Review "
                "page, then `mlflow run . -e judge`")


@dataclass(frozen=True, kw_only=True)
class JudgeResult(Unscored):
    """The judge against people's labels; with `align=true`, its aligned version."""

    agreements: list[Agreement]
    aligned: str | None = None               # the aligned judge's state URI
    alignment: Comparison | None = None      # held-out agreement, aligned - original, 0-100
    registered: RegisteredJudge | None = None  # its version as the experiment's scorer and prompt

    def headline(self) -> str:
        text = "; ".join(a.describe() for a in self.agreements)
        if self.registered:
            r = self.registered
            text += (f"; aligned judge {r.name} v{r.version}: held-out agreement {self.alignment.describe()} -> "
                     f"scoring.judge={r.name if r.champion else f'{r.name}/{r.prompt_version}'}")
        return text


@dataclass(frozen=True, kw_only=True)
class AssessResult(Unscored):
    """Stored traces scored: each scorer's mean with its interval."""

    traces: int
    estimates: dict[str, Estimate]

    def headline(self) -> str:
        scored = "; ".join(f"{name} {e.describe()}" for name, e in self.estimates.items()) or "no scorer gave a value"
        return f"{self.traces} traces: {scored}"
