"""The OpenAI completions protocol: a request body read as JSON (`parse_json`), checked and
turned into token ids and `SampleParams` (`parse_completion`), and errors in OpenAI's format
(`ApiError`).

Every field is validated with a message that names it and says what is allowed; fields the
server cannot honour are refused rather than silently ignored. No client input is a 5xx: JSON
nested deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (a lone surrogate such
as "\\ud800", which JSON can spell but UTF-8 cannot hold) are 400s, and so are more prompts in
one request than the server could ever run at once.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from codegen_repl.model.sample_params import MAX_TEMPERATURE, TOP_K_OFF, SampleParams

if TYPE_CHECKING:
    from codegen_repl.serve.engine import Engine

MAX_SEED = 2**31 - 1  # the seeds a request may ask for (int32, as vLLM's API)
MAX_STOP = 16  # stop strings per request
MAX_JSON_DEPTH = 32  # OpenAI's bodies nest 3 deep; deeper ones only exhaust the parser's stack


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _printable(text: str) -> str:
    """Text that can be sent as UTF-8 (a lone surrogate echoed from a request becomes \\ud800)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions request: every prompt as token ids, one SampleParams."""

    prompts: list[list[int]]  # token ids of each prompt
    sample: SampleParams
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> object:
    """A request body as JSON: 400 when it is not JSON, nests deeper than MAX_JSON_DEPTH, or
    holds a string that is not valid Unicode."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, _too_deep()) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None
    _check_tree(body)
    return body


def _too_deep() -> str:
    return f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels; flatten it"


def _check_tree(body: object) -> None:
    """Walk the parsed body (without recursion) for its depth and for unencodable strings."""
    todo: list[tuple[object, int, str]] = [(body, 1, "")]
    while todo:
        value, depth, field = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, _too_deep())
        if isinstance(value, str):
            _check_text(value, field)
        elif isinstance(value, list):
            todo += [(item, depth + 1, field) for item in value]
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, field or key)
                todo.append((item, depth + 1, field or key))


def _check_text(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        where = f" in {field}" if field else ""
        raise ApiError(
            400,
            f"the request holds a lone surrogate (\\u{ord(bad):04x}){where}, which is not valid "
            "Unicode text; send well-formed UTF-8 (escape only complete surrogate pairs)",
            field or None,
        ) from None


def parse_completion(body: object, engine: Engine) -> CompletionRequest:
    """Validate a /v1/completions body (OpenAI's fields, plus top_k and codegen_truncation)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body)
    texts = _prompt_list(body.get("prompt"))
    most = engine.settings.max_concurrency
    if len(texts) > most:  # each prompt is one engine request: more could never all be queued
        raise ApiError(
            400,
            f"{len(texts)} prompts in one request; this server runs at most {most} "
            "(its max_concurrency): send them in several requests",
            "prompt",
            "too_many_prompts",
        )
    prompts = [_prompt_ids(p, engine) for p in texts]
    vocab = engine.config.vocab_size
    max_tokens = _integer(body, "max_tokens", 16, 1, engine.max_context)
    sample = SampleParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        # -1 is off, as in vLLM; a top_k that keeps the whole vocabulary is off (for_vocab below),
        # as in-process (SampleParams' one rule for the edges)
        top_k=max(0, _integer(body, "top_k", 0, -1, TOP_K_OFF)),
        n=_integer(body, "n", 1, 1, engine.settings.max_batch),
        seed=_integer(body, "seed", secrets.randbelow(MAX_SEED), 0, MAX_SEED),
        stop=_stop(body.get("stop")),
        codegen_rules=_flag(body, "codegen_truncation"),
    ).for_vocab(vocab)
    for ids in prompts:
        _check_fits(len(ids), max_tokens, engine.max_context)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = _flag(options, "include_usage")
    return CompletionRequest(prompts, sample, _flag(body, "stream"), include_usage)


def _refuse_unsupported(body: dict) -> None:
    """Fields we accept only at their neutral values (never silently ignore a wish)."""
    neutral: dict[str, tuple[object, ...]] = {
        "echo": (None, False),
        "logprobs": (None,),
        "suffix": (None, ""),
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
    }
    for name, allowed in neutral.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError(400, "best_of is not supported by this server; leave it out", "best_of")


def _prompt_list(prompt: object) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]  # type: ignore[list-item]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or _is_ids(p) for p in prompt)
    ):
        return prompt
    raise ApiError(
        400, "prompt must be a string, a list of token ids, or a non-empty list of those", "prompt"
    )


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value) and bool(value)


def _prompt_ids(prompt: str | list[int], engine: Engine) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty; give at least one token of context", "prompt")
        return ids
    vocab = engine.config.vocab_size
    bad = [x for x in prompt if not 0 <= x < vocab]
    if bad:
        raise ApiError(
            400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt"
        )
    return prompt


def _check_fits(prompt_tokens: int, max_tokens: int, context: int) -> None:
    over = prompt_tokens + max_tokens - context
    if over > 0:
        raise ApiError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {context} tokens by {over}; shorten the prompt or lower "
            "max_tokens",
            "prompt",
            "context_length_exceeded",
        )


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in {low}..{high}, got {value}", name)
    return value


def _number(
    body: dict, name: str, default: float, low: float, high: float, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)}", name)
    if not (low < value if open_low else low <= value) or value > high:
        bounds = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{name} must be in {bounds}, got {value}", name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    return tuple(stops)
