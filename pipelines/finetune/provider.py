"""The project's finetuning provider for DSPy: `BootstrapFinetune` hands it chat transcripts, it trains a
LoRA on the embedded model's weights (pipelines/finetune/train.py) and names the result as a model.

DSPy then copies the student LM with that model name, and `ProjectLM.copy` gives the copy the adapter
(`adapter_for`), so its embedded llama.cpp server starts with `--lora_path`: every later call, BetterTogether's
next step's included, reaches the finetuned model. The model name carries the adapter's hash: DSPy's cache
never answers the finetuned model with the base model's responses.
Adapters are content-addressed (pipelines/finetune/adapters.py): the same data, settings and seed train
once per cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat

from pipelines.finetune import adapters
from pipelines.finetune.train import FinetuneError, LoRASettings, TrainReport, train_lora

log = logging.getLogger(__name__)

TAG = ":lora-"  # model name of a finetuned LM: <base model>:lora-<adapter sha256[:12]>


class LoRAJob(TrainingJob):
    def status(self) -> str:
        return "done" if self.done() else "running"


class LoRAProvider(Provider):
    """Trains LoRA adapters for the embedded model; `trained` maps each model name it returned to its
    adapter and report."""

    def __init__(self, *, base: Path, cache_dir: Path, settings: LoRASettings,
                 on_step: Callable[[int, float], None] | None = None):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = LoRAJob
        self.base, self.cache_dir, self.settings, self.on_step = Path(base), Path(cache_dir), settings, on_step
        self.trained: dict[str, tuple[Path, TrainReport | None]] = {}  # None: found trained in the cache
        self.transcripts: dict[str, list[dict[str, Any]]] = {}
        self.stopping = False  # set by the step when it is interrupted: training ends at the next step

    def adapter_for(self, model: str) -> Path | None:
        """The adapter of a model name this provider returned (`ProjectLM.copy` serves it with it)."""
        return self.trained[model][0] if model in self.trained else None

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None, train_kwargs: dict[str, Any] | None = None) -> str:
        if train_data_format not in (TrainDataFormat.CHAT, "chat"):
            raise FinetuneError(f"the LoRA provider trains on chat transcripts, not {train_data_format}")
        if not train_data:
            raise FinetuneError("no train example passed the metric, so there is nothing to finetune on: lower "
                                "optimizer.finetune.min_score, or set optimizer.teacher to a stronger LM")
        key = hashlib.sha256(json.dumps([adapters.digest(self.base), self.settings.__dict__, train_data],
                                        sort_keys=True, default=str).encode()).hexdigest()
        recorded = self.cache_dir / f"{key}.json"
        report = None
        if recorded.is_file() and (self.cache_dir / json.loads(recorded.read_text())["adapter"]).is_file():
            adapter = self.cache_dir / json.loads(recorded.read_text())["adapter"]
            log.info("finetune: the same data and settings were trained before; adapter %s", adapter)
        else:
            log.info("finetune: %d transcripts, LoRA r=%d on %s of %s", len(train_data), self.settings.r,
                     ",".join(self.settings.target_modules), self.base.name)
            written = self.cache_dir / f".{key}.gguf"
            report = train_lora(self.base, train_data, self.settings, written, on_step=self.on_step,
                                stopping=lambda: self.stopping)
            adapter = adapters.adopt(written, self.cache_dir)
            recorded.write_text(json.dumps({"adapter": adapter.name}))
        name = f"{model.split(TAG)[0]}{TAG}{adapter.stem[:12]}"
        self.trained[name] = (adapter, report)
        self.transcripts[name] = train_data
        return name
