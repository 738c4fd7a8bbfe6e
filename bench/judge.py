"""What aligning the judge costs (BENCHMARKS.md, 10): LM calls and seconds for 50 labels against the fake LM
at 200 ms per call, as `mlflow run . -e judge -P overrides="align=true"` spends them: the judge's verdict on
every labelled trace (agreement), then the alignment (the `verdicts` preset on 60% of the labels: the judge's
verdict on 2 yes- and 2 no-labelled traces, its demos) and the held-out share judged before and after; then,
as `mlflow_aligner=memalign|simba` adds, MLflow's own Judge.align on the same split (50 labelled traces in a
scratch store) and its held-out verdicts.

    .venv/bin/python bench/judge.py                 # ~1 min
    .venv/bin/python bench/judge.py --labels 100
"""

# ruff: noqa: I001, E402 (the project is importable once _common has put it on the path)
from __future__ import annotations

import time

import _common as common

import dspy
import mlflow

from pipelines.data import load_splits
from pipelines.evaluation.judge import JudgedF1
from pipelines.judging import align
from pipelines.judging.labels import Label
from pipelines.optimizers import build_optimizer
from pipelines.steps.judge import REVIEW_INSTRUCTION
from pipelines.tracking.judging.labels import log_gold, log_labels
from pipelines.tracking.judging.mlflow_align import ALIGNERS, mlflow_align, mlflow_verdicts, pass_fail_judge


def main(args) -> None:
    splits = load_splits(common.compose("cot").data)
    pool = splits.train + splits.dev + splits.test
    examples = [align.example(e.question, e.response, pool[(i + 1) % len(pool)].response[:300],
                              label=i % 2 == 0)
                for i, e in enumerate((pool * (args.labels // len(pool) + 1))[:args.labels])]
    with common.fake_lm(latency=args.latency, score=0.6) as (api_base, counts):
        cfg = common.compose("judge", [*common.fake_lm_overrides(api_base, threads=1)])
        lm = common.build_lm(cfg.lm)
        rows = []

        def phase(name, fn):
            calls, started = sum(counts()), time.perf_counter()
            out = fn()
            rows.append([name, sum(counts()) - calls, time.perf_counter() - started])
            return out

        judged = JudgedF1(lm)
        phase("agreement: judge every label", lambda: [judged(dspy.Example(question=e.question, response=e.gold),
                                                              dspy.Prediction(response=e.answer)) for e in examples])
        parts = align.split(examples, cfg.align_held_out, cfg.scoring.seed)
        original = align.JudgeProgram()
        optimizer = build_optimizer(cfg.optimizer, align.Agrees(cfg.judge_threshold))
        with dspy.context(lm=lm, callbacks=[]):
            aligned = phase(f"alignment: optimizer={cfg.optimizer.name} on {len(parts.align)}",
                            lambda: optimizer.compile(original.deepcopy(), trainset=parts.align))
        phase(f"held-out {len(parts.held_out)}: original", lambda: align.verdicts(original, parts.held_out, lm))
        phase(f"held-out {len(parts.held_out)}: aligned", lambda: align.verdicts(aligned, parts.held_out, lm))
        rows.append(["total", sum(r[1] for r in rows), sum(r[2] for r in rows)])
        mlflow_rows = mlflow_aligners(parts, api_base, phase=phase, rows=rows)
    print(common.table(["phase", "LM calls", "seconds"], rows[:len(rows) - mlflow_rows]))
    print(common.table(["MLflow's Judge.align", "LM calls", "seconds"], rows[len(rows) - mlflow_rows:]))
    print(common.machine())


def labelled_traces(examples: list[dspy.Example]) -> list[str]:
    """Each example as a trace of (question -> answer) with its gold answer and a person's label on it."""
    @mlflow.trace(name="program")
    def program(question: str, answer: str) -> dict:
        return {"response": answer}

    ids = []
    for e in examples:
        program(e.question, e.answer)
        ids.append(mlflow.get_last_active_trace_id())
    mlflow.flush_trace_async_logging()
    log_labels([Label(t, e.label, "bench") for t, e in zip(ids, examples, strict=True)], "correct")
    log_gold({t: {"gold": e.gold} for t, e in zip(ids, examples, strict=True)})
    return ids


def mlflow_aligners(parts: align.Split, api_base: str, *, phase, rows: list) -> int:
    """MemAlign and SIMBA on the alignment share's traces, then each aligned judge on the held-out share;
    returns how many rows it added (LM calls: chat and embedding requests)."""
    common.isolate_mlflow(common.scratch("judge"))
    mlflow.set_experiment("bench-judge")
    ids = labelled_traces(parts.align)
    held = [{"question": e.question, "gold": e.gold, "prediction": e.answer} for e in parts.held_out]
    endpoint = {"api_base": api_base, "api_key": "local"}
    base = pass_fail_judge(name="correct", instruction=REVIEW_INSTRUCTION, model="openai:/fake-ok",
                           api_base=api_base)
    first = len(rows)
    for aligner in ALIGNERS:
        judge = phase(f"{aligner}: Judge.align on {len(ids)}", lambda a=aligner: mlflow_align(
            base, trace_ids=ids, aligner=a, model="openai:/fake-ok", embedding_model="openai:/fake-embed",
            **endpoint))
        phase(f"{aligner}: held-out {len(held)}", lambda j=judge: mlflow_verdicts(j, held, **endpoint))
    return len(rows) - first


if __name__ == "__main__":
    common.run_script(common.parser(__doc__, labels=50, latency=0.2), main)
