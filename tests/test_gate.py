"""The smoke gate's instruments: the KL estimators, the paired test, and where the bounds come from."""

import math

import pytest
import torch

from qlora_bridge.api import Bounds, TokenScores
from qlora_bridge.measure.divergence import Q_REST_FLOOR, compare_rows, full_scores, sparse, text_windows
from qlora_bridge.host import load_plugins
from qlora_bridge.stages.smoke import STRICT, gate_bounds
from qlora_bridge.measure.stats import mcnemar_drop, paired_interval


def test_identical_distributions_give_zero_and_known_ones_their_kl():
    logits = torch.randn(6, 300)
    ref = torch.log_softmax(logits, -1)
    targets = torch.randint(0, 300, (6,))
    for mine, theirs in ((TokenScores(ref), TokenScores(ref.clone())), (sparse(ref, targets), TokenScores(ref)),
                         (sparse(ref, targets), sparse(ref, targets, 20)), (TokenScores(ref), sparse(ref, targets, 20))):
        same = compare_rows(mine, theirs, targets)
        assert same.kl.abs().max() < 10 * Q_REST_FLOOR and bool(same.same_top1.all())
        assert torch.allclose(same.logp, same.reference_logp)
    # two-token distributions: KL((0.9, 0.1) || (0.5, 0.5)) = 0.9 ln 1.8 + 0.1 ln 0.2
    p, q = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    got = compare_rows(TokenScores(p.log()), TokenScores(q.log()), torch.tensor([0]))
    assert got.kl.item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-6)
    assert got.logp.item() == pytest.approx(math.log(0.5)) and got.reference_logp.item() == pytest.approx(math.log(0.9))


def listed(scores: TokenScores, vocab: int) -> torch.Tensor:
    if scores.ids is None:
        return torch.ones(scores.logprobs.shape[0], vocab, dtype=torch.bool)
    mask = torch.zeros(scores.ids.shape[0], vocab + 1, dtype=torch.bool)
    mask[torch.arange(mask.shape[0])[:, None], torch.where(scores.ids >= 0, scores.ids, vocab)] = True
    return mask[:, :vocab]  # column `vocab` took the padding


@pytest.mark.parametrize("ref_k,got_k", [(None, 20), (128, None), (128, 20)],
                         ids=["full-reference,vllm-top-k", "kept-reference,full-engine", "kept-reference,vllm-top-k"])
def test_the_grouped_estimator_is_a_lower_bound_short_by_exactly_the_tail_term(ref_k, got_k):
    torch.manual_seed(0)
    vocab, n = 400, 64
    p_log = torch.log_softmax(3 * torch.randn(n, vocab), -1)
    q_log = torch.log_softmax(p_log + 0.5 * torch.randn(n, vocab), -1)  # a damaged copy
    targets = torch.randint(0, vocab, (n,))
    exact = compare_rows(TokenScores(p_log), TokenScores(q_log), targets)
    ref = TokenScores(p_log) if ref_k is None else sparse(p_log, targets, ref_k)
    got = TokenScores(q_log) if got_k is None else sparse(q_log, targets, got_k)
    est = compare_rows(ref, got, targets)
    assert bool((est.kl <= exact.kl + 1e-6).all())  # the log-sum inequality
    # what it misses is p_rest * KL(P_rest || Q_rest) over the tokens not listed on both sides, as documented
    rest = ~(listed(ref, vocab) & listed(got, vocab))
    p, q = p_log.exp(), q_log.exp()
    p_rest, q_rest = (p * rest).sum(-1), (q * rest).sum(-1)
    p_tail = ((p * rest) / p_rest[:, None]).clamp(min=1e-30)
    q_tail = ((q * rest) / q_rest[:, None]).clamp(min=1e-30)
    bias = p_rest * (p_tail * (p_tail.log() - q_tail.log()) * rest).sum(-1)
    assert torch.allclose(exact.kl - est.kl, bias, atol=1e-5)
    assert torch.allclose(est.rest, p_rest, atol=1e-5)
    assert bool((est.top1 == exact.top1).all() and (est.reference_top1 == exact.reference_top1).all())
    assert torch.allclose(est.logp, exact.logp) and torch.allclose(est.reference_logp, exact.reference_logp)


def test_full_scores_drop_the_last_position_and_an_engine_without_the_actual_token_is_refused():
    logits = torch.randn(5, 10)
    assert full_scores(logits).logprobs.shape == (4, 10)
    from qlora_bridge.errors import BridgeError

    ref = torch.log_softmax(torch.randn(1, 10), -1)
    with pytest.raises(BridgeError, match="lack the actual next token"):
        compare_rows(TokenScores(ref), TokenScores(torch.tensor([[-0.1, -2.5]]), torch.tensor([[7, 8]])), torch.tensor([1]))


def test_text_windows_cover_the_text_once_and_start_with_bos_where_the_tokenizer_adds_one(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = tok("word " * 1500, add_special_tokens=False)["input_ids"]
    windows = text_windows(tok, "word " * 1500, size=512)
    assert all(len(w) <= 512 for w in windows)
    bos = tok.bos_token_id if tok("a")["input_ids"][0] == tok.bos_token_id else None
    body = [t for w in windows for t in (w[1:] if bos is not None else w)]
    assert body == ids[:len(body)] and len(body) >= len(ids) - 1


def test_an_answer_is_scored_up_to_the_token_that_ends_its_turn():
    from qlora_bridge.measure.divergence import teacher_sequences
    from qlora_bridge.tinymodel import SPM_CHAT_TEMPLATE, build_sentencepiece_tokenizer

    tok = build_sentencepiece_tokenizer()
    tok.eos_token = "</s>"  # as Gemma: the turn ends with <end_of_turn>, the text with another EOS
    answer = {"line": 1, "prompt": [{"role": "user", "content": "day one"}], "expected": "Monday", "got": "Monday"}
    (chat,) = teacher_sequences(tok, [answer])
    assert tok.chat_template == SPM_CHAT_TEMPLATE and chat.gold[-1] == tok.convert_tokens_to_ids("<end_of_turn>")
    (plain,) = teacher_sequences(tok, [{**answer, "prompt": "day one"}])
    assert plain.gold[-1] == tok.convert_tokens_to_ids("</s>")


def test_mcnemar_exact_values_and_the_interval():
    assert mcnemar_drop([True] * 9 + [False] * 2, [False] * 9 + [True] * 2)["p_value"] == 0.0327  # 67 / 2048
    assert mcnemar_drop([True, False], [True, False]) == {"reference_only": 0, "served_only": 0, "p_value": 1.0}
    # the AWQ of the issue: 0.70 -> 0.325 on 40 prompts is far beyond chance, 0.70 -> 0.65 is not
    ref = [True] * 28 + [False] * 12
    awq = [True] * 13 + [False] * 27
    assert mcnemar_drop(ref, awq)["p_value"] < 1e-4
    q8 = [True] * 26 + [False] * 14
    assert mcnemar_drop(ref, q8)["p_value"] > 0.2
    lo, hi = paired_interval(ref, awq)
    assert lo < -0.375 < hi < 0
    assert paired_interval(ref, ref) == (0.0, 0.0)
    assert paired_interval(ref, awq) == paired_interval(ref, awq)  # seeded


INHOUSE = '''
from qlora_bridge.api import Bounds, Exporter, ExportResult, hookimpl

PLUGIN_API = 2

@hookimpl
def register_exporters(register):
    register(Exporter(target="acme", export=lambda req: ExportResult(), format="acme", quant_types=("x4", "x8"),
                      bounds={"x4": Bounds(kl_answers=0.5, kl_text=0.6, ppl_ratio=2.0, task_ratio=0.5,
                                           reason="acme's own measurement")}))
'''


def test_bounds_come_from_the_exporters_registration(tmp_path):
    plugin = tmp_path / "acme.py"
    plugin.write_text(INHOUSE)
    registry = load_plugins([str(plugin)])
    manifest = lambda target, quant: {"export": {"target": target, "quant": quant}}
    bounds, source, _ = gate_bounds(registry, manifest("acme", "x4"))
    assert bounds == Bounds(0.5, 0.6, 2.0, 0.5, "acme's own measurement") and "declared by exporter 'acme'" in source
    bounds, source, _ = gate_bounds(registry, manifest("acme", "x8"))
    assert bounds is STRICT and "declares no bounds for x8" in source
    bounds, source, _ = gate_bounds(registry, manifest("gone", "q"))
    assert bounds is STRICT and "no installed exporter 'gone'" in source
    # every quant type a built-in exporter offers has bounds, each with its reason
    for target in ("gguf", "safetensors", "gptq", "awq"):
        exporter, _ = registry.exporter(target)
        assert set(exporter.bounds) == set(exporter.quant_types), target
        assert all(b.reason for b in exporter.bounds.values())
