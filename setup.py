"""Installs absorber_engine and absorber_kernels, and builds the C++ chunk scheduler in csrc/
and the sampler's Twister words (csrc/twister.cpp) with ninja. The benchmarks (benchmarks/) and the
evaluation (evals/) are not part of the installed library: they run from a clone (`absorber bench`,
`absorber eval`, `absorber demo`).

The extension is plain pybind11 + the C++ standard library, so building it never needs torch:
pip's isolated build environment only fetches setuptools, pybind11 and ninja.
"""

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
TWISTER = str(ROOT / "csrc" / "twister.cpp")      # the sampler's words: a module of its own
SOURCES = sorted(str(p) for p in (ROOT / "csrc").glob("*.cpp") if str(p) != TWISTER)
HEADERS = sorted(str(p) for p in (ROOT / "csrc").glob("*.h"))


class NinjaBuildExt(build_ext):
    """Writes a build.ninja for each extension and runs ninja on it (parallel, incremental)."""

    def build_extension(self, ext: Extension) -> None:
        import ninja
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(ROOT / "csrc")]
        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-pthread"]
        cflags += [f"-I{shlex.quote(i)}" for i in includes]
        ldflags = ["-shared", "-pthread"]
        if sys.platform == "darwin":
            ldflags += ["-undefined", "dynamic_lookup"]

        lines = [
            "ninja_required_version = 1.3",
            f"cxx = {cxx}",
            f"cflags = {' '.join(cflags)}",
            f"ldflags = {' '.join(ldflags)}",
            "rule compile",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $in",
            "rule link",
            "  command = $cxx $in $ldflags -o $out",
            "  description = LINK $out",
        ]
        objects = []
        for src in ext.sources:
            obj = build_dir / (Path(src).stem + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: compile {src}")
        lines.append(f"build {out}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        ninja_bin = Path(ninja.BIN_DIR) / "ninja"
        subprocess.check_call([str(ninja_bin), "-C", str(build_dir)])


setup(
    name="absorber-engine",
    version="0.1.0",
    description="Test-time context absorption by causal synchronization (Absorber LLM) for Hugging Face causal LMs",
    python_requires=">=3.10",
    packages=["absorber_engine", "absorber_engine.serve", "absorber_kernels"],
    ext_modules=[Extension("absorber_engine._scheduler", sources=SOURCES, depends=HEADERS),
                 Extension("absorber_engine._twister", sources=[TWISTER])],
    cmdclass={"build_ext": NinjaBuildExt},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm>=4.60",
        "peft>=0.14",
        "numpy>=1.24",
        # GGUF files (and the named real model, which ships as one) are dequantized by transformers.
        "gguf>=0.10",
        "accelerate>=1.0",
        # `absorber serve`: the OpenAI-compatible server.
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        # Triton is what runs the kernels on CUDA and under TRITON_INTERPRET=1 on CPU.
        # The tests, the benchmarks (matplotlib draws their plots) and the evaluation.
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "triton>=3.2", "openai>=1.30", "httpx>=0.27",
                 "matplotlib>=3.7",
                 # The fuzz campaign's coverage-guided engine; wheels exist only for these platforms, and
                 # python -m fuzz.campaign falls back to hypothesis without it.
                 "atheris>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64' "
                 "and python_version >= '3.11' and python_version < '3.14'"],
        "triton": ["triton>=3.2"],
    },
    entry_points={"console_scripts": ["absorber=absorber_engine.cli:main"]},
)
