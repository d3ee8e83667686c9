"""gRPC as a product interface, over real gRPC on loopback: the standard health service across the
worker's life, server reflection, CompleteText (stateless, with an optional cache key) and its
errors, and examples/grpc_client.py end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from rotary.completion.client import WorkerClient
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.wire import MAX_DOCUMENT_CHARS
from tests.conftest import spawn_worker, stop

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = {"rotary.v1.Worker", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def check(channel, service: str = "rotary.v1.Worker") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def complete_text(stub, text: str, offset: int | None = None, **fields) -> tuple[str, pb.CompletionChunk]:
    options = pb.CompleteOptions(max_tokens=fields.pop("max_tokens", 16), mode=fields.pop("mode", pb.COMPLETION_MODE_SINGLE_LINE))
    request = pb.CompleteTextRequest(text=text, offset=len(text) if offset is None else offset, options=options, **fields)
    chunks = list(stub.CompleteText(request, timeout=120))
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks[-1]


def cache_documents(client: WorkerClient) -> int:
    return json.loads(client.stub.Stats(pb.StatsRequest()).json)["cache"]["documents"]


@pytest.fixture
def worker(shared_worker):
    """The session's worker (tests/conftest.py): default flags, caches under a temporary directory."""
    return shared_worker


# -- the standard health service -------------------------------------------------------------


@pytest.mark.model
def test_health_is_not_serving_while_loading_then_serving_then_not_serving_at_shutdown(tmp_path):
    proc, address = spawn_worker(tmp_path)
    try:
        with grpc.insecure_channel(address) as channel:
            # Answered while the model loads (NOT_SERVING is only said before the load ends): the status
            # never waits for the model.
            assert check(channel) == NOT_SERVING and check(channel, "") == NOT_SERVING
            assert not WorkerClient(address).stub.Health(pb.HealthRequest(), timeout=10).ready
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="rotary.v1.Worker"), timeout=300
            )
            seen = []
            for reply in watch:
                seen.append(reply.status)
                if reply.status == SERVING:
                    break
            assert seen[0] == NOT_SERVING and seen[-1] == SERVING
            assert check(channel, "") == SERVING
            assert WorkerClient(address).stub.Health(pb.HealthRequest(), timeout=10).ready
            # Unknown names are NOT_FOUND, as the standard says.
            with pytest.raises(grpc.RpcError) as err:
                check(channel, "no.such.Service")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # Shutting down (SIGTERM, as the daemon stops its worker): watchers hear NOT_SERVING.
            proc.send_signal(signal.SIGTERM)
            try:
                after = next(watch).status
            except grpc.RpcError:  # the server was gone before the update reached us
                after = None
            watch.cancel()
            assert after in (NOT_SERVING, None)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            stop(proc)


def test_health_stays_not_serving_when_the_model_cannot_load(tmp_path):
    proc, address = spawn_worker(tmp_path, "--model", str(tmp_path / "missing-model"))
    client = WorkerClient(address)
    try:
        with pytest.raises(RuntimeError, match="missing-model"):
            client.wait_ready(timeout=120)  # rotary.v1.Worker/Health reports the failure
        assert check(client.channel) == NOT_SERVING and check(client.channel, "") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            complete_text(client.stub, "x = 1")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "missing-model" in err.value.details()
    finally:
        client.close()
        stop(proc)


# -- server reflection ------------------------------------------------------------------------


def list_services(channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    return {s.name for s in reply.list_services_response.service}


@pytest.mark.model
def test_reflection_lists_and_describes_the_services(worker):
    assert list_services(worker.channel) == SERVICES
    # What grpcurl does with `describe`: build the descriptors from the server alone.
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(worker.channel))
    method = pool.FindServiceByName("rotary.v1.Worker").methods_by_name["CompleteText"]
    assert method.input_type.full_name == "rotary.v1.CompleteTextRequest"
    assert method.output_type.full_name == "rotary.v1.CompletionChunk"
    assert {"text", "offset", "language_id", "options", "cache_key"} <= set(method.input_type.fields_by_name)


def test_no_reflection_flag_turns_it_off(tmp_path):
    # The model is not needed: reflection is there (or not) from the start.
    proc, address = spawn_worker(tmp_path, "--no-reflection", "--model", str(tmp_path / "missing-model"))
    try:
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                list_services(channel)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert check(channel) == NOT_SERVING  # health is always served
    finally:
        stop(proc)


def test_reflection_is_on_by_default_only_where_only_this_machine_connects():
    from rotary.completion.rpc.access import is_local_address

    for local in ("127.0.0.1:50151", "127.0.0.2:1", "localhost:0", "[::1]:50151", "unix:/tmp/w.sock"):
        assert is_local_address(local), local
    # an abstract unix socket has no permissions: any local user may connect (docs/RELIABILITY.md)
    for remote in ("0.0.0.0:50151", "[::]:50151", "10.1.2.3:50151", "example.org:443", "192.168.0.7:1", "unix-abstract:w"):
        assert not is_local_address(remote), remote


# -- CompleteText -----------------------------------------------------------------------------

CODE = '''import math


def area(radius):
    """The area of a circle."""
    return math.pi * radius ** 2


def circumference(radius):
    return 2 * math.pi * radius


def describe(shape, size):
    print(f"{shape}: area
'''


@pytest.mark.model
@pytest.mark.parametrize(
    "where, mode",
    [
        ("end", pb.COMPLETION_MODE_SINGLE_LINE),
        ("inside a line, code after it", pb.COMPLETION_MODE_SINGLE_LINE),
        ("start of a body", pb.COMPLETION_MODE_MULTI_LINE),
    ],
    ids=["end single-line", "inside a line single-line", "start of a body multi-line"],
)
def test_complete_text_equals_complete_on_the_same_text_and_offset(worker, where, mode):
    text = CODE.rstrip("\n")
    offset = {
        "end": len(text),
        "inside a line, code after it": text.index("def area(") + len("def area("),
        "start of a body": text.index("def circumference(radius):\n") + len("def circumference(radius):\n    "),
    }[where]
    uri = f"file:///same-{offset}.py"
    worker.open(uri, text)
    request = pb.CompleteRequest(uri=uri, version=1, offset=offset, options=pb.CompleteOptions(max_tokens=24, mode=mode))
    chunks = list(worker.stub.Complete(request, timeout=120))
    by_document = "".join(c.text for c in chunks)
    by_text, last = complete_text(worker.stub, text, offset, language_id="python", max_tokens=24, mode=mode)
    assert by_text == by_document and by_text.strip()
    assert last.stop_reason == chunks[-1].stop_reason
    assert last.stats.context_tokens == chunks[-1].stats.context_tokens
    # Without a cache key nothing was reused and nothing is kept.
    assert last.stats.tokens_reused == 0 and last.stats.tokens_encoded == last.stats.context_tokens


@pytest.mark.model
def test_cache_key_reuses_work_on_a_growing_text(worker):
    key, other_key = "notebook-7", "notebook-8"
    text = CODE.rstrip("\n")
    kept = cache_documents(worker)
    first, last = complete_text(worker.stub, text, cache_key=key, request_id="r1")
    assert last.request_id == "r1" and last.stats.tokens_reused == 0
    assert cache_documents(worker) == kept + 1
    grown = text + first + '")\n\n\ndef main():\n    '
    second, last = complete_text(worker.stub, grown, cache_key=key)
    assert last.stats.tokens_reused > 0
    assert last.stats.tokens_encoded < last.stats.context_tokens // 2
    # The same text without a key encodes everything and gets the same answer (a growing text
    # leaves nothing stale in the cache, so reuse is exact); keyless calls keep no cache.
    fresh, fresh_last = complete_text(worker.stub, grown)
    assert fresh == second and fresh_last.stats.tokens_reused == 0
    assert cache_documents(worker) == kept + 1
    # Another key starts from nothing.
    _, other = complete_text(worker.stub, grown, cache_key=other_key)
    assert other.stats.tokens_reused == 0
    # A document named like the key has a cache of its own: completing another text there
    # leaves the key's cache as it was (the same text again encodes only its last token).
    worker.open(key, "SELECT name FROM users WHERE")
    worker.complete(key, 1, len("SELECT name FROM users WHERE"), max_tokens=4)
    _, again = complete_text(worker.stub, grown, cache_key=key)
    assert again.stats.tokens_encoded == 1 and again.stats.tokens_reused == again.stats.context_tokens - 1


@pytest.mark.model
@pytest.mark.parametrize(
    "fields, field",
    [
        ({"text": "x = 1", "offset": 6}, "offset"),
        ({"text": "x = 1", "offset": -1}, "offset"),
        ({"text": "", "offset": 0}, "text"),
        ({"text": "x" * (MAX_DOCUMENT_CHARS + 1), "offset": 0}, "text"),
        ({"text": "x = 1", "offset": 5, "language_id": "cobol-85"}, "language_id"),
        ({"text": "x = 1", "offset": 5, "options": pb.CompleteOptions(max_tokens=513)}, "options.max_tokens"),
        ({"text": "x = 1", "offset": 5, "options": pb.CompleteOptions(max_tokens=-1)}, "options.max_tokens"),
        ({"text": "x = 1", "offset": 5, "options": pb.CompleteOptions(mode=7)}, "options.mode"),
        ({"text": "x = 1", "offset": 5, "options": pb.CompleteOptions(cache=7)}, "options.cache"),
        ({"text": "x = 1", "offset": 5, "cache_key": "k" * 257}, "cache_key"),
    ],
    ids=[
        "offset past the end", "negative offset", "empty text", "text too large", "unknown language",
        "max_tokens over the limit", "negative max_tokens", "unknown mode", "unknown cache mode", "long cache key",
    ],
)
def test_bad_complete_text_requests_are_invalid_argument_naming_the_field(worker, fields, field):
    with pytest.raises(grpc.RpcError) as err:
        list(worker.stub.CompleteText(pb.CompleteTextRequest(**fields), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: "), err.value.details()


@pytest.mark.model
def test_complete_text_limits_that_are_accepted(worker):
    # Empty language id is plain text; offset 0 and the end are both inside; 512 tokens is the limit.
    _, last = complete_text(worker.stub, "x = 1", 0, language_id="")
    assert last.done
    _, last = complete_text(worker.stub, "x = 1\n", language_id="plaintext", max_tokens=512)
    assert last.done


# -- the example client ---------------------------------------------------------------------------


@pytest.mark.model
def test_example_client_waits_for_a_loading_worker_and_prints_a_completion(worker, tmp_path):
    text = "def is_even(n):\n    return"
    expected, _ = complete_text(worker.stub, text, language_id="python", max_tokens=0, mode=pb.COMPLETION_MODE_AUTO)
    assert expected.strip()
    proc, address = spawn_worker(tmp_path)  # its model is still loading when the example starts
    try:
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "grpc_client.py"), address, text],
            capture_output=True, text=True, timeout=400,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == expected + "\n"
    finally:
        stop(proc)
