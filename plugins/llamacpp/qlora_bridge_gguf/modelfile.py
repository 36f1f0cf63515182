"""An Ollama Modelfile beside the GGUF: the chat template in Ollama's Go template language, the stop tokens, and the
system prompt the fine-tune was trained with.

Jinja cannot be translated to Go templates in general, so the template is read off the Hugging Face template by
example: conversations with marker strings are rendered and cut at the markers into what comes before and after
each role's message. Two shapes are expressible: each message wrapped on its own (ChatML, Llama 3, Phi-3), or a
system prompt folded into the first user turn (Gemma). The pieces are re-assembled for further conversations and
must give Hugging Face's text exactly; otherwise no TEMPLATE is written and the result says why.
"""

from __future__ import annotations

import json

from qlora_bridge.api import adds_bos

S, U, A, V = "\x01system\x01", "\x01user\x01", "\x01assistant\x01", "\x01second user\x01"
CHECKS = (  # conversations the derived template must render exactly as Hugging Face does
    [("user", "hi")],
    [("user", "hi"), ("assistant", "hello"), ("user", "and then?")],
    [("system", "Be brief."), ("user", "hi")],
    [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "more")],
)


def derive(render, bos: str) -> dict:
    """The template's pieces from `render(messages, add_generation_prompt) -> str`. Raises ValueError when the
    template is not of a shape written here. `bos` is the BOS text to take off the front (llama.cpp adds it)."""
    def text(*turns, generation=False):
        out = render([{"role": r, "content": c} for r, c in turns], generation)
        if not out.startswith(bos):
            raise ValueError("the template does not begin with the BOS the tokenizer adds")
        return out[len(bos):]

    def cut(rendered: str, mark: str) -> tuple[str, str]:
        if rendered.count(mark) != 1:
            raise ValueError(f"the template does not render a {mark.strip(chr(1))} message's text once, as given")
        return tuple(rendered.split(mark))

    base = text(("system", S), ("user", U))  # head S mid U user_post
    head, rest = cut(base, S)
    mid, user_post = cut(rest, U)
    answered = text(("system", S), ("user", U), ("assistant", A))
    chat = text(("system", S), ("user", U), ("assistant", A), ("user", V))
    if not (answered.startswith(base) and chat.startswith(answered) and chat.endswith(V + user_post)):
        raise ValueError("earlier turns render differently once later ones follow")
    assistant_pre, assistant_post = cut(answered[len(base):], A)
    user_pre = chat[len(answered):-len(V + user_post)]
    pieces = {"user": (user_pre, user_post), "assistant": (assistant_pre, assistant_post),
              "generation": text(("system", S), ("user", U), generation=True)[len(base):]}
    if mid.endswith(user_pre) and head + mid[:len(mid) - len(user_pre)]:
        pieces.update(shape="wrapped", system=(head, mid[:len(mid) - len(user_pre)]))
    elif head == user_pre:
        pieces.update(shape="folded", separator=mid)
    else:
        raise ValueError("the system prompt is neither its own turn nor folded into the first user turn")
    alone = text(("user", U))  # a template may put in a system turn of its own when none is given (SmolLM2)
    if not alone.endswith(user_pre + U + user_post):
        raise ValueError("a conversation without a system prompt renders its first user turn differently")
    pieces["default"] = alone[:-len(user_pre + U + user_post)]
    return pieces


def assemble(pieces: dict, messages: list[tuple[str, str]]) -> str:
    """What the Go template renders for `messages`, in Python: the check that `derive` read the template right."""
    system = messages[0][1] if messages[0][0] == "system" else None
    out = [] if system is not None else [pieces["default"]]
    for i, (role, content) in enumerate(messages):
        if role == "system":
            if pieces["shape"] == "wrapped":
                out.append(pieces["system"][0] + content + pieces["system"][1])
            continue
        pre, post = pieces[role]
        fold = system is not None and pieces["shape"] == "folded" and i == 1
        out.append(pre + (system + pieces["separator"] if fold else "") + content + post)
    return "".join(out) + pieces["generation"]


def go_template(pieces: dict) -> str:
    """The Go template (Ollama's `.Messages`, with system messages in it, as Ollama passes them). Every literal
    piece is a quoted Go string: no whitespace trimming, no "{{" in the text to escape."""
    q = lambda s: "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""
    first_is_system = '(eq (index $.Messages 0).Role "system")'
    user_pre, user_post = pieces["user"]
    if pieces["shape"] == "wrapped":
        system = q(pieces["system"][0]) + "{{ .Content }}" + q(pieces["system"][1])
        user = q(user_pre) + "{{ .Content }}" + q(user_post)
    else:
        system = ""
        user = (q(user_pre) + f"{{{{ if and (eq $i 1) {first_is_system} }}}}{{{{ (index $.Messages 0).Content }}}}"
                + q(pieces["separator"]) + "{{ end }}{{ .Content }}" + q(user_post))
    assistant = q(pieces["assistant"][0]) + "{{ .Content }}" + q(pieces["assistant"][1])
    default = f"{{{{ if not {first_is_system} }}}}{q(pieces['default'])}{{{{ end }}}}" if pieces["default"] else ""
    return (default + '{{ range $i, $_ := .Messages }}{{ if eq .Role "system" }}' + system
            + '{{ else if eq .Role "user" }}' + user + '{{ else if eq .Role "assistant" }}' + assistant
            + "{{ end }}{{ end }}" + q(pieces["generation"]))


def stop_tokens(tok, pieces: dict | None, eos_texts: list[str]) -> list[str]:
    """The end-of-turn texts: special tokens in what follows an answer, then the EOS tokens (the tokenizer's and
    generation_config.json's: Gemma stops on <end_of_turn>, which only the latter names)."""
    special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    after = pieces["assistant"][1] if pieces else ""
    stops = [s for s in sorted(special, key=len, reverse=True) if s in after]
    return stops + [t for t in dict.fromkeys([tok.eos_token, *eos_texts]) if t and t not in stops]


def modelfile(gguf_name: str, tok, system: str | None, eos_texts: list[str]) -> tuple[str, dict]:
    """The Modelfile text and what it says (template shape or why there is none, stops, system prompt)."""
    bos = tok.bos_token if adds_bos(tok) else ""
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    pieces, why = None, None
    if not tok.chat_template:
        why = "the tokenizer has no chat template"
    else:
        try:
            pieces = derive(render, bos)
            for conv in CHECKS:
                want = render([{"role": r, "content": c} for r, c in conv], True)
                if bos + assemble(pieces, conv) != want:
                    raise ValueError(f"the derived template renders {conv!r} differently")
        except (ValueError, TypeError) as e:  # TypeError: a template that refuses a system message, etc.
            pieces, why = None, str(e)
    stops = stop_tokens(tok, pieces, eos_texts)
    lines = [f"FROM ./{gguf_name}"]
    if pieces:
        lines.append(f'TEMPLATE """{go_template(pieces)}"""')
    else:
        lines.append(f"# no TEMPLATE: {why}; Ollama falls back on its guess from the GGUF's chat template")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    if system and '"""' not in system:  # a Modelfile string cannot hold its own delimiter
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n", {"template": pieces["shape"] if pieces else None, "no_template_because": why,
                                     "stops": stops, "system": system, "checked_conversations": len(CHECKS)}
