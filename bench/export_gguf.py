"""GGUF export benchmark: ours beside llama.cpp's own converter and quantizer, on a synthetic 1.1B-shaped model.

    python bench/export_gguf.py                    # F16, Q8_0 and Q4_K_M each way, plus a plain copy as the floor
    python bench/export_gguf.py --imatrix          # also with the importance matrix (ours: computed from data;
                                                   # llama.cpp's: llama-imatrix on the same text), which is slow

Ours runs `export --target gguf` (parity search, conversion, quantization, read-back, Modelfile) with
--option imatrix=off unless --imatrix; llama.cpp's is its convert_hf_to_gguf.py (from the llama-cpp-python source
distribution, with its own gguf-py; the synthetic tokenizer's unknown hash is mapped to "gpt-2", the pre-tokenizer
our parity search picks for it) then its llama-quantize (the build the exporter uses), each in its own process.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_runner import run  # noqa: E402
from synthetic import build  # noqa: E402

# llama.cpp's converter refuses a tokenizer whose hash it does not know (every locally trained one)
CONVERT = """import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timed(argv: list) -> tuple[float, float]:
    """Wall seconds and the process's peak RSS in MiB (from wait4: this small parent adds ~nothing)."""
    t = time.time()
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{argv[0]} failed: {proc.stderr.read()[-2000:]!r}")
    return time.time() - t, usage.ru_maxrss / 1024


def llama_cpp(base: Path, work: Path, quants: list[str], imatrix_text: Path | None) -> list[dict]:
    from qlora_bridge.host import load_plugins

    load_plugins()  # the built-in gguf plugin is importable once loaded
    from qlora_bridge_gguf.tools import download, tools, unpack

    bin_dir, _ = tools(None, progress=True)
    src = next(work.glob("src/*/vendor/llama.cpp"), None)
    if src is None:
        src = unpack(download(__import__("llama_cpp").__version__, work, work / "download.log"), work)
    f16 = work / "llama.cpp-F16.gguf"
    convert_s, convert_rss = timed([sys.executable, "-c", CONVERT, src, base, "--outfile", f16, "--outtype", "f16"])
    rows = [{"name": "F16", "wall_s": convert_s, "convert": convert_s, "peak_rss_mib": convert_rss,
             "size_gb": f16.stat().st_size / 1e9}]
    matrix_s, matrix = 0.0, []
    if imatrix_text:
        matrix_s, _ = timed([bin_dir / "llama-imatrix", "-m", f16, "-f", imatrix_text, "-o", work / "m.gguf",
                             "--no-ppl", "--parse-special", "-t", os.cpu_count()])
        matrix = ["--imatrix", work / "m.gguf"]
    for q in quants:
        if q in ("F16", "F32", "BF16"):
            continue
        out = work / f"llama.cpp-{q}.gguf"
        s, rss = timed([bin_dir / "llama-quantize", *(matrix if q != "Q8_0" else []), f16, out, q, os.cpu_count()])
        rows.append({"name": q, "wall_s": convert_s + matrix_s + s, "convert": convert_s, "quantize": s,
                     "imatrix": matrix_s if matrix and q != "Q8_0" else None, "peak_rss_mib": max(convert_rss, rss),
                     "size_gb": out.stat().st_size / 1e9})
        out.unlink()
    f16.unlink()
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/qlora-bridge-bench", help="scratch folder")
    p.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    p.add_argument("--imatrix", action="store_true")
    a, _ = p.parse_known_args()
    try:  # llama.cpp's converter imports it before looking for a tokenizer.model
        import sentencepiece  # noqa: F401
    except ImportError:
        raise SystemExit("llama.cpp's convert_hf_to_gguf.py needs sentencepiece: pip install sentencepiece") from None
    work = Path(a.work)
    base, _ = build("1.1b", work / "inputs")
    quants = a.quants.split(",")
    ours = run(__file__, base, work, [("gguf", q) for q in quants], {} if a.imatrix else {"imatrix": "off"},
               {"parity s": "seconds_parity", "convert s": "seconds_convert", "imatrix s": "seconds_imatrix",
                "quantize s": "seconds_quantize"})
    text = None
    if a.imatrix:  # the text our export's matrix was computed from: general text alone (no training data here)
        from transformers import AutoTokenizer

        from qlora_bridge.calibration import general_text
        from qlora_bridge_gguf.imatrix import CHUNK, GENERAL_ONLY

        tok = AutoTokenizer.from_pretrained(base)
        text = work / "imatrix.txt"
        text.write_text("".join(tok.decode(b) for b in general_text(tok, CHUNK, GENERAL_ONLY)[0]))
    theirs = llama_cpp(base, work, quants, text)
    print("\nllama.cpp's convert_hf_to_gguf.py + llama-quantize" + (" + llama-imatrix" if text else ""))
    print(f"{'export':<12}{'wall s':>8}{'convert s':>11}{'imatrix s':>11}{'quantize s':>12}{'peak RSS MiB':>14}"
          f"{'size GB':>9}")
    for r in theirs:
        cells = [f"{r.get(k):>{w}.1f}" if r.get(k) is not None else f"{'-':>{w}}"
                 for k, w in (("convert", 11), ("imatrix", 11), ("quantize", 12))]
        print(f"{r['name']:<12}{r['wall_s']:>8.1f}{''.join(cells)}{r['peak_rss_mib']:>14.0f}{r['size_gb']:>9.2f}")
    print("\nours / llama.cpp, wall: " + ", ".join(
        f"{t['name']} {o['wall_s'] / t['wall_s']:.2f}x" for t in theirs for o in ours if o["name"] == t["name"] and o["ok"]))
    print(json.dumps({"ours": ours, "llama.cpp": theirs}))
