"""What a LoRA finetune of the embedded model costs on this machine (BENCHMARKS.md, 9): training seconds per
1,000 tokens and peak memory, the adapter's size, and generation speed through llama.cpp with and without it.

Transcripts are the project's own prompt format at two lengths (a CoT prompt, ~300 tokens; a RAG prompt
with passages, ~1,000), trained with the `finetune_quick` settings (r=8 on v_proj and o_proj) in a process of
its own per arm, so peak memory is the arm's. Generation: the same 5 questions through `llama_cpp.Llama`
with the base GGUF alone and with the adapter, 96 tokens each, greedy.

    .venv/bin/python bench/finetune.py                 # ~5-10 min on 2 cores
    .venv/bin/python bench/finetune.py --examples 8 --epochs 1
"""

# ruff: noqa: I001, E402 (the project is importable once _common has put it on the path)
from __future__ import annotations

import json
import resource
import time

import _common as common  # puts the project on the path first

from pipelines.config import compose
from pipelines.data import load_corpus, load_splits
from pipelines.finetune.train import LoRASettings, train_lora
from pipelines.lm import build_adapter
from pipelines.server import resolve_gguf


def transcripts(kind: str, n: int) -> list[dict]:
    """`n` chat transcripts in the embedded stack's prompt format: questions of the sample, gold answers."""
    import dspy

    cfg = compose("rag")
    adapter = build_adapter(cfg.lm)
    examples = (load_splits(cfg.data).train + load_splits(cfg.data).test)[:n]
    passages = [text[:500] for text in load_corpus(cfg.data).texts[:5]]
    signature = dspy.Signature("context, question -> reasoning, response" if kind == "rag" else
                               "question -> reasoning, response")
    return [adapter.format_finetune_data(signature, [], {"question": e.question, "context": passages},
                                         {"reasoning": "From what I know.", "response": e.response[:400]})
            for e in examples]


def train_arm(args) -> dict:
    base = resolve_gguf(compose("config").lm.server.gguf)
    chats = transcripts(args.kind, args.examples)
    settings = LoRASettings(epochs=args.epochs, learning_rate=1e-3, seed=0)
    out = common.scratch("finetune") / "adapter.gguf"
    report = train_lora(base, chats, settings, out)
    trained = report.tokens * report.epochs
    return {"kind": args.kind, "examples": report.examples, "tokens_per_epoch": report.tokens, "epochs": report.epochs,
            "load_s": report.load_seconds, "train_s": report.train_seconds,
            "s_per_1k_tokens": 1e3 * report.train_seconds / trained, "peak_rss_mib": report.peak_memory_mb,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "adapter_bytes": out.stat().st_size, "adapter": str(out), "final_loss": report.losses[-1]}


def generation(adapter: str | None, tokens: int = 96) -> float:
    """Generated tokens per second, greedy, over 5 questions."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(resolve_gguf(compose("config").lm.server.gguf)), lora_path=adapter, n_ctx=2048,
                verbose=False)
    questions = [e.question for e in load_splits(compose("config").data).dev[:5]]
    produced, started = 0, time.perf_counter()
    for q in questions:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": q}], max_tokens=tokens, temperature=0)
        produced += out["usage"]["completion_tokens"]
    return produced / (time.perf_counter() - started)


def main(args) -> None:
    arms = [common.spawn_worker(args, kind=kind) for kind in ("cot", "rag")]
    speed = {"base": generation(None), "with adapter": generation(arms[0]["adapter"])}
    print(common.table(["transcripts", "examples", "tokens/epoch", "epochs", "load s", "train s", "s / 1k tokens",
                        "peak RSS MiB", "adapter bytes", "final loss"],
                       [[a["kind"], a["examples"], a["tokens_per_epoch"], a["epochs"], a["load_s"], a["train_s"],
                         a["s_per_1k_tokens"], a["max_rss_mib"], a["adapter_bytes"], a["final_loss"]] for a in arms]))
    print(common.table(["llama.cpp", "generated tokens/s"], [[k, v] for k, v in speed.items()]))
    print(json.dumps({"arms": arms, "generation": speed, "machine": common.machine()}, indent=2))


if __name__ == "__main__":
    common.run_script(common.parser(__doc__, examples=16, epochs=2, kind="cot"), main, train_arm)
