"""What aligning the judge costs (BENCHMARKS.md, 10): LM calls and seconds for 50 labels against the fake LM
at 200 ms per call, as `mlflow run . -e judge -P overrides="align=true"` spends them: the judge's verdict on
every labelled trace (agreement), then the alignment (BootstrapFewShot on 60% of the labels, stopping at 4
demos) and the held-out share judged before and after.

    .venv/bin/python bench/judge.py                 # ~1 min
    .venv/bin/python bench/judge.py --labels 100
"""

# ruff: noqa: I001, E402 (the project is importable once _common has put it on the path)
from __future__ import annotations

import time

import _common as common

import dspy

from pipelines.data import load_splits
from pipelines.evaluation.scoring import JudgedF1
from pipelines.judging import align
from pipelines.optimizers import build_optimizer


def main(args) -> None:
    splits = load_splits(common.compose("cot").data)
    pool = splits.train + splits.dev + splits.test
    examples = [align.example(e.question, e.response, pool[(i + 1) % len(pool)].response[:300], i % 2 == 0)
                for i, e in enumerate((pool * (args.labels // len(pool) + 1))[:args.labels])]
    with common.fake_lm(latency=args.latency, score=0.6) as (api_base, counts):
        cfg = common.compose("judge", [*common.fake_lm_overrides(api_base, threads=1)])
        lm = common.build_lm(cfg.lm)
        rows = []

        def phase(name, fn):
            calls, started = counts()[0], time.perf_counter()
            out = fn()
            rows.append([name, counts()[0] - calls, time.perf_counter() - started])
            return out

        judged = JudgedF1(lm)
        phase("agreement: judge every label", lambda: [judged(dspy.Example(question=e.question, response=e.gold),
                                                              dspy.Prediction(response=e.answer)) for e in examples])
        parts = align.split(examples, cfg.align_held_out, cfg.scoring.seed)
        original = align.JudgeProgram()
        optimizer = build_optimizer(cfg.optimizer, align.Agrees(cfg.judge_threshold))
        with dspy.context(lm=lm, callbacks=[]):
            aligned = phase(f"alignment: BootstrapFewShot on {len(parts.align)}",
                            lambda: optimizer.compile(original.deepcopy(), trainset=parts.align))
        phase(f"held-out {len(parts.held_out)}: original", lambda: align.verdicts(original, parts.held_out, lm))
        phase(f"held-out {len(parts.held_out)}: aligned", lambda: align.verdicts(aligned, parts.held_out, lm))
    rows.append(["total", sum(r[1] for r in rows), sum(r[2] for r in rows)])
    print(common.table(["phase", "LM calls", "seconds"], rows))
    print(common.machine())


if __name__ == "__main__":
    common.run_script(common.parser(__doc__, labels=50, latency=0.2), main)
