"""How many streaming calls (Complete, CompleteText, GenerateTests, any other service's) the worker serves at once.

One more gets RESOURCE_EXHAUSTED. Each holds a gRPC thread while it streams: the rest of the pool
(server.RPC_THREADS) stays for the quick calls, and health checks have threads of their own.
$ROTARY_MAX_STREAMS overrides the limit.
"""

from __future__ import annotations

import contextlib
import os
import threading

import grpc

MAX_STREAMS = 64


def max_streams_setting() -> int:
    """$ROTARY_MAX_STREAMS, else MAX_STREAMS; a value that is not a positive integer stops the worker."""
    value = os.environ.get("ROTARY_MAX_STREAMS", "").strip()
    if not value:
        return MAX_STREAMS
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"ROTARY_MAX_STREAMS={value!r}: expected a positive whole number of streaming calls")
    return int(value)


class StreamLimit:
    """How many streaming calls are served at once: at most `limit`, the next refused (counted)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, context):
        with self._lock:
            full = self.open >= self.limit
            if full:
                self.refused += 1
            else:
                self.open += 1
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the worker is serving its limit of {self.limit} streaming calls at once; retry when one ends",
            )
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1

    def stats(self) -> dict:
        return {"streams_open": self.open, "streams_refused": self.refused, "max_streams": self.limit}
