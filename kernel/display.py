"""Code as a Jupyter MIME bundle that follows the front end's theme.

Generated code is a fenced `python` block as `text/markdown`, with the code as `text/plain` for
front ends (and tools) that render no markdown. There is deliberately no `text/html`: inline
colours of one Pygments style are unreadable in the other themes (a light style's blue names on
JupyterLab Dark's near-black: contrast about 2.2:1), while JupyterLab and Notebook 7 highlight a
markdown code block with their editor's theme colours (CodeMirror's `--jp-mirror-editor-*`
variables), and VS Code with its own. Fences follow CommonMark: a fence longer than any run of
backticks in the code (https://spec.commonmark.org/0.31.2/#fenced-code-blocks).
"""

from __future__ import annotations

import re

# In a display's metadata, marks generated code, so tools (and tests) tell it from outputs.
CODE_METADATA = {"codegen": {"generated_code": True}}
# The display while the model has written nothing yet.
PLACEHOLDER = {"text/markdown": "*writing code…*", "text/plain": ""}
# A CommonMark thematic break: the rule between the generated code and its outputs.
RULE = "\n\n---"
_BACKTICKS = re.compile(r"`{3,}")


def code_bundle(code: str, rule: bool = False) -> dict[str, str]:
    """A display bundle for code (the empty string shows as an empty block).

    Args:
        code: Python source.
        rule: end the markdown with a horizontal rule (before the code's outputs).
    """
    longest = max((len(run) for run in _BACKTICKS.findall(code)), default=2)
    fence = "`" * (longest + 1)
    markdown = f"{fence}python\n{code.rstrip(chr(10))}\n{fence}" + (RULE if rule else "")
    return {"text/markdown": markdown, "text/plain": code}
