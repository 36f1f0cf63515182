"""What the instruments read: a model's next-token scores along a sequence, from any engine (re-exported by the
plugin API, since a serving backend's `logprobs` returns them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class TokenScores:
    """A model's next-token log-probabilities along one token sequence, as its engine computed them: row j is the
    distribution of token j + 1 given tokens 0..j, so a sequence of n tokens has n - 1 rows.

        TokenScores(torch.log_softmax(logits[:-1], -1))  # the full vocabulary, from [n, vocab] logits
        TokenScores(logprobs=top_k_logprobs, ids=top_k_ids)  # [n - 1, k], padded with id -1 and -inf
    """
    logprobs: "torch.Tensor"  # [n - 1, k] float32 log-probabilities
    ids: "torch.Tensor | None" = None  # [n - 1, k] their token ids (each row must hold the actual next token);
    # None: the columns are the whole vocabulary in order
