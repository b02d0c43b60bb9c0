"""The source files of a folder as git would see them: what `.gitignore` files ignore, the
`.git` folder itself, caches, and Python environments (a folder with a `pyvenv.cfg`, as `venv`
and `virtualenv` write it, or a `conda-meta`, whatever its name; `.venv`, `.tox`, `.nox`,
`site-packages`, `node_modules` by name) are not walked into.

`.gitignore` patterns are read with `pathspec` (git's wildmatch rules, negations included),
each file's patterns relative to its own folder, as git reads them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pathspec

SKIPPED_FOLDERS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", ".tox", ".nox",
                             "site-packages", "node_modules"})  # fmt: skip
CODE_SUFFIXES = (".py", ".ipynb")


def source_files(folder: Path, suffixes: tuple[str, ...] = CODE_SUFFIXES) -> Iterator[Path]:
    """The files under `folder` with one of `suffixes` that git would not ignore, walked in
    sorted order; virtual environments and version-control folders are skipped."""
    ignores: list[tuple[Path, pathspec.GitIgnoreSpec]] = []
    for root, folders, files in os.walk(folder):
        here = Path(root)
        ignores = [(base, spec) for base, spec in ignores if here.is_relative_to(base)]
        gitignore = here / ".gitignore"
        if gitignore.is_file():
            lines = gitignore.read_text(encoding="utf-8", errors="replace").splitlines()
            ignores.append((here, pathspec.GitIgnoreSpec.from_lines(lines)))
        folders[:] = sorted(
            name for name in folders
            if name not in SKIPPED_FOLDERS and not _environment(here / name)
            and not _ignored(here / name, ignores, folder=True)
        )  # fmt: skip
        for name in sorted(files):
            path = here / name
            if path.suffix in suffixes and not _ignored(path, ignores, folder=False):
                yield path


def _environment(folder: Path) -> bool:
    """A virtual environment (venv, virtualenv) or a conda environment, whatever its name."""
    return (folder / "pyvenv.cfg").is_file() or (folder / "conda-meta").is_dir()


def _ignored(path: Path, ignores: list[tuple[Path, pathspec.GitIgnoreSpec]], folder: bool) -> bool:
    """Whether the `.gitignore` files above `path` ignore it (the deepest one that has a
    say decides, as in git)."""
    verdict = False
    for base, spec in ignores:
        relative = path.relative_to(base).as_posix() + ("/" if folder else "")
        result = spec.check_file(relative)
        if result.include is not None:
            verdict = result.include
    return verdict
