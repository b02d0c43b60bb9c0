"""The OpenAI-compatible decoder server: request parsing and errors, routes and SSE (`app`),
and the continuous-batching engine over device slots (`engine`).
"""
