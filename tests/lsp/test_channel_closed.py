"""A worker restart closes the daemon's gRPC channel while calls are in flight: grpc.aio then raises
asyncio.CancelledError out of the call. The daemon must answer such a request (a stats command
left unanswered hung `rotary soak kills` after 42 kills), and still let a request whose own task
is cancelled propagate. Real gRPC over loopback: a worker whose Stats takes 10 s."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent import futures

import grpc
import pytest

from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc import worker_pb2_grpc as pb_grpc
from rotary.completion.rpc.access import worker_channel
from rotary.lsp.worker import worker_stats


class SlowStats(pb_grpc.WorkerServicer):
    def __init__(self):
        self.entered = threading.Event()  # a Stats call is in flight on the server

    def Stats(self, request, context):
        self.entered.set()
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return pb.StatsReply(json=json.dumps({"slow": True}))


@pytest.fixture()
def slow_worker():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = SlowStats()
    pb_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer.entered
    server.stop(0)


async def in_flight(entered: threading.Event) -> None:
    """Until the call has reached the server (an event, not a sleep that hopes it has)."""
    assert await asyncio.to_thread(entered.wait, 30), "the Stats call never reached the server"


def test_a_channel_closed_mid_call_is_an_answer_not_a_cancel(slow_worker):
    address, entered = slow_worker

    async def run() -> dict:
        channel = worker_channel(address, session="s")
        call = asyncio.ensure_future(worker_stats(pb_grpc.WorkerStub(channel)))
        await in_flight(entered)
        await channel.close()  # what the daemon's supervisor does when its worker dies
        return await asyncio.wait_for(call, timeout=5)

    out = asyncio.run(run())
    assert "stats_error" in out and "closed" in out["stats_error"], out


def test_a_cancelled_request_still_propagates(slow_worker):
    address, entered = slow_worker

    async def run() -> None:
        channel = worker_channel(address, session="s")
        try:
            task = asyncio.ensure_future(worker_stats(pb_grpc.WorkerStub(channel)))
            await in_flight(entered)
            task.cancel()  # $/cancelRequest or shutdown: the request's own task
            await task
        finally:
            await channel.close()

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
