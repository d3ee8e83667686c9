"""Complete a text through a running Rotary worker over gRPC: no LSP, no documents.

    .venv/bin/rotary worker --listen 127.0.0.1:50151 &
    .venv/bin/python examples/grpc_client.py 127.0.0.1:50151 [TEXT]   # completes TEXT at its end
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rotary.completion.rpc import worker_pb2, worker_pb2_grpc

address = sys.argv[1]
text = sys.argv[2] if len(sys.argv) > 2 else "def fibonacci(n):\n    "

with grpc.insecure_channel(address) as channel:
    # Wait (up to 5 minutes) until the model is loaded: the standard health service streams
    # the worker's status, NOT_SERVING while it loads, then SERVING.
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="rotary.v1.Worker"), wait_for_ready=True, timeout=300
    )
    for reply in watch:
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
    watch.cancel()

    request = worker_pb2.CompleteTextRequest(text=text, offset=len(text), language_id="python")
    for chunk in worker_pb2_grpc.WorkerStub(channel).CompleteText(request, timeout=120):
        print(chunk.text, end="", flush=True)  # chunks arrive as lines become final
    print()
