"""llama.cpp compiled for the CPU it runs on, never with the AMX kernels that fault on Intel Xeons with AMX."""

import shutil
import subprocess
from pathlib import Path

import pytest

import qlora_bridge_llamacpp.build as lb
from qlora_bridge.errors import BridgeError

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi2 avx2"
AVX512 = "avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16"
CPUS = {  # the flags lines of the three machine kinds this project runs on (shortened to what matters)
    "avx2": BASE,
    "avx512 (AMD EPYC)": f"{BASE} {AVX512}",
    "avx512 + amx (Intel Xeon)": f"{BASE} {AVX512} amx_bf16 amx_tile amx_int8",
}


def options(flags: str) -> dict[str, str]:
    return dict(a[2:].split("=") for a in lb.cmake_flags(lb.cpu_flags(f"processor: 0\nflags\t\t: {flags}\n"),
                                                         "x86_64"))


@pytest.mark.parametrize("cpu", CPUS)
def test_the_build_never_compiles_the_amx_kernels_and_never_native(cpu):
    chosen = options(CPUS[cpu])
    assert chosen["GGML_NATIVE"] == "OFF"  # -march=native would define __AMX_INT8__ on an AMX CPU
    assert chosen["GGML_AMX_TILE"] == chosen["GGML_AMX_INT8"] == chosen["GGML_AMX_BF16"] == "OFF"
    assert chosen["GGML_AVX2"] == chosen["GGML_FMA"] == chosen["GGML_F16C"] == "ON"


def test_each_cpu_gets_its_own_vector_extensions_and_no_more():
    avx2, amd, intel = (options(CPUS[c]) for c in CPUS)
    assert avx2["GGML_AVX512"] == avx2["GGML_AVX512_BF16"] == "OFF"  # would be illegal instructions there
    assert amd["GGML_AVX512"] == amd["GGML_AVX512_VNNI"] == amd["GGML_AVX512_BF16"] == "ON"
    assert intel == amd  # AMX adds nothing to the build
    partial = options(BASE + " avx512f avx512cd avx512vl")  # no DQ/BW: ggml's AVX512 switch needs all five
    assert partial["GGML_AVX512"] == "OFF"


def test_the_cache_key_follows_the_build_not_the_machine():
    keys = {c: lb.build_key(lb.cpu_flags(f"flags: {f}"), "x86_64") for c, f in CPUS.items()}
    assert keys["avx2"] != keys["avx512 (AMD EPYC)"] == keys["avx512 + amx (Intel Xeon)"]


def test_off_x86_the_build_stays_native():
    assert lb.cmake_flags(set(), "aarch64")[0] == "-DGGML_NATIVE=ON"


@pytest.mark.skipif(not shutil.which("gcc") or not shutil.which("objdump"), reason="needs gcc and objdump")
def test_the_instrument_finds_amx_code_where_there_is_some(tmp_path):
    """The disassembly check below can fail: an object with one AMX tile configuration is caught."""
    src = tmp_path / "amx.c"
    src.write_text("#include <immintrin.h>\nvoid f(const void *cfg) { _tile_loadconfig(cfg); _tile_release(); }\n")
    subprocess.run(["gcc", "-O2", "-mamx-tile", "-c", str(src), "-o", str(tmp_path / "amx.o")], check=True)
    subprocess.run(["gcc", "-O2", "-c", "-x", "c", "-", "-o", str(tmp_path / "plain.o")],
                   input=b"int g(void){return 1;}\n", check=True)
    assert "ldtilecfg" in lb.amx_instructions(tmp_path / "amx.o")
    assert lb.amx_instructions(tmp_path / "plain.o") == []


def test_the_installed_llama_cpp_has_no_amx_kernels():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF extra: pip install '.[gguf]'")
    if not shutil.which("objdump"):
        pytest.skip("objdump (binutils) reads the library's code")
    info = llama_cpp.llama_print_system_info().decode()
    assert not lb.amx_compiled(info), info
    libraries = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so*"))
    assert libraries, "llama-cpp-python's CPU backend library not found"
    assert all(lb.amx_instructions(lib) == [] for lib in libraries)
    lb.refuse_faulting_build()  # and the guard lets it through


def test_a_faulting_build_on_an_amx_cpu_is_refused_with_the_fix(monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF extra: pip install '.[gguf]'")
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AVX512 = 1 | AMX_INT8 = 1 |")
    monkeypatch.setattr(lb, "has_amx", lambda flags=None: True)
    with pytest.raises(BridgeError, match="compiled with llama.cpp's AMX kernels") as e:
        lb.refuse_faulting_build()
    assert "GGML_NATIVE" not in e.value.fix and "qlora_bridge_llamacpp.build cmake-args" in e.value.fix
    monkeypatch.setattr(lb, "has_amx", lambda flags=None: False)  # the same build on a CPU without AMX runs
    lb.refuse_faulting_build()
