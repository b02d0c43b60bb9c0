"""JSON-lines and JSON files that survive a crash: torn last lines, atomic replacement."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from codegen_repl.errors import ConfigError
from codegen_repl.evals.jsonl import append_jsonl, drop_torn_tail, read_jsonl, write_json_atomic


def test_append_then_read_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    append_jsonl(path, [{"id": 1}, {"id": 2}])
    append_jsonl(path, [{"id": 3, "text": "a\nb"}])
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}, {"id": 3, "text": "a\nb"}]
    assert path.read_text().count("\n") == 3


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "comp')  # a crash mid-write
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]
    drop_torn_tail(path)
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'
    append_jsonl(path, [{"id": 3}])
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]
    drop_torn_tail(tmp_path / "absent.jsonl")  # nothing to cut, no error


def test_a_bad_line_in_the_middle_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ConfigError, match=r"samples.jsonl:2 is not valid JSON; fix or remove"):
        read_jsonl(path)
    with pytest.raises(ConfigError, match="does not exist; give the path of a JSON-lines file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_gzipped_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "problems.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write('{"task_id": "A/0"}\n{"task_id": "A/1"}\n')
    assert [r["task_id"] for r in read_jsonl(path)] == ["A/0", "A/1"]


def test_write_json_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")
    write_json_atomic(path, {"pass@1": 0.5})
    assert json.loads(path.read_text()) == {"pass@1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
