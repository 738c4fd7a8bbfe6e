"""Corpus embeddings in a FAISS index, cached on disk by content hash, behind a retriever.

Same search as `dspy.retrievers.Embeddings` (normalized vectors; IVF-PQ candidates above the
brute-force threshold, exact re-ranking), but the index travels with a logged model as plain files
(pipelines/packaging.py), loads without re-embedding the corpus, and the retriever is shared, not copied,
when optimizers deep-copy a program.

  embedders.py  the local and hosted embedders, and what makes two interchangeable
  index.py      the index, its search and its files on disk
  cache.py      indexes cached by content hash: built once, read back without embedding
  retriever.py  the retriever, and its RETRIEVER trace span

Code imports each name from its module. Only pickles name classes here: a program that MLflow's `dspy`
flavor (or an older, pickle-only version of this project) pickled while this package was one module
refers to `pipelines.retrieval.Retriever`, `.Index`, `.LocalEmbedder` and `.HostedEmbedder`, and a
process that has already imported this package unpickles it against this package, not the model's own
copy of the code; `__getattr__` finds those four where they live now.
"""

import importlib

_PICKLED_BEFORE_THE_SPLIT = {"Retriever": "retriever", "Index": "index", "LocalEmbedder": "embedders",
                             "HostedEmbedder": "embedders"}


def __getattr__(name: str):
    if name in _PICKLED_BEFORE_THE_SPLIT:
        return getattr(importlib.import_module(f"{__name__}.{_PICKLED_BEFORE_THE_SPLIT[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
