"""The tokenizer in GGUF form, and the llama.cpp pre-tokenizer chosen by measured parity, not by a hash list.

llama.cpp decides how text is split before BPE from the name in `tokenizer.ggml.pre`. llama.cpp's own converter
looks that name up by hashing the tokenizer's output on a fixed text, which fails for any tokenizer it has not
seen. Here every candidate name is written into a vocab-only GGUF, loaded by llama.cpp, and scored against the
Hugging Face tokenizer on the built-in corpus; the first with 100% parity wins, and none means no export.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from qlora_bridge.api import PARITY_CORPUS, CheckFailed

# llama.cpp pre-tokenizer names for BPE vocabularies, most common first. The order only decides ties.
BPE_PRE_CANDIDATES = ("gpt-2", "llama-bpe", "smollm", "qwen2", "qwen35", "deepseek-llm", "deepseek-v3",
                      "gpt-4o", "tekken", "starcoder", "refact", "falcon", "falcon3", "olmo", "dbrx", "stablelm2",
                      "command-r", "mpt", "llama4", "pixtral", "kimi-k2", "superbpe", "seed-coder", "exaone4",
                      "deepseek-coder", "smaug-bpe", "poro-chat", "bloom", "gpt3-finnish", "viking", "jais",
                      "chatglm-bpe", "minerva-7b", "trillion", "bailingmoe", "grok-2", "hunyuan", "glm4")


def tokenizer_kind(folder: Path) -> str:
    """'gpt2' for byte-level BPE (tokenizer.json), 'llama' for SentencePiece vocabularies."""
    tj = Path(folder) / "tokenizer.json"
    if tj.is_file():
        model = json.loads(tj.read_text())["model"]
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return "gpt2"
    return "llama"


def add_vocab(writer, folder: Path, config: dict, tokenizer_pre: str, tok) -> None:
    """Tokens, types, merges and special tokens of the Hugging Face tokenizer `tok` saved in `folder`."""
    import gguf

    folder = Path(folder)
    kind = tokenizer_kind(folder)
    if kind == "llama":
        vocab = gguf.LlamaHfVocab(folder) if (folder / "tokenizer.json").is_file() else \
            gguf.SentencePieceVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list([t.decode() if isinstance(t, bytes) else t for t in tokens])
        writer.add_token_scores(list(scores))
        writer.add_token_types([int(t) for t in types])
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer)
        return
    n_vocab = config.get("vocab_size", len(tok.vocab))
    reverse = {i: t for t, i in tok.vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    # add BOS/EOS exactly when the Hugging Face tokenizer does, whatever tokenizer_config.json spells out
    plain, full = hf_ids(tok, "a"), tok("a")["input_ids"]
    special.add_special_token = {"bos": len(full) > len(plain) and full[0] == tok.bos_token_id,
                                 "eos": len(full) > len(plain) and full[-1] == tok.eos_token_id}
    special.add_to_gguf(writer)


def hf_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def llama_ids(vocab_model, text: str) -> list[int]:
    return vocab_model.tokenize(text.encode(), add_bos=False, special=True)


def parity(vocab_file: Path, tok, corpus=PARITY_CORPUS) -> tuple[int, list[str]]:
    """How many corpus entries llama.cpp tokenizes exactly as Hugging Face does, and the ones it does not."""
    from llama_cpp import Llama

    model = Llama(str(vocab_file), vocab_only=True, verbose=False)
    try:
        wrong = [text for text in corpus if llama_ids(model, text) != hf_ids(tok, text)]
    finally:
        model.close()
    return len(corpus) - len(wrong), wrong


def write_vocab_only(folder: Path, out_file: Path, config: dict, arch_name: str, pre: str, tok) -> None:
    import gguf

    writer = gguf.GGUFWriter(out_file, arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    add_vocab(writer, folder, config, pre, tok)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def choose_pre_tokenizer(folder: Path, config: dict, arch_name: str, tok, candidates=None) -> dict:
    """The first candidate whose llama.cpp tokenization matches Hugging Face's `tok` on every corpus entry."""
    folder = Path(folder)
    kind = tokenizer_kind(folder)
    candidates = candidates or (BPE_PRE_CANDIDATES if kind == "gpt2" else ("default",))
    scores = {}
    with tempfile.TemporaryDirectory() as d:
        for pre in candidates:
            path = Path(d) / f"{pre}.gguf"
            write_vocab_only(folder, path, config, arch_name, pre, tok)
            ok, wrong = parity(path, tok)
            scores[pre] = ok
            if not wrong:
                return {"pre": pre, "parity": f"{ok}/{ok}", "tried": scores, "tokenizer_model": kind}
    best = max(scores, key=scores.get)
    raise CheckFailed(f"no llama.cpp pre-tokenizer reproduces this tokenizer on the {len(PARITY_CORPUS)}-entry "
                      f"parity corpus (best: {best} with {scores[best]}); a GGUF would tokenize differently from "
                      "the model it came from", file=folder / "tokenizer.json", field="pre_tokenizer",
                      fix="use a tokenizer llama.cpp supports; scores per candidate: " + json.dumps(scores))
