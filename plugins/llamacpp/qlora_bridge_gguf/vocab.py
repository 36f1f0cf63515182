"""The tokenizer in GGUF form, and the llama.cpp pre-tokenizer chosen by measured parity, not by a hash list.

llama.cpp decides how text is split before BPE from the name in `tokenizer.ggml.pre`. llama.cpp's own converter
looks that name up by hashing the tokenizer's output on a fixed text, which fails for any tokenizer it has not
seen. Here every candidate name is written into a vocab-only GGUF, loaded by llama.cpp, and scored against the
Hugging Face tokenizer on the built-in corpus; of those with 100% parity, the one that also matches on most of a
larger sample wins, and none means no export.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qlora_bridge.api import PARITY_CORPUS, CheckFailed, adds_bos, reference_document

# llama.cpp pre-tokenizer names for BPE vocabularies, most common first. The order only decides ties.
BPE_PRE_CANDIDATES = ("gpt-2", "llama-bpe", "smollm", "qwen2", "qwen35", "deepseek-llm", "deepseek-v3",
                      "gpt-4o", "tekken", "starcoder", "refact", "falcon", "falcon3", "olmo", "dbrx", "stablelm2",
                      "command-r", "mpt", "llama4", "pixtral", "kimi-k2", "superbpe", "seed-coder", "exaone4",
                      "deepseek-coder", "smaug-bpe", "poro-chat", "bloom", "gpt3-finnish", "viking", "jais",
                      "chatglm-bpe", "minerva-7b", "trillion", "bailingmoe", "grok-2", "hunyuan", "glm4")


def tokenizer_kind(tokenizer_json: dict | None) -> str:
    """'gpt2' for byte-level BPE, 'llama' for SentencePiece vocabularies (byte fallback, or tokenizer.model alone)."""
    model = (tokenizer_json or {}).get("model") or {}
    return "gpt2" if model.get("type") == "BPE" and not model.get("byte_fallback") else "llama"


@dataclass
class Vocab:
    """The tokenizer as the GGUF holds it, but for the pre-tokenizer name: read once, written for each candidate."""
    folder: Path  # the Hugging Face folder it was read from
    model: str  # llama.cpp's tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece family)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    space_prefix: bool | None
    special: object  # gguf.SpecialVocab: special ids, merges, chat template, whether BOS/EOS are added


def read_vocab(folder: Path, config: dict, tok) -> Vocab:
    """The Hugging Face tokenizer `tok` saved in `folder`, in GGUF terms."""
    import gguf

    folder = Path(folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text()) if path.is_file() else None  # 33 MB on Gemma: parsed once
    if tokenizer_kind(data) == "llama":
        if data:
            tokens, scores, types = sentencepiece_from_json(data, config.get("vocab_size"))
        else:
            tokens, scores, types = zip(*gguf.SentencePieceVocab(folder).all_tokens())
        tokens = [t.decode() if isinstance(t, bytes) else t for t in tokens]
        # llama.cpp's SentencePiece tokenizer puts a space before the text unless told not to; Llama 2 and Mistral
        # declare that prefix in tokenizer.json, Gemma does not (research README, fact 17); tokenizer.model alone
        # means SentencePiece's own default, a prefix
        return Vocab(folder, "llama", tokens, [int(t) for t in types], list(scores),
                     adds_space_prefix(data) if data else True, special_tokens(folder, len(tokens), tok, merges=False))
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
    return Vocab(folder, "gpt2", tokens, [int(t) for t in types], None, None,
                 special_tokens(folder, n_vocab, tok, merges=True))


def add_vocab(writer, vocab: Vocab, tokenizer_pre: str) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.space_prefix is not None:
        writer.add_add_space_prefix(vocab.space_prefix)
    vocab.special.add_to_gguf(writer)


def special_tokens(folder: Path, n_vocab: int, tok, merges: bool):
    """Special token ids, merges and the chat template; BOS/EOS are added exactly when the Hugging Face tokenizer
    adds them, whatever tokenizer_config.json spells out (Gemma's says nothing; its post-processor adds BOS)."""
    import gguf

    special = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    plain, full = hf_ids(tok, "a"), tok("a")["input_ids"]
    special.add_special_token = {"bos": adds_bos(tok),
                                 "eos": len(full) > len(plain) and full[-1] == tok.eos_token_id}
    return special


def adds_space_prefix(data: dict) -> bool:
    """Whether a tokenizer.json prepends "▁" to the text: a Prepend normalizer, or a Metaspace pre-tokenizer whose
    prepend_scheme is not "never" (older files say add_prefix_space)."""

    def parts(node):
        if not node:
            return []
        inner = node.get("normalizers") or node.get("pretokenizers")
        return [p for n in inner for p in parts(n)] if inner else [node]

    return any(n["type"] == "Prepend" for n in parts(data.get("normalizer"))) or any(
        n["type"] == "Metaspace" and n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never")
        != "never" for n in parts(data.get("pre_tokenizer")))


def sentencepiece_from_json(data: dict, n_vocab: int | None) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types for llama.cpp's SentencePiece tokenizer from a tokenizer.json.

    llama.cpp merges, at each step, the adjacent pair whose joined token scores highest. A BPE tokenizer.json
    carries no scores, only merge ranks, so a token's score is minus the rank of the first merge that makes it:
    the same order Hugging Face merges in (and SentencePiece's own piece order, which is what llama.cpp's converter
    copies from tokenizer.model). gguf-py's LlamaHfVocab writes -1000 for every token, which leaves llama.cpp's
    merge order to chance: 0 of 24 corpus lines came out right on Gemma 3. A Unigram model carries its scores."""
    import gguf

    model = data["model"]
    vocab = dict(model["vocab"]) if model["type"] == "BPE" else {t: i for i, (t, _) in enumerate(model["vocab"])}
    score = {}
    if model["type"] == "BPE":
        for rank, merge in enumerate(model.get("merges") or []):
            a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
            score.setdefault(a + b, -float(rank))
    else:
        score = {t: float(s) for t, s in model["vocab"]}
    added = {a["id"]: a for a in data.get("added_tokens") or []}
    size = max([n_vocab or 0, len(vocab), *(i + 1 for i in added)])
    reverse = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in reverse:
            t = reverse[i]
            tokens.append(t)
            byte = model.get("byte_fallback") and len(t) == 6 and t.startswith("<0x") and t.endswith(">")
            scores.append(0.0 if byte else score.get(t, 0.0))
            types.append(gguf.TokenType.BYTE if byte else gguf.TokenType.UNKNOWN if t == model.get("unk_token")
                         else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


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


def write_vocab_only(vocab: Vocab, out_file: Path, arch_name: str, pre: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(out_file, arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    add_vocab(writer, vocab, pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def choose_pre_tokenizer(vocab: Vocab, arch_name: str, tok, candidates=None) -> dict:
    """The candidate whose llama.cpp tokenization matches Hugging Face's `tok` on every corpus entry. Every
    candidate is tried: where several match, the one that matches on most paragraphs of the reference document
    wins (list order only among those still level), and the result says which tied."""
    kind = vocab.model
    candidates = candidates or (BPE_PRE_CANDIDATES if kind == "gpt2" else ("default",))
    scores, level = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for pre in candidates:
            path = Path(d) / f"{pre}.gguf"
            write_vocab_only(vocab, path, arch_name, pre)
            scores[pre], wrong = parity(path, tok)
            if not wrong:
                level[pre] = path
        if not level:
            best = max(scores, key=scores.get)
            raise CheckFailed(f"no llama.cpp pre-tokenizer reproduces this tokenizer on the {len(PARITY_CORPUS)}-entry "
                              f"parity corpus (best: {best} with {scores[best]}); a GGUF would tokenize differently "
                              "from the model it came from", file=vocab.folder / "tokenizer.json",
                              field="pre_tokenizer",
                              fix="if llama.cpp knows this tokenizer under a name not tried here, pass it with "
                                  "--option pre_tokenizer=NAME; otherwise export safetensors and serve it with vLLM. "
                                  "Entries matched per candidate: " + json.dumps(scores))
        paragraphs = [p for p in reference_document().split("\n\n") if p.strip()]
        wider = {pre: parity(path, tok, paragraphs)[0] for pre, path in level.items()} if len(level) > 1 else {}
    pre = max(level, key=lambda name: wider.get(name, 0))
    return {"pre": pre, "parity": f"{scores[pre]}/{len(PARITY_CORPUS)}", "tried": scores, "tokenizer_model": kind,
            "tied": sorted(level), "tie_break": {"paragraphs": len(paragraphs), "matched": wider} if wider else None}
