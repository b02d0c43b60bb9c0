"""The terminal front end, split as ptpython splits a REPL: `loop` (read a line, let the shared
session commands act on it, never die; the terminal's Frontend), `input` (line readers, key
bindings, completion, the answers to questions), `render` (code and outputs on a rich Console)
and `chat` (the wiring of `codegen-repl chat`). What a command does is `core.commands`' job.
"""
