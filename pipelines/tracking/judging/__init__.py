"""The judge's side of MLflow: people's labels and review queues (labels), aligned judges as registered
scorers and prompts (registry), and MLflow's own judge alignment beside the project's (mlflow_align)."""
