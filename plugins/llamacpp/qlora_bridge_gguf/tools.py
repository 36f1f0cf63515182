"""llama.cpp's own `llama-imatrix` and `llama-quantize`, built once from the sources llama-cpp-python vendors.

llama-cpp-python passes an importance matrix to its quantizer only as an opaque C++ pointer, so quantizing with
one takes llama.cpp's tools. They are built from the same llama-cpp-python release that is installed (same
llama.cpp commit: the files they write are the ones the library reads), static, with the library's flags for
this CPU (never the AMX kernels: see qlora_bridge_llamacpp.build), and cached under those flags' key:

    bin, built_from = tools(sdist=None, progress=True)  # ~3.5 min the first time
    subprocess.run([bin / "llama-quantize", "--imatrix", "m.imatrix", "in.gguf", "out.gguf", "Q4_K_M"])
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from qlora_bridge.api import BridgeError, cache_dir

from qlora_bridge_llamacpp.build import build_key, cmake_flags, cpu_flags

TARGETS = ("llama-imatrix", "llama-quantize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF")


def tools(sdist: str | None, progress: bool) -> tuple[Path, str]:
    """The folder holding TARGETS for the installed llama-cpp-python, building them on first use, and what they
    were built from."""
    import llama_cpp

    version = llama_cpp.__version__
    home = cache_dir() / "llama.cpp-tools" / f"{version}-{build_key()}"
    if not all((home / t).is_file() for t in TARGETS):
        home.parent.mkdir(parents=True, exist_ok=True)
        with open(home.with_name(f"{home.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another export building them: wait, then use its build
            if not all((home / t).is_file() for t in TARGETS):
                build(home, version, sdist, progress)
    return home, f"llama.cpp vendored by llama-cpp-python {version}"


def build(home: Path, version: str, sdist: str | None, progress: bool) -> None:
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None or shutil.which("c++") is None:
        raise BridgeError("building llama.cpp's quantizer needs cmake and a C++ compiler", field="--option imatrix",
                          fix="install them (pip install cmake; apt install g++), or export with --option imatrix=off")
    log = home.with_name(f"{home.name}.build.log")  # the compiler's output, beside the cache
    log.unlink(missing_ok=True)
    for stale in home.parent.glob(f"{home.name}.partial-*"):  # a build that died (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    if progress:
        print(f"building llama.cpp {', '.join(TARGETS)} from llama-cpp-python {version}'s sources, once "
              f"(~4 min on 2 cores; cached in {home})", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"{home.name}.partial-", dir=home.parent) as tmp:
        tmp = Path(tmp)
        source = unpack(Path(sdist) if sdist else download(version, tmp, log), tmp)
        ninja = ["-G", "Ninja"] if shutil.which("ninja") else []  # faster than make where present
        run([cmake, "-S", str(source), "-B", str(tmp / "build"), *ninja, *CMAKE_FLAGS,
             *cmake_flags(cpu_flags())], log)
        run([cmake, "--build", str(tmp / "build"), "--target", *TARGETS, "-j", str(os.cpu_count() or 1)], log)
        staged = tmp / "bin"
        staged.mkdir()
        for t in TARGETS:
            shutil.copy2(tmp / "build" / "bin" / t, staged / t)
        shutil.rmtree(home, ignore_errors=True)
        staged.rename(home)  # complete or absent


def download(version: str, into: Path, log: Path) -> Path:
    """llama-cpp-python's source distribution through pip (its index, proxy and cache settings)."""
    run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps", "--no-binary",
         "llama-cpp-python", "-d", str(into)], log,  # ":all:" would also build its build tools (cmake) from source
        fix="on a machine without the package index, download llama_cpp_python-VERSION.tar.gz elsewhere and pass "
            "--option llama_cpp_sdist=FILE; or --option imatrix=off")
    return next(into.glob("llama_cpp_python-*.tar.gz"))


def unpack(sdist: Path, into: Path) -> Path:
    """Only vendor/llama.cpp of the source distribution."""
    if not sdist.is_file():
        raise BridgeError("llama-cpp-python source distribution not found", file=sdist,
                          field="--option llama_cpp_sdist", fix="give the llama_cpp_python-VERSION.tar.gz of the "
                          "installed version (pip download llama-cpp-python==VERSION --no-deps "
                          "--no-binary llama-cpp-python)")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        if not members:
            raise BridgeError("no vendor/llama.cpp in this archive", file=sdist, field="--option llama_cpp_sdist",
                              fix="give llama-cpp-python's source distribution (llama_cpp_python-VERSION.tar.gz)")
        tar.extractall(into / "src", members=members, filter="data")
    return next((into / "src").glob("*/vendor/llama.cpp"))


def run(argv: list[str], log: Path, fix: str = "see the build log; or export with --option imatrix=off"):
    with open(log, "a") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise BridgeError(f"{Path(argv[0]).name} {argv[1]} failed (exit {proc.returncode})", file=log, fix=fix)
