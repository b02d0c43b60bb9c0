"""CodeGen-1 in JAX/Flax: configs, the network, the tokenizer, checkpoints and sampling."""

from __future__ import annotations
