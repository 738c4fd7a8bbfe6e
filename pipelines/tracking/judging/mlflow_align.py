"""MLflow's own judge alignment beside the project's: `Judge.align` with SIMBA or MemAlign on the same
labelled traces, so the judge step measures both on one held-out share. MLflow's aligners learn a pass/fail
judge made with `make_judge` from the traces themselves: each needs the question and answer (its spans),
the gold answer (an `expected_response` expectation) and people's labels (HUMAN feedback named like the
judge)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlflow

from pipelines.errors import ConfigError
from pipelines.tracking.evaluation import comparison_metrics
from pipelines.tracking.judging.labels import EXPECTATION

ALIGNERS = ("simba", "memalign")
SIMBA_MIN_TRACES = 10  # MLflow's SIMBA refuses fewer labelled traces


@contextlib.contextmanager
def lm_endpoint(api_base: str | None, api_key: str | None) -> Iterator[None]:
    """MLflow's aligners build their own LMs from a model URI alone: a local server's address and key reach
    them, for the alignment only, through the variables LiteLLM reads."""
    saved = {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
    if api_base:
        os.environ["OPENAI_BASE_URL"] = api_base
        if api_key:
            os.environ["OPENAI_API_KEY"] = api_key
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pass_fail_judge(*, name: str, instruction: str, model: str, api_base: str | None):
    """The people's question (the review instruction) as an MLflow judge of (question, answer, gold)."""
    from mlflow.genai.judges import make_judge

    template = (f"{instruction}\n\nQuestion: {{{{ inputs }}}}\nReference answer: {{{{ expectations }}}}\n"
                "Answer to judge: {{ outputs }}\n\nSay true for pass, false for fail")  # MLflow adds the stop
    return make_judge(name=name, instructions=template, model=model, feedback_value_type=bool, base_url=api_base)


def mlflow_align(judge, *, trace_ids: list[str], aligner: str, model: str, api_base: str | None,
                 api_key: str | None, embedding_model: str):
    """`judge.align` on the traces with MLflow's SIMBA or MemAlign, run on `model` (and MemAlign's
    embedder); a failure is one line."""
    from mlflow.genai.judges.optimizers import MemAlignOptimizer, SIMBAAlignmentOptimizer

    optimizer = (SIMBAAlignmentOptimizer(model=model) if aligner == "simba" else
                 MemAlignOptimizer(reflection_lm=model, embedding_model=embedding_model))
    traces = [mlflow.get_trace(t) for t in trace_ids]
    with lm_endpoint(api_base, api_key):
        try:
            return judge.align(traces, optimizer)
        except mlflow.exceptions.MlflowException as e:
            raise ConfigError(f"MLflow's {aligner} alignment failed: {' '.join(str(e).split())[:200]}") from None


def mlflow_verdicts(judge, rows: list[dict], *, api_base: str | None, api_key: str | None) -> list[bool | None]:
    """The judge's pass/fail per row; None where it gave no usable verdict (counted, never agreement)."""
    verdicts = []
    with lm_endpoint(api_base, api_key):
        for row in rows:
            feedback = judge(inputs={"question": row["question"]}, outputs={"response": row["prediction"] or ""},
                             expectations={EXPECTATION: row["gold"]})
            verdicts.append(feedback.value if isinstance(feedback.value, bool) and not feedback.error else None)
    return verdicts


def log_mlflow_alignment(aligned, *, name: str, gain, versus, unparseable: int) -> int:
    """The MLflow-aligned judge's held-out comparisons as metrics, and the judge registered as the
    experiment's scorer `name` (the Judges page); returns its version."""
    run = mlflow.active_run()
    mlflow.log_metrics({"mlflow_align_unparseable": unparseable,
                        **comparison_metrics({"mlflow_align_heldout_agreement": gain,
                                              "mlflow_vs_dspy_heldout_agreement": versus})})
    version = aligned.register(name=name, experiment_id=run.info.experiment_id).scorer_version
    mlflow.set_tag("mlflow_aligned_judge", f"{name} v{version}")
    return version
