"""Ctrl-C where half-done work would be worse than a late stop: held until a block ends
(`held_interrupts`: a kernel start), or turned into a request the work answers when it can
(`interrupts_call`: a replay stops after the turn it is running). Both act only in the main
thread, where Python delivers SIGINT; elsewhere the caller stops the work its own way.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def held_interrupts(reraise: bool = True) -> Iterator[None]:
    """Ctrl-C (SIGINT) waits until the block ends (a kernel start or stop must not be cut in
    half); then it is raised as KeyboardInterrupt (`reraise`) or dropped. Outside the main
    thread, where no signal arrives, the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _handler(previous))
    if held and reraise:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_call(on_interrupt: Callable[[], None]) -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) calls `on_interrupt` instead of raising
    KeyboardInterrupt, so long work (a replay) stops where it chooses, never half-way through
    a step. Outside the main thread the block just runs (the caller stops it otherwise)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: on_interrupt())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _handler(previous))


def _handler(previous: Any) -> Any:
    """A handler `signal.getsignal` returned, fit to be set again (None: not set from Python)."""
    return signal.default_int_handler if previous is None else previous
