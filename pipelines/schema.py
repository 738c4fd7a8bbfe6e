"""The config's schema: every group typed, so a composed config is validated and converted once.

Registered in Hydra's ConfigStore as `schema` (the first entry of conf/config.yaml's defaults): a wrong
type (`lm.max_tokens=lots`) or an unknown key (`program.kk=3`) fails at composition, before anything
runs, and code reads `cfg.program.k` as an int without casting. The optimizer group stays free-form:
its keys are the optimizer class's own arguments (`_target_`), checked by the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Adapter(StrEnum):
    chat = "chat"                # DSPy's ChatAdapter
    json = "json"                # DSPy's JSONAdapter
    json_schema = "json_schema"  # JSONAdapter with decoding constrained to the output fields' schema


class EmbedderKind(StrEnum):
    local = "local"      # a sentence-transformers model shipped in a package, offline
    litellm = "litellm"  # any embedding model LiteLLM reaches (OpenAI, or an OpenAI-compatible server)


class ProgramName(StrEnum):
    cot = "cot"
    rag = "rag"
    multihop = "multihop"  # the LM writes the search queries of later hops
    ensemble = "ensemble"  # several programs (or samples of one) answer, a reducer keeps one answer


class Reducer(StrEnum):
    mbr = "mbr"        # judge-free: the answer most similar to the others (minimum Bayes risk)
    select = "select"  # an LM picks one of the answers
    merge = "merge"    # an LM writes one answer from them


class Similarity(StrEnum):
    token_f1 = "token_f1"
    rouge_l = "rouge_l"


class Metric(StrEnum):
    semantic_f1 = "semantic_f1"  # LM judge
    token_f1 = "token_f1"        # judge-free, lexical
    rouge_l = "rouge_l"          # judge-free, lexical
    arena_win_rate = "arena_win_rate"          # LM judge, pairwise against the gold answer (RAG-QA Arena)
    arena_win_tie_rate = "arena_win_tie_rate"  # the same verdicts, ties counted


class PromotionRule(StrEnum):
    significant = "significant"  # the paired interval of new - champion lies above 0
    better = "better"            # the new point score is higher


class Engine(StrEnum):
    local = "local"  # this process: DSPy's threads
    spark = "spark"  # Spark executors (the `spark/` group), gathered on the driver


class OutputFormat(StrEnum):
    parquet = "parquet"
    jsonl = "jsonl"


class Split(StrEnum):
    train = "train"
    dev = "dev"
    test = "test"


@dataclass
class ServerConfig:
    """The embedded llama.cpp server (lm=local). Also what `pipelines.server.ensure_server` takes."""

    gguf: str = MISSING          # package/file inside an installed package, or a path
    n_ctx: int = 8192
    host: str = "127.0.0.1"
    port: int | None = None      # None: a free port
    n_threads: int | None = None  # None: all cores
    startup_timeout: float = 120.0
    state_dir: str | None = None  # None: ~/.cache/ragqa-dspy/llama-server, shared by all jobs
    keep_alive: float = 0.0      # seconds the server waits, once no process uses it, before it stops
    lora: str | None = None      # a GGUF LoRA adapter served with the model (a finetuned program's LM)


@dataclass
class LMConfig:
    model: str = MISSING
    api_base: str | None = None      # None with `server`: start (or reuse) the embedded server
    api_key_env: str | None = None   # the key's environment variable; keys never live in config
    temperature: float | None = None
    max_tokens: int | None = None
    num_retries: int = 3
    timeout: float | None = None
    cache: bool = True
    adapter: Adapter = Adapter.chat
    max_field_chars: int | None = None
    context_window: int | None = None
    server: ServerConfig | None = None


@dataclass
class EmbedderConfig:
    kind: EmbedderKind = MISSING
    model: str = MISSING
    package: str | None = None       # local: the installed package holding the model files
    api_base: str | None = None
    api_key_env: str | None = None
    dimensions: int | None = None
    batch_size: int = 64


@dataclass
class DataConfig:
    name: str = MISSING
    examples: str = MISSING
    corpus: str = MISSING
    examples_url: str | None = None
    corpus_url: str | None = None
    train_size: int = MISSING
    dev_size: int = MISSING
    test_size: int = MISSING
    shuffle_seed: int = 0            # the split's shuffle: same seed, same train/dev/test


@dataclass
class ProgramConfig:
    """The program: `cot`, `rag` or `multihop` with their retrieval settings, or `ensemble` (see `ensemble`)."""

    name: ProgramName = MISSING
    signature: str | None = None     # cot
    k: int = 5                       # rag, multihop: passages per search
    hops: int = 2                    # multihop: searches per question (the first with the question itself)
    max_characters: int | None = None
    brute_force_threshold: int = 20000
    reserve_tokens: int = 1024


@dataclass
class EnsembleConfig:
    """`program=ensemble`: who answers (exactly one of `members`, `candidates_of`, `samples_of`) and how one
    answer is kept."""

    members: list[str] = field(default_factory=list)  # model URIs: [models:/NAME/3, models:/NAME/5]
    candidates_of: str | None = None  # an optimize run's id: its best `size` candidate programs
    samples_of: str | None = None     # a model URI: `size` samples of that one program
    size: int = 3                     # candidates_of, samples_of: how many members
    temperature: float = 0.7          # samples_of: sampling temperature (each sample has its own rollout id)
    reducer: Reducer = Reducer.mbr
    similarity: Similarity = Similarity.token_f1  # mbr: how two answers are compared


@dataclass
class TrackingConfig:
    uri: str | None = None           # sqlite:///..., or http(s)://... with tracking=server
    server: bool = False             # tracking=server: an MLflow server, checked before any work
    experiment: str = MISSING
    registered_model: str | None = None
    log_traces: bool = True
    trace_judge: bool = False
    log_compiles: bool = False
    dspy_flavor: bool = True         # also MLflow's `dspy` flavor (cloudpickle) beside the pickle-free pyfunc
    artifact_location: str | None = None


@dataclass
class ArenaConfig:
    """The arena judge (`arena_win_rate`, `arena_win_tie_rate`): pipelines/evaluation/arena.py."""

    examples: str | None = None      # few-shot: a JSONL of your labelled pairs (question, answer_1, answer_2, verdict)
    both_orders: bool = False        # judge each question in both orders; adds arena_order_flip_rate


@dataclass
class ScoringConfig:
    metrics: list[Metric] = field(default_factory=lambda: [Metric.semantic_f1])
    primary: Metric = Metric.semantic_f1
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0
    promotion: PromotionRule = PromotionRule.significant
    miss_threshold: float = 50.0     # a primary score below it is a poor answer (failure modes)
    judge: str | None = None         # an aligned SemanticF1 judge: a registered judge's NAME[@ALIAS|/VERSION], or a URI
    arena: ArenaConfig = field(default_factory=ArenaConfig)


@dataclass
class IndexConfig:
    engine: Engine = Engine.local  # where the corpus is embedded; the index is built on the driver either way


@dataclass
class SparkConfig:
    """A Spark session (pipelines/scale/spark.py): `conf` is the tree of Spark properties below `spark.`."""

    master: str = "local[*]"
    log_level: str = "WARN"
    forward_env: bool = True         # on a cluster, send the job's key variables as spark.executorEnv.* (redacted)
    partitions: int | None = None    # tasks per batch: None = Spark's default parallelism
    conf: dict[str, Any] = field(default_factory=dict)


@dataclass
class PathsConfig:
    """The checkout, the caches (data, index, DSPy, Java, the code shipped to Spark) and Hydra's run dirs."""

    root: str = MISSING
    cache: str = MISSING
    outputs: str = MISSING


@dataclass
class Config:
    """The whole config, every entry point's: one node per config group, then the top-level keys."""

    lm: LMConfig = MISSING
    embedder: EmbedderConfig = MISSING
    data: DataConfig = MISSING
    program: ProgramConfig = MISSING
    optimizer: dict[str, Any] = MISSING
    tracking: TrackingConfig = MISSING
    scoring: ScoringConfig = MISSING
    spark: SparkConfig = MISSING
    paths: PathsConfig = MISSING
    index: IndexConfig = field(default_factory=IndexConfig)
    engine: Engine = Engine.local    # where evaluations run
    num_threads: int | None = 2      # None (predict only): the logged program's own default
    split: Split = Split.dev
    model_uri: str | None = None
    judge: dict[str, Any] = field(default_factory=dict)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    gepa_optimizer: str = "gepa_quick"
    finetune_optimizer: str = "finetune_quick"
    run_id: str | None = None        # review, assess: the run whose traces go to a review queue / are scored
    scorers: list[str] = field(default_factory=list)  # assess: scorer names (pipelines/tracking/scorers.py)
    guidelines: list[str] = field(default_factory=list)  # assess: the rules the `guidelines` judge checks
    since: str | None = None         # assess: traces from this ISO date/time on
    until: str | None = None         # assess: traces up to this ISO date/time
    labels: str | None = None        # judge: a CSV/JSONL of trace_id,label[,rationale][,reviewer]
    label_name: str = "correct"      # judge: the name people's labels carry on the traces
    judge_threshold: float = 0.5     # judge: a 0-1 judge score at or above this is a yes
    align: bool = False              # judge: also align the judge to the labels (pipelines/judging/align.py)
    align_held_out: float = 0.4      # judge: the share of labelled traces kept out of alignment, to measure it
    judge_name: str | None = None    # judge: the registered scorer and prompt an aligned judge becomes a version of
    mlflow_aligner: str | None = None  # judge: also MLflow's Judge.align (simba | memalign), measured beside
    mlflow_embedding_model: str = "openai:/text-embedding-3-small"  # judge: MemAlign's embedder
    steps: list[str] | None = None   # main only
    matched_rag: bool = True         # main: beside multihop, rag with as many passages (hops x k)
    input: str | None = None         # predict: a JSONL, CSV or Parquet file (or directory) with a `question` column
    output: str | None = None        # predict: the directory the predictions go to
    output_format: OutputFormat = OutputFormat.parquet
    overwrite: bool = False          # predict: replace an existing output directory


def register() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
