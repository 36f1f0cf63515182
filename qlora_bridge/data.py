"""JSONL training data in three shapes, tokenized with answer-only labels.

Shapes (one per file, decided by the first record's keys):
  chat         {"messages": [{"role": ..., "content": ...}, ...]}   loss on assistant turns only
  instruction  {"prompt": ..., "completion": ...}                    loss on the completion only
  text         {"text": ...}                                         loss on every token

Records longer than the maximum length are refused by default (the error names the line), because cutting
a record silently can remove the very answer tokens it was meant to teach. `truncate=True` cuts from the
right instead and reports how many records were cut and how many were dropped for losing every answer token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BridgeError
from .files import read_text

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
SHAPES = {"chat": ("messages",), "instruction": ("prompt", "completion"), "text": ("text",)}
SHAPES_HELP = ('each line must be a JSON object of one shape: {"messages": [{"role": "user", "content": ...}, '
               '{"role": "assistant", "content": ...}]}, {"prompt": ..., "completion": ...} or {"text": ...}')


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int


@dataclass
class Dataset:
    path: Path
    shape: str
    examples: list[Example]
    truncated: list[int] = field(default_factory=list)  # line numbers cut to the maximum length
    dropped: list[int] = field(default_factory=list)  # line numbers with no answer token left after cutting
    warnings: list[str] = field(default_factory=list)  # what the user should know about how records were tokenized

    @property
    def answer_tokens(self) -> int:
        return sum(sum(1 for t in ex.labels if t != IGNORE_INDEX) for ex in self.examples)


def require_file(path: Path, what: str, *, field: str | None = None, fix: str = "give the path of a .jsonl file"):
    """A data file the user named exists and is a file: a folder is called one, with the .jsonl files in it."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.jsonl"))
        raise BridgeError(f"the {what} path is a folder, not a file", file=path, field=field,
                          fix="give the path of a .jsonl file" + (f" (this folder holds {', '.join(inside[:3])}"
                                                                   f"{' …' if len(inside) > 3 else ''})" if inside
                                                                   else ""))
    if not path.is_file():
        raise BridgeError(f"{what} file not found", file=path, field=field, fix=fix)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Records with their 1-based line numbers; blank lines are skipped."""
    path = Path(path)
    require_file(path, "dataset")
    records = []
    # split on newlines only: str.splitlines would also cut at U+2028 and the like, which JSON strings may hold
    for n, line in enumerate(read_text(path, "dataset").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BridgeError(f"line {n} is not valid JSON ({e.msg} at column {e.colno})", file=path,
                              fix="each line must hold one complete JSON object") from None
        if not isinstance(rec, dict):
            raise BridgeError(f"line {n} is a JSON {type(rec).__name__}, not an object", file=path,
                              fix=SHAPES_HELP)
        records.append((n, rec))
    if not records:
        raise BridgeError("the dataset has no records", file=path, fix="add at least one JSON line")
    return records


def record_shape(rec: dict, path: Path, line: int) -> str:
    for shape, keys in SHAPES.items():
        if all(k in rec for k in keys):
            return shape
    raise BridgeError(f"the record has keys {sorted(rec)}, which match no dataset shape", file=path,
                      field=f"line {line}", fix=SHAPES_HELP)


def _check_str(value, path, line, name):
    if not isinstance(value, str) or not value:
        raise BridgeError(f"line {line}: '{name}' must be a non-empty string", file=path, field=name,
                          fix="put the text in a JSON string")


def _chat_spans(tok, messages, path, line) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not isinstance(messages, list) or not messages:
        raise BridgeError(f"line {line}: 'messages' must be a non-empty list", file=path, field="messages",
                          fix=SHAPES_HELP)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BridgeError(f"line {line}: message {i} needs a role of system, user or assistant",
                              file=path, field=f"messages[{i}].role", fix=SHAPES_HELP)
        _check_str(m.get("content"), path, line, f"messages[{i}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise BridgeError(f"line {line}: the conversation has no assistant turn to learn from", file=path,
                          field="messages", fix="add the answer as a message with role 'assistant'")
    if not tok.chat_template:
        raise BridgeError("the base model's tokenizer has no chat template, so chat data cannot be rendered",
                          file=path, field="messages",
                          fix="give the base model a template (a chat_template.jinja file in its folder, or "
                          "\"chat_template\" in its tokenizer_config.json), or use the instruction shape "
                          "(prompt/completion)")
    render = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if not full.startswith(render(messages[: i + 1], False)):
            raise BridgeError(f"line {line}: the chat template renders a conversation's prefix differently "
                              "from the conversation, so answer tokens cannot be located", file=path,
                              fix="use the instruction shape, or a base model with an append-only template")
        spans.append((start, end))
    return full, spans


def tokenize_record(tok, rec: dict, shape: str, path: Path, line: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE_INDEX wherever the model must not be trained."""
    if shape == "chat":
        text, spans = _chat_spans(tok, rec["messages"], path, line)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE_INDEX
                  for t, (a, _) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if shape == "instruction":
        _check_str(rec["prompt"], path, line, "prompt")
        _check_str(rec["completion"], path, line, "completion")
        prompt = tok(rec["prompt"])["input_ids"]
        answer = tok(rec["completion"], add_special_tokens=False)["input_ids"] + eos
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    _check_str(rec["text"], path, line, "text")
    ids = tok(rec["text"])["input_ids"] + eos
    return ids, list(ids)


def load_dataset(path: Path, tok, max_len: int, truncate: bool = False) -> Dataset:
    path = Path(path)
    records = read_jsonl(path)
    shape = record_shape(records[0][1], path, records[0][0])
    ds = Dataset(path=path, shape=shape, examples=[])
    for line, rec in records:
        if (s := record_shape(rec, path, line)) != shape:
            raise BridgeError(f"the record is {s} data but the file started as {shape} data", file=path,
                              field=f"line {line}", fix="keep one shape per file")
        ids, labels = tokenize_record(tok, rec, shape, path, line)
        if len(ids) > max_len:
            if not truncate:
                raise BridgeError(f"line {line} is {len(ids)} tokens, longer than the maximum of {max_len}",
                                  file=path, field="max_seq_len",
                                  fix="raise --max-seq-len, shorten the record, or pass --truncate to cut it")
            ids, labels = ids[:max_len], labels[:max_len]
            ds.truncated.append(line)
        if all(t == IGNORE_INDEX for t in labels):
            ds.dropped.append(line)
            continue
        ds.examples.append(Example(ids, labels, line))
    if not ds.examples:
        raise BridgeError("no record has an answer token left to train on", file=path,
                          fix="raise --max-seq-len so the answers fit")
    if shape == "chat" and (bos := missing_bos(tok, ds.examples[0].input_ids)):
        ds.warnings.append(f"the chat template does not begin a conversation with {bos}, which this tokenizer "
                           "adds to plain text: chat records are trained without it, as the template renders them "
                           "(an engine that adds it to the template's output serves a prompt the model never saw)")
    return ds


def adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS before plain text, as measured (tokenizer_config.json may not say: Gemma's
    post-processor adds it)."""
    return tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]


def missing_bos(tok, ids: list[int]) -> str | None:
    """The BOS token if the tokenizer adds one to plain text and these ids do not start with it."""
    return tok.bos_token if adds_bos(tok) and ids[:1] != [tok.bos_token_id] else None


def token_sequences(path: Path, tok, max_len: int) -> list[list[int]]:
    """Every record's token ids as the model was trained on them (cut to max_len): calibration data for exporters."""
    return [ex.input_ids for ex in load_dataset(path, tok, max_len, truncate=True).examples]


def collate(batch: list[Example], pad_id: int):
    """Right-padded tensors for training."""
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class HeldOut:
    prompt: list[dict] | str  # chat messages up to the answer, or an instruction prompt
    expected: str
    line: int


def check_data(data: Path, heldout: Path | None) -> None:
    """The datasets' files and record shapes, checked before anything expensive (converting or loading the base,
    which tokenizing needs): a bad line is named in a second, not after minutes of model preparation."""
    for line, rec in read_jsonl(data):
        record_shape(rec, Path(data), line)
    if heldout is not None:
        load_heldout(heldout)


def load_heldout(path: Path) -> list[HeldOut]:
    """Held-out prompts with their expected answers: the last assistant turn, or the completion."""
    path = Path(path)
    items = []
    for line, rec in read_jsonl(path):
        shape = record_shape(rec, path, line)
        if shape == "chat":
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                    or msgs[-1].get("role") != "assistant":
                raise BridgeError(f"line {line}: a held-out conversation must end with the expected assistant "
                                  "answer", file=path, field="messages", fix=SHAPES_HELP)
            items.append(HeldOut(msgs[:-1], msgs[-1]["content"], line))
        elif shape == "instruction":
            items.append(HeldOut(rec["prompt"], rec["completion"], line))
        else:
            raise BridgeError(f"line {line}: held-out data needs an expected answer; plain text has none",
                              file=path, fix="use chat or prompt/completion records")
    return items
