"""A trained PEFT LoRA as a GGUF adapter that llama.cpp loads beside its base model (`--lora_path`).

llama.cpp names a linear layer by block and role (`blk.3.attn_v.weight`); an adapter holds, per adapted
layer, `<name>.lora_a` (r x in) and `<name>.lora_b` (out x r), and scales B·A by `adapter.lora.alpha / r`
as PEFT does. q_proj and k_proj are left out: llama.cpp stores them permuted for rotary embeddings.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

# Hugging Face's Llama module names -> llama.cpp's tensor names.
TENSORS = {"v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
           "down_proj": "ffn_down"}
_LAYER = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def architecture(gguf_path: Path) -> str:
    """The model architecture a GGUF file declares (`general.architecture`), e.g. `llama`."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def write(model, path: Path, *, alpha: float, arch: str) -> None:
    """Write the LoRA layers of a PEFT `model` as a GGUF adapter at `path`, atomically."""
    import gguf

    tensors = {}
    for name, module in model.named_modules():
        found = _LAYER.search(name)
        if not found or not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        block, role = found.groups()
        target = f"blk.{block}.{TENSORS[role]}.weight"
        tensors[f"{target}.lora_a"] = module.lora_A["default"].weight.detach().float().cpu().numpy()
        tensors[f"{target}.lora_b"] = module.lora_B["default"].weight.detach().float().cpu().numpy()
    if not tensors:
        raise ValueError("the model has no LoRA layers llama.cpp can load")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".lora-", suffix=".gguf", delete=False) as tmp:
        pass
    writer = gguf.GGUFWriter(tmp.name, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name in sorted(tensors):  # a fixed order: the same weights give the same bytes
        writer.add_tensor(name, np.ascontiguousarray(tensors[name]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(tmp.name).replace(path)
