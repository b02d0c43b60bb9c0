"""LocalDecoder.prepare: once the background work is done, the turns of a growing session
compile nothing (counted with JAX's own compile events, not timed) and decode as before."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from codegen_repl.decoders.local import (
    FIRST_STEPS,
    STEP_TOKENS,
    TYPED_PIECES_UP_TO,
    TYPED_TOKENS,
    Ahead,
    LocalDecoder,
)
from codegen_repl.model import cpu_matmul, sampling
from codegen_repl.model.checkpoint import load_model
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import decode_chunk, fresh_state, prefill_rows, resize_state
from codegen_repl.model.tokenizer import CodeGenTokenizer

SAMPLE = SampleParams(max_new_tokens=16, codegen_rules=True)
STEPS = [f"step {n}: make the list {'longer ' * (n % 3)}and print it" for n in range(7)]


@contextlib.contextmanager
def compiles() -> Iterator[list[str]]:
    """The functions JAX traces or compiles inside the block (any jit cache miss: a trace, or
    a compile of a program traced before, e.g. for other shardings)."""
    seen: list[str] = []
    events = ("jaxpr_trace_duration", "backend_compile_duration")

    def listen(event: str, duration: float, **kwargs: object) -> None:
        if event.removeprefix("/jax/core/compile/") in events:
            seen.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def tokens(chunks: Iterator[np.ndarray]) -> list[list[int]]:
    """Each row's tokens, whatever the chunks' lengths (a prepared decoder's first chunks may
    be one step where a cold one's are chunk_size)."""
    return np.concatenate(list(chunks), axis=1).tolist()


def long_context_decoder(folder: Path, whole_context: bool = False) -> LocalDecoder:
    """The chat checkpoint with a 1024-token window (rotary positions have no limit), so a
    session crosses cache lengths (192 -> 256 -> 384), unless `whole_context`: then one row's
    cache is the whole window from the start (where the CPU attention kernel is built)."""
    loaded = load_model(folder)
    config = dataclasses.replace(loaded.config, max_positions=1024)
    decoder = LocalDecoder.create(config, loaded.params, CodeGenTokenizer.from_dir(folder))
    if whole_context and not decoder.whole_context_cache:
        pytest.skip(f"the CPU attention kernel does not apply here: {cpu_matmul.status()}")
    decoder.whole_context_cache = whole_context
    return decoder


@pytest.mark.parametrize("whole_context", [False, True])
def test_prepared_turns_compile_nothing(chat_checkpoint: Path, whole_context: bool) -> None:
    for program in (prefill_rows, decode_chunk, resize_state, fresh_state):
        program.clear_cache()  # what other tests compiled must not hide a compile here
    decoder = long_context_decoder(chat_checkpoint, whole_context)
    context, lengths = "import math\n", set()
    while decoder.count_tokens(context) < 170:  # a few turns cross cache lengths
        context += "x = [1, 2, 3]\nprint(x)\n\n"
    for step in STEPS[:4]:
        decoder.prepare(context, SAMPLE)
        decoder.wait_prepared()  # a user who types slower than the machine prepares
        prompt = f"{context}# {step}\n"
        assert decoder.count_tokens(prompt) - decoder.count_tokens(context) <= STEP_TOKENS
        with compiles() as compiled:
            code = "".join(decoder.generate(prompt, SAMPLE))
        assert compiled == [], f"turn {step!r} compiled {compiled}"
        lengths.add(decoder._kept.cache[0].keys.shape[2])  # type: ignore[union-attr]
        context = f"{prompt}{code.rstrip()}\n\n"
    if whole_context:  # one cache length, the window (+ a chunk's room), from the first turn on
        assert lengths == {1024 + decoder.chunk_size - 1}
    else:
        assert len(lengths) >= 2, lengths  # the session grew across a cache length


def test_the_first_request_compiles_while_the_weights_load(chat_checkpoint: Path) -> None:
    """LocalDecoder.load's `early`: the decoder over the params' shapes compiles the first
    request's programs before the weights are read; the loaded arrays then find them compiled
    (what a lowering over jax.ShapeDtypeStruct params gives is the program they run)."""
    for program in (prefill_rows, decode_chunk, resize_state, fresh_state):
        program.clear_cache()
    seen: list[tuple[bool, bool]] = []

    def early(shaped: LocalDecoder) -> None:
        leaves = jax.tree_util.tree_leaves(shaped.params)
        seen.append((shaped.loaded, all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)))
        shaped.prepare("", SAMPLE)
        shaped.wait_prepared()  # all compiled before the weights are read

    decoder = LocalDecoder.load(chat_checkpoint, early=early)
    assert seen == [(False, True)] and decoder.loaded
    prompt = f"# {STEPS[1]}\n"
    with compiles() as compiled:
        code = "".join(decoder.generate(prompt, SAMPLE))
    assert compiled == [], f"the first request compiled {compiled}"
    assert code == "".join(LocalDecoder.load(chat_checkpoint).generate(prompt, SAMPLE))


def test_prepared_turns_give_the_tokens_of_cold_runs(chat_checkpoint: Path) -> None:
    warm, cold = long_context_decoder(chat_checkpoint), long_context_decoder(chat_checkpoint)
    context = "import math\n"
    for step in STEPS[:2]:
        warm.prepare(context, SAMPLE)
        prompt = f"{context}# {step}\n"
        code = "".join(warm.generate(prompt, SAMPLE))  # may overtake the background work
        cold.forget()
        assert code == "".join(cold.generate(prompt, SAMPLE))
        context = f"{prompt}{code.rstrip()}\n\n"


def test_a_request_waits_for_the_context_prefill_and_says_so(chat_checkpoint: Path) -> None:
    decoder = long_context_decoder(chat_checkpoint)
    told: list[str] = []
    decoder.on_status = told.append
    context = "import math\n" + "x = [1, 2, 3]\nprint(x)\n\n" * 20
    with decoder._lock:  # the context prefill cannot finish before the request comes
        decoder.prepare(context, SAMPLE)
        job = next(future for key, future in decoder._jobs.items() if key[0] == "context")
        while not job.running():
            pass
    code = "".join(decoder.generate(f"{context}# {STEPS[0]}\n", SAMPLE))
    assert told == ["getting the model ready for this context…"]
    assert decoder.reused_tokens(decoder.tokenizer.encode(context)) > 0 and code is not None


@pytest.mark.parametrize("rows", [1, 3])
def test_prepare_plans_the_programs_of_a_request(chat_checkpoint: Path, rows: int) -> None:
    decoder = long_context_decoder(chat_checkpoint)
    sample = dataclasses.replace(SAMPLE, n=rows, temperature=0.5, max_new_tokens=128)
    plan = decoder._plan(200, rows, sample)
    steps = 128  # 128 new tokens, chunks of 4
    next_lengths = [decoder.cache_length(200 + extra + steps) for extra in (1, STEP_TOKENS)]
    assert next_lengths == [384, 512]
    # the next request's two cache lengths, then the one after them (compiled while the user
    # types the turns before it needs it)
    assert [job[1] for job in plan if job[0] == "decode"] == [384, 512, 768]
    # one warm prefill program per cache length (a step's text is prefilled STEP_TOKENS wide),
    # first; then the narrow one for the end of a step prefilled as it was typed
    prefills = [job[1:] for job in plan if job[0] == "prefill"]
    wide = [(length, rows, STEP_TOKENS, False) for length in (384, 512)]
    narrow = [(length, rows, TYPED_TOKENS, False) for length in (384, 512)]
    assert prefills == [*wide, *narrow, (768, rows, STEP_TOKENS, False)]
    # fewer new tokens than STEP_TOKENS: the cache still has room for a STEP_TOKENS-wide prefill
    # (200 + 1 + 16 would fit in 256 positions, but not 200 + 1 + 64)
    short = decoder._plan(200, rows, dataclasses.replace(sample, max_new_tokens=16))
    assert [job[1] for job in short if job[0] == "decode"] == [384, 512]
    assert all(job[2] == rows for job in plan if job[0] in ("prefill", "decode"))


def test_the_room_for_a_step_prefill_stops_at_the_context(chat_checkpoint: Path) -> None:
    decoder = long_context_decoder(chat_checkpoint)  # a 1024-token context
    assert decoder._request_length(200, 16) == 384  # 200 + 64 positions: a full-width prefill
    assert decoder._request_length(1000, 16) == 1024  # not 1064: no cache past the context


def test_a_first_turn_without_context_plans_the_cold_widths(chat_checkpoint: Path) -> None:
    decoder = long_context_decoder(chat_checkpoint)
    plan = decoder._plan(0, 1, SAMPLE)
    prefills = [job[1:] for job in plan if job[0] == "prefill"]
    lengths = sorted({job[1] for job in plan if job[0] == "decode"})
    # nothing cached to read: each cache length gets the cold widths of a step (16, 32, 64)
    assert sorted(prefills) == [(n, 1, width, True) for n in lengths for width in (16, 32, 64)]


def test_turn_1_plans_the_narrow_prefill_only(chat_checkpoint: Path) -> None:
    """Turn 1 over the whole-context cache goes in narrow pieces, also as it is typed: the
    wide prefill compiles after the first request (the next plan), not beside it."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    length = decoder.cache_length(1)
    for typed in (0, 12):  # the empty context, then the step as typed so far
        first = [job for job in decoder._plan(typed, 1, SAMPLE) if job[0] == "prefill"]
        assert first == [("prefill", length, 1, TYPED_TOKENS, False)]
    resumed = [job[3] for job in decoder._plan(300, 1, SAMPLE) if job[0] == "prefill"]
    assert resumed == [TYPED_TOKENS, STEP_TOKENS]  # a long context (a resume): both at once
    decoder.complete("# say hi\n", dataclasses.replace(SAMPLE, max_new_tokens=4))
    later = [job[3] for job in decoder._plan(40, 1, SAMPLE) if job[0] == "prefill"]
    assert later == [TYPED_TOKENS, STEP_TOKENS]


def test_prepare_compiles_one_prefill_program_per_cache_length(chat_checkpoint: Path) -> None:
    for program in (prefill_rows, decode_chunk, resize_state, fresh_state):
        program.clear_cache()
    decoder = long_context_decoder(chat_checkpoint)
    context = "import math\n" + "x = [1, 2, 3]\nprint(x)\n\n" * 8
    plan = decoder._plan(decoder.count_tokens(context), 1, SAMPLE)
    lengths = {job[1] for job in plan if job[0] == "decode"}
    with compiles() as compiled:
        decoder.prepare(context, SAMPLE)
        decoder.wait_prepared()
    # the context's own (cold) prefill, then one STEP_TOKENS-wide prefill per cache length
    # (not three: 16/32/64) and one TYPED_TOKENS-wide per length the next request can have
    prefills = [job for job in plan if job[0] == "prefill"]
    assert sorted(job[3] for job in prefills) == [TYPED_TOKENS] * 2 + [STEP_TOKENS] * 3
    assert compiled.count("prefill_rows") == 1 + len(prefills), compiled
    assert compiled.count("decode_chunk") == len(lengths), compiled


def test_short_and_long_steps_after_a_prepared_context_compile_nothing(
    chat_checkpoint: Path,
) -> None:
    """A step of 3 tokens and one of STEP_TOKENS run the one prefill program compiled ahead
    (whatever max_new_tokens: SAMPLE's 16 leaves less room than that) and give the tokens of
    a cold run."""
    decoder, cold = long_context_decoder(chat_checkpoint), long_context_decoder(chat_checkpoint)
    context = "import math\n" + "x = [1, 2, 3]\nprint(x)\n\n" * 8
    ids = decoder.tokenizer.encode(context)
    for step in (ids[-3:], (ids * 2)[-STEP_TOKENS:]):
        decoder.prepare(context, SAMPLE)
        decoder.wait_prepared()
        with compiles() as compiled:
            got = tokens(decoder.stream_tokens(ids + step, SAMPLE))
        assert compiled == [], f"a {len(step)}-token step compiled {compiled}"
        cold.forget()
        assert got == tokens(cold.stream_tokens(ids + step, SAMPLE))


@pytest.mark.parametrize("rows", [1, 3])
def test_one_row_plans_one_cache_length_the_window(chat_checkpoint: Path, rows: int) -> None:
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    sample = dataclasses.replace(SAMPLE, n=rows, temperature=0.5, max_new_tokens=128)
    for base in (0, 200, 700):
        plan = decoder._plan(base, rows, sample)
        decodes = [job[1] for job in plan if job[0] == "decode"]
        window = 1024 + decoder.chunk_size - 1  # and a chunk's dropped tokens
        if rows == 1:  # nothing to compile as the session grows (the chunk and one step)
            assert set(decodes) == {window}
            assert not [job for job in plan if job[0] == "resize"]
        else:  # n rows: bucket lengths (n times the memory), kept as one row of the window
            assert decodes[0] == decoder.cache_length(base + 1 + 128, rows)
            assert decodes[0] < 1024 or base == 700
            assert ("resize", rows, decodes[0], 1, window) in plan


@pytest.mark.parametrize("new_tokens", [1, 2, 3])
def test_a_request_that_ends_at_the_window_fits_the_whole_context_cache(
    chat_checkpoint: Path, new_tokens: int
) -> None:
    # The decode chunk (4 tokens) runs past the window by its dropped tokens: the cache must
    # hold them (a 1020 + 1 request decodes positions 1020..1023 and a chunk beyond).
    whole = long_context_decoder(chat_checkpoint, whole_context=True)
    cut = long_context_decoder(chat_checkpoint)
    sample = dataclasses.replace(SAMPLE, max_new_tokens=new_tokens, codegen_rules=False)
    ids = [whole.tokenizer.encode("x = 1\n")[0]] * (1024 - new_tokens)
    want = tokens(cut.stream_tokens(ids, sample))
    assert tokens(whole.stream_tokens(ids, sample)) == want
    short = ids[: 1024 // 2]  # and the decoder serves the next request
    assert [c.tolist() for c in whole.stream_tokens(short, sample)] == [
        c.tolist() for c in cut.stream_tokens(short, sample)
    ]


@pytest.mark.parametrize("whole_context", [False, True])
def test_a_step_prefilled_as_it_was_typed_leaves_a_narrow_prefill(
    chat_checkpoint: Path, whole_context: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The REPL prepares the step as it is typed (Session.prepare_next's `typed`): after Enter
    only its last tokens are left, prefilled TYPED_TOKENS wide by a program compiled ahead,
    and the tokens are a cold run's."""
    for program in (prefill_rows, decode_chunk, resize_state, fresh_state):
        program.clear_cache()
    decoder = long_context_decoder(chat_checkpoint, whole_context)
    cold = long_context_decoder(chat_checkpoint)
    context = "import math\n" + "x = [1, 2, 3]\nprint(x)\n\n" * 8
    step = STEPS[4]
    ids = decoder.tokenizer.encode(f"{context}# {step}\n")
    decoder.prepare(context, SAMPLE)  # after the last turn
    for end in (*range(3, len(step), 5), len(step) - 2):  # a few keys at a time
        decoder.prepare(f"{context}# {step[:end]}", SAMPLE)
    decoder.wait_prepared()
    left = len(ids) - decoder.reused_tokens(ids)
    assert 0 < left <= TYPED_TOKENS
    widths: list[int] = []

    def prefill(*args: Any, **kwargs: Any) -> Any:
        widths.append(args[3].shape[1])  # tokens: [1, width]
        return prefill_rows(*args, **kwargs)

    monkeypatch.setattr(sampling, "prefill_rows", prefill)
    with compiles() as compiled:
        got = [t for chunk in decoder.stream_tokens(ids, SAMPLE) for t in chunk[0].tolist()]
    assert compiled == [], f"the step compiled {compiled}"
    assert widths == [TYPED_TOKENS]  # not STEP_TOKENS: ~one decode step's work, not ~5
    assert got == [t for chunk in cold.stream_tokens(ids, SAMPLE) for t in chunk[0].tolist()]


def test_a_newer_prompt_drops_the_queued_prefill_of_an_older_one(chat_checkpoint: Path) -> None:
    decoder = long_context_decoder(chat_checkpoint)
    context = "import math\n" + "x = [1, 2, 3]\nprint(x)\n\n" * 4
    typed = [f"{context}# make the list{' longer' * n}" for n in range(3)]
    with decoder._lock:  # the first prefill runs and waits: the next ones queue behind it
        decoder.prepare(typed[0], SAMPLE)
        first = next(future for key, future in decoder._jobs.items() if key[0] == "context")
        while not first.running():
            pass
        decoder.prepare(typed[1], SAMPLE)
        second = next(f for key, f in decoder._jobs.items() if key[0] == "context" and f != first)
        decoder.prepare(typed[2], SAMPLE)
    assert second.cancelled()  # never run: the user typed on
    decoder.wait_prepared()
    assert decoder._tokens == decoder.tokenizer.encode(typed[2])


def test_one_row_prefills_any_text_in_pieces_of_the_two_programs_compiled_ahead(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the whole-context cache a session runs two prefill programs, whatever the text's
    length and whether anything is cached: a long context (a resume), a pasted step, a short
    one; the tokens are those of the bucketed cache's single prefill."""
    for program in (prefill_rows, decode_chunk, resize_state, fresh_state):
        program.clear_cache()
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    cut = long_context_decoder(chat_checkpoint)
    decoder.complete("import math\n", SAMPLE)  # a session after its first turn:
    decoder.prepare("import math\n", SAMPLE)  # both programs compiled
    decoder.wait_prepared()
    decoder.forget()  # and nothing cached
    widths: list[tuple[int, bool]] = []

    def prefill(*args: Any, **kwargs: Any) -> Any:
        widths.append((args[3].shape[1], kwargs["cold"]))  # tokens: [1, width]
        return prefill_rows(*args, **kwargs)

    context = "import math\n" + "x = [1, 2, 3]\nprint(x)\n\n" * 16
    ids = decoder.tokenizer.encode(context)
    assert len(ids) > 2 * STEP_TOKENS + TYPED_TOKENS
    pasted = decoder.tokenizer.encode(f"# {STEPS[1]} " * 6 + "\n")
    prompts = (ids, ids + pasted, ids + pasted[:5])
    want = []
    for prompt in prompts:
        cut.forget()
        want.append([t for chunk in cut.stream_tokens(prompt, SAMPLE) for t in chunk[0].tolist()])
    monkeypatch.setattr(sampling, "prefill_rows", prefill)
    for prompt, tokens in zip(prompts, want, strict=True):
        with compiles() as compiled:
            got = [t for chunk in decoder.stream_tokens(prompt, SAMPLE) for t in chunk[0].tolist()]
        assert compiled == [], f"a {len(prompt)}-token prompt compiled {compiled}"
        assert got == tokens
    count = -(-len(ids) // STEP_TOKENS)  # nothing cached: STEP_TOKENS pieces, none cold
    last = len(ids) - (count - 1) * STEP_TOKENS  # and the last one narrow where it fits
    assert widths[:count] == [(STEP_TOKENS, False)] * (count - 1) + [
        (TYPED_TOKENS if last <= TYPED_TOKENS else STEP_TOKENS, False)
    ]
    assert set(widths) == {(STEP_TOKENS, False), (TYPED_TOKENS, False)}


def test_a_prepare_of_a_prompt_the_cache_holds_keeps_what_it_holds(chat_checkpoint: Path) -> None:
    """A long pasted step, /undo (a prepare of the context before it), the step again: the
    kept cache was cut to the shorter prompt's length while its tokens still named the cut
    positions, and the step decoded other tokens than a fresh decoder's (breaker trial)."""
    decoder, fresh = long_context_decoder(chat_checkpoint), long_context_decoder(chat_checkpoint)
    context = "import os\n"
    step = "# " + " ".join(f"item{i} = {i}" for i in range(40))
    ids = decoder.tokenizer.encode(f"{context}{step}\n")
    assert len(ids) > 192  # longer than the context's request length (cut to 192 before)
    list(decoder.stream_tokens(ids, SAMPLE))
    decoder.prepare(context, SAMPLE)  # /undo
    decoder.wait_prepared()
    decoder.prepare(f"{context}{step}", SAMPLE)  # the step again, as typed
    decoder.wait_prepared()
    got = tokens(decoder.stream_tokens(ids, SAMPLE))
    assert got == tokens(fresh.stream_tokens(ids, SAMPLE))


def test_a_newer_prompt_stops_a_running_prefill_at_its_next_piece(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pasted step's prefill runs in pieces; the user deletes it and types another step
    (or presses Enter): the stale prefill stops after the piece it runs, keeping what it
    prefilled, instead of running its whole length first (13-16 s for 1,500 tokens of 350M)."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    fresh = long_context_decoder(chat_checkpoint)
    pasted = decoder.tokenizer.encode("x = [1, 2, 3]\nprint(x)\n\n" * 30)
    assert len(pasted) > 4 * STEP_TOKENS
    other = "import math\n# print pi\n"
    pieces: list[int] = []

    def prefill(*args: Any, **kwargs: Any) -> Any:
        pieces.append(args[3].shape[1])
        if len(pieces) == 1:  # while the paste's first piece runs, a newer prompt comes
            decoder.prepare(other, SAMPLE)
        return prefill_rows(*args, **kwargs)

    monkeypatch.setattr(sampling, "prefill_rows", prefill)
    decoder.prepare(decoder.tokenizer.decode(pasted), SAMPLE)
    decoder.wait_prepared()
    assert pieces[0] == STEP_TOKENS and len(pieces) < 4  # the paste's first piece, then other's
    assert decoder._tokens == decoder.tokenizer.encode(other)
    ids = decoder.tokenizer.encode(other + "x = 1\n")
    got = tokens(decoder.stream_tokens(ids, SAMPLE))
    assert got == tokens(fresh.stream_tokens(ids, SAMPLE))


def test_the_first_code_comes_after_one_step(chat_checkpoint: Path) -> None:
    """Over the whole-context cache the first chunk is FIRST_STEPS long: turn 1 compiles only
    that decode program ahead (cheaper to compile, while the weights load) and runs every chunk
    with it; from turn 2 on the first chunk is one step, the others chunk_size. The tokens are
    those of whole chunks, and no request compiles anything."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    cut = long_context_decoder(chat_checkpoint)
    sample = dataclasses.replace(SAMPLE, max_new_tokens=13)  # 1 + 3 chunks of 4: 13
    context = "import math\n"
    decoder.prepare(context, sample)
    decoder.wait_prepared()
    assert {job[3] for job in decoder._compiled if job[0] == "decode"} == {FIRST_STEPS}
    prompt = decoder.tokenizer.encode(context + "# a\n")
    with compiles() as compiled:
        turn_1 = list(decoder.stream_tokens(prompt, sample))
    assert compiled == [], compiled
    assert [chunk.shape[1] for chunk in turn_1] == [FIRST_STEPS] * 13
    want = [t for chunk in cut.stream_tokens(prompt, sample) for t in chunk[0].tolist()]
    assert [t for chunk in turn_1 for t in chunk[0].tolist()] == want
    for step in STEPS[:3]:
        decoder.prepare(context, sample)
        decoder.wait_prepared()
        prompt = decoder.tokenizer.encode(f"{context}# {step}\n")
        with compiles() as compiled:
            chunks = list(decoder.stream_tokens(prompt, sample))
        assert compiled == [], compiled
        assert [chunk.shape[1] for chunk in chunks] == [FIRST_STEPS, 4, 4, 4]
        cut.forget()
        want = [t for chunk in cut.stream_tokens(prompt, sample) for t in chunk[0].tolist()]
        assert [t for chunk in chunks for t in chunk[0].tolist()] == want
        context = f"{context}# {step}\n{decoder.tokenizer.decode(want)}\n\n"


def test_a_background_prefill_is_computed_when_its_job_ends(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each piece is computed before the next (JAX dispatches asynchronously): a prefill that
    stops between pieces stops the work, and `wait_prepared` means the cache is there (a
    request right after it waited 2-5 s for a queued prefill of 350M)."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)

    @jax.jit
    def slow(keys: jax.Array) -> jax.Array:  # ready 0.2 s after it is dispatched
        def sleep() -> np.ndarray:
            time.sleep(0.2)
            return np.zeros((), np.float32)

        return keys + jax.pure_callback(sleep, jax.ShapeDtypeStruct((), np.float32))

    def prefill(*args: Any, **kwargs: Any) -> Any:
        state = prefill_rows(*args, **kwargs)
        keys = slow(state.cache[0].keys)
        return state._replace(cache=(state.cache[0]._replace(keys=keys), *state.cache[1:]))

    monkeypatch.setattr(sampling, "prefill_rows", prefill)
    context = decoder.tokenizer.decode(decoder.tokenizer.encode("x = [1, 2, 3]\n" * 100)[:300])
    decoder.prepare(context, SAMPLE)
    decoder.wait_prepared()
    assert decoder._kept is not None and len(decoder._tokens) == decoder.count_tokens(context)
    assert decoder._kept.cache[0].keys.is_ready()


def test_a_long_prefill_is_told_before_it_runs(chat_checkpoint: Path) -> None:
    """A request that must read many new tokens (a pasted step, the first turn after a resume)
    says so first (the REPL prints it), not a silent screen for seconds; a typed step does not."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    told: list[str] = []
    decoder.on_status = told.append
    context = decoder.tokenizer.decode(decoder.tokenizer.encode("x = [1, 2, 3]\n" * 60)[:400])
    ids = decoder.tokenizer.encode(context)
    next(decoder.stream_tokens(ids, SAMPLE))
    assert told == [f"reading {len(ids)} new tokens of context…"]
    told.clear()
    decoder.prepare(context, SAMPLE)
    decoder.wait_prepared()
    next(decoder.stream_tokens(decoder.tokenizer.encode(context + "# a short step\n"), SAMPLE))
    assert told == []


def test_a_request_prefills_while_its_decode_program_compiles(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turn 1 with a cold compile cache: Enter comes while the decode chunk compiles in the
    background; the step's prefill runs meanwhile, not after it (350M on the 2-core CPU: ~1 s
    of prefill, ~2 s of compile), and the tokens are a cold decoder's."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    compiling, release, prefilled = threading.Event(), threading.Event(), threading.Event()
    compile_program = LocalDecoder._compile

    def held_compile(self: LocalDecoder, job: Any, sample: SampleParams) -> None:
        if job[0] == "decode":  # a compile that takes until the test releases it
            compiling.set()
            release.wait(60)
        compile_program(self, job, sample)

    def prefill(*args: Any, **kwargs: Any) -> Any:
        prefilled.set()
        return prefill_rows(*args, **kwargs)

    monkeypatch.setattr(LocalDecoder, "_compile", held_compile)
    monkeypatch.setattr(sampling, "prefill_rows", prefill)
    decoder.prepare("", SAMPLE)  # turn 1's programs, as while the weights load
    assert compiling.wait(60)
    ids = decoder.tokenizer.encode("import math\n# make a list of squares\n")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        tokens = pool.submit(lambda: [c[0].tolist() for c in decoder.stream_tokens(ids, SAMPLE)])
        try:
            assert prefilled.wait(30), "the prefill waited for the decode program's compile"
            assert not tokens.done()  # and the decode waits for that compile, not compiling twice
        finally:
            release.set()
        got = [t for chunk in tokens.result(120) for t in chunk]
    cold = long_context_decoder(chat_checkpoint, whole_context=True)
    assert got == [t for chunk in cold.stream_tokens(ids, SAMPLE) for t in chunk[0].tolist()]


def test_a_failed_prefill_leaves_the_decoder_usable(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = long_context_decoder(chat_checkpoint)
    ids = decoder.tokenizer.encode("import math\n")

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # Ctrl-C inside the request's prefill

    with monkeypatch.context() as patched:
        patched.setattr(sampling, "prefill_rows", fail)
        with pytest.raises(KeyboardInterrupt):
            next(decoder.stream_tokens(ids, SAMPLE))
    decoder.prepare("import os\n", SAMPLE)  # the background prefill is not skipped for good
    decoder.wait_prepared()
    assert decoder._tokens == decoder.tokenizer.encode("import os\n")


def test_the_background_thread_takes_no_work_once_stopped() -> None:
    ahead = Ahead()
    ran: list[int] = []
    assert ahead.submit(lambda: ran.append(1)).result(30) is None
    ahead.stop()  # at exit: a thread started after it could be inside XLA as Python ends
    assert ahead.submit(lambda: ran.append(2)).cancelled() and ran == [1]


def test_the_background_thread_runs_the_jobs_by_priority() -> None:
    """The programs the next request runs come before the prefill of what is typed, which
    comes before the other programs: typing (a prefill every 0.25 s) must not keep the decode
    chunk from compiling (turn 1 compiled it after Enter: 7.3 s instead of 2.7 s)."""
    ahead, gate, order = Ahead(), threading.Event(), list[str]()
    busy = ahead.submit(lambda: gate.wait(30) and None)
    while not busy.running():
        time.sleep(0.001)
    jobs = [(2, "later"), (1, "prefill"), (0, "decode"), (1, "prefill again"), (0, "fresh")]
    futures = [ahead.submit(functools.partial(order.append, name), p) for p, name in jobs]
    gate.set()
    concurrent.futures.wait(futures, timeout=30)
    assert order == ["decode", "fresh", "prefill", "prefill again", "later"]
    ahead.stop()


def test_a_step_before_the_wide_prefill_compiled_goes_in_narrow_pieces(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turn 1 typed while its programs compile: the 8-wide prefill is compiled first (the
    one Enter runs after a typed step), the 64-wide last; a step of up to 64 tokens that
    comes before it runs 8 wide, not a compile of seconds after Enter."""
    decoder = long_context_decoder(chat_checkpoint, whole_context=True)
    length = decoder.cache_length(1)
    decoder._compile(("prefill", length, 1, TYPED_TOKENS, False), SAMPLE)
    widths: list[int] = []

    def prefill(*args: Any, **kwargs: Any) -> Any:
        widths.append(args[3].shape[1])
        return prefill_rows(*args, **kwargs)

    prefill.lower = prefill_rows.lower  # type: ignore[attr-defined]  # for _compile
    monkeypatch.setattr(sampling, "prefill_rows", prefill)
    ids = decoder.tokenizer.encode("import math\n# " + STEPS[3] * 2 + "\n")
    assert TYPED_PIECES_UP_TO < len(ids) <= STEP_TOKENS
    list(decoder.stream_tokens(ids, SAMPLE))
    assert widths == [TYPED_TOKENS] * -(-len(ids) // TYPED_TOKENS)
    decoder._compile(("prefill", length, 1, STEP_TOKENS, False), SAMPLE)
    decoder.forget()
    widths.clear()
    list(decoder.stream_tokens(ids, SAMPLE))  # once compiled, the wide one: fewer pieces
    assert widths == [STEP_TOKENS]
