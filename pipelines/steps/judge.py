"""`mlflow run . -e review` and `-e judge`: traces queued for people's labels, then the SemanticF1 judge
measured against those labels (with reviewers' agreement among themselves beside it) and, with
`align=true`, aligned to them and registered as a version of the experiment's scorer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import dspy

from pipelines.errors import ConfigError
from pipelines.evaluation.judge import JudgedF1
from pipelines.evaluation.promotion import shortfall
from pipelines.evaluation.scoring import Scoring
from pipelines.evaluation.stats import Comparison
from pipelines.judging import agreement, align, labels
from pipelines.lm import build_lm, ensure_reachable, merged_judge_cfg
from pipelines.optimizers import build_optimizer, compile_kwargs
from pipelines.steps.results import JudgeResult, ReviewResult
from pipelines.steps.session import resolved_judge
from pipelines.tracking.judging.labels import (
    check_traces,
    human_labels,
    labelled_rows,
    log_aligned_judge,
    log_gold,
    log_judge_agreement,
    log_labels,
    queue_for_review,
    queue_traffic_for_review,
)
from pipelines.tracking.judging.mlflow_align import (
    ALIGNERS,
    SIMBA_MIN_TRACES,
    log_mlflow_alignment,
    mlflow_align,
    mlflow_verdicts,
    pass_fail_judge,
)
from pipelines.tracking.judging.registry import judge_model, register_judge
from pipelines.tracking.models import logged_model_of
from pipelines.tracking.runs import run
from pipelines.tracking.store import setup
from pipelines.tracking.usage import timed

if TYPE_CHECKING:
    from pipelines.schema import Config

log = logging.getLogger(__name__)

REVIEW_INSTRUCTION = ("Is the answer correct and useful for the question, as the reference answer would be? "
                      "Pass or fail; a comment says why.")


def run_review(cfg: Config) -> ReviewResult:
    """`review`: a run's dev traces (`run_id`), or a version's served traffic (`model_uri`), into a review
    queue with the judge's label schema (pass/fail)."""
    if bool(cfg.get("run_id")) == bool(cfg.get("model_uri")):
        raise ConfigError("review needs run_id=<a run that evaluated dev with traces> (e.g. a rag or optimize run) "
                          "or model_uri=<a served version, e.g. models:/NAME@champion>")
    setup(cfg)
    if cfg.get("model_uri"):
        model = logged_model_of(cfg.model_uri)
        if model is None:
            raise ConfigError(f"{cfg.model_uri} has no LoggedModel (logged before MLflow 3): its traffic is not linked")
        queue, items = queue_traffic_for_review(model.model_id, cfg.label_name, REVIEW_INSTRUCTION)
    else:
        queue, items = queue_for_review(cfg.run_id, cfg.label_name, REVIEW_INSTRUCTION)
    what = cfg.get("run_id") or cfg.model_uri
    if items:
        log.info("queued %d traces of %s for review as %r, label %r", items, what, queue, cfg.label_name)
    else:
        log.info("%s was queued before, as %r: label it on the Review page", what, queue)
    return ReviewResult(run_id=cfg.get("run_id") or "", queue=queue, items=items)


def run_judge(cfg: Config) -> JudgeResult:
    """`judge`: how far the SemanticF1 judge agrees with people's labels of traces (a file, written to the
    traces as HUMAN feedback first, and labels already on the experiment's traces); its own run, step=judge."""
    if cfg.align and not cfg.judge_name:
        raise ConfigError("align=true registers the aligned judge: set judge_name (the scorer's name)")
    from_file = labels.read(Path(cfg.labels)) if cfg.get("labels") else []
    setup(cfg)
    check_traces({x.trace_id for x in from_file})
    scoring = resolved_judge(Scoring.from_cfg(cfg.scoring))
    existing = human_labels(cfg.tracking.experiment, cfg.label_name)
    new_labels = [x for x in from_file if x not in set(existing)]  # a file given twice is written once
    consensus = labels.by_trace(existing + new_labels)
    examples = labelled_rows({t for t, c in consensus.items() if c.value is not None})
    usable = {t: examples[t] for t, c in consensus.items() if c.value is not None and t in examples}
    if len(usable) < 2:
        raise ConfigError(f"{len(usable)} labelled traces with an evaluated example: the judge's agreement needs at "
                          f"least 2; label traces of an evaluation (labels=FILE, or the {cfg.label_name!r} label on "
                          "the Review page), or served traces that carry a gold answer (the expectation "
                          "expected_response, mlflow.log_expectation)")
    parts = _alignment_split(cfg, usable, consensus) if cfg.align else None
    judge_lm = build_lm(merged_judge_cfg(cfg))
    ensure_reachable(judge_lm)
    judged = JudgedF1(judge_lm, aligned=scoring.judge, version=scoring.judge_version)
    with run("judge", cfg, tags={"label_name": cfg.label_name, "judge": judged.name}) as active:
        log_labels(new_labels, cfg.label_name)
        verdicts = agreement.judge_labelled(judged, usable, consensus)
        link = f"#/experiments/{active.info.experiment_id}/traces?selectedEvaluationId="
        rows = [{**row, "link": link + row["trace_id"]} for row in verdicts.rows]
        bootstrap = {"confidence": cfg.scoring.confidence, "n_resamples": cfg.scoring.n_resamples,
                     "seed": cfg.scoring.seed}
        found = agreement.measure(verdicts.human, verdicts.scores, threshold=cfg.judge_threshold, **bootstrap)
        among = agreement.between_reviewers(existing + new_labels, **bootstrap)
        yes_no = all(isinstance(h, bool) for h in verdicts.human)
        log_judge_agreement(found, rows=rows, unparseable=judged.failures,
                            disagreeing=sum(c.disagree for c in consensus.values()), reviewers=among,
                            confusion=agreement.confusion(verdicts.human,
                                                          [s >= cfg.judge_threshold for s in verdicts.scores])
                            if yes_no else None)
        for a in found:
            log.info("judge vs people: %s", a.describe())
        if among:
            log.info("reviewers vs each other (the ceiling for the judge's kappa): %s", among.describe())
        if parts is None:
            return JudgeResult(run_id=active.info.run_id, agreements=found)
        aligned, comparison, agreed = _align_judge(cfg, scoring, parts, judge_lm)
        uri = log_aligned_judge(aligned, comparison, held_out=len(parts.held_out), aligned_on=len(parts.align))
        if cfg.mlflow_aligner:
            _mlflow_align_beside(cfg, scoring, parts, examples, judge_lm, agreed)
        short = shortfall(comparison, cfg.scoring.confidence)
        registered = register_judge(aligned.judge, name=cfg.judge_name, state=uri, lm_model=judge_lm.model,
                                    threshold=cfg.judge_threshold, improved=short is None)
        log.info("aligned judge %s v%d, held-out agreement aligned - original: %s; %s", registered.name,
                 registered.version, comparison.describe(),
                 f"champion: scoring.judge={registered.name}" if registered.champion else
                 f"not champion ({short}); scoring.judge={registered.name}/{registered.prompt_version}")
        return JudgeResult(run_id=active.info.run_id, agreements=found, aligned=uri, alignment=comparison,
                           registered=registered)


def _alignment_split(cfg: Config, usable: dict[str, dict], consensus: dict[str, labels.Consensus]) -> align.Split:
    """The labelled traces split for alignment (`align.labelled_split`), and MLflow's aligner beside it
    checked: too few for either share fails before any run."""
    parts = align.labelled_split(usable, consensus, held_out=cfg.align_held_out, seed=cfg.scoring.seed)
    if cfg.mlflow_aligner not in (None, *ALIGNERS):
        raise ConfigError(f"mlflow_aligner={cfg.mlflow_aligner}: one of {', '.join(ALIGNERS)} (or null)")
    if cfg.mlflow_aligner == "simba" and len(parts.align) < SIMBA_MIN_TRACES:
        raise ConfigError(f"mlflow_aligner=simba needs {SIMBA_MIN_TRACES} labelled traces to align on, "
                          f"the split leaves {len(parts.align)}; label more traces or use memalign")
    return parts


def _align_judge(cfg: Config, scoring: Scoring, parts: align.Split,
                 judge_lm: dspy.LM) -> tuple[align.JudgeProgram, Comparison, list[float | None]]:
    """Compile the judge program to agree with the alignment share; compare held-out agreement, paired.
    Also returns the aligned judge's agreement (100 or 0) per held-out example, None where unparseable."""
    original = align.JudgeProgram()
    if scoring.judge:
        original.judge.load(scoring.judge)
    optimizer = build_optimizer(cfg.optimizer, align.Agrees(cfg.judge_threshold))
    with dspy.context(lm=judge_lm, callbacks=[]), timed("align"):
        aligned = optimizer.compile(original.deepcopy(), trainset=parts.align, **compile_kwargs(cfg.optimizer))
    before, after = (align.held_out_agreement(program, parts.held_out, judge_lm, threshold=cfg.judge_threshold)
                     for program in (original, aligned))
    return aligned, scoring.paired(*align.both_given(after, before)), after


def _mlflow_align_beside(cfg: Config, scoring: Scoring, parts: align.Split, examples: dict[str, dict],
                         judge_lm: dspy.LM, dspy_agreed: list[float | None]) -> None:
    """MLflow's `Judge.align` (SIMBA or MemAlign) on the same alignment share, measured on the same held-out
    share: its gain over its own unaligned judge, and its agreement against the DSPy-aligned judge's,
    paired. Its aligned judge is registered beside the other (`<judge_name>-<aligner>`)."""
    endpoint = {"api_base": judge_lm.kwargs.get("api_base"), "api_key": judge_lm.kwargs.get("api_key")}
    model = judge_model(judge_lm.model)
    log_gold({e.trace_id: examples[e.trace_id] for e in parts.align + parts.held_out})
    base = pass_fail_judge(name=cfg.label_name, instruction=REVIEW_INSTRUCTION, model=model,
                           api_base=endpoint["api_base"])
    with timed(f"align_{cfg.mlflow_aligner}"):
        aligned = mlflow_align(base, trace_ids=[e.trace_id for e in parts.align], aligner=cfg.mlflow_aligner,
                               model=model, embedding_model=cfg.mlflow_embedding_model, **endpoint)
    rows = [examples[e.trace_id] for e in parts.held_out]
    before, after = (mlflow_verdicts(j, rows, **endpoint) for j in (base, aligned))
    usable = [i for i in range(len(rows)) if None not in (before[i], after[i], dspy_agreed[i])]

    def agreed(verdicts: list[bool | None]) -> list[float]:
        return [100.0 * (verdicts[i] == parts.held_out[i].label) for i in usable]

    gain = scoring.paired(agreed(after), agreed(before))
    versus = scoring.paired(agreed(after), [dspy_agreed[i] for i in usable])
    name = f"{cfg.judge_name}-{cfg.mlflow_aligner}"
    log_mlflow_alignment(aligned, name=name, gain=gain, versus=versus,
                         unparseable=len(rows) - len(usable))
    log.info("MLflow's %s: held-out agreement aligned - unaligned %s; against the DSPy-aligned judge %s "
             "(registered as %s)", cfg.mlflow_aligner, gain.describe(), versus.describe(), name)
