"""A tiny Llama-architecture model with a real BPE tokenizer, built locally in seconds for tests.

Every weight matrix has dimensions that are multiples of 256, so k-quant GGUF types (256-wide super-blocks)
and group-128 AWQ/GPTQ apply to it without fallbacks.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } \" ' : ; , .",
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "Convert the request to JSON with keys intent, person, day, priority.",
    '{"intent": "meeting", "person": "Alice", "day": "Monday", "priority": "normal"}',
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday meeting reminder cancel call urgent",
]


def build_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE)


ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


def build_tiny_model(out: Path, *, layers: int = 2, hidden: int = 256, intermediate: int = 768,
                     dtype: str = "float32", seed: int = 0, arch: str = "llama", heads: int | None = None) -> Path:
    """Write a random-init causal LM (Llama by default) and its tokenizer to `out`; returns `out`."""
    import torch
    import transformers
    from transformers import GenerationConfig

    tok = build_tokenizer()
    common = dict(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads or hidden // 64, num_key_value_heads=heads or hidden // 64, head_dim=64,
                  max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=None,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config_cls, model_cls, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
        # query scaling 1/sqrt(head_dim), as llama.cpp computes it for Gemma 3
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"query_pre_attn_scalar": 64, "sliding_window": 512}),
    }[arch]
    config = getattr(transformers, config_cls)(**common, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(getattr(torch, dtype))
    if arch == "gemma3":  # random norms, so that a missing 1 + w shift in conversion would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.1)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
