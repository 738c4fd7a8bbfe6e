"""A program as plain files and back, so a logged program loads and serves without unpickling anything.

One directory holds:

  spec.json   what to build: the program's kind and constructor settings, the LM's settings (never
              its key: keys come from the environment at call time), the adapter, the embedder
  state.json  DSPy's own JSON state (`program.save`): each predictor's instructions and demos
  index/      RAG and multihop: the retriever's index as `write_index` lays it out (embeddings, passages,
              doc ids), so a loaded program retrieves without re-embedding the corpus
  members/    an ensemble: one such directory per distinct member program (samples of one program share
              one), their indexes stored once each under indexes/<index key>/
  adapter/    a finetuned program: the LoRA adapter its LM's llama.cpp server loads (GGUF)

`ProgramModel` is the pyfunc model that `pipelines/model_code.py` hands to MLflow ("models from code").
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dspy
import mlflow
import pandas as pd
from omegaconf import OmegaConf

from pipelines.config import NO_KEY, is_secret
from pipelines.errors import ConfigError
from pipelines.evaluation.metrics import NO_PREDICTION
from pipelines.lm import ProjectLM, SchemaJSONAdapter, build_adapter
from pipelines.programs import RAG, Ensemble, Member, MultiHop, inputs, outputs
from pipelines.retrieval.embedders import HostedEmbedder, LocalEmbedder
from pipelines.retrieval.index import read_index, write_index
from pipelines.retrieval.retriever import Retriever

FORMAT = 1  # bump when the files change meaning; a model in another format then fails to load in one line
SPEC, STATE, INDEX, MEMBERS, INDEXES, ADAPTER = "spec.json", "state.json", "index", "members", "indexes", "adapter"


@dataclass(frozen=True, kw_only=True)
class Packaged:
    program: dspy.Module
    lm: dspy.LM
    adapter: dspy.Adapter


def save(program: dspy.Module, lm: dspy.LM, adapter: dspy.Adapter, path: Path, *, indexes: Path | None = None) -> None:
    """Write `program`, answering through `lm` and `adapter`, into the new directory `path`. A retriever's
    index goes to `path/index`, or, given `indexes`, once per index key below it (an ensemble's members)."""
    path.mkdir(parents=True)
    spec = {"format": FORMAT, "program": program_spec(program, path, indexes), "lm": lm_spec(lm, path),
            "adapter": adapter_spec(adapter)}
    # DSPy's state would record a predictor's own LM as a plain dspy.LM: the program's one LM is the spec's.
    lms = [p.lm for p in program.predictors()]
    try:
        for predictor in program.predictors():
            predictor.lm = None
        program.save(str(path / STATE))
    finally:
        for predictor, predictor_lm in zip(program.predictors(), lms, strict=True):
            predictor.lm = predictor_lm
    (path / SPEC).write_text(json.dumps(spec, indent=2))


def load(path: Path) -> Packaged:
    """Rebuild what `save` wrote: the program from its spec, then its instructions and demos from DSPy's JSON."""
    spec = json.loads((path / SPEC).read_text())
    if spec.get("format") != FORMAT:
        raise ConfigError(f"{path} holds a program in format {spec.get('format')}, this project reads format "
                          f"{FORMAT}; re-run the step that logged it")
    program = build(spec["program"], path)
    program.load(str(path / STATE))
    return Packaged(program=program, lm=restore_lm(spec["lm"], path),
                    adapter=build_adapter(OmegaConf.create(spec["adapter"])))


def program_spec(program: dspy.Module, path: Path, indexes: Path | None = None) -> dict[str, Any]:
    """The program's kind and settings; a retriever's index and an ensemble's members are written below `path`."""
    if isinstance(program, RAG):
        retriever = program.retriever
        if not isinstance(retriever, Retriever):
            raise ConfigError(f"cannot log a {type(program).__name__} over a {type(retriever).__name__}: only the "
                              "project's Retriever travels as files")
        index = path / INDEX if indexes is None else indexes / retriever.index.meta["key"]
        if not index.exists():
            write_index(retriever.index, index)
        spec = {"kind": "rag", "k": program.k, "context_window": program.context_window,
                "max_tokens": program.max_tokens, "reserve_tokens": program.reserve_tokens,
                "retriever": {"k": retriever.k, "brute_force_threshold": retriever.index.brute_force_threshold,
                              "index_embedder": retriever.index.meta["embedder"],
                              "index": os.path.relpath(index, path),
                              "embedder": embedder_spec(retriever.embedder)}}
        if isinstance(program, MultiHop):
            spec.update(kind="multihop", hops=program.hops,
                        query_inputs=list(program.write_query.signature.input_fields))
        return spec
    if isinstance(program, Ensemble):
        return ensemble_spec(program, path, indexes or path / INDEXES)
    if type(program) is dspy.ChainOfThought:
        signature = program.predict.signature
        fields = {name: f for name, f in signature.output_fields.items() if name != "reasoning"}
        fields = {**signature.input_fields, **fields}
        if any(f.annotation is not str for f in fields.values()):
            raise ConfigError(f"cannot log a ChainOfThought with typed fields ({signature.signature}): the spec "
                              "keeps field names only")
        outputs_ = [name for name in signature.output_fields if name != "reasoning"]
        return {"kind": "cot", "signature": f"{', '.join(signature.input_fields)} -> {', '.join(outputs_)}"}
    raise ConfigError(f"cannot log a {type(program).__name__}: only the project's cot, rag, multihop and ensemble "
                      "programs are logged as files")


def ensemble_spec(ensemble: Ensemble, path: Path, indexes: Path) -> dict[str, Any]:
    """Each distinct member program in its own directory (its LM and adapter with it); members that are
    samples of one program point at the same directory, with their rollout id and temperature."""
    directories: dict[int, str] = {}
    members = []
    for member in ensemble.members:
        if id(member.program) not in directories:
            directory = f"{MEMBERS}/{len(directories)}"
            save(member.program, member.answer_lm, member.adapter, path / directory, indexes=indexes)
            directories[id(member.program)] = directory
        members.append({"program": directories[id(member.program)], "label": member.label,
                        "rollout": member.rollout, "temperature": member.temperature})
    return {"kind": "ensemble", "reducer": str(ensemble.reducer), "similarity": ensemble.similarity,
            "members": members}


def build(spec: dict[str, Any], path: Path) -> dspy.Module:
    if spec["kind"] == "cot":
        return dspy.ChainOfThought(spec["signature"])
    if spec["kind"] == "ensemble":
        packaged = {d: load(path / d) for d in dict.fromkeys(m["program"] for m in spec["members"])}
        members = [Member(packaged[m["program"]].program, lm=packaged[m["program"]].lm,
                          adapter=packaged[m["program"]].adapter, label=m["label"], rollout=m["rollout"],
                          temperature=m["temperature"]) for m in spec["members"]]
        return Ensemble(members, reducer=spec["reducer"], similarity=spec["similarity"])
    retriever_spec = spec["retriever"]
    index = read_index(path / retriever_spec.get("index", INDEX), retriever_spec["index_embedder"],
                       retriever_spec["brute_force_threshold"])
    retriever = Retriever(index, restore_embedder(retriever_spec["embedder"]), k=retriever_spec["k"])
    settings = {"k": spec["k"], "context_window": spec["context_window"], "max_tokens": spec["max_tokens"],
                "reserve_tokens": spec["reserve_tokens"]}
    if spec["kind"] == "multihop":
        program = MultiHop(retriever, hops=spec["hops"], **settings)
        # DSPy's state matches a predictor's fields by position: a writer saved with other inputs would load
        # with its field descriptions shifted.
        reads = list(program.write_query.signature.input_fields)
        logged = spec.get("query_inputs", ["question", "context"])  # unrecorded before it read past queries
        if logged != reads:
            raise ConfigError(f"{path} holds a multihop program whose query writer reads {', '.join(logged)}; "
                              f"this project's reads {', '.join(reads)}: re-run the step that logged it")
        return program
    return RAG(retriever, **settings)


def _public(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Settings without anything that looks like a key."""
    return {key: value for key, value in kwargs.items() if not is_secret(key)}


def lm_spec(lm: dspy.LM, path: Path | None = None) -> dict[str, Any]:
    """The LM's settings; a finetuned LM's LoRA adapter is copied to `path/adapter/` and named relative to it."""
    # The placeholder that keyless servers get is recorded as a flag; a real key is never written.
    server = getattr(lm, "server", None)
    if server and server.get("lora"):
        if path is None:
            raise ConfigError(f"{lm.model}: an LM with a LoRA adapter is written with its program's files")
        adapter = Path(server["lora"])
        (path / ADAPTER).mkdir()
        shutil.copyfile(adapter, path / ADAPTER / adapter.name)
        server = {**server, "lora": f"{ADAPTER}/{adapter.name}"}
    # An embedded server is found again by its settings, not by the port this process saw it on.
    kwargs = {k: v for k, v in _public(lm.kwargs).items() if not (server and k == "api_base")}
    return {"model": lm.model, "server": server, "cache": lm.cache, "num_retries": lm.num_retries,
            "kwargs": kwargs, "keyless": lm.kwargs.get("api_key") == NO_KEY}


def restore_lm(spec: dict[str, Any], path: Path | None = None) -> ProjectLM:
    key = {"api_key": NO_KEY} if spec["keyless"] else {}
    server = spec["server"]
    if server and server.get("lora"):
        server = {**server, "lora": str((path / server["lora"]).resolve())}
    return ProjectLM(spec["model"], server=server, cache=spec["cache"], num_retries=spec["num_retries"],
                     **spec["kwargs"], **key)


def adapter_spec(adapter: dspy.Adapter) -> dict[str, Any]:
    """In the `lm/` config's terms, so `build_adapter` rebuilds it."""
    if isinstance(adapter, SchemaJSONAdapter):
        return {"adapter": "json_schema", "max_field_chars": adapter.max_field_chars}
    if isinstance(adapter, dspy.JSONAdapter):
        return {"adapter": "json"}
    if type(adapter) is dspy.ChatAdapter:
        return {"adapter": "chat"}
    raise ConfigError(f"cannot log a program answering through a {type(adapter).__name__}")


def embedder_spec(embedder) -> dict[str, Any]:
    if isinstance(embedder, HostedEmbedder):
        return {"kind": "litellm", "model": embedder.model, "api_key_env": embedder.api_key_env,
                "batch_size": embedder.batch_size, "caching": embedder.caching,
                "kwargs": _public(embedder.default_kwargs)}
    if isinstance(embedder, dspy.Embedder) and isinstance(embedder.model, LocalEmbedder):
        local = embedder.model
        return {"kind": "local", "package": local.package, "device": local.device, "batch_size": local.batch_size}
    raise ConfigError(f"cannot log a retriever embedding with a {type(embedder).__name__}")


def restore_embedder(spec: dict[str, Any]) -> dspy.Embedder:
    if spec["kind"] == "litellm":
        return HostedEmbedder(spec["model"], api_key_env=spec["api_key_env"], batch_size=spec["batch_size"],
                              caching=spec["caching"], **spec["kwargs"])
    local = LocalEmbedder(package=spec["package"], device=spec["device"], batch_size=spec["batch_size"])
    return dspy.Embedder(local, batch_size=spec["batch_size"], caching=False)


ERROR = "error"          # why a row has no answer ("" when it has one)
TRACE_ID = "trace_id"    # the row's trace ("" when untraced): where `mlflow.log_feedback` attaches feedback
EMPTY = {"context": [], "doc_ids": [], "queries": [], "candidates": []}  # a list output of a row with no answer


class Tracing(Protocol):
    """How a loaded program traces (`pipelines.tracking.serving`, handed in by `pipelines/model_code.py`)."""

    def start_tracing(self) -> bool:
        """Set tracing up for this process; False where it is off."""

    def flush_on_executor(self) -> None:
        """Write a batch's traces before a Spark executor's task ends."""


class ProgramModel(mlflow.pyfunc.PythonModel):
    """A logged program as pyfunc: rebuilt from its files (the `program` artifact), it answers a batch.

    N rows with a `question` column (and the program's other input fields, if any) in, N rows out in the
    same order: `reasoning`, `response`, what else the program answers with (`pipelines.programs.outputs`:
    a RAG's `context` and `doc_ids`, ...), `error` and `trace_id`.
    Rows are answered concurrently (`num_threads`, an inference param whose default is the logged run's); a
    row whose program fails gets its error and empty outputs, and the other rows still answer.
    Each row answers inside the caller's trace when there is one (`mlflow.genai.evaluate`, a function under
    `@mlflow.trace`), else as a trace of its own, linked to the logged model, through the `tracing` it is
    given (`pipelines.tracking.serving`; `RAGQA_TRACING=false` turns it off).
    """

    def __init__(self, *, tracing: Tracing | None = None):
        self.tracing = tracing  # None: never traced

    def load_context(self, context) -> None:
        packaged = load(Path(context.artifacts["program"]))
        self.program, self.lm, self.adapter = packaged.program, packaged.lm, packaged.adapter
        self.inputs, self.outputs = inputs(self.program), outputs(self.program)
        self.traced = self.tracing is not None and self.tracing.start_tracing()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        records = model_input[list(self.inputs)].to_dict(orient="records")
        threads = max(1, min(int((params or {}).get("num_threads") or 1), len(records) or 1))
        # Each row in a copy of the caller's context: its trace (the parent span), MLflow's prediction
        # context (the model id traces link to) and DSPy's settings follow the row into its thread.
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(contextvars.copy_context().run, self._answer, record) for record in records]
            rows = [future.result() for future in futures]
        if self.traced:
            self.tracing.flush_on_executor()
        return pd.DataFrame(rows, columns=[*self.outputs, ERROR, TRACE_ID])

    def _answer(self, record: dict[str, Any]) -> dict[str, Any]:
        empty = {name: EMPTY.get(name, "") for name in self.outputs}
        blank = [name for name, value in record.items() if not isinstance(value, str) or not value.strip()]
        if blank:
            return {**empty, ERROR: f"empty {' and '.join(blank)}", TRACE_ID: ""}
        parent = mlflow.get_current_active_span() if self.traced else None
        last = mlflow.get_last_active_trace_id(thread_local=True)
        try:
            # A context per call, not global settings: rows run on worker threads (and servers' threads).
            with dspy.context(lm=self.lm, adapter=self.adapter):
                prediction = self.program(**record)
            error = ""
        except Exception as e:
            prediction, error = dspy.Prediction(), f"{type(e).__name__}: {e}"[:2000]
        # The caller's trace, or the one this call made (a failed call's trace records its error too).
        finished = mlflow.get_last_active_trace_id(thread_local=True)
        trace_id = parent.trace_id if parent else (finished if self.traced and finished != last else None)
        answer = {name: prediction.get(name, empty[name]) for name in empty} if not error else empty
        if not error and not answer["response"]:
            error = NO_PREDICTION
        return {**answer, ERROR: error, TRACE_ID: trace_id or ""}
