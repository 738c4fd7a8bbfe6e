"""What every step builds from its config before a run opens: the checks, the LMs, the judge it resolves,
the scorer and the data (`Session`), and the retriever. Bad input fails here, with no run left behind."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from pipelines import packaging
from pipelines.data import Splits, load_corpus, load_splits
from pipelines.evaluation.scoring import Scorer, Scoring
from pipelines.lm import build_adapter, build_lm, check_credentials, ensure_reachable, merged_judge_cfg
from pipelines.optimizers import check_optimizer
from pipelines.programs import Ensemble, check_program
from pipelines.retrieval.cache import load_or_build_index
from pipelines.retrieval.embedders import build_embedder
from pipelines.retrieval.retriever import Retriever
from pipelines.scale import engine, spark
from pipelines.schema import Engine, ProgramName
from pipelines.steps import members
from pipelines.tracking.judging.registry import aligned_state, resolve_judge
from pipelines.tracking.models import check_model
from pipelines.tracking.store import setup

if TYPE_CHECKING:
    from pipelines.schema import Config


RETRIEVING = (ProgramName.rag, ProgramName.multihop)  # the programs that read the index


@dataclass(frozen=True, kw_only=True)
class Session:
    """Everything built from config before a run opens, so bad input fails with no run left behind."""

    cfg: Config
    lm: dspy.LM
    judge: dspy.LM
    adapter: dspy.Adapter
    scorer: Scorer
    splits: Splits
    ensemble: Ensemble | None = None  # program=ensemble: its members, loaded before any LM starts

    @property
    def scoring(self) -> Scoring:
        return self.scorer.scoring


@dataclass(frozen=True, kw_only=True)
class Checked:
    """What checking a step's config reads on the way: its scoring (judge resolved) and its data."""

    scoring: Scoring
    splits: Splits


def check_step(cfg: Config, *, model_uri: str | None = None, optimizing: bool = False) -> Checked:
    """Everything about a step's config that can be wrong, checked with no LM built or called and no run
    opened, cheapest first: the program's numbers, a tracking server that is down or refuses us, a judge
    or `model_uri` that names nothing, a missing key, the data, and (`optimizing`) the optimizer's config.
    An ensemble's members are checked where they are loaded (`members.build`), or by `main` before its
    optimize step has made them."""
    scoring = Scoring.from_cfg(cfg.scoring)
    check_program(cfg.program)
    setup(cfg)
    scoring = resolved_judge(scoring)
    if model_uri:
        check_model(model_uri)
    check_credentials(cfg.lm)
    check_credentials(merged_judge_cfg(cfg))
    splits = load_splits(cfg.data)
    if optimizing:
        check_optimizer(cfg, len(splits.train))
    return Checked(scoring=scoring, splits=splits)


def prepare(cfg: Config, *, model_uri: str | None = None, optimizing: bool = False) -> Session:
    """Check (`check_step`) and build everything a step needs: an ensemble's members are loaded, then the
    LMs are built and reached (the embedded server starts here), still before any run opens."""
    checked = check_step(cfg, model_uri=model_uri, optimizing=optimizing)
    scoring, splits = checked.scoring, checked.splits
    ensemble = members.build(cfg.ensemble) if cfg.program.name == ProgramName.ensemble else None
    judge_cfg = merged_judge_cfg(cfg)
    lm = build_lm(cfg.lm)
    judge = lm if judge_cfg is cfg.lm else build_lm(judge_cfg)
    adapter = build_adapter(cfg.lm)
    for model in (lm, judge):
        ensure_reachable(model)
    # LM responses are cached next to the project's other caches (RAGQA_CACHE_DIR), not in ~/.dspy_cache.
    dspy.configure_cache(disk_cache_dir=str(Path(cfg.paths.cache) / "dspy"))
    dspy.configure(lm=lm, adapter=adapter)
    scorer = Scorer.with_judges(scoring, judge, traced=cfg.tracking.trace_judge)
    return Session(cfg=cfg, lm=lm, judge=judge, adapter=adapter, scorer=scorer, splits=splits, ensemble=ensemble)


def build_retriever(cfg: Config) -> tuple[Retriever, dict[str, Any]]:
    started = time.monotonic()
    corpus = load_corpus(cfg.data)
    embedder = build_embedder(cfg.embedder)

    def on_spark(texts: list[str]):  # started only when the index is not cached
        return engine.embed_on_spark(spark.session(cfg), texts, packaging.embedder_spec(embedder),
                                     partitions=cfg.spark.partitions)

    built = load_or_build_index(corpus, embedder, cfg.embedder, cfg.program.max_characters,
                                Path(cfg.paths.cache) / "index",
                                brute_force_threshold=cfg.program.brute_force_threshold,
                                embed=on_spark if cfg.index.engine == Engine.spark else None)
    info = {"path": built.path, "cache_hit": built.cache_hit, "embedded": built.embedded,
            "passages": len(built.index.passages), "has_doc_ids": corpus.has_doc_ids,
            "seconds": time.monotonic() - started}
    return Retriever(built.index, embedder, k=cfg.program.k), info


def resolved_judge(scoring: Scoring) -> Scoring:
    """`scoring.judge` as a local copy of the state to load and the version runs record; one that resolves to
    nothing fails here, before any run."""
    if not scoring.judge:
        return scoring
    found = resolve_judge(scoring.judge)
    return dataclasses.replace(scoring, judge=aligned_state(found.state), judge_version=found.version)
