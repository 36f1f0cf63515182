"""What a model folder says about itself, and where an export's says otherwise than the merged model's (issue 34).

A damaged declaration can leave every measured figure intact: an EOS id set to "." passed the gate, because the
divergence and task checks are teacher-forced with the reference tokenizer's ids and the demo's answers have no
full stop, while llama-cli or Ollama then cut every prose answer at its first sentence. So the gate also reads what
the file declares (Exporter.declares: api.hf_declared for a Hugging Face folder, the GGUF exporter its metadata)
and compares it with the merged model's, field by field:

    differences(hf_declared(export), hf_declared(merged), tok)
    # [{"key": "eos", "export": 30, "merged": 2, "gate": True}]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Declared:
    """What a model file says about itself: what a runtime reads to tokenize, template, stop and compute. The gate
    holds an export's (Exporter.declares) to the merged model's, field by field; None: the file does not say.

        Declared(bos=1, eos=2, stop=(2,), add_bos=False, chat_template="{% for message in messages %}...",
                 context_length=8192, rope_theta=100000.0, norm_eps=1e-5, layers=30, hidden=576, heads=9,
                 kv_heads=3, head_dim=64, vocab=49152, adapter_sha256="463aa1...")
    """
    bos: int | None = None  # token ids
    eos: int | None = None
    stop: tuple[int, ...] | None = None  # every id the file names as ending a generation (EOS, end of turn)
    pad: int | None = None
    unk: int | None = None
    add_bos: bool | None = None  # the tokenizer prepends BOS / appends EOS to a text
    add_eos: bool | None = None
    chat_template: str | None = None  # the Jinja text
    stop_strings: tuple[str, ...] | None = None  # a runtime's stop list (Ollama's Modelfile PARAMETER stop)
    context_length: int | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    vocab: int | None = None
    adapter_sha256: str | None = None  # the fine-tune the file says it carries (its lineage)


# Conversations the two chat templates render: the rendered strings must be equal (a template of the same length
# but another family's renders other text). Without and with a system prompt, multi-turn, with and without the
# generation prompt.
CONVERSATIONS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime number."}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "List two colours, one per line."}], True),
    ([{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}], False),
]
# Reported, not gated: RMSNorm's epsilon moves the output only where a hidden state's mean square is near it, and
# the divergence check measures that effect (issue 34: 1e-5 -> 1e-4 on the demo moved the KL from 0.0044 to 0.0046).
REPORTED = ("norm_eps",)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def hf_declared(folder: Path) -> Declared:
    """What a Hugging Face model folder declares: config.json (the decoder's, for wrappers that nest it under
    text_config), generation_config.json, the tokenizer (what it adds to a text, its chat template), and for a
    merged folder the adapter its merge report names."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = read_json(folder / "config.json")
    text = config.get("text_config") or config
    generation = read_json(folder / "generation_config.json")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    ends = generation.get("eos_token_id", text.get("eos_token_id", config.get("eos_token_id")))
    stop = {ends} if isinstance(ends, int) else set(ends or [])
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)
    probe = tok("a")["input_ids"]
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    heads = text.get("num_attention_heads")
    hidden = text.get("hidden_size")
    report = read_json(folder / "merge_report.json")
    return Declared(
        bos=tok.bos_token_id, eos=tok.eos_token_id, stop=tuple(sorted(stop)), pad=tok.pad_token_id,
        unk=tok.unk_token_id, add_bos=bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id,
        add_eos=bool(probe) and tok.eos_token_id is not None and probe[-1] == tok.eos_token_id,
        chat_template=template, context_length=text.get("max_position_embeddings"),
        rope_theta=(text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta")),
        norm_eps=text.get("rms_norm_eps", text.get("layer_norm_eps")), layers=text.get("num_hidden_layers"),
        hidden=hidden, heads=heads, kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or (hidden // heads if hidden and heads else None),
        vocab=text.get("vocab_size"), adapter_sha256=(report.get("adapter") or {}).get("sha256"))


def rendered(template: str | None, tok) -> list[str]:
    """The conversations through a chat template, with the merged model's tokenizer (its special tokens)."""
    if template is None:
        return []
    out = []
    for messages, generation in CONVERSATIONS:
        try:
            out.append(tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=generation))
        except Exception as e:  # a template may refuse a role (no system prompt): the same refusal is the same
            out.append(f"<refused: {type(e).__name__}: {e}>")
    return out


def differences(export: Declared, merged: Declared, tok) -> list[dict]:
    """Each field the export declares otherwise than the merged model: {key, export, merged, gate}. A field
    either file leaves unsaid (None) is not compared. Special cases: the export may name fewer ids as stopping a
    generation than the merged model (a runtime also stops on what its own rules know), never one the merged model
    does not; a runtime's stop strings must hold the text of each of the merged model's stop tokens; chat templates
    are compared by what they render."""
    out = []

    def differ(key, a, b, gate=True):
        out.append({"key": key, "export": a, "merged": b, "gate": gate and key not in REPORTED})

    for f in fields(Declared):
        key, a, b = f.name, getattr(export, f.name), getattr(merged, f.name)
        if a is None or b is None:
            continue
        if key == "stop":
            if set(a) - set(b):
                differ(key, list(a), list(b))
        elif key == "stop_strings":
            if missing := [t for t in tok.convert_ids_to_tokens(list(merged.stop or ())) if t not in a]:
                differ(key, list(a), missing)
        elif key == "chat_template":
            ours, theirs = rendered(a, tok), rendered(b, tok)
            if ours != theirs:
                first = next(i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y)
                differ(key, ours[first][-200:], theirs[first][-200:])
        elif isinstance(a, float) or isinstance(b, float):
            if not math.isclose(a, b, rel_tol=1e-6):
                differ(key, a, b)
        elif a != b:
            differ(key, a, b)
    return out
