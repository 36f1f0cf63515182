"""Built-in smoke checks: does the served export answer, tokenize, template, remember and perform like the merge?

Each check gets the SmokeContext (qlora_bridge.api.SmokeContext) and returns {"passed": bool, ...figures}.
"""

import json
import math
import time

from qlora_bridge.api import PARITY_CORPUS, REFERENCE_TEXT, SmokeCheck, hookimpl

PLUGIN_API = 1  # the plugin API this module was written for
PROBE = [{"role": "user", "content": "What is the capital of France?"}]


def max_tokens_for(ctx, expected: str) -> int:
    return len(ctx.tokenizer()(expected, add_special_tokens=False)["input_ids"]) + 8


def served_answers(ctx, items) -> list[str]:
    """Greedy answers of the served model, cached so golden and retention share them."""
    cache = ctx._cache.setdefault("served", {})
    out = []
    for item in items:
        key = json.dumps(item.prompt)
        if key not in cache:
            cache[key] = ctx.client.generate(item.prompt, max_tokens_for(ctx, item.expected))[0]
        out.append(cache[key])
    return out


def serves(ctx) -> dict:
    """Both endpoints answer with a well-formed completion (a model may legitimately stop at once)."""
    out = ctx.client.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                              "temperature": 0.0})
    chat = ctx.client.post("/v1/chat/completions", {"messages": PROBE, "max_tokens": 16, "temperature": 0.0})
    well_formed = all(r["choices"][0].get("finish_reason") in ("stop", "length") and
                      r.get("usage", {}).get("prompt_tokens", 0) > 0 for r in (out, chat))
    return {"passed": well_formed and isinstance(chat["choices"][0]["message"].get("content"), str),
            "completion": out["choices"][0]["text"][:80], "chat": (chat["choices"][0]["message"]["content"] or "")[:80]}


def tokenization(ctx) -> dict:
    if ctx.server.adapter.tokenize is None:
        return {"passed": False, "error": f"backend {ctx.server.backend} offers no tokenize call"}
    tok = ctx.tokenizer()
    wrong = [t for t in PARITY_CORPUS
             if ctx.server.adapter.tokenize(ctx.server, t) != tok(t, add_special_tokens=False)["input_ids"]]
    return {"passed": not wrong, "parity": f"{len(PARITY_CORPUS) - len(wrong)}/{len(PARITY_CORPUS)}",
            "details": wrong[:5]}


def chat_template(ctx) -> dict:
    """The server's prompt for a chat has exactly as many tokens as the Hugging Face template renders."""
    tok = ctx.tokenizer()
    messages = [{"role": "system", "content": "Answer briefly."}, *PROBE]
    want = len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"])
    _, usage = ctx.client.generate(messages, 1)
    got = usage.get("prompt_tokens")
    return {"passed": got == want, "prompt_tokens_served": got, "prompt_tokens_hf": want}


def golden(ctx) -> dict:
    if not ctx.suite:
        return {"passed": False, "error": "no suite: pass --suite FILE, or merge with held-out data"}
    answers = served_answers(ctx, ctx.suite)
    passed = sum(item.passes(a) for item, a in zip(ctx.suite, answers))
    rate = passed / len(ctx.suite)
    return {"passed": rate >= ctx.min_pass_rate, "pass_rate": round(rate, 3), "min_pass_rate": ctx.min_pass_rate,
            "prompts": len(ctx.suite),
            "details": [{"expected": i.expected, "got": a} for i, a in zip(ctx.suite, answers) if not i.passes(a)][:5]}


def retention(ctx) -> dict:
    """Held-out answers of the served model against the merged model's: an export that forgot the fine-tune fails."""
    items = ctx.heldout
    if not items:
        return {"passed": False, "error": "the lineage has no held-out answers of the merged model: merge with "
                "--heldout FILE"}
    answers = served_answers(ctx, items)
    same = sum(a.strip() == i.merged_answer.strip() for i, a in zip(items, answers))
    merged_em = sum(i.passes(i.merged_answer) for i in items) / len(items)
    served_em = sum(i.passes(a) for i, a in zip(items, answers)) / len(items)
    rate = same / len(items)
    return {"passed": rate >= ctx.thresholds["retention"], "retention": round(rate, 3),
            "min_retention": ctx.thresholds["retention"], "exact_match_served": round(served_em, 3),
            "exact_match_merged": round(merged_em, 3), "prompts": len(items)}


def quality(ctx) -> dict:
    """Perplexity on the reference text from the served log-probabilities, against the merged model's."""
    import torch

    if ctx.server.adapter.prompt_logprobs is None:
        return {"passed": False, "error": f"backend {ctx.server.backend} offers no prompt log-probabilities"}
    served = ctx.server.adapter.prompt_logprobs(ctx.server, REFERENCE_TEXT)
    ids = ctx.tokenizer()(REFERENCE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = ctx.reference_model()(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
    if len(served) != ids.shape[1] - 1:
        return {"passed": False, "error": f"the server scored {len(served)} tokens, the reference "
                f"{ids.shape[1] - 1}: the texts were tokenized differently"}
    ppl_ref, ppl_served = math.exp(nll), math.exp(-sum(served) / len(served))
    delta = ppl_served / ppl_ref - 1
    return {"passed": delta <= ctx.thresholds["ppl_delta"], "ppl_merged": round(ppl_ref, 4),
            "ppl_served": round(ppl_served, 4), "ppl_delta": round(delta, 5),
            "max_ppl_delta": ctx.thresholds["ppl_delta"], "tokens": len(served)}


def speed(ctx) -> dict:
    start = time.time()
    _, usage = ctx.client.generate([{"role": "user", "content": "Tell me a short story about a lighthouse."}], 48)
    seconds = time.time() - start
    n = usage.get("completion_tokens", 0)
    return {"passed": n > 0, "latency_s": round(seconds, 3), "completion_tokens": n,
            "tokens_per_second": round(n / seconds, 2) if seconds else None}


@hookimpl
def register_smoke_checks(register):
    register(SmokeCheck("serves", serves, description="completions and chat completions answer"))
    register(SmokeCheck("tokenization", tokenization, description="served tokenizer == merged model's, on the corpus"))
    register(SmokeCheck("chat-template", chat_template, description="chat prompt renders to as many tokens as HF's"))
    register(SmokeCheck("golden", golden, description="suite prompts at temperature 0 meet their match rules"))
    register(SmokeCheck("retention", retention, description="held-out answers equal the merged model's"))
    register(SmokeCheck("quality", quality, description="perplexity delta against the merged model"))
    register(SmokeCheck("speed", speed, gate=False, description="latency and tokens per second (recorded)"))
