"""Built-in smoke checks: does the served export answer, tokenize, template, and behave like the model that was trained?

Each check gets the SmokeContext (qlora_bridge.api.SmokeContext) and returns {"passed": bool, ...figures}; a failed
gate says why in "why", naming the instrument and the figure. `divergence` and `task-score` read the figures that
ctx.measurements() computes once through the serving engine, and apply the export's bounds (ctx.bounds).
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

from qlora_bridge.api import PARITY_CORPUS, SmokeCheck, differences, hookimpl

PLUGIN_API = 11  # the plugin API this module was written for
PROBE = [{"role": "user", "content": "What is the capital of France?"}]
SPEED_TOKENS = 128  # long enough that the time per token, not the request, dominates


def sig(x: float) -> float:
    """Four significant digits: KL figures span 1e-9 (float32 copies) to 1 (a broken export)."""
    return float(f"{x:.4g}")


def max_tokens_for(ctx, expected: str) -> int:
    return len(ctx.tokenizer()(expected, add_special_tokens=False)["input_ids"]) + 8


def is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def declarations(ctx) -> dict:
    """What the export says about itself (special tokens, what its tokenizer adds, the chat template as rendered,
    RoPE, shape, a runtime's stop strings, the fine-tune it carries) against the merged model and the export's
    lineage. A file whose EOS is another token cuts answers where the model would not stop, and no teacher-forced
    figure can see it (issue 34)."""
    if ctx.declares is None:
        return {"passed": True, "not_checked": f"exporter {ctx.manifest['export']['target']!r} declares no reader"}
    found = differences(ctx.declares(ctx.artifact), ctx.merged_declared, ctx.tokenizer())
    said = [f"the export carries the fine-tune of adapter {d['export'][:12]}, its lineage names {d['merged'][:12]} "
            "(another training run)" if d["key"] == "adapter_sha256" else
            f"{d['key']}: the export says {d['export']!r}, the merged model {d['merged']!r}" for d in found]
    return {"passed": not any(d["gate"] for d in found), "differences": found,
            "why": "; ".join(w for w, d in zip(said, found) if d["gate"]),
            "reported": "; ".join(w for w, d in zip(said, found) if not d["gate"])}


def serves(ctx) -> dict:
    """Both endpoints answer, and a held-out request comes back whole: the turn ends on its own (not cut off by
    max_tokens), and where the reference answers in JSON, the served answer parses as JSON too."""
    out = ctx.client.post("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                              "temperature": 0.0})
    completion = out["choices"][0]
    problems = []
    if not isinstance(completion.get("text"), str) or completion.get("finish_reason") not in ("stop", "length"):
        problems.append(f"/v1/completions answered {json.dumps(completion)[:200]}")
    item = ctx.heldout[0] if ctx.heldout else None
    messages = item.prompt if item and isinstance(item.prompt, list) else PROBE
    budget = max_tokens_for(ctx, item.merged_answer) if item else 32
    chat = ctx.client.post("/v1/chat/completions", {"messages": messages, "max_tokens": budget, "temperature": 0.0})
    choice, usage = chat["choices"][0], chat.get("usage") or {}
    answer = choice["message"].get("content") or ""
    if choice.get("finish_reason") != "stop":
        problems.append(f"the chat answer did not end its turn within {budget} tokens "
                        f"(finish_reason {choice.get('finish_reason')!r}): {answer[:80]!r}")
    if not answer.strip():
        problems.append("the chat answer is empty")
    if item and is_json(item.merged_answer.strip()) and not is_json(answer.strip()):
        problems.append(f"the reference answers in JSON, the served answer does not parse: {answer[:80]!r}")
    if not 0 < usage.get("completion_tokens", 0) <= budget or usage.get("prompt_tokens", 0) <= 0:
        problems.append(f"implausible usage counts {usage}")
    return {"passed": not problems, "why": "; ".join(problems), "completion": completion.get("text", "")[:80],
            "chat": answer[:80]}


def tokenization(ctx) -> dict:
    if ctx.server.adapter.tokenize is None:
        return {"passed": False, "error": f"backend {ctx.server.backend} offers no tokenize call"}
    tok = ctx.tokenizer()
    wrong = [t for t in PARITY_CORPUS
             if ctx.server.adapter.tokenize(ctx.server, t) != tok(t, add_special_tokens=False)["input_ids"]]
    return {"passed": not wrong, "parity": f"{len(PARITY_CORPUS) - len(wrong)}/{len(PARITY_CORPUS)}",
            "why": f"{len(wrong)} corpus entries tokenized differently, first {wrong[0]!r}" if wrong else "",
            "details": wrong[:5]}


def chat_template(ctx) -> dict:
    """The server's prompt for a chat has exactly as many tokens as the Hugging Face template renders."""
    tok = ctx.tokenizer()
    messages = [{"role": "system", "content": "Answer briefly."}, *PROBE]
    want = len(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
               ["input_ids"])
    _, usage = ctx.client.generate(messages, 1)
    got = usage.get("prompt_tokens")
    return {"passed": got == want, "prompt_tokens_served": got, "prompt_tokens_hf": want,
            "why": "" if got == want else f"the served chat prompt has {got} tokens, the model's template {want}"}


def golden(ctx) -> dict:
    """Suite prompts, generated by the server at temperature 0, meet their match rules."""
    if not ctx.suite:
        return {"passed": False, "error": "no suite: pass --suite FILE, or merge with held-out data"}
    with ThreadPoolExecutor(4) as pool:  # a batching server (vLLM) answers them together
        answers = list(pool.map(lambda item: ctx.client.generate(item.prompt, max_tokens_for(ctx, item.expected))[0],
                                ctx.suite))
    passed = sum(item.passes(a) for item, a in zip(ctx.suite, answers))
    rate = passed / len(ctx.suite)
    return {"passed": rate >= ctx.min_pass_rate, "pass_rate": round(rate, 3), "min_pass_rate": ctx.min_pass_rate,
            "why": "" if rate >= ctx.min_pass_rate else f"pass rate {rate:.3f} < {ctx.min_pass_rate}",
            "prompts": len(ctx.suite),
            "details": [{"expected": i.expected, "got": a} for i, a in zip(ctx.suite, answers) if not i.passes(a)][:5]}


def divergence(ctx) -> dict:
    """KL divergence of the served next-token distributions from the reference's, along the reference's own
    held-out answers and over the reference document, and the perplexity ratio on the document."""
    m, b = ctx.measurements(), ctx.bounds
    answers, text = m["answers"], m["text"]
    over = [(f"mean KL along the held-out answers {answers['kl_mean']:.3g} nats/token > {b.kl_answers}",
             answers["kl_mean"] > b.kl_answers),
            (f"mean KL on the reference text {text['kl_mean']:.3g} nats/token > {b.kl_text}",
             text["kl_mean"] > b.kl_text),
            (f"perplexity ratio on the reference text {text['ppl_ratio']:.4f} > {b.ppl_ratio}",
             text["ppl_ratio"] > b.ppl_ratio)]
    figures = {"kl_answers": sig(answers["kl_mean"]), "kl_answers_p99": sig(answers["kl_p99"]),
               "top1_answers": round(answers["top1"], 4), "answer_tokens": answers["tokens"],
               "kl_text": sig(text["kl_mean"]), "kl_text_p99": sig(text["kl_p99"]),
               "top1_text": round(text["top1"], 4), "ppl_ratio": round(text["ppl_ratio"], 5),
               "ppl": round(text["ppl"], 3), "ppl_reference": round(text["ppl_reference"], 3),
               "text_tokens": text["tokens"]}
    # the reference is kept as its 128 most likely tokens per position: KL beyond them is grouped, a lower bound
    # short by at most this share of the reference's probability (qlora_bridge.measure.divergence)
    figures.update(rest_mass_text=sig(text.get("rest_mass", 0.0)), rest_mass_answers=sig(answers.get("rest_mass", 0.0)))
    return {"passed": not any(bad for _, bad in over), "why": "; ".join(w for w, bad in over if bad),
            **figures, "max_kl_answers": b.kl_answers, "max_kl_text": b.kl_text, "max_ppl_ratio": b.ppl_ratio,
            "engine_seconds": m["seconds"], "reference_seconds": m["reference_seconds"]}


def task_score(ctx) -> dict:
    """The held-out task score of the served model (greedy would give the expected answer) beside the reference's
    on the same prompts; fails on a drop that is both significant (exact McNemar) and beyond the bound."""
    m, b = ctx.measurements(), ctx.bounds
    task, n = m["task"], m["task"]["prompts"]
    significant = task["p_value"] < task["significance"]
    failed = significant and task["ratio"] < b.task_ratio
    why = (f"task score {task['served']:.3f} against the reference's {task['reference']:.3f} on {n} held-out "
           f"prompts (ratio {task['ratio']:.3f} < {b.task_ratio}, McNemar p = {task['p_value']:.3g})") if failed else ""
    lo, hi = task["interval"]
    return {"passed": not failed, "why": why, "task_score": round(task["served"], 4),
            "task_score_reference": round(task["reference"], 4), "ratio": round(task["ratio"], 4),
            "min_ratio": b.task_ratio, "p_value": task["p_value"], "interval_95": f"[{lo:+.3f}, {hi:+.3f}]",
            "reference_only": task["reference_only"], "served_only": task["served_only"], "prompts": n,
            # answer agreement: greedy decoding would repeat the reference's answer word for word
            "agreement": round(m["answers"]["answers_kept"] / m["answers"]["records"], 4)}


def speed(ctx) -> dict:
    """Tokens per second over SPEED_TOKENS generated tokens (end-of-text banned so the count is the same)."""
    tok = ctx.tokenizer()
    body = {"prompt": "Once upon a time, in a lighthouse by the sea,", "max_tokens": SPEED_TOKENS,
            "temperature": 0.0, "logit_bias": {str(i): -100 for i in tok.all_special_ids}}
    start = time.time()
    out = ctx.client.post("/v1/completions", body)
    seconds = time.time() - start
    n = (out.get("usage") or {}).get("completion_tokens", 0)
    return {"passed": n > 0, "latency_s": round(seconds, 3), "completion_tokens": n,
            "tokens_per_second": round(n / seconds, 2) if seconds else None}


@hookimpl
def register_smoke_checks(register):
    register(SmokeCheck("declarations", declarations,
                        description="what the export declares (tokens, template, RoPE, shape, lineage) == the "
                                    "merged's"))
    register(SmokeCheck("serves", serves, description="both endpoints answer; a held-out request comes back whole"))
    register(SmokeCheck("tokenization", tokenization, description="served tokenizer == merged model's, on the corpus"))
    register(SmokeCheck("chat-template", chat_template, description="chat prompt renders to as many tokens as HF's"))
    register(SmokeCheck("golden", golden, description="suite prompts at temperature 0 meet their match rules"))
    register(SmokeCheck("divergence", divergence,
                        description="KL to the reference on its held-out answers and a long text, perplexity ratio"))
    register(SmokeCheck("task-score", task_score,
                        description="held-out task score beside the reference's, paired (exact McNemar)"))
    register(SmokeCheck("speed", speed, gate=False, description="tokens per second over 128 tokens (recorded)"))
