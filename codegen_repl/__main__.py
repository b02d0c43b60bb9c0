"""`python -m codegen_repl`: the `codegen-repl` command."""

from codegen_repl.cli.app import app

app(prog_name="codegen-repl")
