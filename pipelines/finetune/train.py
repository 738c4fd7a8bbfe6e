"""LoRA on a causal LM's weights from chat transcripts, with transformers + peft, on CPU or a GPU.

The base is the embedded model's own GGUF (transformers dequantizes it into a float32 torch model) or any
Hugging Face causal LM directory. Only the assistant's turn is learned: the prompt's tokens carry no loss.
Training is seeded: the same data, settings and seed give the same adapter bytes on CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from tqdm.auto import tqdm

from pipelines.errors import ConfigError
from pipelines.finetune import gguf_lora

log = logging.getLogger(__name__)


class FinetuneError(ConfigError):
    """Finetuning cannot start or could not finish; the message says what to fix (one line, as bad config)."""


@dataclass(frozen=True, kw_only=True)
class LoRASettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("v_proj", "o_proj")
    epochs: int = 2
    learning_rate: float = 1e-3
    grad_accumulation: int = 1       # examples per optimizer step
    max_seq_length: int = 2048       # longer transcripts are skipped (counted), never cut mid-answer
    seed: int = 0
    device: str = "auto"             # auto = a GPU where torch sees one, else the CPU

    def __post_init__(self):
        unknown = sorted(set(self.target_modules) - set(gguf_lora.TENSORS))
        if unknown:
            raise FinetuneError(f"optimizer.finetune.target_modules: {unknown} cannot be served by llama.cpp as an "
                                f"adapter; choose from {sorted(gguf_lora.TENSORS)}")
        if self.r < 1 or self.epochs < 1 or self.grad_accumulation < 1 or self.learning_rate <= 0:
            raise FinetuneError("optimizer.finetune: r, epochs and grad_accumulation must be >= 1 and "
                                "learning_rate > 0")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> LoRASettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known - {"base_model", "min_score"})
        if unknown:
            raise FinetuneError(f"optimizer.finetune: unknown keys {unknown}; known: {sorted(known)}")
        values = {k: v for k, v in kwargs.items() if k in known}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass
class TrainReport:
    """What a finetune did, for the run's metrics."""

    base: str
    examples: int                   # transcripts trained on
    skipped: int                    # longer than max_seq_length
    tokens: int                     # tokens read per epoch (prompt and answer)
    target_tokens: int              # answer tokens learned per epoch
    epochs: int
    steps: int
    trainable_parameters: int
    load_seconds: float             # the base model into torch
    train_seconds: float            # the optimizer steps
    peak_memory_mb: float
    losses: list[float] = field(default_factory=list)


def load_base(base: Path, device: str):
    """(model, tokenizer) from a GGUF file or a Hugging Face model directory, in float32 on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"gguf_file": base.name} if base.suffix == ".gguf" else {}
    source = str(base.parent if where else base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **where)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **where)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FinetuneError(f"cannot load the base model {base} into torch: {' '.join(str(e).split())[:300]}") from None
    return model.to(device), tokenizer


def encode(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a transcript through the model's chat template, and labels that learn the last
    (assistant) turn only (-100 elsewhere)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise FinetuneError("the chat template does not extend the prompt with the answer; cannot mask the prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def train_lora(base: Path, chats: list[dict[str, Any]], settings: LoRASettings, adapter: Path,
               on_step: Callable[[int, float], None] | None = None,
               stopping: Callable[[], bool] = lambda: False) -> TrainReport:
    """Train a LoRA on `chats` (`{"messages": [...]}` each, the last message the assistant's) and write it
    as a GGUF adapter at `adapter`. `on_step(step, loss)` sees every optimizer step; `stopping()` ends the
    training between steps (nothing is written then)."""
    import torch
    from peft import LoraConfig, get_peft_model

    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    process = psutil.Process()
    peak = process.memory_info().rss
    loading = time.monotonic()
    model, tokenizer = load_base(base, device)
    load_seconds = time.monotonic() - loading
    arch = gguf_lora.architecture(base) if base.suffix == ".gguf" else model.config.model_type
    encoded = [encode(tokenizer, chat["messages"]) for chat in chats]
    kept = [e for e in encoded if len(e[0]) <= settings.max_seq_length]
    if not kept:
        raise FinetuneError(f"all {len(encoded)} transcripts are longer than optimizer.finetune.max_seq_length="
                            f"{settings.max_seq_length} tokens; raise it")
    torch.manual_seed(settings.seed)
    model = get_peft_model(model, LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                             target_modules=list(settings.target_modules), bias="none",
                                             task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    order = random.Random(settings.seed)
    steps_per_epoch = math.ceil(len(kept) / settings.grad_accumulation)
    losses: list[float] = []
    started = time.monotonic()
    model.train()
    with tqdm(total=steps_per_epoch * settings.epochs, desc="finetune", unit="step") as bar:
        for _ in range(settings.epochs):
            batch = kept[:]
            order.shuffle(batch)
            for start in range(0, len(batch), settings.grad_accumulation):
                if stopping():
                    raise FinetuneError("finetuning was stopped before it finished; no adapter was written")
                group, total = batch[start:start + settings.grad_accumulation], 0.0
                for ids, labels in group:
                    try:
                        out = model(input_ids=torch.tensor([ids], device=device),
                                    labels=torch.tensor([labels], device=device))
                        (out.loss / len(group)).backward()
                    except (MemoryError, torch.OutOfMemoryError) as e:
                        raise FinetuneError(f"out of memory training on a {len(ids)}-token transcript on {device}: "
                                            "lower optimizer.finetune.max_seq_length or r, or use a GPU") from e
                    total += out.loss.item() / len(group)
                optimizer.step()
                optimizer.zero_grad()
                losses.append(total)
                peak = max(peak, process.memory_info().rss)
                if on_step:
                    on_step(len(losses), total)
                bar.set_postfix(loss=f"{total:.3f}")
                bar.update()
    train_seconds = time.monotonic() - started
    gguf_lora.write(model, adapter, alpha=settings.alpha, arch=arch)
    if device == "cuda":
        peak = max(peak, torch.cuda.max_memory_allocated())
    return TrainReport(base=str(base), examples=len(kept), skipped=len(encoded) - len(kept),
                       tokens=sum(len(ids) for ids, _ in kept),
                       target_tokens=sum(sum(1 for t in labels if t != -100) for _, labels in kept),
                       epochs=settings.epochs, steps=len(losses),
                       trainable_parameters=sum(p.numel() for p in trainable), load_seconds=load_seconds,
                       train_seconds=train_seconds, peak_memory_mb=peak / 2**20, losses=losses)
