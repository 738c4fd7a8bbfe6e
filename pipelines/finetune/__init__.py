"""Weight distillation: a program's own traces trained into the embedded model as a LoRA adapter.

  provider.py   DSPy's finetuning interface (`BootstrapFinetune` calls it): transcripts in, model name out
  train.py      LoRA with transformers + peft on the GGUF's weights, seeded, on CPU or a GPU
  gguf_lora.py  the trained LoRA as a GGUF adapter for llama.cpp
  adapters.py   adapters on disk by content hash; a pickled LM carries its adapter's bytes
"""
