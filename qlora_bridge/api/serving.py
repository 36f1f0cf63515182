"""What a smoke check works with at run time: the server's client, the golden prompts, and the context that holds
the export, the reference and the shared measurements (the records a plugin registers are in types.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BridgeError
from ..measure.declared import Declared
from ..measure.scores import TokenScores
from .types import Bounds, Server


def http_json(url: str, body: dict, timeout: float = 300.0) -> dict:
    """POST a JSON body, return the JSON answer; an HTTP error raises with the server's message."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} answered {e.code}: {e.read()[:500]!r}") from None


@dataclass
class Golden:
    """One golden prompt and how to judge the served answer.

        Golden([{"role": "user", "content": "2+2="}], "4", match="contains").passes("It is 4.")  # True
    """
    prompt: list[dict] | str
    expected: str
    match: str = "exact"
    merged_answer: str | None = None  # what the merged model answered, when the suite comes from lineage

    def passes(self, got: str) -> bool:
        got, expected = got.strip(), self.expected.strip()
        if self.match == "exact":
            return got == expected
        if self.match == "contains":
            return expected in got
        if self.match == "regex":
            return re.search(expected, got) is not None
        try:
            return json.loads(got) == json.loads(expected)
        except json.JSONDecodeError:
            return False


class Client:
    """The few OpenAI-compatible calls the checks make, on the standard library."""

    def __init__(self, base_url: str, timeout: float = 300.0):
        self.base_url, self.timeout = base_url, timeout

    def post(self, path: str, body: dict) -> dict:
        return http_json(self.base_url + path, body, self.timeout)

    def generate(self, prompt: list[dict] | str, max_tokens: int) -> tuple[str, dict]:
        """Greedy answer to a chat (list of messages) or a plain completion prompt, with the usage counts."""
        body = {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
        if isinstance(prompt, list):
            out = self.post("/v1/chat/completions", {"messages": prompt, **body})
            return out["choices"][0]["message"]["content"] or "", out.get("usage", {})
        out = self.post("/v1/completions", {"prompt": prompt, **body})
        return out["choices"][0]["text"], out.get("usage", {})


@dataclass
class SmokeContext:
    """What a smoke check gets: the running server, the export, the reference model, the suite and the bounds.

    measurements() gives the divergence and task-score figures, computed once and shared by every check."""

    client: Client
    server: Server
    artifact: Path
    manifest: dict
    merged: Path | None
    suite: list[Golden]  # golden prompts
    min_pass_rate: float
    heldout: list[Golden]  # held-out prompts with the reference's answers
    reference: object  # the model that was trained: its held-out answers and cached scores (measure/reference.py)
    bounds: Bounds
    bounds_source: str
    # how to read what the export says about itself (its exporter's `declares`; None: it has none), and what the
    # merged model says, with the adapter the export's lineage names (only that, where no merged folder is at hand)
    declares: Callable[[Path], Declared] | None
    merged_declared: Declared
    # the smoke stage's measurement: (reference, tokenizer, the served model's scores for token sequences) -> figures
    measure: Callable[[object, object, Callable[[list[list[int]]], Iterator[TokenScores]]], dict]
    _cache: dict = field(default_factory=dict)

    def tokenizer(self):
        if "tok" not in self._cache:
            from transformers import AutoTokenizer

            source = self.merged if self.merged else self.artifact
            self._cache["tok"] = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        return self._cache["tok"]

    def measurements(self) -> dict:
        """Through the serving engine (ServingAdapter.logprobs); computed once, shared by every check."""
        if "measured" not in self._cache:
            adapter = self.server.adapter
            if adapter.logprobs is None:
                raise BridgeError(f"backend {self.server.backend} offers no next-token log-probabilities",
                                  field="--backend", fix="serve it with a backend whose adapter has `logprobs`")
            self._cache["measured"] = self.measure(self.reference, self.tokenizer(),
                                                   lambda sequences: adapter.logprobs(self.server, sequences))
        return self._cache["measured"]
