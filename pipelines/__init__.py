"""DSPy RAG on RAG-QA Arena Tech, tracked with MLflow. Entry points live in the step modules."""

import os

# LiteLLM otherwise tries to download its price list at import time, which stalls offline.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
