"""The Decoder protocol: the one interface every front end uses to get code from a model.

Nothing here imports JAX: a REPL talking to a decoder server never pays for it. `open_decoder`
imports the decoder it was asked for (`codegen_repl.decoders.local` or `.remote`) only then.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from codegen_repl.core.truncation import Cutter
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.paths import default_cache_dir

if TYPE_CHECKING:
    from codegen_repl.model.tokenizer import CodeGenTokenizer


class Decoder(Protocol):
    """What a front end needs from a model, local or remote."""

    @property
    def max_context(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def describe(self) -> str:
        """One line for a banner: what runs the model, where, in what dtype (a server's
        decoder asks the server, so an unreachable one fails here, before anything is shown)."""
        ...

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        """Stream the text of the first sample, ended by the request's stop rules."""
        ...

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        """All `sample.n` completions, each ended by the stop rules."""
        ...


def open_decoder(
    model: str | Path,
    *,
    server: str | None = None,
    api_key: str | None = None,
    dtype: str | None = None,
    int8: bool = False,
    context_window: int | None = None,
) -> Decoder:
    """The decoder a front end asked for: a decoder server's when `server` is a URL (then
    `model` names the served model to ask for, and `context_window` is its window in tokens
    where the server does not report it), else `model` loaded in this process."""
    if server:
        from codegen_repl.decoders.remote import RemoteDecoder

        name = str(model) if model else None
        return RemoteDecoder(server, api_key=api_key, model=name, context_window=context_window)
    from codegen_repl.decoders.local import LocalDecoder  # imports JAX: only when asked for

    return LocalDecoder.load(
        model, dtype=dtype, int8=int8, compilation_cache=default_cache_dir() / "jax"
    )


@dataclasses.dataclass
class SampleText:
    """One sample's text as it streams in, whether EOS or a stop rule has ended it, and how much
    of it has been handed on: the one settled-text stream of the local decoder, the server's
    engine (tokens in) and the remote decoder (text in, `tokenizer` None)."""

    tokenizer: CodeGenTokenizer | None
    cutter: Cutter
    ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    done: bool = False
    sent: int = 0  # characters of `text` already handed on by `take`

    def add(self, tokens: Sequence[int]) -> None:
        """Append token ids (decoded with `tokenizer`); EOS ends the sample."""
        if self.done:
            return
        assert self.tokenizer is not None, "a text-only SampleText takes add_text"
        for token in tokens:
            if token == self.tokenizer.eos_token_id:
                self.done = True
                break
            self.ids.append(token)
        self._settle(self.tokenizer.decode(self.ids))

    def add_text(self, piece: str) -> None:
        """Append text as a server streamed it."""
        if not self.done:
            self._settle(self.text + piece)

    def _settle(self, text: str) -> None:
        """Keep `text`, cut where a stop rule has fired (which ends the sample; EOS may have
        ended it already)."""
        cut = self.cutter.final(text)
        self.text = text if cut is None else text[:cut]
        self.done = self.done or cut is not None

    def shown(self) -> int:
        """How much of the text can be shown now: it is settled and holds whole characters."""
        if self.done:
            return len(self.text)
        settled = self.cutter.visible(self.text)
        while settled and self.text[settled - 1] == "\ufffd":  # wait for a character's tail
            settled -= 1
        return settled

    def take(self, finished: bool = False) -> str:
        """The text settled since the last take; once the sample is done (or `finished`, e.g.
        at max_new_tokens), all that is left of its final, cut text."""
        final = finished or self.done
        text = self.result() if final else self.text
        end = len(text) if final else self.shown()
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def result(self) -> str:
        """The whole sample, cut by the stop rules."""
        return self.cutter.apply(self.text)
