"""The one flow, free of JAX and of any front-end library: the Decoder protocol (`decoding`),
the multi-turn context (`context`), CodeGen's truncation (`truncation`), the Session and its
notebook (`session`), the Executor over a Jupyter kernel (`executor`), settings and the
session commands every front end shares (`settings`, `commands`).
"""
