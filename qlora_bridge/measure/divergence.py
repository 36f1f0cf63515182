"""How far an export's next-token distributions are from the reference model's: the instruments of the smoke gate
and of `compare`.

Everything is teacher-forced, so one forward pass per sequence measures what greedy decoding would do:
- along the held-out prompts followed by the reference model's own answers: KL divergence per answer token, the
  share of positions with the same top-1 token, and answers kept (the export's top-1 is the reference's at every
  answer position and at the end of turn: greedy decoding would repeat the reference's answer word for word);
- along the same prompts followed by the expected answers: the task score (greedy would give the expected answer);
- over a long reference text in windows of WINDOW tokens: mean and 99th-percentile KL, same top-1 share and the
  perplexity ratio, the figures llama.cpp's KL-divergence mode reports.

Distributions come in two shapes (api.TokenScores): the full vocabulary (llama.cpp in process, an exporter's
logits hook, a reference model just run) or listed tokens: vLLM's prompt log-probabilities (its 20 most likely
tokens plus the actual one) and the cached reference (qlora_bridge.measure.reference: its TOP_K most likely plus the
actual one). With both full, the KL(P || Q) is exact (P the reference, Q the export). Otherwise the vocabulary is
grouped into the tokens both sides list and one bucket for the rest. By the log-sum inequality that never exceeds
the true KL; what it misses is exactly p_rest * KL(P_rest || Q_rest), the reference's probability outside the
listed tokens times the divergence within that tail, so the figures carry p_rest (`rest_mass`) beside the
estimate. q_rest is 1 minus a sum of float32 probabilities, so it is floored at 1e-6, their rounding: flooring it
only lowers the estimate further. Top-1, the actual token's log-probability (perplexity) and every answer-level
figure are exact whatever the shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .scores import TokenScores
from ..errors import BridgeError

WINDOW = 512  # tokens per window of the reference text: within every supported model's context
TOP_K = 128  # tokens of the reference's distributions kept per position (with the actual next token)
Q_REST_FLOOR = 1e-6


@dataclass
class Teacher:
    """One held-out record, tokenized twice: prompt + the reference's answer, prompt + the expected one."""
    line: int
    kept: list[int]
    gold: list[int]
    start: int  # index of the first answer token in both sequences


def teacher_sequences(tok, answers: list[dict]) -> list[Teacher]:
    """answers: the reference model's greedy answers to the held-out prompts ({line, prompt, expected, got})."""
    from ..data import HeldOut
    from .evaluate import render_prompt

    out = []
    for a in answers:
        chat = isinstance(a["prompt"], list)
        stop = answer_end(tok, a["prompt"])
        answer = lambda text: tok(text.strip(), add_special_tokens=False)["input_ids"] + stop
        prompt = tok(render_prompt(tok, HeldOut(a["prompt"], a["expected"], a["line"])),
                     add_special_tokens=not chat)["input_ids"]
        out.append(Teacher(a["line"], prompt + answer(a["got"]), prompt + answer(a["expected"]), len(prompt)))
    return out


def answer_end(tok, prompt) -> list[int]:
    """The token that ends an answer: in a chat, the first one the template puts after the assistant's text (Gemma
    ends its turn with <end_of_turn>, not with its EOS; scored against EOS, no answer would ever count as right);
    otherwise EOS, as training appends it."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if not isinstance(prompt, list):
        return eos
    mark = "\x01answer\x01"
    text = tok.apply_chat_template([*prompt, {"role": "assistant", "content": mark}], tokenize=False)
    return tok(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"][:1] or eos


def text_windows(tok, text: str, size: int = WINDOW) -> list[list[int]]:
    """The text's tokens in windows of `size`, each starting with BOS where the tokenizer adds one."""
    from ..data import adds_bos

    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    step = size - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids) - 1, step) if len(ids[i:i + step]) > 1]


def full_scores(logits: torch.Tensor) -> TokenScores:
    """TokenScores of [n, vocab] logits (e.g. from Exporter.logits): the full vocabulary, n - 1 rows."""
    return TokenScores(torch.log_softmax(logits[:-1].float(), -1))


def rows_from(scores: TokenScores, start: int) -> TokenScores:
    return TokenScores(scores.logprobs[start:], None if scores.ids is None else scores.ids[start:])


def sparse(logp: torch.Tensor, targets: torch.Tensor, k: int = TOP_K) -> TokenScores:
    """The k most likely tokens of each row of full log-probabilities [n, vocab], plus the actual next token (how
    the reference is kept: k = 128 columns instead of ~50k)."""
    top = logp.topk(min(k, logp.shape[1]), -1)
    extra = torch.where((top.indices == targets[:, None]).any(-1), -1, targets)
    ids = torch.cat([top.indices, extra[:, None]], -1)
    return TokenScores(torch.cat([top.values, logp.gather(1, targets[:, None])], -1).where(ids >= 0, float("-inf")),
                       ids)


def lookup(scores: TokenScores, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the tokens `ids` [n, m] (-1: none) in `scores`, and which of them it lists."""
    wanted = ids >= 0
    if scores.ids is None:
        return scores.logprobs.float().gather(1, ids.clamp(min=0)), wanted
    match = (scores.ids[:, None, :] == ids[:, :, None]) & wanted[:, :, None] & (scores.ids[:, None, :] >= 0)
    logp = torch.where(match, scores.logprobs.float()[:, None, :], torch.tensor(float("-inf"))).amax(-1)
    return logp, match.any(-1)


def argmax(scores: TokenScores) -> torch.Tensor:
    best = scores.logprobs.argmax(-1)
    return best if scores.ids is None else scores.ids.gather(1, best[:, None])[:, 0]


@dataclass
class Rows:
    """Per-row comparison of an export with the reference."""
    kl: torch.Tensor
    same_top1: torch.Tensor  # bool
    top1: torch.Tensor  # the export's most likely token
    reference_top1: torch.Tensor
    logp: torch.Tensor  # the export's log-probability of the actual next token
    reference_logp: torch.Tensor
    rest: torch.Tensor  # the reference's probability outside the tokens both sides list (0: full vocabularies)


def compare_rows(ref: TokenScores, got: TokenScores, targets: torch.Tensor) -> Rows:
    """ref, got: the reference's and the export's distributions for the same n rows; targets: the next tokens [n].
    Exact KL where both give the full vocabulary, else the grouped lower bound of the module docstring over the
    tokens both list."""
    n = ref.logprobs.shape[0]
    if got.logprobs.shape[0] != n:
        raise BridgeError(f"the export scored {got.logprobs.shape[0]} positions, the reference {n}",
                          fix="the engine tokenized or truncated the sequence: score sequences within its context")
    if ref.ids is None and got.ids is None and got.logprobs.shape != ref.logprobs.shape:
        raise BridgeError(f"the export's distributions have {got.logprobs.shape[1]} entries, the reference's "
                          f"{ref.logprobs.shape[1]}",
                          fix="the export has another vocabulary: compare exports of this model")
    logp, found = lookup(got, targets[:, None])
    ref_logp, ref_found = lookup(ref, targets[:, None])
    if not bool(found.all() and ref_found.all()):
        raise BridgeError("the engine's top-k log-probabilities lack the actual next token at some position",
                          fix="the serving adapter must list the actual token in every row")
    if ref.ids is None and got.ids is None:
        p_log, q_log = ref.logprobs.float(), got.logprobs.float()
        kl, rest = (p_log.exp() * (p_log - q_log)).sum(-1), torch.zeros(n)
    else:
        ids = ref.ids if ref.ids is not None else got.ids  # the listed tokens; a sparse reference's first
        p_log, p_found = lookup(ref, ids)
        q_log, q_found = lookup(got, ids)
        both = p_found & q_found
        p, q = torch.where(both, p_log.exp(), 0.0), torch.where(both, q_log.exp(), 0.0)
        rest = (1 - p.sum(-1)).clamp(min=0)
        q_rest = (1 - q.sum(-1)).clamp(min=Q_REST_FLOOR)
        head = torch.where(both, p * (p_log - q_log), 0.0).sum(-1)
        tail = torch.where(rest > 0, rest * (rest.clamp(min=1e-30).log() - q_rest.log()), 0.0)
        kl = head + tail
    top1, ref_top1 = argmax(got), argmax(ref)
    return Rows(kl, top1 == ref_top1, top1, ref_top1, logp[:, 0], ref_logp[:, 0], rest)


def summary(rows: list[Rows]) -> dict:
    kl = torch.cat([r.kl for r in rows]).double()
    rest = torch.cat([r.rest for r in rows])
    out = {"tokens": int(kl.numel()),
           # identical distributions give |KL| ~ 1e-8 of float32 rounding, of either sign: that is 0
           "kl_mean": max(kl.mean().item(), 0.0), "kl_p99": max(torch.quantile(kl, 0.99).item(), 0.0),
           "top1": torch.cat([r.same_top1 for r in rows]).float().mean().item()}
    if rest.any():
        out["rest_mass"] = rest.mean().item()
    return out


class AnswerScorer:
    """Holds the reference's log-probabilities along its own answers and the expected ones; scores any export."""

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers
        # each distinct sequence once: where the reference answered correctly its answer is the expected one
        self.sequences = list(dict.fromkeys(tuple(s) for t in teachers for s in (t.kept, t.gold)))
        self.index = {s: i for i, s in enumerate(self.sequences)}
        self.starts = {}
        for t in teachers:
            self.starts[self.index[tuple(t.kept)]] = self.starts[self.index[tuple(t.gold)]] = t.start
        self.ref: list[TokenScores] = []  # the reference's answer rows for `inputs` (reference_rows)

    @property
    def inputs(self) -> list[list[int]]:
        return [list(s) for s in self.sequences]

    def reference_rows(self, logits: Iterable[torch.Tensor]) -> list[TokenScores]:
        """From the reference's [n, vocab] logits for `inputs`: its answer rows, sparse (top-k + actual token)."""
        out = []
        for i, lg in enumerate(logits):
            start = self.starts[i]
            out.append(sparse(torch.log_softmax(lg[start - 1:-1].float(), -1), torch.tensor(self.sequences[i][start:])))
        return out

    def score(self, scores: Iterable[TokenScores]) -> dict:
        """scores: the export's TokenScores for `inputs`, in order; self.ref: the reference's answer rows."""
        rows = []
        for i, (got, ref) in enumerate(zip(scores, self.ref)):
            start = self.starts[i]
            rows.append(compare_rows(ref, rows_from(got, start - 1), torch.tensor(self.sequences[i][start:])))
        if len(rows) != len(self.sequences):
            raise BridgeError(f"the export scored {len(rows)} of {len(self.sequences)} held-out sequences",
                              fix="the engine stopped early: see its log")
        kept = [rows[self.index[tuple(t.kept)]] for t in self.teachers]
        gold = [(rows[self.index[tuple(t.gold)]], torch.tensor(t.gold[t.start:])) for t in self.teachers]
        return {"records": len(self.teachers), **summary(kept),
                "answers_kept": sum(bool(r.same_top1.all()) for r in kept),
                "reference_correct": [bool((r.reference_top1 == g).all()) for r, g in gold],
                "served_correct": [bool((r.top1 == g).all()) for r, g in gold]}


def text_reference(windows: list[list[int]], logits: Iterable[torch.Tensor]) -> list[TokenScores]:
    """The reference's rows over the text windows, sparse, from its [n, vocab] logits for them."""
    return [sparse(torch.log_softmax(lg[:-1].float(), -1), torch.tensor(ids[1:])) for ids, lg in zip(windows, logits)]


def text_divergence(windows: list[list[int]], reference: list[TokenScores], scores: Iterable[TokenScores]) -> dict:
    """The export against the reference over the reference text's windows."""
    rows = [compare_rows(ref, got, torch.tensor(ids[1:])) for ids, ref, got in zip(windows, reference, scores)]
    if len(rows) != len(windows):
        raise BridgeError(f"the export scored {len(rows)} of {len(windows)} text windows",
                          fix="the engine stopped early: see its log")
    nll = lambda key: -torch.cat([getattr(r, key) for r in rows]).double().mean().item()
    ppl, ppl_ref = torch.tensor(nll("logp")).exp().item(), torch.tensor(nll("reference_logp")).exp().item()
    return {**summary(rows), "ppl": ppl, "ppl_reference": ppl_ref, "ppl_ratio": ppl / ppl_ref}
