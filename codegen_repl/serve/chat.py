"""`/v1/chat/completions` in CodeGen's multi-turn format, and how answers are shaped.

A chat maps onto multi-turn program synthesis (core/context.py's format):
- the `system` messages (optional, only before the first `user` message) are the prefix: their
  text, ending in one blank line ("" for no prefix); without one, MTPB's imports
  (core/settings.py's DEFAULT_PREFIX);
- each `user` message is a step, written as `# step` comment lines;
- each `assistant` message is the code of the step before it;
- the last message is a `user` step, and the reply is that step's code, cut by CodeGen's rules.

So a conversation whose turns are sent back as they were answered grows its prompt by one turn,
and the engine, which keeps each slot's tokens, prefills only the new turn. Everything else
(sampling fields, limits, errors) is /v1/completions' (protocol.py).

Also here, for both endpoints: how a checked request runs (`Job`: its engine requests and
events), and how its answer is shaped (`Shape`: `text` choices or chat `message`s, whole or
streamed as server-sent events).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from codegen_repl.core.context import TurnText, build_context
from codegen_repl.core.settings import DEFAULT_PREFIX
from codegen_repl.serve.engine import Delta, Engine, Event, Failed, Finish, QueueFull
from codegen_repl.serve.engine import Request as EngineRequest
from codegen_repl.serve.protocol import ApiError, CompletionRequest, parse_completion

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
# Chat fields we accept only at their neutral values (the rest are checked as for completions).
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "prompt": (None,),
    "codegen_truncation": (None, True),
}


@dataclasses.dataclass(frozen=True)
class Message:
    role: Role
    content: str


def parse_chat(body: object, engine: Engine) -> CompletionRequest:
    """Validate a /v1/chat/completions body: its messages become one prompt (see the module
    docstring), its other fields are checked as /v1/completions' (codegen_rules always on)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, allowed in _NEUTRAL.items():
        if name in body and body[name] not in allowed:
            hint = "send messages" if name == "prompt" else "leave it out"
            raise ApiError(400, f"{name} is not supported on chat completions; {hint}", name)
    prompt = chat_prompt(parse_messages(body.get("messages")))
    dropped = {"messages", "max_completion_tokens", *_NEUTRAL}
    fields = {k: v for k, v in body.items() if k not in dropped}
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens
        if body.get("max_tokens") is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        fields["max_tokens"] = body["max_completion_tokens"]
    fields |= {"prompt": prompt, "codegen_truncation": True}
    try:
        return parse_completion(fields, engine)
    except ApiError as error:
        if error.param != "prompt":
            raise
        message = error.message.replace("the prompt", "the conversation", 1)
        raise ApiError(error.status, message, "messages", error.code) from None


def parse_messages(value: object) -> list[Message]:
    """OpenAI's messages: a non-empty list of {role, content}, content a string or a list of
    {"type": "text", "text": ...} parts."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", "messages")
    messages = [_message(item, i) for i, item in enumerate(value)]
    if messages[-1].role != "user":
        raise ApiError(
            400,
            f"the last message must be a user message (the step to write code for), got "
            f"{messages[-1].role}",
            "messages",
        )
    return messages


def _message(item: object, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(item, dict):
        raise ApiError(400, f"{where} must be an object with role and content", "messages")
    role = item.get("role")
    if role not in ROLES:
        raise ApiError(
            400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", "messages"
        )
    for name in ("tool_calls", "function_call", "tool_call_id"):
        if item.get(name) not in (None, []):
            raise ApiError(400, f"{where}.{name} is not supported; leave it out", "messages")
    return Message(role, _content(item.get("content"), where))


def _content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        return "".join(part["text"] for part in content)
    raise ApiError(
        400,
        f"{where}.content must be a string or a list of {{'type': 'text', 'text': STRING}} parts "
        "(this server reads text only)",
        "messages",
    )


def _is_text_part(part: object) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def chat_prompt(messages: list[Message]) -> str:
    """The multi-turn prompt of a checked conversation (ending in a user message)."""
    systems = 0
    while systems < len(messages) and messages[systems].role == "system":
        systems += 1
    prefix = DEFAULT_PREFIX
    if systems:
        text = "\n".join(m.content for m in messages[:systems]).rstrip("\n")
        prefix = f"{text}\n\n" if text.strip() else ""
    turns: list[TurnText] = []
    rest = messages[systems:]
    for k, message in enumerate(rest):
        expected = "user" if k % 2 == 0 else "assistant"
        if message.role != expected:
            raise ApiError(
                400,
                f"messages[{systems + k}] is a {message.role} message where a {expected} "
                "message belongs: system messages come first, then user (a step) and "
                "assistant (its code) alternate, ending with a user message",
                "messages",
            )
        if message.role == "user" and not message.content.strip():
            raise ApiError(
                400, f"messages[{systems + k}] is an empty step; say what to do", "messages"
            )
        if message.role == "assistant":
            turns.append(TurnText(rest[k - 1].content, message.content))
    return build_context(prefix, turns, rest[-1].content)


# ------------------------------------------------------------------------- answers


@dataclasses.dataclass(frozen=True)
class Shape:
    """How choices are answered: /v1/completions' `text` or /v1/chat/completions' `message`
    (streamed: `delta`, a first chunk per choice carrying the role)."""

    kind: Literal["text", "chat"]

    @property
    def id_prefix(self) -> str:
        return "chatcmpl" if self.kind == "chat" else "cmpl"

    def object(self, stream: bool) -> str:
        if self.kind == "text":
            return "text_completion"
        return "chat.completion.chunk" if stream else "chat.completion"

    def opening(self, choices: int) -> list[dict[str, Any]]:
        """The chunks sent before any text: a chat stream's role, per choice."""
        if self.kind == "text":
            return []
        delta = {"role": "assistant", "content": ""}
        return [_chat_choice(i, "delta", delta, None) for i in range(choices)]

    def chunk(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """One streamed choice update (text, or the finish with no text)."""
        if self.kind == "text":
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        return _chat_choice(index, "delta", {"content": text} if text else {}, reason)

    def choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """One choice of a whole (not streamed) answer."""
        if self.kind == "text":
            return self.chunk(index, text, reason)
        return _chat_choice(index, "message", {"role": "assistant", "content": text}, reason)


def _chat_choice(
    index: int, key: str, content: dict[str, str], reason: str | None
) -> dict[str, Any]:
    return {"index": index, key: content, "logprobs": None, "finish_reason": reason}


TEXT, CHAT = Shape("text"), Shape("chat")


# ------------------------------------------------------------------------- running a request


class Job:
    """The engine requests of one HTTP request (one per prompt) and their events."""

    def __init__(self, parsed: CompletionRequest, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.n = parsed.sample.n
        self.prompt_tokens = sum(len(ids) for ids in parsed.prompts)
        self.completion_tokens = 0
        self.open = len(parsed.prompts) * self.n  # choices not finished yet
        self.requests = [
            EngineRequest(ids, parsed.sample, self._emitter(loop, k))
            for k, ids in enumerate(parsed.prompts)
        ]

    def _emitter(self, loop: asyncio.AbstractEventLoop, k: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:  # on the engine thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))

        return emit

    def submit(self, engine: Engine) -> None:
        try:
            for request in self.requests:
                engine.submit(request)
        except QueueFull:
            self.cancel()
            raise ApiError(
                429, "the server is busy (its queue is full); retry shortly", code="queue_full"
            ) from None

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def choices(self) -> AsyncIterator[dict[str, Any]]:
        """Choice updates ({index, text, finish_reason}) until every choice has finished."""
        while self.open:
            k, event = await self.queue.get()
            if isinstance(event, Failed):
                raise ApiError(500, event.message, code="decoder_failed")
            index = k * self.n + event.index
            if isinstance(event, Delta):
                yield {"index": index, "text": event.text, "logprobs": None, "finish_reason": None}
            elif isinstance(event, Finish):
                self.open -= 1
                self.completion_tokens += event.tokens
                yield {"index": index, "text": "", "logprobs": None, "finish_reason": event.reason}

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


async def stream_chunks(
    job: Job, envelope: dict[str, Any], include_usage: bool, shape: Shape
) -> AsyncIterator[dict[str, str]]:
    """SSE data lines: one chunk per text piece or finish, [DONE] last. A client that goes
    away cancels this generator, and `finally` frees its slots."""
    try:
        for opening in shape.opening(job.open):
            yield {"data": json.dumps({**envelope, "choices": [opening]})}
        async for choice in job.choices():
            chunk = shape.chunk(choice["index"], choice["text"], choice["finish_reason"])
            yield {"data": json.dumps({**envelope, "choices": [chunk]})}
        if include_usage:
            yield {"data": json.dumps({**envelope, "choices": [], "usage": job.usage()})}
        yield {"data": "[DONE]"}
    except ApiError as error:
        yield {"data": json.dumps(error.body())}
    finally:
        job.cancel()


async def collect(
    job: Job, envelope: dict[str, Any], request: HttpRequest, shape: Shape
) -> Response:
    """The whole completion; stop decoding if the client disconnects while it waits."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    watcher = asyncio.create_task(wait_disconnect(request, job))
    try:
        async for choice in job.choices():
            texts.setdefault(choice["index"], []).append(choice["text"])
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    finally:
        watcher.cancel()
        job.cancel()
    choices = [shape.choice(i, "".join(texts[i]), reasons.get(i)) for i in sorted(texts)]
    return JSONResponse({**envelope, "choices": choices, "usage": job.usage()})


async def wait_disconnect(request: HttpRequest, job: Job) -> None:
    """Cancel the job when the client goes away (its samples then finish as cancelled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    job.cancel()
