"""Build the optional C++ extension `codegen_repl.model._cpu_matmul` (csrc/cpu_matmul.cc and
csrc/cpu_attention.cc).

Everything else about the package is in pyproject.toml. The extension is a weight-only
int8/bf16 matmul and a decode attention over the KV cache for XLA's CPU backend (see
model/cpu_matmul.py and model/cpu_attention.py); it compiles against the XLA
FFI headers that jaxlib ships (`jax.ffi.include_dir()`; jaxlib is in [build-system].requires).
Without a C++ compiler, or if the build fails, `pip install` still succeeds: the warning says
so and the model runs on the XLA path (`codegen-repl generate --verbose` shows which).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SKIP_MESSAGE = (
    "codegen-repl: the C++ CPU matmul was not built ({error}); int8/bf16 weights on the CPU "
    "will use XLA's slower path. Install a C++ compiler (g++ or clang++ with C++20) and "
    "reinstall to build it."
)


def xla_ffi_include() -> str:
    """The folder holding xla/ffi/api/ffi.h, from the jaxlib installed for the build."""
    import jaxlib

    folder = Path(jaxlib.__file__).parent / "include"
    if not (folder / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise FileNotFoundError(f"no XLA FFI headers under {folder}")
    return str(folder)


class OptionalBuildExt(build_ext):
    """Build what can be built; a missing compiler or header is a warning, never an error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # e.g. no compiler at all: PlatformError
            self.warn(SKIP_MESSAGE.format(error=error))

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("CODEGEN_BUILD_CPU_MATMUL", "1") == "0":
            self.warn(SKIP_MESSAGE.format(error="CODEGEN_BUILD_CPU_MATMUL=0"))
            return
        try:
            ext.include_dirs.append(xla_ffi_include())
            if self.compiler.compiler_type == "msvc":
                ext.extra_compile_args = ["/std:c++20", "/O2"]
            else:
                ext.extra_compile_args = ["-std=c++20", "-O3", "-fvisibility=hidden"]
            super().build_extension(ext)
        except Exception as error:  # CompileError, LinkError, ImportError (no jaxlib), ...
            self.warn(SKIP_MESSAGE.format(error=error))


setup(
    ext_modules=[
        Extension(
            "codegen_repl.model._cpu_matmul",
            sources=["csrc/cpu_matmul.cc", "csrc/cpu_attention.cc"],
            depends=["csrc/matmul_body.h", "csrc/matmul_amx.h"],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
