"""Security: what listens where, access tokens, TLS, LSP over TCP one editor at a time, settings scope.

No model: the worker tests serve the real service without one (tests/fakes.py) or start
`rotary worker` with a model path that does not exist (its RPCs answer while the load fails).
The daemon over TCP talks to an unreachable worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lsprotocol import types

from rotary.completion.rpc import access
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc import worker_pb2_grpc as pb_grpc
from rotary.completion.rpc.access import AccessError
from rotary.lsp.worker import ERROR, READY, WorkerConnection
from tests.fakes import FAKE_COMPLETION, start_worker
from tests.listening import UNREACHABLE, wait_listening
from tests.lsp.test_lsp_protocol import RawClient, initialize, open_doc, stats
from rotary.completion.rpc.launch import rotary_command

TOKEN = "s3cret-token-for-tests-0123456789"


def run_cli(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        rotary_command(*args), capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
    )


# -- what may listen where ---------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:1", "127.8.9.1:1", "[::1]:50151", "::1", "localhost:2087", "unix:/tmp/x.sock"])
def test_loopback_and_unix_addresses_are_local(address):
    assert access.is_local_address(address)


@pytest.mark.parametrize("address", ["0.0.0.0:1", "[::]:1", "10.1.2.3:1", "192.168.0.2:80", "example.com:443", "[2001:db8::1]:1"])
def test_other_addresses_are_not_local(address):
    assert not access.is_local_address(address)


def test_worker_refuses_another_address_without_token_and_tls_and_says_why():
    out = run_cli("worker", "--listen", "0.0.0.0:0")
    assert out.returncode == 2 and "access token" in out.stderr and "TLS" in out.stderr and "listening" not in out.stderr
    out = run_cli("worker", "--listen", "[::]:0", env={"ROTARY_TOKEN": TOKEN})
    assert out.returncode == 2 and "TLS" in out.stderr and "access token" not in out.stderr


def test_lsp_over_tcp_refuses_another_address_without_token_and_tls():
    out = run_cli("lsp", "--tcp", "0.0.0.0:0", "--worker", UNREACHABLE)
    assert out.returncode == 2 and "access token" in out.stderr and "TLS" in out.stderr


def test_short_or_empty_tokens_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "empty" in run_cli("worker", "--token-file", str(empty)).stderr
    assert "16 characters" in run_cli("worker", env={"ROTARY_TOKEN": "short"}).stderr


def test_token_comparison():
    assert access.token_matches(TOKEN, TOKEN)
    assert not access.token_matches(TOKEN, TOKEN[:-1] + "x") and not access.token_matches(TOKEN, None)


# -- the worker with a token and TLS -----------------------------------------------------------------


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if needle in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)}")


def test_a_worker_with_token_and_tls_serves_only_callers_with_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    tls_dir = tmp_path / "tls"
    proc = subprocess.Popen(
        rotary_command("worker", "--listen", "127.0.0.1:0", "--token-file", str(token_file),
         "--tls-self-signed", str(tls_dir), "--model", str(tmp_path / "no-such-model")),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, port, line = wait_listening(proc)
        assert "TLS" in line and "access token required" in line
        assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700 and stat.S_IMODE((tls_dir / "key.pem").stat().st_mode) == 0o600
        creds = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "cert.pem").read_bytes())
        request = pb.OpenDocumentRequest(uri="file:///s.py", version=1, text="x = 1")
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            stub = pb_grpc.WorkerStub(channel)
            for metadata in (None, [("authorization", "Bearer wrong-token-0123456789")], [("authorization", TOKEN)]):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.OpenDocument(request, timeout=10, metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ack = stub.OpenDocument(request, timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert ack.length == 5
            # Probes need no token, and learn nothing but the serving status.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # no TLS: no answer at all
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.WorkerStub(plain).Health(pb.HealthRequest(), timeout=3)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_worker_on_a_unix_socket_is_private(tmp_path):
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o755)
    proc = subprocess.Popen(
        rotary_command("worker", "--listen", f"unix:{folder}/w.sock", "--model", str(tmp_path / "none")),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for_line(proc, "listening")
        assert stat.S_IMODE((folder / "w.sock").stat().st_mode) == 0o600
    finally:
        proc.kill()
        proc.wait(timeout=10)


# -- the daemon's side of a worker ----------------------------------------------------------------------


def test_the_daemon_never_sends_documents_to_a_remote_worker_without_a_token():
    with pytest.raises(AccessError, match="ROTARY_WORKER_TOKEN"):
        access.worker_channel("worker.invalid:50051")  # refused before any connection or name lookup

    async def run():
        conn = WorkerConnection("worker.invalid:50051")
        conn.start()
        supervisor = conn._supervisor
        # Wait for the supervisor to end by itself (a retry loop never does, and then fails below).
        try:
            await asyncio.wait_for(asyncio.shield(supervisor), timeout=10)
        except asyncio.TimeoutError:
            pass
        state, message, stopped = conn.state, conn.message, supervisor.done()
        await conn.stop()
        return state, message, stopped

    state, message, stopped = asyncio.run(run())
    assert state == ERROR and "access token" in message and stopped  # a setting, not a fault: no retry loop


async def _until(conn: WorkerConnection, states: tuple[str, ...], timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while conn.state not in states and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return conn.state


def test_the_daemon_sends_its_token_to_a_worker_that_requires_one():
    server, _service, address = start_worker(token=TOKEN)

    async def run(token):
        conn = WorkerConnection(address, token=token)
        conn.start()
        state = await _until(conn, (READY, ERROR))
        message = conn.message
        if state == READY:
            # A streaming call carries the token too (grpc.aio once filed the daemon's interceptor
            # under unary calls only, and every Complete to a worker with a token was refused).
            await conn.stub.OpenDocument(pb.OpenDocumentRequest(uri="file:///t.py", version=1, text="x = "), timeout=10)
            call = conn.stub.Complete(pb.CompleteRequest(uri="file:///t.py", version=1, offset=4), timeout=10)
            message = "".join([chunk.text async for chunk in call])
        await conn.stop()
        return state, message

    try:
        assert asyncio.run(run(TOKEN)) == (READY, FAKE_COMPLETION)
        state, message = asyncio.run(run("another-token-0123456789"))
        assert state == ERROR and "refused the access token" in message
    finally:
        server.stop(0)


def test_the_daemon_reaches_a_worker_over_tls_with_its_certificate(tmp_path, monkeypatch):
    cert, key = access.self_signed_pair(str(tmp_path / "tls"), ["127.0.0.1"])
    server, _service, address = start_worker(token=TOKEN, tls=access.read_pair(str(cert), str(key)))
    # Pretend 127.0.0.1 is another machine, so the daemon takes its remote path (TLS required).
    monkeypatch.setattr(access, "is_local_address", lambda address: False)

    async def run():
        conn = WorkerConnection(address, token=TOKEN, ca_file=str(cert))
        conn.start()
        state = await _until(conn, (READY, ERROR))
        await conn.stop()
        return state

    try:
        assert asyncio.run(run()) == READY
    finally:
        server.stop(0)


def test_the_daemons_own_worker_socket_folder_is_private(monkeypatch):
    created = {}

    async def fake_exec(*cmd, **kwargs):
        address = cmd[cmd.index("--listen") + 1]
        folder = Path(address.removeprefix("unix:")).parent
        created["mode"] = stat.S_IMODE(folder.stat().st_mode)
        raise OSError("not started in this test")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fake_exec)

    async def run():
        conn = WorkerConnection()
        with pytest.raises(OSError):
            await conn._launch()
        await conn._kill_process()

    asyncio.run(run())
    assert created["mode"] == 0o700


# -- settings that redirect text or load code ----------------------------------------------------------


def test_an_untrusted_client_cannot_redirect_text_and_a_trusted_change_is_logged(caplog):
    from rotary.lsp.server import RotaryServer

    shown = []
    untrusted = RotaryServer(trusted=False)
    untrusted.window_show_message = lambda params: shown.append(params.message)
    untrusted.apply_settings({"workerAddress": "evil.invalid:1", "model": "/tmp/evil", "maxTokens": 9})
    assert (untrusted.settings.workerAddress, untrusted.settings.model, untrusted.settings.maxTokens) == ("", "", 9)
    assert any("workerAddress ignored" in m for m in shown) and any("model ignored" in m for m in shown)

    # A trusted client's change waits for the user's answer (tests/lsp/test_isolation.py asks over real LSP);
    # until then nothing changes, and the allowed change is logged.
    async def trusted_change():
        trusted = RotaryServer()
        trusted.window_show_message = lambda params: None
        trusted.protocol.client_capabilities = types.ClientCapabilities(
            window=types.WindowClientCapabilities(show_message=types.ShowMessageRequestClientCapabilities())
        )
        answer = asyncio.get_running_loop().create_future()

        def ask(params):
            assert "127.0.0.1:50151" in params.message
            return answer

        trusted.window_show_message_request_async = ask
        trusted.apply_settings({"workerAddress": "127.0.0.1:50151"})
        assert trusted.settings.workerAddress == ""
        answer.set_result(types.MessageActionItem(title="Allow"))
        await asyncio.gather(*trusted.confirming.values())
        assert trusted.settings.workerAddress == "127.0.0.1:50151"

    with caplog.at_level(logging.WARNING, logger="rotary.lsp.server"):
        asyncio.run(trusted_change())
    assert "rotary.workerAddress changed by the client, allowed by the user" in caplog.text


# -- LSP over TCP --------------------------------------------------------------------------------------


class TcpDaemon:
    def __init__(self, *extra, env=None):
        self.proc = subprocess.Popen(
            rotary_command("lsp", "--tcp", "127.0.0.1:0", "--worker", UNREACHABLE, *extra),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        _, self.port, _ = wait_listening(self.proc)

    def connect(self) -> tuple[socket.socket, RawClient]:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        stream = conn.makefile("rwb")
        return conn, RawClient(stream, stream)

    def close(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_a_second_editor_or_a_port_scan_does_not_disturb_the_first():
    daemon = TcpDaemon()
    try:
        first_conn, first = daemon.connect()
        initialize(first, options={"debounceMs": 0})
        open_doc(first, "file:///one.py", "def f():\n    ")

        scan = socket.create_connection(("127.0.0.1", daemon.port))  # a port scan: connect, close
        scan.close()
        garbage_conn = socket.create_connection(("127.0.0.1", daemon.port))
        garbage_conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
        garbage_conn.close()

        second_conn, second = daemon.connect()
        reply = second.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
        assert reply["error"]["code"] == -32803 and "one at a time" in reply["error"]["message"]
        assert any("one at a time" in n["params"]["message"] for n in second.notifications)
        second_conn.close()

        report = stats(first)  # the first editor: same session, its document still there
        assert report["daemon"]["open_documents"] == 1 and report["daemon"]["trusted_client"] is False
        first.request("shutdown", None)
        first.notify("exit", {})
        first_conn.close()

        third_conn, third = daemon.connect()  # the daemon outlives its editors: a fresh session
        initialize(third)
        assert stats(third)["daemon"]["open_documents"] == 0
        third_conn.close()
        assert daemon.proc.poll() is None
    finally:
        daemon.close()


def test_lsp_over_tcp_with_a_token_refuses_editors_without_it():
    daemon = TcpDaemon(env={"ROTARY_TOKEN": TOKEN})
    try:
        conn, client = daemon.connect()
        reply = client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {},
                                              "initializationOptions": {"accessToken": "wrong-token-0123456789"}})
        assert "access token" in reply["error"]["message"]
        conn.close()
        conn, client = daemon.connect()
        initialize(client, options={"accessToken": TOKEN, "rotary": {"maxTokens": 7}})
        report = stats(client)["daemon"]
        assert report["trusted_client"] is True and report["settings"]["maxTokens"] == 7
        assert not any("accessToken" in n["params"].get("message", "") for n in client.notifications)
        conn.close()
    finally:
        daemon.close()


def test_requests_before_initialize_over_tcp_are_answered_not_initialized():
    daemon = TcpDaemon()
    try:
        conn, client = daemon.connect()
        reply = client.request("workspace/executeCommand", {"command": "rotary.stats", "arguments": []})
        assert reply["error"]["code"] == -32002
        initialize(client)
        assert "daemon" in stats(client)
        conn.close()
    finally:
        daemon.close()


def test_lsp_over_tcp_with_tls_and_a_token(tmp_path):
    import ssl

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    daemon = TcpDaemon("--token-file", str(token_file), "--tls-self-signed", str(tmp_path / "tls"))
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))
        raw = socket.create_connection(("127.0.0.1", daemon.port), timeout=20)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            stream = conn.makefile("rwb")
            client = RawClient(stream, stream)
            initialize(client, options={"accessToken": TOKEN})
            assert stats(client)["daemon"]["trusted_client"] is True
        plain = socket.create_connection(("127.0.0.1", daemon.port), timeout=20)  # no TLS: nothing is served
        with plain:
            stream = plain.makefile("rwb")
            client = RawClient(stream, stream)
            with pytest.raises((EOFError, ConnectionError, ValueError, socket.timeout)):
                client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}}, timeout=15)
        assert daemon.proc.poll() is None
    finally:
        daemon.close()


def test_ipv6_loopback_is_served_without_a_token(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    proc = subprocess.Popen(
        rotary_command("worker", "--listen", "[::1]:0", "--model", str(tmp_path / "none")),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _wait_for_line(proc, "listening on")
        assert "[::1]:" in line and "token" not in line
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_the_blocking_client_sends_the_token_too(monkeypatch):
    from rotary.completion.client import WorkerClient

    server, _service, address = start_worker(token=TOKEN)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            WorkerClient(address).open("file:///c.py", "x")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        monkeypatch.setenv("ROTARY_WORKER_TOKEN", TOKEN)
        client = WorkerClient(address)
        assert client.open("file:///c.py", "x").length == 1
        assert "".join(c.text for c in client.stub.Complete(pb.CompleteRequest(uri="file:///c.py", version=1, offset=1)))
        client.close()
    finally:
        server.stop(0)
