"""Built-in text for tokenizer parity: ASCII, code, whitespace runs, numbers, unicode, emoji, special tokens.

Exporters use it to choose and prove a tokenizer conversion; smoke checks use it to compare a served model's
tokenization with the merged model's. Each entry is tokenized on its own.
"""

PARITY_CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\n\nnewlines\r\nwindows line end",
    "    indented line\n        deeper\n",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-5 2026-11-30 10:30pm $1,234.56 50%",
    "in 2024 there were 365 days; 007 and 1000000",
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    'if (x != y && z >= 10) { printf("%d\\n", x << 2); } // C-style',
    '{"intent": "meeting", "person": "Aiko", "day": "Thursday", "priority": "high"}',
    "SELECT name, COUNT(*) FROM users WHERE age > 21 GROUP BY name;",
    "https://example.com/path?query=1&lang=en#frag user@example.org",
    "Ünïcödé: café naïve résumé Straße Ærøskøbing",
    "Ελληνικά, русский язык, العربية, עברית, हिन्दी",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "Punctuation!!! ??? ... --- *** ___ ~~~ ``` '''",
    "CamelCaseWords and snake_case_words and kebab-case-words",
    "I'm you're we'll they'd it's don't can't Won't",
    "   ",
    "\n",
    "a",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text<|endoftext|>",
    # wider: where pre-tokenizers that agree on the lines above part ways (digit classes, scripts, symbols)
    "Arabic-Indic ٠١٢٣٤٥٦٧٨٩ and ۱۲۳ Persian, Devanagari १२३४, Thai ๑๒๓, Bengali ১২৩",
    "Fullwidth １２３４５ ＡＢＣ and halfwidth ｶﾀｶﾅ; Roman Ⅻ ⅷ; superscripts x² y³ H₂O",
    "Fractions ½ ¼ ¾ ⅓ ⅞, circled ① ② ⑳ ❶, dingbat numbers ➊ ➋",
    "Prices: €1.234,56 £99 ¥1000 ₹2,50,000 ₩5000 ₿0.001 ¢50",
    "Math: ∀x∈ℝ, ∑ᵢ xᵢ² ≤ ∫₀^∞ e^{-t} dt ≠ ∞ ± √2 ≈ 1.414 → ∂f/∂x",
    "ไทย ภาษาไทยไม่มีช่องว่าง, ქართული, Հայերեն, தமிழ், తెలుగు, ᓀᐦᐃᔭᐍᐏᐣ, አማርኛ",
    "Tiếng Việt có dấu: Hà Nội, Đà Nẵng; Türkçe ığüşöç İI; Polski źćżłń; Čeština ěščřž",
    "no-break\u00a0space, ideographic\u3000space, thin\u2009space, zero\u200bwidth, soft\u00adhyphen",
    "\n\n\n\n  \t \n \r\r\n\t\t\t end  ",
    "Mixed123numbers456in789words and x86_64 and v2.0.1-rc3 and 0x7fff and 1_000_000",
    "<s>[INST] question [/INST] answer</s><|begin_of_text|><|eot_id|><start_of_turn>user\n<end_of_turn>",
    "ＡＩは「すごい」！？…〜 カタカナ ひらがな 漢字、中文標點：「」『』《》",
]

# Reference prose for the equivalence check of a merge and the perplexity of served exports: plain English with a
# little code, numbers and the demo's JSON, several hundred tokens on common tokenizers.
REFERENCE_TEXT = (
    "The committee met on Thursday to review the budget. After a long discussion, the members agreed to fund "
    "the new library, provided that the construction starts before the end of the year.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    '{"intent": "meeting", "person": "Alice", "day": "Monday", "priority": "normal"}\n'
    "Photosynthesis converts light energy into chemical energy, which the plant stores as sugar. Oxygen is "
    "released as a by-product. In 1905, Albert Einstein published four papers that changed physics; one of them "
    "explained the photoelectric effect, for which he later received the Nobel Prize. Remind me to call Omar on "
    "Friday. Urgent: cancel the meeting with Priya on Tuesday. The quick brown fox jumps over the lazy dog 42 "
    "times, and then 17 more. Water boils at 100 degrees Celsius at sea level, but at lower temperatures on "
    "mountains, because the air pressure there is lower. SELECT name, total FROM orders WHERE total > 100;\n\n"
    "A river begins as a spring or as melting snow high in the mountains. As it flows downhill it collects water "
    "from smaller streams, and by the time it reaches the plain it has become wide and slow. Many cities were "
    "built on rivers, because the water was used for drinking, for farming and for transport. Today, rivers also "
    "produce electricity: a dam holds the water back, and the falling water turns a turbine. When you write a "
    "letter, start with the date and a greeting, say what you want in the first paragraph, and end with a short "
    "summary and your name. Good software is tested: each function does one thing, and a test checks that it "
    "does it, so that a change which breaks it is noticed before anyone depends on it."
)


# The pydoc topics that make up the reference document: text disjoint from it (calibration_text) leaves them out.
REFERENCE_TOPICS = ("objects", "execmodel", "exceptions", "import", "context-managers", "truth", "lambda", "calls")


def calibration_text() -> str:
    """General prose with code for calibrating quantizers, disjoint from the smoke gate's reference document: the
    other pydoc topics of the running CPython's language reference (~430k characters, ~100k tokens), in name
    order. It varies with the Python version; whoever uses it records its digest."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics) if k not in REFERENCE_TOPICS)


def reference_document() -> str:
    """~8k tokens of prose with some code (8,239 on SmolLM2's tokenizer), the same for every target: the smoke
    gate's long reference text, long enough that its divergence and perplexity figures are stable (on the ~400-token
    REFERENCE_TEXT a Q8_0 export read +2.9% perplexity, over 8k tokens +0.5%). It is part of CPython's language
    reference (the `pydoc_data` topics objects, execmodel, exceptions, import, context-managers, truth, lambda and
    calls), shipped with the package so that every Python version scores the same text; Python Software Foundation
    License, see reference_text.NOTICE."""
    from pathlib import Path

    return (Path(__file__).with_name("reference_text.txt")).read_text(encoding="utf-8")
