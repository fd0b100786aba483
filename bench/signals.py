"""Ctrl-C and SIGTERM, the same way in every command: what was running is recorded, then the process
exits 130 (SIGINT) or 143 (SIGTERM), as a shell reports them. Kept free of heavy imports: the suite's
parent process uses it too."""
from __future__ import annotations

import signal

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the same path records what was running and exits."""


def interrupt_exit_code(error: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGINT raises KeyboardInterrupt and SIGTERM Terminated where
    the signal lands, and `raise_if_received()` raises it again where it was swallowed: a finalizer run
    by the garbage collector (DALI's pipelines have slow ones) is such a place, where CPython prints
    "Exception ignored" and a sweep would go on. A signal the process started out ignoring (`cmd &` in a
    script, nohup) stays ignored."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def handler(self, signum, frame):
        self.signum = signum
        self.raise_if_received()

    def raise_if_received(self) -> None:
        if self.signum is not None:
            raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def __enter__(self):
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s, handler in self.previous.items():
            if handler != signal.SIG_IGN:
                signal.signal(s, self.handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
