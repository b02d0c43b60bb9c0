"""Kernelspecs installed into temporary Jupyter data folders, found through JUPYTER_PATH."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from codegen_repl.kernel.install import KernelInstall, install_kernel


def install(prefix: Path, name: str, model: str | Path) -> Path:
    """The kernelspec under `prefix` (test_install.py runs the command itself); returns the
    data folder to put on JUPYTER_PATH."""
    install_kernel(KernelInstall(name=name, place="prefix", prefix=prefix, model=str(model)))
    return prefix / "share" / "jupyter"


@contextlib.contextmanager
def kernel_env(data: Path, user_config: Path | None = None) -> Iterator[None]:
    """Kernelspecs under `data` are found (by this process and the kernels it starts), and
    kernels read `user_config` (default: none) instead of the developer's config.toml."""
    config = user_config or data / "no-user-config.toml"
    before = {name: os.environ.get(name) for name in ("JUPYTER_PATH", "CODEGEN_REPL_CONFIG")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(data), before["JUPYTER_PATH"]]))
    os.environ["CODEGEN_REPL_CONFIG"] = str(config)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
