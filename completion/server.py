"""The worker process: the gRPC server around a WorkerService (service.py), its call limits and its lifetime.

`make_server` builds the server: the stream limit and health checks on threads of their own
(CallLimits), the access token and request parsing (rpc/access.py), the standard health and
reflection services (standard_services.py). `serve` listens, loads the model in the background,
expires silent sessions, and on SIGTERM, Ctrl-C or its parent's exit writes every changed
cache's snapshot before it returns.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures

import grpc

from rotary.cache.pids import pid_alive

from .rpc import worker_pb2_grpc as pb_grpc
from .rpc.access import WorkerInterceptor, is_local_address, server_credentials, unix_socket_path
from .service import SESSION_LEASE_S, WorkerService
from .standard_services import add_standard_services, report_load
from .streams import StreamLimit

RPC_THREADS = 128
HEALTH_METHODS = ("/rotary.v1.Worker/Health", "/grpc.health.v1.Health/Check")
HEALTH_THREADS = 4

log = logging.getLogger(__name__)


class CallLimits(grpc.ServerInterceptor):
    """Streaming calls within the StreamLimit; health checks on a thread pool of their own, so a
    worker serving every thread of its main pool still answers them (the daemon restarts a worker
    whose Health misses its deadline). Outermost: it wraps the handlers the other interceptors made."""

    def __init__(self, streams: StreamLimit, health_pool: futures.ThreadPoolExecutor):
        self.streams, self.health_pool = streams, health_pool

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return handler
        kind = dict(deserializer=handler.request_deserializer, serializer=handler.response_serializer)
        if details.method in HEALTH_METHODS and handler.unary_unary is not None:
            check = handler.unary_unary

            def health(request, context):
                return check(request, context)

            health.experimental_thread_pool = self.health_pool  # grpc's per-method pool (grpc/_server.py)
            return grpc.unary_unary_rpc_method_handler(health, kind["deserializer"], kind["serializer"])
        for make, behavior in (
            (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
            (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
        ):
            if behavior is not None:
                return make(self._limited(behavior), kind["deserializer"], kind["serializer"])
        return handler

    def _limited(self, behavior):
        def stream(request, context):
            with self.streams.slot(context):
                yield from behavior(request, context)

        return stream


def make_server(
    service: WorkerService, token: str | None = None, reflection: bool = False, rpc_threads: int | None = None
) -> tuple[grpc.Server, object]:
    """The gRPC server of a worker service (no port yet) and its standard health servicer.

    Completion calls wait on the model thread without holding it; at most the service's stream
    limit of them hold a thread, so the quick calls (Stats, documents) find one among `rpc_threads`
    (default: RPC_THREADS, at least the limit plus 16), and health checks run on threads of their own."""
    health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="rotary-health")
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=rpc_threads or max(RPC_THREADS, service.streams.limit + 16), thread_name_prefix="rotary-rpc"
        ),
        interceptors=[
            CallLimits(service.streams, health_pool),
            WorkerInterceptor(token),  # the access token, and a clear error for unparsable requests
        ],
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    return server, add_standard_services(server, reflection)


def serve(
    listen: str,
    model_path: str | None = None,
    cache_budget_mb: int = 1024,
    parent_pid: int | None = None,
    on_bound=None,
    max_context_tokens: int = 2048,
    refresh_window: int = 128,
    stale_budget: int = 1024,
    reflection: bool | None = None,
    token: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    session_lease_s: float = SESSION_LEASE_S,
) -> None:
    """Serve until interrupted (or until the parent process, when given, is gone).

    `token`: every call but the standard health check must carry it (rpc/access.py); `tls`: a
    (certificate, key) PEM pair to serve TLS with. The caller checks that a non-local address has both.

    Beside rotary.v1.Worker: grpc.health.v1.Health, and server reflection when `reflection`
    (None: on for loopback and unix sockets, off elsewhere)."""
    service = WorkerService(model_path, cache_budget_mb, max_context_tokens, refresh_window, stale_budget, session_lease_s)
    server, health = make_server(service, token, is_local_address(listen) if reflection is None else reflection)
    port = server.add_secure_port(listen, server_credentials(*tls)) if tls else server.add_insecure_port(listen)
    if unix_socket_path(listen):
        os.chmod(unix_socket_path(listen), 0o600)  # this user alone connects
    if port == 0 and not listen.startswith("unix:"):
        raise SystemExit(f"could not listen on {listen}")
    bound = listen if listen.startswith("unix:") or not listen.endswith(":0") else f"{listen.rsplit(':', 1)[0]}:{port}"
    server.start()
    report_load(health, service.load_in_background(), service.ready)
    stop = threading.Event()
    # SIGTERM (the daemon stopping its worker) ends the loop below like Ctrl-C, so snapshots get written.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if on_bound:
        on_bound(bound)
    try:
        while not stop.is_set() and server.wait_for_termination(timeout=1.0):  # True: timed out, still serving
            if parent_pid and not pid_alive(parent_pid):
                log.info("parent %s is gone; worker exits", parent_pid)
                break
            service.expire_sessions()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        health.enter_graceful_shutdown()
        server.stop(grace=0.5)
        service.flush_snapshots()
