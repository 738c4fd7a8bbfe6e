"""The programs, one module per family: `ChainOfThought` (the baseline, DSPy's own), RAG, multi-hop RAG
whose LM writes the search queries, and ensembles of programs with a reducer for long answers."""

from __future__ import annotations

import dspy

from pipelines.errors import ConfigError
from pipelines.programs.ensemble import Ensemble, Member, MembersFailed, Reducer, mbr_pick
from pipelines.programs.multihop import MultiHop
from pipelines.programs.rag import RAG, context_char_budget, fit_passages
from pipelines.schema import LMConfig, ProgramConfig, ProgramName

__all__ = ["RAG", "Ensemble", "Member", "MembersFailed", "MultiHop", "Reducer", "build_program", "program_lm",
           "context_char_budget", "doc_id_type", "fit_passages", "inputs", "mbr_pick", "outputs", "retrieves"]

BASE_OUTPUTS = ("reasoning", "response")
ALL_OUTPUTS = (*BASE_OUTPUTS, "context", "doc_ids", "queries", "candidates")  # what any program may answer with


def outputs(program: dspy.Module) -> tuple[str, ...]:
    """The fields a program's answer carries, beside `reasoning` and `response`, in the order a served
    program returns them."""
    if isinstance(program, MultiHop):
        return (*BASE_OUTPUTS, "context", "doc_ids", "queries")
    if isinstance(program, RAG):
        return (*BASE_OUTPUTS, "context", "doc_ids")
    if isinstance(program, Ensemble):
        return (*BASE_OUTPUTS, *(("context", "doc_ids") if program.retrieves else ()), "candidates")
    return BASE_OUTPUTS


def inputs(program: dspy.Module) -> tuple[str, ...]:
    """The input fields a program answers from: `question` for RAG and multihop, a CoT's signature's inputs,
    an ensemble's members' (which `pipelines.steps.members` checks are the same)."""
    if isinstance(program, Ensemble):
        return inputs(program.members[0].program)
    if isinstance(program, RAG):
        return ("question",)
    if isinstance(program, dspy.ChainOfThought):
        return tuple(program.predict.signature.input_fields)
    return ("question",)


def retrieves(program: dspy.Module) -> bool:
    return "doc_ids" in outputs(program)


def doc_id_type(program: dspy.Module) -> str:
    """`long` when every document the program (or any ensemble member) can retrieve has an int id, else `string`."""
    parts = [m.program for m in program.members] if isinstance(program, Ensemble) else [program]
    indexes = [getattr(p.retriever, "index", None) for p in parts if isinstance(p, RAG)]
    ids = [d for index in indexes if index is not None for d in index.doc_ids]
    return "long" if all(isinstance(d, int) for d in ids) else "string"


def program_lm(program: dspy.Module) -> dspy.LM | None:
    """The LM the program's predictors carry themselves (a finetuned program's), or None where they answer
    through DSPy's configured LM. One program answers through one LM."""
    lms = {id(p.lm): p.lm for p in program.predictors() if p.lm is not None}
    if len(lms) > 1:
        raise ConfigError(f"the program's predictors answer through {len(lms)} different LMs; a logged program "
                          "answers through one")
    if lms and any(p.lm is None for p in program.predictors()):
        raise ConfigError("some of the program's predictors carry an LM and others do not")
    return next(iter(lms.values()), None)


def check_program(program_cfg: ProgramConfig) -> None:
    """What the schema's types cannot say: the numbers make sense."""
    if program_cfg.name in (ProgramName.rag, ProgramName.multihop) and program_cfg.k < 1:
        raise ConfigError(f"program.k={program_cfg.k}: a retrieving program needs at least 1 passage per search")
    if program_cfg.name == ProgramName.multihop and program_cfg.hops < 1:
        raise ConfigError(f"program.hops={program_cfg.hops}: multihop needs at least 1 hop (1 is rag)")


def build_program(program_cfg: ProgramConfig, lm_cfg: LMConfig, retriever=None) -> dspy.Module:
    """`cot`, `rag` or `multihop` from config (an ensemble is built from its members: `pipelines.steps`)."""
    check_program(program_cfg)
    if program_cfg.name == ProgramName.cot:
        return dspy.ChainOfThought(program_cfg.signature)
    if program_cfg.name == ProgramName.ensemble:
        raise ConfigError("an ensemble is built from its members, not from program config")
    if retriever is None:
        raise ConfigError(f"the {program_cfg.name} program needs a retriever")
    settings = {"k": program_cfg.k, "context_window": lm_cfg.context_window, "max_tokens": lm_cfg.max_tokens,
                "reserve_tokens": program_cfg.reserve_tokens}
    if program_cfg.name == ProgramName.multihop:
        return MultiHop(retriever, hops=program_cfg.hops, **settings)
    return RAG(retriever, **settings)
