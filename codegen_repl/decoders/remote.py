"""RemoteDecoder: the Decoder protocol over any OpenAI-compatible completions server.

Tested against our own `codegen-repl serve` and against servers shaped as llama.cpp's
llama-server, vLLM and Ollama document theirs (tests/decoders/fake_servers.py). What each
offers differs, so the decoder asks in this order and keeps the first answer:

- Context window: the `--context` the user gave; else `GET /v1/models` (`max_model_len`: ours
  and vLLM's; `context_length`: LM Studio's); else llama.cpp's `GET /props`
  (`default_generation_settings.n_ctx`); else Ollama's `POST /api/show` (`num_ctx` in
  `parameters`, else `model_info["<arch>.context_length"]`); else a ServerError asking for
  `--context`.
- Token counts: `POST /tokenize` with `{"model", "prompt", "content"}` (ours and vLLM's read
  `prompt` and answer `count`; llama.cpp's reads `content` and answers `tokens`); else, when
  the served model is a hub id (`org/name`, or Ollama's `hf.co/org/name:tag`) whose tokenizer
  is in the local HF cache, that tokenizer (offline); else `usage.prompt_tokens` of a one-token
  greedy completion. Counts are cached per text.
- Completions: `POST /v1/completions`, streamed as server-sent events (`data: {json}` lines,
  ended by `data: [DONE]`; an event with an `error` object is an error). Stop strings and
  CodeGen's truncation rules are sent (`codegen_truncation` is our extension) and also applied
  here, so they hold whatever the server does with them.

Docs followed: llama.cpp tools/server/README.md (`/tokenize`, `/props`, "API errors"), vLLM's
OpenAI-compatible server (`TokenizeResponse{count, max_model_len, tokens}`, `ModelCard.
max_model_len`, `ErrorResponse`), Ollama docs/api.md (`/api/show`) and docs/openai.md
(`/v1/completions`, `/v1/models`), OpenAI's API reference (SSE framing, error bodies).

Connect errors (and 503 while a server loads its model) are retried with exponential backoff.
Every failure is a `ServerError` that names the server and says what to do; an answer we
cannot read names the endpoint and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import httpx

from codegen_repl.core.decoding import SampleText
from codegen_repl.core.truncation import Cutter
from codegen_repl.decoders import answers
from codegen_repl.decoders.answers import Absent, OneChoice, TooLong, is_count, read_json
from codegen_repl.errors import CodeGenError, ServerError
from codegen_repl.model.sample_params import SampleParams

_RETRIED = (httpx.ConnectError, httpx.ConnectTimeout)
# /v1/models fields that hold the context window: vLLM's and ours, then LM Studio's.
_CONTEXT_FIELDS = ("max_model_len", "context_length")
TokenCounting = Literal["tokenize", "tokenizer", "usage"]  # how count_tokens asks


class RemoteDecoder:
    """A decoder server's model, behind the same protocol as LocalDecoder.

    Args:
        url: the server's root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted).
        api_key: sent as `Authorization: Bearer KEY`; default: $CODEGEN_API_KEY.
        model: the served model to ask for; None (or a name the server does not serve, when it
            serves exactly one) means the server's model.
        context_window: the context window in tokens, for servers that do not report it (a
            reported one is then ignored: the user's word wins).
        retries: extra tries after a connect error or a 503, waiting backoff * 2**i seconds.

    Raises:
        ServerError: the URL is not http(s) (the server is first asked on first use).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        *,
        context_window: int | None = None,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.25,
    ) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        if not self.url.startswith(("http://", "https://")):
            raise ServerError(f"the server URL must start with http:// or https://, got {url!r}")
        if context_window is not None and context_window < 2:
            raise ServerError(f"--context must be at least 2 tokens, got {context_window}")
        api_key = api_key or os.environ.get("CODEGEN_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0)
        )
        self.requested_model, self.retries, self.backoff = model, retries, backoff
        self._served: tuple[str, int | None] | None = None  # (model id, context from /v1/models)
        self._context = context_window
        self.counting: TokenCounting | None = None  # decided by the first count_tokens
        self._tokenizer: Callable[[str], int] | None = None
        self._counts: dict[str, int] = {}
        self._one_at_a_time = False  # the server answers one choice per request

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------------- protocol

    @property
    def max_context(self) -> int:
        if self._context is None:
            self._context = self._find_context()
        return self._context

    @property
    def model(self) -> str:
        return self._model_info()[0]

    def describe(self) -> str:
        """`server http://host:8000 · context 2048 tokens` (asks the server)."""
        return f"server {self.url} · context {self.max_context} tokens"

    def count_tokens(self, text: str) -> int:
        if text not in self._counts:
            if len(self._counts) > 256:
                self._counts.clear()
            self._counts[text] = self._count(text)
        return self._counts[text]

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        """Stream the first sample. Closing the iterator (or Ctrl-C while it waits) closes the
        connection, and the server frees the slot."""
        text = SampleText(None, Cutter(codegen_rules=sample.codegen_rules, stop=sample.stop))
        body = self._body(prompt, sample, n=1) | {"stream": True}
        with contextlib.closing(self._send("/v1/completions", body, stream=True)) as response:
            for choice in answers.sse_choices(response, self.url):
                if choice.get("index", 0) != 0:
                    continue
                text.add_text(answers.choice_text(choice, self.url))
                if piece := text.take():
                    yield piece
                if text.done:
                    break
        if rest := text.take(finished=True):
            yield rest

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        """All n samples: in one request, or, from a server that answers one choice only
        (llama.cpp refuses n > 1, Ollama ignores it), one request per sample, sample i with
        seed + i."""
        if sample.n > 1 and not self._one_at_a_time:
            try:
                texts = self._complete(prompt, sample)
            except OneChoice:
                texts = []
            if len(texts) == sample.n:
                return texts
            self._one_at_a_time = True
        if sample.n == 1:
            return self._complete(prompt, sample)
        one = dataclasses.replace(sample, n=1)
        return [
            self._complete(prompt, dataclasses.replace(one, seed=sample.seed + i))[0]
            for i in range(sample.n)
        ]

    def _complete(self, prompt: str, sample: SampleParams) -> list[str]:
        cutter = Cutter(codegen_rules=sample.codegen_rules, stop=sample.stop)
        with contextlib.closing(
            self._send("/v1/completions", self._body(prompt, sample, n=sample.n))
        ) as response:
            choices = read_json(response, self.url).get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise answers.unreadable(self.url, "/v1/completions", "choices")
        texts = {
            answers.choice_index(c, i, self.url): answers.choice_text(c, self.url)
            for i, c in enumerate(choices)
        }
        if len(texts) not in (1, sample.n):
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

    def _model_info(self) -> tuple[str, int | None]:
        if self._served is None:
            with contextlib.closing(self._send("/v1/models", None, method="GET")) as response:
                models = read_json(response, self.url).get("data")
            if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
                raise answers.unreadable(self.url, "/v1/models", "data")
            self._served = self._pick(models)
        return self._served

    def _pick(self, models: list[dict[str, Any]]) -> tuple[str, int | None]:
        ids = [str(m.get("id")) for m in models]
        chosen = next((m for m in models if m.get("id") == self.requested_model), None)
        if chosen is None and len(models) == 1:
            chosen = models[0]
        if chosen is None:
            raise ServerError(
                f"the decoder server at {self.url} serves {', '.join(ids) or 'no model'}, not "
                f"{self.requested_model!r}; pass one of those as --model"
            )
        if not isinstance(chosen.get("id"), str):
            raise answers.unreadable(self.url, "/v1/models", "data[].id")
        length = next((chosen[k] for k in _CONTEXT_FIELDS if chosen.get(k) is not None), None)
        if length is not None and not is_count(length):
            raise answers.unreadable(self.url, "/v1/models", "data[].max_model_len")
        return chosen["id"], length

    # ------------------------------------------------------------------------- what it offers

    def _find_context(self) -> int:
        """The context window: /v1/models, else llama.cpp's /props, else Ollama's /api/show."""
        reported = self._model_info()[1]
        if reported is not None:
            return reported
        props = self._probe("/props", None, method="GET")
        if props is not None:
            settings = props.get("default_generation_settings")
            n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else props.get("n_ctx")
            if n_ctx is not None:
                if not is_count(n_ctx):
                    raise answers.unreadable(
                        self.url, "/props", "default_generation_settings.n_ctx"
                    )
                return n_ctx
        shown = self._probe("/api/show", {"model": self.model})
        if shown is not None:
            found = answers.ollama_context(shown)
            if found is not None:
                return found
        raise ServerError(
            f"the decoder server at {self.url} does not report its context window (no "
            "max_model_len in /v1/models, no n_ctx in /props, no context_length in /api/show); "
            "pass it as --context TOKENS (in the kernel and the magics: the context_window "
            "option); CodeGen's is 2048, llama.cpp's the -c it was started with, Ollama's the "
            "model's num_ctx"
        )

    def _count(self, text: str) -> int:
        if self.counting in (None, "tokenize"):
            body = {"model": self.model, "prompt": text, "content": text}
            answer = self._probe("/tokenize", body)
            if answer is not None:
                self.counting = "tokenize"
                return answers.tokenize_count(answer, self.url)
            if self.counting == "tokenize":
                raise ServerError(f"the decoder server at {self.url} stopped answering /tokenize")
        if self.counting in (None, "tokenizer"):
            self._tokenizer = self._tokenizer or _cached_tokenizer(self.model)
            if self._tokenizer is not None:
                self.counting = "tokenizer"
                return self._tokenizer(text)
        self.counting = "usage"
        greedy: dict[str, Any] = {"model": self.model, "prompt": text, "temperature": 0.0}
        greedy["max_tokens"] = 1
        try:
            response = self._send("/v1/completions", greedy)
        except TooLong:
            return self.max_context + 1  # refused as longer than the context: it does not fit
        with contextlib.closing(response):
            usage = read_json(response, self.url).get("usage")
        count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if not is_count(count, low=0):
            raise answers.unreadable(self.url, "/v1/completions", "usage.prompt_tokens")
        return int(count)  # type: ignore[arg-type]

    def _probe(
        self, path: str, body: dict[str, Any] | None, method: str = "POST"
    ) -> dict[str, Any] | None:
        """The JSON object an endpoint some servers lack answers; None where this one lacks it
        (404, 405, 501), does not understand our request there (400, 422), or answers it with
        something else than a JSON object (a web UI's page)."""
        try:
            with contextlib.closing(self._send(path, body, method=method)) as response:
                return read_json(response, self.url, path)
        except (Absent, answers.NotJson):
            return None

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
                problem = answers.error_message(response)
                response.close()
                continue
            if response.status_code >= 400:
                raise answers.status_error(response, self.url)
            return response
        raise ServerError(
            f"the decoder server at {self.url} is not available after {self.retries + 1} tries "
            f"({problem}); start it with `codegen-repl serve --model MODEL`, or check the URL "
            "and the SSH tunnel"
        )


# ----------------------------------------------------------------------------- a hub tokenizer


def _hub_id(model: str) -> str | None:
    """`org/name` of a served model id that names a hub repo (`Salesforce/codegen-350M-mono`,
    Ollama's `hf.co/Salesforce/codegen-350M-mono:latest`), else None."""
    for prefix in ("hf.co/", "huggingface.co/", "https://huggingface.co/"):
        model = model.removeprefix(prefix)
    repo = model.split(":", 1)[0]
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or repo.startswith((".", "~")):
        return None
    return repo


def _cached_tokenizer(model: str) -> Callable[[str], int] | None:
    """A counter from the model's tokenizer when it is in the local HF cache (never downloads:
    the server holds the model, this machine may be offline), else None."""
    repo = _hub_id(model)
    if repo is None:
        return None
    try:
        from huggingface_hub import snapshot_download

        from codegen_repl.model import tokenizer as files

        names = [files.TOKENIZER_FILE, files.VOCAB_FILE, files.MERGES_FILE, files.ADDED_TOKENS_FILE]
        folder = snapshot_download(repo, allow_patterns=names, local_files_only=True)
        tokenizer = files.load_tokenizer(folder)
    except (CodeGenError, OSError, ValueError, ImportError):
        return None  # not cached (huggingface_hub's errors are OSError or ValueError)
    return lambda text: len(tokenizer.encode(text))
