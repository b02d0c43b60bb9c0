"""The Jupyter kernel and IPython magics (see the Jupyter issue; nothing here yet)."""

from __future__ import annotations
