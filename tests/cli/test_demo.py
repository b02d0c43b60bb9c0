"""`codegen-repl demo`: the model trained by train/ writes the listed code; the cache is reused,
keyed by the recipe, and never left half-written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from codegen_repl.cli import demo
from codegen_repl.cli.app import app
from codegen_repl.core.context import MTPB_PREFIX, TurnText, build_context

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("demo-cache")
    demo.ensure_demo_model(cache, quiet=True)
    return cache


@pytest.mark.slow
def test_demo_model_writes_the_listed_code(demo_cache: Path) -> None:
    from codegen_repl.decoders.local import LocalDecoder
    from codegen_repl.model.sample_params import SampleParams

    decoder = LocalDecoder.load(str(demo.demo_folder(demo_cache)))
    greedy = SampleParams(max_new_tokens=48, temperature=0.0)
    steps = list(demo.PAIRS)
    assert len(steps) >= 3
    for index, step in enumerate(steps):
        history = [TurnText(s, demo.PAIRS[s]) for s in steps[:index][-2:]]
        for prompt in (
            build_context(MTPB_PREFIX, [], step),
            build_context(MTPB_PREFIX, history, step),
        ):
            completion = decoder.complete(prompt, greedy)[0]
            assert completion.startswith(demo.PAIRS[step] + "\n"), (step, completion)


@pytest.mark.slow
def test_second_call_reuses_the_cache(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = demo.demo_folder(demo_cache)
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_training(work: Path, quiet: bool = False) -> Path:
        raise AssertionError("the cached demo model was retrained")

    monkeypatch.setattr(demo, "train_demo", no_training)
    assert demo.ensure_demo_model(demo_cache) == folder
    assert weights.stat().st_mtime_ns == before
    assert sorted(p.name for p in demo_cache.iterdir()) == [folder.name]  # no temp folders


def test_interrupted_training_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(work: Path, quiet: bool = False) -> Path:
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_demo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_recipe_gets_a_new_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = demo.demo_folder(tmp_path)
    monkeypatch.setitem(demo.RECIPE, "train", {**demo.RECIPE["train"], "steps": 201})
    assert demo.demo_folder(tmp_path) != before
    monkeypatch.undo()
    monkeypatch.setitem(demo.PAIRS, "say bye", 'print("bye")')
    assert demo.demo_folder(tmp_path) != before


def test_corpus_sessions_use_the_repl_context_format(tmp_path: Path) -> None:
    demo.write_corpus(tmp_path, 20)
    texts = [path.read_text() for path in sorted(tmp_path.glob("*.py"))]
    assert len(texts) == 20
    for text in texts:
        body = text.removeprefix(MTPB_PREFIX)
        assert body.startswith("# ")
        steps = [line[2:] for line in body.splitlines() if line.startswith("# ")]
        assert 1 <= len(steps) <= 4 and len(set(steps)) == len(steps)
        expected = "".join(TurnText(s, demo.PAIRS[s]).render() for s in steps)
        assert body == expected


def test_demo_help() -> None:
    result = runner.invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--retrain", "--yes", "--session"):
        assert option in result.output


def test_demo_prints_the_steps_then_chats_on_the_cached_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEGEN_REPL_CACHE", str(tmp_path))
    folder = demo.demo_folder()
    assert folder.parent == tmp_path / "demo"
    folder.mkdir(parents=True)  # a cached model: no training
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("codegen_repl.cli.chat.chat", lambda **kw: calls.append(kw))
    result = runner.invoke(app, ["demo", "--yes", "--session", str(tmp_path / "s.ipynb")])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert "knows ONLY these steps" in first
    for step in demo.PAIRS:
        assert f"# {step}" in result.output
    assert "training" not in result.output
    assert calls == [
        {"model": os.fspath(folder), "session": tmp_path / "s.ipynb", "yes": True,
         "temperature": 0.0}
    ]  # fmt: skip
