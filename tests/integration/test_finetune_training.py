"""LoRA training and its GGUF adapter on a tiny random Llama (a Hugging Face directory written here): what
the finetuning provider does, in seconds. The embedded model itself is trained in tests/e2e/test_finetune.py."""

import json

import pytest
from dspy.clients.utils_finetune import TrainDataFormat

from pipelines.errors import ConfigError
from pipelines.finetune import adapters
from pipelines.finetune.provider import TAG, LoRAJob, LoRAProvider
from pipelines.finetune.train import FinetuneError, LoRASettings, train_lora

CHATS = [{"messages": [{"role": "system", "content": "Answer in JSON."},
                       {"role": "user", "content": f"question {i}"},
                       {"role": "assistant", "content": json.dumps({"response": f"answer {i}"})}]} for i in range(4)]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with random weights and a word-level tokenizer, saved as a model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    words = sorted({w for chat in CHATS for m in chat["messages"] for w in
                    TEMPLATE.replace("{", " ").split() + m["content"].replace('"', " ").split()})
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", chat_template=TEMPLATE)
    tokenizer.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_training_learns_the_answers_and_writes_a_gguf_adapter_llama_cpp_names(tiny_llama, tmp_path):
    import gguf

    settings = LoRASettings(epochs=4, learning_rate=5e-3, target_modules=("v_proj", "o_proj", "down_proj"))
    steps = []
    report = train_lora(tiny_llama, CHATS, settings, tmp_path / "a.gguf", on_step=lambda s, loss: steps.append(s))
    assert report.examples == 4 and report.steps == 16 and steps == list(range(1, 17))
    assert report.losses[-1] < 0.9 * report.losses[0], report.losses  # it learns (a random tiny model, slowly)
    assert 0 < report.target_tokens < report.tokens and report.peak_memory_mb > 0
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    names = {t.name for t in reader.tensors}
    roles = ("attn_v", "attn_output", "ffn_down")
    assert names == {f"blk.{b}.{role}.weight.lora_{ab}" for b in (0, 1) for role in roles for ab in "ab"}
    field = reader.fields["adapter.lora.alpha"]
    assert float(field.parts[field.data[0]][0]) == settings.alpha
    shapes = {t.name: tuple(t.shape) for t in reader.tensors}  # GGUF lists dimensions innermost first
    assert shapes["blk.0.attn_v.weight.lora_a"] == (32, 8) and shapes["blk.0.attn_v.weight.lora_b"] == (8, 16)


def test_the_same_data_settings_and_seed_give_the_same_adapter_bytes(tiny_llama, tmp_path):
    settings = LoRASettings(epochs=1)
    train_lora(tiny_llama, CHATS, settings, tmp_path / "1.gguf")
    train_lora(tiny_llama, CHATS, settings, tmp_path / "2.gguf")
    train_lora(tiny_llama, CHATS, LoRASettings(epochs=1, seed=1), tmp_path / "3.gguf")
    first = adapters.digest(tmp_path / "1.gguf")
    assert adapters.digest(tmp_path / "2.gguf") == first != adapters.digest(tmp_path / "3.gguf")


def test_the_provider_names_a_model_per_adapter_and_trains_the_same_data_once(tiny_llama, tmp_path):
    provider = LoRAProvider(base=tiny_llama, cache_dir=tmp_path, settings=LoRASettings(epochs=1))
    job = LoRAJob(model="openai/tiny", train_data=CHATS, train_data_format=TrainDataFormat.CHAT)
    name = provider.finetune(job, "openai/tiny", CHATS, TrainDataFormat.CHAT)
    adapter, report = provider.trained[name]
    assert name == f"openai/tiny{TAG}{adapter.stem[:12]}" and adapter.stem == adapters.digest(adapter)
    assert report is not None and provider.transcripts[name] == CHATS
    again = LoRAProvider(base=tiny_llama, cache_dir=tmp_path, settings=LoRASettings(epochs=1))
    assert again.finetune(job, "openai/tiny", CHATS, TrainDataFormat.CHAT) == name
    assert again.trained[name] == (adapter, None)  # found in the cache: not trained again
    with pytest.raises(FinetuneError, match="no train example passed the metric"):
        provider.finetune(job, "openai/tiny", [], TrainDataFormat.CHAT)


def test_stopping_writes_no_adapter(tiny_llama, tmp_path):
    with pytest.raises(FinetuneError, match="stopped"):
        train_lora(tiny_llama, CHATS, LoRASettings(), tmp_path / "a.gguf", stopping=lambda: True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("settings", "message"), [
    ({"target_modules": ["q_proj"]}, "cannot be served by llama.cpp"),
    ({"r": 0}, "must be >= 1"),
    ({"rank": 8}, "unknown keys"),
])
def test_bad_lora_settings_fail_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        LoRASettings.from_kwargs(settings)


def test_a_base_model_torch_cannot_load_fails_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FinetuneError, match="cannot load the base model"):
        train_lora(tmp_path, CHATS, LoRASettings(), tmp_path / "a.gguf")


def test_running_out_of_memory_fails_in_one_line_and_writes_no_adapter(tiny_llama, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(LlamaForCausalLM, "forward", exhausted)
    with pytest.raises(FinetuneError, match="out of memory training on a .*max_seq_length"):
        train_lora(tiny_llama, CHATS, LoRASettings(), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
