"""The `codegen-repl` command line: a typer app (`app.py`), one module per command group."""
