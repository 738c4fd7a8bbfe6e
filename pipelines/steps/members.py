"""Who answers in an ensemble (`program=ensemble`), from the `ensemble` config node: listed programs
(`members`), an optimize run's best candidates (`candidates_of`), or samples of one program (`samples_of`).

`check` (which `build` runs first) needs no LM and opens no run: one source, at least two members (three
for `mbr`, which cannot choose between two), every URI a program of this project, every member asking for
the same inputs. `build` then loads them, each with the LM and adapter it was logged with, still calling
no LM; an optimize run's candidates share its program's files (one index, one LM) and differ only in their
instructions and demos.
"""

from __future__ import annotations

import logging

from pipelines.errors import ConfigError
from pipelines.programs import Ensemble, Member
from pipelines.schema import EnsembleConfig, Reducer
from pipelines.tracking.candidates import candidate_states
from pipelines.tracking.models import check_program_model, load_packaged, program_model_of_run

log = logging.getLogger(__name__)

SOURCES = ("members", "candidates_of", "samples_of")


def source(cfg: EnsembleConfig) -> str:
    """The one configured source of members, by name."""
    given = [name for name in SOURCES if cfg.get(name)]
    if len(given) != 1:
        raise ConfigError(f"program=ensemble needs exactly one of ensemble.members=[URI,...], "
                          f"ensemble.candidates_of=RUN_ID, ensemble.samples_of=URI; got {given or 'none'}")
    return given[0]


def check_size(cfg: EnsembleConfig, kind: str) -> None:
    """How many members `kind` (one of SOURCES) gives, and whether the reducer can choose among them;
    no model is looked up (main checks its ensemble step so before the optimize step it is made of runs)."""
    count = len(cfg.members) if kind == "members" else cfg.size
    what = f"ensemble.members lists {count}" if kind == "members" else f"ensemble.size={cfg.size}"
    if count < 2:
        raise ConfigError(f"an ensemble needs at least 2 members; {what}")
    if count == 2 and Reducer(cfg.reducer) is Reducer.mbr:
        # Each answer's mean similarity is its similarity to the other one: the same number for both.
        raise ConfigError(f"ensemble.reducer=mbr cannot choose between 2 members ({what}): their similarities "
                          "to each other tie, so it would always keep member 1; use 3 or more members, or "
                          "ensemble.reducer=select (an LM picks) or ensemble.reducer=merge (an LM writes one)")
    if kind == "samples_of" and cfg.temperature <= 0:
        raise ConfigError(f"ensemble.samples_of needs ensemble.temperature > 0 (got {cfg.temperature}): at 0 every "
                          "sample is the same answer")


def check(cfg: EnsembleConfig) -> None:
    """Everything about the members that can be known without loading them."""
    kind = source(cfg)
    check_size(cfg, kind)
    uris = {"members": list(cfg.members), "samples_of": [cfg.samples_of],
            "candidates_of": [program_model_of_run(cfg.candidates_of)] if kind == "candidates_of" else []}
    inputs = {uri: tuple(check_program_model(uri).signature.inputs.input_names()) for uri in uris[kind]}
    if len(set(inputs.values())) > 1:
        listed = "; ".join(f"{uri}: {', '.join(names)}" for uri, names in inputs.items())
        raise ConfigError(f"ensemble members ask for different inputs ({listed}); every member must answer the "
                          "same input fields")


def build(cfg: EnsembleConfig) -> Ensemble:
    """The ensemble `cfg` describes, its members loaded (no LM is called)."""
    check(cfg)
    kind = source(cfg)
    if kind == "members":
        members = [_member(uri, label=uri) for uri in cfg.members]
    elif kind == "samples_of":
        packaged = load_packaged(cfg.samples_of)
        members = [Member(packaged.program, lm=packaged.lm, adapter=packaged.adapter,
                          label=f"{cfg.samples_of} sample {i + 1}", rollout=i + 1, temperature=cfg.temperature)
                   for i in range(cfg.size)]
    else:
        members = _candidates(cfg.candidates_of, cfg.size)
        if len(members) < cfg.size:
            log.warning("run %s kept %d distinct candidate programs, fewer than ensemble.size=%d: the ensemble has "
                        "%d members%s", cfg.candidates_of, len(members), cfg.size, len(members),
                        "; with 2, mbr keeps candidate 1's answers (their similarities tie)"
                        if len(members) == 2 and Reducer(cfg.reducer) is Reducer.mbr else "")
    return Ensemble(members, reducer=cfg.reducer, similarity=str(cfg.similarity))


def _member(uri: str, *, label: str) -> Member:
    packaged = load_packaged(uri)
    return Member(packaged.program, lm=packaged.lm, adapter=packaged.adapter, label=label)


def _candidates(run_id: str, size: int) -> list[Member]:
    """The run's `size` best candidates: its logged program with each candidate's instructions and demos."""
    base = load_packaged(program_model_of_run(run_id))
    states = candidate_states(run_id, size)
    if len(states) < 2:
        raise ConfigError(f"run {run_id} kept {len(states)} candidate program(s); an ensemble needs at least 2")
    members = []
    for row, state in states:
        program = base.program.deepcopy()  # the retriever is shared, not copied
        program.load(str(state))
        members.append(Member(program, lm=base.lm, adapter=base.adapter,
                              label=f"candidate {row['rank']} of run {run_id} (score {row['score']:.1f})"))
    return members
