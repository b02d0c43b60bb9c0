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
from codegen_repl.userconfig import default_cache_dir

if TYPE_CHECKING:
    from codegen_repl.model.tokenizer import CodeGenTokenizer


class Decoder(Protocol):
    """What a front end needs from a model, local or remote."""

    @property
    def max_context(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

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
) -> Decoder:
    """The decoder a front end asked for: a decoder server's when `server` is a URL (then
    `model` names the served model to ask for), else `model` loaded in this process."""
    if server:
        from codegen_repl.decoders.remote import RemoteDecoder

        return RemoteDecoder(server, api_key=api_key, model=str(model) if model else None)
    from codegen_repl.decoders.local import LocalDecoder  # imports JAX: only when asked for

    return LocalDecoder.load(
        model, dtype=dtype, int8=int8, compilation_cache=default_cache_dir() / "jax"
    )


@dataclasses.dataclass
class SampleText:
    """One sample's tokens and text as they stream in, and whether EOS or a stop rule has ended
    it (the local decoder and the server's engine both keep their samples in one)."""

    tokenizer: CodeGenTokenizer
    cutter: Cutter
    ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    done: bool = False

    def add(self, tokens: Sequence[int]) -> None:
        if self.done:
            return
        for token in tokens:
            if token == self.tokenizer.eos_token_id:
                self.done = True
                break
            self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cut = self.cutter.final(self.text)
        if cut is not None:
            self.text, self.done = self.text[:cut], True

    def shown(self) -> int:
        """How much of the text can be shown now: it is settled and holds whole characters."""
        if self.done:
            return len(self.text)
        settled = self.cutter.visible(self.text)
        while settled and self.text[settled - 1] == "\ufffd":  # wait for a character's tail
            settled -= 1
        return settled

    def result(self) -> str:
        return self.cutter.apply(self.text)
