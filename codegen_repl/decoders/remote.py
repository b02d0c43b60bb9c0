"""RemoteDecoder: the Decoder protocol over an OpenAI-compatible completions server.

Works with `codegen-repl serve` and with other servers of the same protocol (vLLM, ...):
- `max_context` comes from `GET /v1/models` (`max_model_len`, as vLLM names it; 2048, CodeGen's
  window, when the server does not say).
- `count_tokens` asks the server's tokenizer (`POST /tokenize`, vLLM's extension); a server
  without it is asked for a one-token greedy completion, whose `usage.prompt_tokens` is the
  count. Counts are cached per text.
- Stop strings and CodeGen's truncation rules are sent (`codegen_truncation` is our extension)
  and also applied here, so they hold whatever the server does with them.
Connect errors (and 503 while the server loads its model) are retried with exponential backoff;
every failure becomes a `ServerError` that says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx

from codegen_repl.core.truncation import Cutter
from codegen_repl.errors import ServerError
from codegen_repl.model.sample_params import SampleParams

DEFAULT_CONTEXT = 2048  # CodeGen's window, for servers that do not report theirs
_RETRIED = (httpx.ConnectError, httpx.ConnectTimeout)


class RemoteDecoder:
    """A decoder server's model, behind the same protocol as LocalDecoder.

    Args:
        url: the server's root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted).
        api_key: sent as `Authorization: Bearer KEY`; default: $CODEGEN_API_KEY.
        model: the served model to ask for; None (or a name the server does not serve, when it
            serves exactly one) means the server's model.
        retries: extra tries after a connect error or a 503, waiting backoff * 2**i seconds.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        *,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.25,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        if not self.url.startswith(("http://", "https://")):
            raise ServerError(f"the server URL must start with http:// or https://, got {url!r}")
        api_key = api_key or os.environ.get("CODEGEN_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )
        self.requested_model, self.retries, self.backoff = model, retries, backoff
        self._served: tuple[str, int] | None = None  # (model id, context length)
        self._counts: dict[str, int] = {}

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------------- protocol

    @property
    def max_context(self) -> int:
        return self._model_info()[1]

    @property
    def model(self) -> str:
        return self._model_info()[0]

    def count_tokens(self, text: str) -> int:
        if text not in self._counts:
            if len(self._counts) > 256:
                self._counts.clear()
            self._counts[text] = self._count(text)
        return self._counts[text]

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        """Stream the first sample. Closing the iterator (or Ctrl-C while it waits) closes the
        connection, and the server frees the slot."""
        cutter = Cutter(codegen_rules=sample.codegen_rules, stop=sample.stop)
        body = self._body(prompt, sample, n=1) | {"stream": True}
        text, shown = "", 0
        with contextlib.closing(self._send("/v1/completions", body, stream=True)) as response:
            for choice in _sse_choices(response, self.url):
                if choice.get("index", 0) != 0:
                    continue
                text += choice.get("text") or ""
                end = cutter.visible(text)
                if end > shown:
                    yield text[shown:end]
                    shown = end
                if cutter.final(text) is not None:
                    break
        rest = cutter.apply(text)[shown:]
        if rest:
            yield rest

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        cutter = Cutter(codegen_rules=sample.codegen_rules, stop=sample.stop)
        with contextlib.closing(
            self._send("/v1/completions", self._body(prompt, sample, n=sample.n))
        ) as response:
            choices = _json(response, self.url).get("choices") or []
        texts = {int(c.get("index", i)): c.get("text") or "" for i, c in enumerate(choices)}
        if len(texts) != sample.n:
            raise ServerError(
                f"the decoder server at {self.url} returned {len(texts)} choices for n="
                f"{sample.n}; is it an OpenAI-compatible completions server?"
            )
        return [cutter.apply(texts[i]) for i in sorted(texts)]

    # ------------------------------------------------------------------------- requests

    def _body(self, prompt: str, sample: SampleParams, n: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": sample.max_new_tokens,
            "temperature": sample.temperature,
            "top_p": sample.top_p,
            "n": n,
            "seed": sample.seed,
        }
        if sample.top_k:
            body["top_k"] = sample.top_k
        if sample.stop:
            body["stop"] = list(sample.stop)
        if sample.codegen_rules:
            body["codegen_truncation"] = True
        return body

    def _model_info(self) -> tuple[str, int]:
        if self._served is None:
            with contextlib.closing(self._send("/v1/models", None, method="GET")) as response:
                models = _json(response, self.url).get("data") or []
            self._served = self._pick(models)
        return self._served

    def _pick(self, models: list[dict[str, Any]]) -> tuple[str, int]:
        ids = [str(m.get("id")) for m in models]
        chosen = next((m for m in models if m.get("id") == self.requested_model), None)
        if chosen is None and len(models) == 1:
            chosen = models[0]
        if chosen is None:
            raise ServerError(
                f"the decoder server at {self.url} serves {', '.join(ids) or 'no model'}, not "
                f"{self.requested_model!r}; pass one of those as --model"
            )
        length = chosen.get("max_model_len") or chosen.get("context_length") or DEFAULT_CONTEXT
        return str(chosen["id"]), int(length)

    def _count(self, text: str) -> int:
        try:
            with contextlib.closing(
                self._send("/tokenize", {"model": self.model, "prompt": text})
            ) as response:
                return int(_json(response, self.url)["count"])
        except _NotFound:
            pass
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
        with contextlib.closing(self._send("/v1/completions", body)) as response:
            return int(_json(response, self.url)["usage"]["prompt_tokens"])

    def _send(
        self, path: str, body: dict[str, Any] | None, method: str = "POST", stream: bool = False
    ) -> httpx.Response:
        """The response (status < 400), after retrying connect errors and 503s with backoff."""
        request = self.client.build_request(method, path, json=body)
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.send(request, stream=stream)
            except _RETRIED as error:
                problem = f"cannot connect: {error}"
                continue
            except httpx.HTTPError as error:
                raise ServerError(f"the decoder server at {self.url} failed: {error}") from None
            if response.status_code == 503:
                problem = _message(response)
                response.close()
                continue
            if response.status_code >= 400:
                raise _status_error(response, self.url)
            return response
        raise ServerError(
            f"the decoder server at {self.url} is not available after {self.retries + 1} tries "
            f"({problem}); start it with `codegen-repl serve --model MODEL`, or check the URL "
            "and the SSH tunnel"
        )


class _NotFound(ServerError):
    """404: the server lacks an endpoint (e.g. /tokenize)."""


def _message(response: httpx.Response) -> str:
    """The server's error message (OpenAI's format, or the raw body)."""
    response.read()
    try:
        error = response.json().get("error")
        return str(error.get("message") if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return response.text[:300] or response.reason_phrase


def _status_error(response: httpx.Response, url: str) -> ServerError:
    message = _message(response)
    response.close()
    status = response.status_code
    if status == 401:
        return ServerError(
            f"the decoder server at {url} refused the API key ({message}); pass --api-key KEY "
            "or set CODEGEN_API_KEY to the key the server was started with"
        )
    if status == 404:
        return _NotFound(f"the decoder server at {url} has no {response.request.url.path}")
    if status == 429:
        return ServerError(f"the decoder server at {url} is busy ({message}); try again shortly")
    return ServerError(f"the decoder server at {url} answered {status}: {message}")


def _json(response: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data = json.loads(response.read())
    except (ValueError, httpx.HTTPError) as error:
        raise ServerError(
            f"the decoder server at {url} sent an unreadable answer: {error}"
        ) from None
    if not isinstance(data, dict):
        raise ServerError(f"the decoder server at {url} sent an unexpected answer: {data!r:.200}")
    return data


def _sse_choices(response: httpx.Response, url: str) -> Iterator[dict[str, Any]]:
    """The choices of each `data:` event until [DONE]; an error event raises ServerError."""
    try:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (pings), event names, blank separators
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            chunk = json.loads(payload)
            if chunk.get("error"):
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise ServerError(f"the decoder server at {url} failed: {message}")
            yield from chunk.get("choices") or []
    except httpx.HTTPError as error:
        raise ServerError(f"the decoder server at {url} broke off the stream: {error}") from None
    except ValueError as error:
        raise ServerError(f"the decoder server at {url} sent a bad event: {error}") from None
