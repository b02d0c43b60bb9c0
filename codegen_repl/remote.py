"""RemoteDecoder: the Decoder protocol over an OpenAI-compatible completions server (issue 7)."""

from __future__ import annotations
