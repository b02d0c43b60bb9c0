"""The one flow, free of JAX and of any front-end library: the Decoder protocol (`decoding`),
the multi-turn context (`context`), CodeGen's truncation (`truncation`), the Session
(`session`), its turns and the .ipynb they are saved in (`notebook`), Ctrl-C held over work
that must not be cut in half (`interrupts`), the Executor over a Jupyter kernel (`executor`;
starting and stopping the kernel: `kernel_process`; its messages as notebook outputs:
`outputs`), settings and the session commands every front end shares (`settings`; `commands`,
over the `Frontend` protocol and the one command table and input parsers of `frontend`).
"""
