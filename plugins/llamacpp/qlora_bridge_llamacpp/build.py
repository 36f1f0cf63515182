"""How llama.cpp is compiled here, so that the one build serves, scores and quantizes on this CPU.

llama.cpp's native build (`-DGGML_NATIVE=ON`, pip's default for llama-cpp-python) compiles its AMX kernels on an
Intel Xeon that reports AMX, and those fault at `ldtilecfg` on the first Q4_K product on many of them, VMs above
all (llama.cpp #20824, ollama #17249): the server dies on its first request, the in-process scorer with signal 11.
So the build names this CPU's vector extensions one by one, as llama.cpp's own options, and never the AMX ones:

    AVX2 only                 -> SSE4.2 AVX AVX2 FMA F16C BMI2
    AVX-512 (AMD EPYC)        -> the above + AVX512 (F/CD/VL/DQ/BW), VBMI, VNNI, BF16 where present
    AVX-512 + AMX (Xeon 4th+) -> the same as AVX-512: AMX off

Every compiled llama.cpp (llama-cpp-python's wheel, llama-imatrix, llama-quantize) takes these flags, and a cache
of one is keyed by `build_key`, so a cache carried to another CPU is not reused there. Standard library only: the
Makefile runs this file before anything is installed:

    python3 plugins/llamacpp/qlora_bridge_llamacpp/build.py cmake-args   # the CMAKE_ARGS for this CPU
    python3 plugins/llamacpp/qlora_bridge_llamacpp/build.py wheel        # build (once) and print the wheel's path
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

# llama.cpp option -> the /proc/cpuinfo flags it needs (all of them)
X86_OPTIONS = {"GGML_SSE42": ("sse4_2",), "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_FMA": ("fma",),
               "GGML_F16C": ("f16c",), "GGML_BMI2": ("bmi2",), "GGML_AVX_VNNI": ("avx_vnni",),
               # ggml's AVX512 switch compiles for F, CD, VL, DQ and BW together
               "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
               "GGML_AVX512_VBMI": ("avx512vbmi",), "GGML_AVX512_VNNI": ("avx512_vnni",),
               "GGML_AVX512_BF16": ("avx512_bf16",)}
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # the kernels that fault (see above)
# what the Makefile's build leaves out beside the library: the server's Python side needs nothing compiled
COMMON = ("-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF")
# instructions only an AMX kernel contains: a compiled file holding one was built with AMX
AMX_INSTRUCTIONS = ("ldtilecfg", "tdpbssd", "tdpbusd", "tdpbf16ps", "tileloadd")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags line of /proc/cpuinfo (the first processor's; they agree)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cmake_flags(flags: set[str], machine: str | None = None) -> list[str]:
    """llama.cpp's CMake options for a CPU with these flags. Off x86-64 (ARM) the native build has no AMX to
    fault, so it stays native."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"]
    chosen = [f"-D{opt}={'ON' if all(f in flags for f in needs) else 'OFF'}" for opt, needs in X86_OPTIONS.items()]
    return [*COMMON, *chosen, *(f"-D{opt}=OFF" for opt in NEVER)]


def build_key(flags: set[str] | None = None, machine: str | None = None) -> str:
    """Names a build by what it was compiled for, not by the machine: two CPUs with the same extensions share it."""
    args = cmake_flags(cpu_flags() if flags is None else flags, machine)
    return hashlib.sha256(" ".join(args).encode()).hexdigest()[:12]


def has_amx(flags: set[str] | None = None) -> bool:
    return "amx_tile" in (cpu_flags() if flags is None else flags)


def amx_compiled(system_info: str) -> bool:
    """Whether a llama.cpp build's system info (llama_print_system_info) says its AMX kernels are in."""
    return "AMX_INT8 = 1" in system_info


def refuse_faulting_build() -> None:
    """Refuse, before a server or an in-process scorer dies of it, a llama-cpp-python compiled with the AMX kernels
    (pip's native build) on a CPU that reports AMX."""
    import llama_cpp

    from qlora_bridge.api import BridgeError

    if has_amx() and amx_compiled(llama_cpp.llama_print_system_info().decode(errors="replace")):
        raise BridgeError(
            f"llama-cpp-python {llama_cpp.__version__} was compiled with llama.cpp's AMX kernels, which fault on the "
            "first 4-bit matrix product on many Intel Xeons with AMX (this CPU reports AMX; llama.cpp #20824)",
            field="llama-cpp-python", fix="reinstall it for this CPU without them: CMAKE_ARGS=\"$(python -m "
            "qlora_bridge_llamacpp.build cmake-args)\" pip install --force-reinstall --no-deps "
            f"--no-cache-dir llama-cpp-python=={llama_cpp.__version__} (`make` builds it so)")


def amx_instructions(binary: Path) -> list[str]:
    """The AMX instructions in a compiled file's code (objdump's disassembly): empty for a build without them."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    return sorted({word for line in out.splitlines() for word in line.split()[1:2] if word in AMX_INSTRUCTIONS})


def pinned_version(pyproject: Path) -> str:
    """llama-cpp-python's version as pyproject.toml pins it (one place for the pin)."""
    import re

    found = re.search(r'"llama-cpp-python(?:\[[^\]]*\])?==([^"]+)"', pyproject.read_text())
    if not found:
        raise SystemExit(f"{pyproject}: no llama-cpp-python==VERSION pin")
    return found.group(1)


def wheel(cache: Path, version: str, pip: list[str]) -> Path:
    """llama-cpp-python's wheel built for this CPU, from source, once per version and build key. pip's own wheel
    cache keys a source build by version alone (a native build made on another CPU would be reused), so it is
    bypassed; the wheel lands complete or not at all."""
    home = cache / f"llama-cpp-python-{version}-{build_key()}"
    found = sorted(home.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    home.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": " ".join(cmake_flags(cpu_flags())),
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    print(f"building llama-cpp-python {version} for this CPU ({home.name}; ~5 min on 2 cores, once)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f".{home.name}.partial-", dir=home.parent) as tmp:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                        "-w", tmp, f"llama-cpp-python=={version}"], env=env, check=True,
                       stdout=sys.stderr)  # stdout carries the wheel's path to the Makefile
        os.rename(tmp, home)  # complete or absent
        os.mkdir(tmp)  # for TemporaryDirectory's cleanup
    return next(home.glob("llama_cpp_python-*.whl"))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "cmake-args":
        print(" ".join(cmake_flags(cpu_flags())))
    elif what == "key":
        print(build_key())
    elif what == "wheel":
        root = Path(__file__).resolve().parents[3]  # the checkout: the core's pyproject.toml holds the pin
        cache = Path(os.environ.get("QLORA_BRIDGE_CACHE", Path.home() / ".cache" / "qlora-bridge")) / "wheels"
        print(wheel(cache, pinned_version(root / "pyproject.toml"), [sys.executable, "-m", "pip"]))
    else:
        raise SystemExit("usage: build.py cmake-args | key | wheel")
