"""Reading an OpenAI-compatible server's answers for the RemoteDecoder: JSON bodies, server-sent
events, error bodies, and the fields llama.cpp, vLLM, Ollama and our server name differently.
Anything unreadable is a ServerError that names the server, the endpoint and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from codegen_repl.errors import ServerError


class Absent(ServerError):
    """The server lacks an endpoint (404, 405, 501) or cannot read our request there (400,
    422): a probe for what a server offers moves on to the next way."""


class OneChoice(ServerError):
    """400 on /v1/completions refusing n > 1 (llama.cpp: "Only one completion choice")."""


class TooLong(ServerError):
    """400 on /v1/completions for a prompt longer than the context."""


class NotJson(ServerError):
    """A 200 whose body is not a JSON object."""


def is_count(value: object, low: int = 1) -> bool:
    return type(value) is int and value >= low


def unreadable(url: str, endpoint: str, field: str) -> ServerError:
    return ServerError(
        f"the decoder server at {url} answered {endpoint} without a readable `{field}`; is it an "
        "OpenAI-compatible completions server (llama.cpp, vLLM, Ollama, codegen-repl serve)?"
    )


def choice_text(choice: dict[str, Any], url: str) -> str:
    text = choice.get("text")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise unreadable(url, "/v1/completions", "choices[].text")
    return text


def choice_index(choice: dict[str, Any], default: int, url: str) -> int:
    index = choice.get("index", default)
    if not is_count(index, low=0):
        raise unreadable(url, "/v1/completions", "choices[].index")
    return int(index)


def tokenize_count(answer: dict[str, Any], url: str) -> int:
    """`count` (ours, vLLM's), else the length of `tokens` (llama.cpp's)."""
    if "count" in answer:
        if not is_count(answer["count"], low=0):
            raise unreadable(url, "/tokenize", "count")
        return int(answer["count"])
    tokens = answer.get("tokens")
    if not isinstance(tokens, list):
        raise unreadable(url, "/tokenize", "tokens")
    return len(tokens)


def ollama_context(shown: dict[str, Any]) -> int | None:
    """`num_ctx` from /api/show's `parameters` (what Ollama runs the model with), else the
    model's own `<arch>.context_length` in `model_info`."""
    parameters = shown.get("parameters")
    if isinstance(parameters, str):
        for line in parameters.splitlines():
            name, _, value = line.strip().partition(" ")
            if name == "num_ctx" and value.strip().isascii() and value.strip().isdigit():
                return int(value.strip())
    info = shown.get("model_info")
    if isinstance(info, dict):
        for key, value in info.items():
            if key.endswith(".context_length") and is_count(value):
                return int(value)
    return None


def error_message(response: httpx.Response) -> str:
    """The server's error message: OpenAI's `{"error": {"message"}}` (ours, llama.cpp,
    Ollama's OpenAI layer, vLLM >= 0.10), vLLM's older `{"object": "error", "message"}`,
    Ollama's `{"error": "text"}`, or the raw body."""
    response.read()
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("message"):
            return str(data["message"])
    return response.text[:300]


def status_error(response: httpx.Response, url: str) -> ServerError:
    message = error_message(response)
    response.close()
    status = response.status_code
    if status == 401:
        return ServerError(
            f"the decoder server at {url} refused the API key ({message}); pass --api-key KEY "
            "or set CODEGEN_API_KEY to the key the server was started with"
        )
    path = response.request.url.path
    if status in (404, 405, 501):
        return Absent(f"the decoder server at {url} has no {path} ({message})")
    if status in (400, 422) and path != "/v1/completions":
        return Absent(f"the decoder server at {url} refused {path}: {message}")
    if status == 400 and "only one completion choice" in message.lower():
        return OneChoice(f"the decoder server at {url} answered 400: {message}")
    if status == 400 and "context" in message.lower():
        return TooLong(f"the decoder server at {url} answered 400: {message}")
    if status == 429:
        return ServerError(f"the decoder server at {url} is busy ({message}); try again shortly")
    return ServerError(f"the decoder server at {url} answered {status}: {message}")


def read_json(response: httpx.Response, url: str, endpoint: str | None = None) -> dict[str, Any]:
    endpoint = endpoint or response.request.url.path
    try:
        body = response.read()
    except httpx.HTTPError as error:
        raise ServerError(f"the decoder server at {url} broke off its answer: {error}") from None
    try:
        data = json.loads(body)
    except ValueError as error:
        raise NotJson(
            f"the decoder server at {url} sent an unreadable answer to {endpoint}: {error}"
        ) from None
    if not isinstance(data, dict):
        raise NotJson(
            f"the decoder server at {url} sent an unexpected answer to {endpoint}: {data!r:.200}"
        )
    return data


def sse_choices(response: httpx.Response, url: str) -> Iterator[dict[str, Any]]:
    """The choices of each `data:` event until [DONE]; an error event raises ServerError."""
    try:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (pings), event names, blank separators
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            chunk = json.loads(payload)
            if not isinstance(chunk, dict):
                raise ValueError(f"not an object: {payload[:200]}")
            error = chunk.get("error") or (chunk.get("object") == "error" and chunk)
            if error:
                message = error.get("message") if isinstance(error, dict) else error
                raise ServerError(f"the decoder server at {url} failed: {message}")
            choices = chunk.get("choices") or []
            if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                raise unreadable(url, "/v1/completions (stream)", "choices")
            yield from choices
    except httpx.HTTPError as error:
        raise ServerError(f"the decoder server at {url} broke off the stream: {error}") from None
    except ValueError as error:
        raise ServerError(f"the decoder server at {url} sent a bad event: {error}") from None
