"""The project's error tree.

Every error a user can cause (a bad flag, a broken checkpoint, a missing file) is raised as one
of these, with a message that says what happened and what to do. Front ends catch
`CodeGenError` at their loop and show the message; anything else is a bug.
"""

from __future__ import annotations


class CodeGenError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CodeGenError, ValueError):
    """A configuration value is invalid; the message lists what is allowed."""


class CheckpointError(CodeGenError):
    """A checkpoint cannot be found, read or matched to the model."""


class TokenizerError(CodeGenError):
    """Tokenizer files are missing or inconsistent."""


class KernelError(CodeGenError):
    """The Jupyter kernel that runs generated code failed."""


class ServerError(CodeGenError):
    """The decoder server cannot be reached or answered with an error."""
