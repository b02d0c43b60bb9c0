"""The `codegen-repl` command line: a typer app (`app.py`), one module per command group."""

import sys

# nbformat validates notebooks with jsonschema, whose format checker imports rfc3987_syntax where
# it is installed (jupyterlab pulls it in, through jupyter-events); that import builds a Lark
# grammar: 1.45 s on the 2-core CPU, before the REPL's prompt can show. No notebook schema uses
# an IRI format, so the command's own process does without it (the kernel it starts is not
# touched). None in sys.modules makes the import fail, and jsonschema skips that format.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
