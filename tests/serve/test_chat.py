"""`/v1/chat/completions` on a real uvicorn (127.0.0.1) with the tiny random CodeGen: the
`openai` client's chat API over a 5-turn conversation, plain and streamed, turn for turn equal
to /v1/completions on the equivalent multi-turn prompt; n, seed, stop and usage; the errors; and
prefix reuse (a conversation growing by one turn prefills only that turn)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from codegen_repl.core.context import TurnText, build_context
from codegen_repl.core.settings import DEFAULT_PREFIX
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.serve.app import create_app, serve_in_thread
from tests.serve.test_app import (  # noqa: F401  (fixtures)
    AUTH,
    KEY,
    LONG,
    client,
    engine_loader,
    health,
    local,
    server,
    server_checkpoint,
    wait_ready,
)

STEPS = [
    "read a list of numbers",
    "keep the even ones",
    "square each of them",
    "add them up",
    "print the total",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def chat_server(local: LocalDecoder) -> Iterator[str]:  # noqa: F811
    """A server of its own, so that no other test's requests move the prefill counter."""
    app = create_app("tiny", engine_loader(local, max_batch=4), KEY)
    with serve_in_thread(app) as url:
        wait_ready(url)
        yield url


def messages_of(turns: list[TurnText], step: str, system: str | None = None) -> list[Any]:
    head = [] if system is None else [{"role": "system", "content": system}]
    body = [
        message
        for turn in turns
        for message in (
            {"role": "user", "content": turn.step},
            {"role": "assistant", "content": turn.code},
        )
    ]
    return [*head, *body, {"role": "user", "content": step}]


def test_five_turn_chat_equals_completions(server: str, local: LocalDecoder) -> None:  # noqa: F811
    """Each turn's reply (plain and streamed) is /v1/completions' answer to the equivalent
    prompt with CodeGen's truncation, and the local decoder's."""
    api = client(server)
    turns: list[TurnText] = []
    for step in STEPS:
        prompt = build_context(DEFAULT_PREFIX, turns, step)
        messages = messages_of(turns, step)
        plain = api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0
        )
        reply = plain.choices[0].message.content
        assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
        same = api.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"codegen_truncation": True},
        )  # fmt: skip
        assert reply == same.choices[0].text
        assert plain.choices[0].finish_reason == same.choices[0].finish_reason
        assert reply == local.complete(prompt, SampleParams(MAX_TOKENS, codegen_rules=True))[0]
        assert plain.usage is not None and plain.usage.prompt_tokens == local.count_tokens(prompt)
        stream = api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].object == "chat.completion.chunk"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
            plain.choices[0].finish_reason
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == (
            plain.usage.total_tokens
        )
        turns.append(TurnText(step, reply))
    assert any(turn.code for turn in turns)  # the conversation did carry code


def test_system_message_is_the_prefix_and_parts_are_text(server: str) -> None:  # noqa: F811
    api = client(server)
    turns = [TurnText("load the data", "data = [1, 2, 3]")]
    prompt = build_context("import math\n\n", turns, "take the square roots")
    messages = messages_of(turns, "take the square roots", system="import math")
    messages[-1]["content"] = [
        {"type": "text", "text": "take the square "},
        {"type": "text", "text": "roots"},
    ]
    chat = api.chat.completions.create(model="tiny", messages=messages, max_tokens=16, seed=3)
    same = api.completions.create(
        model="tiny", prompt=prompt, max_tokens=16, seed=3, extra_body={"codegen_truncation": True}
    )
    assert chat.choices[0].message.content == same.choices[0].text
    bare = messages_of([], "say hi", system="")  # an empty system message: no prefix at all
    empty = api.chat.completions.create(model="tiny", messages=bare, max_tokens=8, temperature=0)
    assert empty.usage is not None and empty.usage.prompt_tokens == len(
        client_tokens(server, "# say hi\n")
    )


def client_tokens(url: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"prompt": text}, headers=AUTH).json()["tokens"]


def test_n_seed_stop_and_max_completion_tokens(server: str) -> None:  # noqa: F811
    api = client(server)
    messages = messages_of([TurnText("make a list", "xs = []")], "append five numbers")
    prompt = build_context(
        DEFAULT_PREFIX, [TurnText("make a list", "xs = []")], "append five numbers"
    )
    rules = {"codegen_truncation": True}
    many = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0.9, top_p=0.9, n=3, seed=7
    )
    same = api.completions.create(
        model="tiny", prompt=prompt, max_tokens=20, temperature=0.9, top_p=0.9, n=3, seed=7,
        extra_body=rules,
    )  # fmt: skip
    texts = [c.message.content for c in sorted(many.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(same.choices, key=lambda c: c.index)]
    assert len(many.choices) == 3
    full = (
        api.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0, extra_body=rules
        )
        .choices[0]
        .text
    )
    assert len(full) >= 6  # stop on a piece of the greedy reply: cut right before it
    stop = full[3:6]
    stopped = api.chat.completions.create(
        model="tiny", messages=messages, max_tokens=40, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    newer = api.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_completion_tokens=5
    )
    assert newer.usage is not None and newer.usage.completion_tokens <= 5


def test_growing_conversation_prefills_only_the_new_turn(
    chat_server: str,
    local: LocalDecoder,  # noqa: F811
) -> None:
    api = client(chat_server)
    turns: list[TurnText] = []
    previous: list[int] = []
    for k, step in enumerate(STEPS):
        ids = local.tokenizer.encode(build_context(DEFAULT_PREFIX, turns, step))
        before = health(chat_server)["prefilled_tokens"]
        answer = api.chat.completions.create(
            model="tiny", messages=messages_of(turns, step), max_tokens=MAX_TOKENS, temperature=0
        )
        prefilled = health(chat_server)["prefilled_tokens"] - before
        assert ids[: len(previous)] == previous  # the conversation grew by one turn
        if k == 0:
            assert prefilled == len(ids)  # a fresh server: the whole first prompt
        else:
            assert 0 < prefilled <= len(ids) - len(previous)  # the new turn, not the old ones
        turns.append(TurnText(step, answer.choices[0].message.content or ""))
        previous = ids


# ------------------------------------------------------------------------- errors

TWO = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
BAD_CHAT = [
    # (body, status, a fragment of the message, param)
    ({"messages": "hi"}, 400, "messages must be a non-empty list", "messages"),
    ({"messages": []}, 400, "messages must be a non-empty list", "messages"),
    ({}, 400, "messages must be a non-empty list", "messages"),
    ({"messages": [5]}, 400, "messages[0] must be an object", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "role must be one of", "messages"),
    ({"messages": [{"role": "user"}]}, 400, "content must be a string or a list", "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "content must be a string", "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "text only",
        "messages",
    ),
    ({"messages": TWO}, 400, "the last message must be a user message", "messages"),
    (
        {"messages": [TWO[0], TWO[0]]},
        400,
        "messages[1] is a user message where a assistant message belongs",
        "messages",
    ),
    (
        {"messages": [TWO[1], TWO[0]]},
        400,
        "messages[0] is a assistant message where a user message belongs",
        "messages",
    ),
    (
        {"messages": [TWO[0], {"role": "system", "content": "x"}, TWO[0]]},
        400,
        "system messages come first",
        "messages",
    ),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "empty step", "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400, "lone surrogate", "messages"),
    ({"messages": TWO[:1], "max_tokens": 0}, 400, "max_tokens must be in 1..512", "max_tokens"),
    ({"messages": TWO[:1], "n": 17}, 400, "n must be in 1..16", "n"),
    (
        {"messages": TWO[:1], "temperature": "hot"},
        400,
        "temperature must be a number",
        "temperature",
    ),
    ({"messages": TWO[:1], "stop": [1]}, 400, "stop must be a string or a list", "stop"),
    (
        {"messages": TWO[:1], "tools": [{"type": "function"}]},
        400,
        "tools is not supported",
        "tools",
    ),
    ({"messages": TWO[:1], "logprobs": True}, 400, "logprobs is not supported", "logprobs"),
    ({"messages": TWO[:1], "prompt": "x"}, 400, "send messages", "prompt"),
    (
        {"messages": TWO[:1], "max_tokens": 4, "max_completion_tokens": 4},
        400,
        "not both",
        "max_tokens",
    ),
    (
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 200},
        400,
        "exceeds the model's context of 512",
        "messages",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}], "tool_choice": "auto"},
        400,
        "tool_choice is not supported",
        "tool_choice",
    ),
]


@pytest.mark.parametrize(("body", "status", "message", "param"), BAD_CHAT)
def test_bad_chat_gets_an_openai_error(server: str, body, status, message, param) -> None:  # noqa: F811
    raw = json.dumps(body).encode()  # ASCII: a lone surrogate travels as its JSON escape
    headers = {**AUTH, "Content-Type": "application/json"}
    answer = httpx.post(f"{server}/v1/chat/completions", content=raw, headers=headers, timeout=30)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_chat_needs_the_key_and_refuses_bad_json(server: str) -> None:  # noqa: F811
    body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1}
    anonymous = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert anonymous.status_code == 401 and "no API key" in anonymous.json()["error"]["message"]
    headers = {**AUTH, "Content-Type": "application/json"}
    for raw in (b"{not json", b"[" * 2000 + b"]" * 2000, json.dumps([1]).encode()):
        answer = httpx.post(
            f"{server}/v1/chat/completions", content=raw, headers=headers, timeout=30
        )
        assert answer.status_code == 400 and "error" in answer.json()
    served = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert served.status_code == 200 and served.json()["object"] == "chat.completion"
