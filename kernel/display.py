"""Code as a Jupyter MIME bundle: highlighted HTML for notebooks, plain text for the rest."""

from __future__ import annotations

from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

# Inline styles (noclasses): the HTML must look right without a stylesheet, in any frontend
# and in a saved notebook.
_FORMATTER = HtmlFormatter(noclasses=True, style="default", nobackground=True)
_LEXER = PythonLexer()
# In a display's metadata, marks generated code, so tools (and tests) tell it from outputs.
CODE_METADATA = {"codegen": {"generated_code": True}}


def code_bundle(code: str) -> dict[str, str]:
    """A display bundle for generated code (the empty string shows as an empty block)."""
    return {
        "text/plain": code,
        "text/html": highlight(code, _LEXER, _FORMATTER) if code else "<pre></pre>",
    }


def text_bundle(text: str) -> dict[str, str]:
    return {"text/plain": text}
