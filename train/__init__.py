"""Training of CodeGen-architecture models (see the training issue; nothing here yet)."""

from __future__ import annotations
