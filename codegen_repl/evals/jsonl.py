"""JSON-lines and JSON files that survive a crash: samples, results and reports.

`append_jsonl` writes a block of records in one write and fsyncs it, so an interrupted run
leaves whole blocks and at most a torn last line, which `read_jsonl` ignores and
`drop_torn_tail` cuts before the next append (resume). `write_json_atomic` replaces a file
in one rename. Used by the HumanEval and MTPB harnesses and their commands.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codegen_repl.errors import ConfigError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (.gz too); a torn last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give the path of a JSON-lines file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):  # no newline after it: a write that did not finish
                break
            message = f"{path}:{number} is not valid JSON; fix or remove that line"
            raise ConfigError(message) from None
    return records


def append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append records in one write and fsync, so a crash leaves whole blocks (or a torn last
    line, which `read_jsonl` ignores and `drop_torn_tail` removes)."""
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (an interrupted append) before appending more."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


def write_json_atomic(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
