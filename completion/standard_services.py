"""The standard gRPC services the worker serves beside rotary.v1.Worker: health and reflection.

grpc.health.v1.Health is what load balancers, Kubernetes probes, grpc_health_probe and
Envoy check. Its status lives in the health servicer's own table, set once when the model
load ends, so a probe never waits for the model or its lock. Both the server ("") and
"rotary.v1.Worker" read NOT_SERVING while the model loads or after it failed to load,
SERVING once it is ready, and NOT_SERVING again while the worker shuts down.

Server reflection lets grpcurl and other generic clients list and describe the services
without the .proto. It is on by default where only this machine can connect (loopback,
unix sockets) and off elsewhere unless asked for (`rotary worker --reflection`).
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .rpc import worker_pb2 as pb

WORKER_SERVICE = pb.DESCRIPTOR.services_by_name["Worker"].full_name  # "rotary.v1.Worker"
HEALTH_NAMES = (health.OVERALL_HEALTH, WORKER_SERVICE)


def add_standard_services(server, reflection_on: bool) -> health.HealthServicer:
    """Add grpc.health.v1.Health (every name NOT_SERVING until `report_load` says otherwise) and,
    when asked, server reflection listing every service. Returns the health servicer."""
    servicer = health.HealthServicer()
    for name in HEALTH_NAMES:
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if reflection_on:
        reflection.enable_server_reflection((WORKER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return servicer


def report_load(servicer: health.HealthServicer, load_thread: threading.Thread, ready: threading.Event) -> threading.Thread:
    """When the model load ends, set SERVING if it succeeded (a failed load stays NOT_SERVING)."""

    def wait() -> None:
        load_thread.join()
        if ready.is_set():
            for name in HEALTH_NAMES:
                servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    thread = threading.Thread(target=wait, name="rotary-health", daemon=True)
    thread.start()
    return thread
