"""`python -m codegen_repl.kernel -f CONNECTION_FILE`: the `codegen` kernel's entry point."""

from __future__ import annotations

from codegen_repl.kernel.kernel import main

if __name__ == "__main__":
    main()
