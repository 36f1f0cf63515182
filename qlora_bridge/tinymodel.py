"""A tiny Llama-architecture model with a real BPE tokenizer, built locally in seconds for tests: byte-level (GPT-2
style, the default) or SentencePiece style (byte fallback and "▁" for spaces, as Llama 2, Mistral and Gemma ship).

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


# SentencePiece style: the chat template and stop token are Gemma's
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPM_SPECIAL = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]


def build_sentencepiece_tokenizer(vocab_size: int = 1024, *, space_prefix: bool = True):
    """BPE with byte fallback: the 256 <0xXX> byte tokens follow the special tokens, as in SentencePiece models.
    space_prefix: Llama 2's way (a normalizer that puts "▁" before the text, and before the text after each special
    token: what llama.cpp does); without it, Gemma's (a normalizer that only replaces spaces)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=SPM_SPECIAL, show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    data = json.loads(tok.to_str())
    trained = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    order = SPM_SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in trained if t not in SPM_SPECIAL]
    data["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    for added in data["added_tokens"]:
        added["id"] = order.index(added["content"])
    tok = Tokenizer.from_str(json.dumps(data))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if space_prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<end_of_turn>",
                                   unk_token="<unk>", pad_token="</s>", chat_template=SPM_CHAT_TEMPLATE)


ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
TOKENIZERS = {"bytelevel": build_tokenizer, "sentencepiece": build_sentencepiece_tokenizer,
              "sentencepiece-no-prefix": lambda: build_sentencepiece_tokenizer(space_prefix=False)}


def build_tiny_model(out: Path, *, layers: int = 2, hidden: int = 256, intermediate: int = 768,
                     dtype: str = "float32", seed: int = 0, arch: str = "llama", heads: int | None = None,
                     tokenizer: str = "bytelevel") -> Path:
    """Write a random-init causal LM (Llama by default) and its tokenizer (one of TOKENIZERS) to `out`."""
    import torch
    import transformers
    from transformers import GenerationConfig

    tok = TOKENIZERS[tokenizer]()
    common = dict(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads or hidden // 64, num_key_value_heads=heads or hidden // 64, head_dim=64,
                  max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
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
