"""docs/RELIABILITY.md's security statements that had no test, each against its documented wording:
`--allow-remote` no longer enough, the token file warning, the self-signed pair's properties, no
reflection off loopback, the daemon's `--worker-ca` / `--worker-token-file` / `$ROTARY_WORKER_CA`,
and LSP over TCP's limits before `initialize`. No model: the workers here are started with a model
that does not exist (what is checked is there before any load) or are the real service on a fake
engine (tests/fakes.py); ports come from the OS (port 0, read back from the process).

Checked by mutation (by hand, then put back): 365 days for the certificate, a token file warned
about only when others (not the group) may read it, reflection on by default everywhere,
HANDSHAKE_MESSAGES 15 or 17, HANDSHAKE_S 5: each fails a test here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import socket
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rotary.completion.rpc import access
from rotary.completion.rpc.launch import rotary_command
from rotary.completion.server import make_server
from rotary.completion.service import WorkerService

from tests.fakes import FAKE_COMPLETION, FakeEngine
from tests.lsp.test_lsp_protocol import RawClient, stop_daemon

TOKEN = "a-documented-test-token-0123456789"
REFUSAL = re.compile(r"refusing to serve the worker on 0\.0\.0\.0:0: it is not a loopback address or a unix socket")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (access.TOKEN_ENV, access.WORKER_TOKEN_ENV, access.WORKER_CA_ENV)}
    return {**env, **extra}


def run_rotary(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        rotary_command(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env or clean_env(), check=False
    )


def token_file(folder: Path, mode: int) -> Path:
    path = folder / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(mode)
    return path


def resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None, socket.AF_INET)
    except OSError:
        return False
    return True


def host_name_or_skip() -> str:
    """This machine's host name: not a loopback address to the access rule, so the daemon takes its
    remote path (TLS and a token) to reach it; a worker on 0.0.0.0 serves it."""
    name = socket.gethostname()
    if not resolves(name):
        pytest.skip(f"the host name {name!r} does not resolve here")
    return name


# -- What listens where: --allow-remote ------------------------------------------------------------


def test_allow_remote_is_still_accepted_and_no_longer_enough():
    """docs/RELIABILITY.md: "`--allow-remote` ... is still accepted and no longer enough". The flag parses
    (no usage error) and the worker still refuses 0.0.0.0 without a token and TLS, before any model load."""
    result = run_rotary("worker", "--listen", "0.0.0.0:0", "--allow-remote", "--model", "/nonexistent-model")
    assert result.returncode == 2, result.stderr
    assert "unrecognized arguments" not in result.stderr and "usage:" not in result.stderr
    assert REFUSAL.search(result.stderr), result.stderr
    assert "It needs an access token (--token-file or $ROTARY_TOKEN) and TLS" in result.stderr
    assert "listening on" not in result.stderr


# -- Tokens: the token file's permissions ------------------------------------------------------------


@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o640, True), (0o600, False)])
def test_a_token_file_others_may_read_is_warned_about(tmp_path, mode, warned):
    """docs/RELIABILITY.md Tokens: "a warning when group or others may read the file". The worker reads
    the token file before it decides whether to serve (here it refuses for want of TLS, so nothing loads)."""
    path = token_file(tmp_path, mode)
    result = run_rotary("worker", "--listen", "0.0.0.0:0", "--token-file", str(path), "--model", "/nonexistent-model")
    assert result.returncode == 2 and REFUSAL.search(result.stderr), result.stderr
    assert "It needs TLS" in result.stderr  # the token was read and accepted; only TLS is missing
    warning = f"token file {path} can be read by other users"
    assert (warning in result.stderr) == warned, result.stderr


# -- TLS: the self-signed pair, and no reflection off loopback --------------------------------------------


def start_cli_worker(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int, Path]:
    """`rotary worker --listen 0.0.0.0:0` with a token and a self-signed pair (and a model that does not
    exist: the rpc services are served from the start, the load fails); (process, port, stderr log)."""
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            rotary_command(
                "worker", "--listen", "0.0.0.0:0", "--token-file", str(token_file(tmp_path, 0o600)),
                "--tls-self-signed", str(tmp_path / "tls"), "--model", str(tmp_path / "missing-model"), *extra,
            ),
            stdin=subprocess.DEVNULL, stderr=stderr, env=clean_env(XDG_CACHE_HOME=str(tmp_path / "cache")),
        )
    deadline = time.monotonic() + 120
    while not (bound := re.search(r"listening on 0\.0\.0\.0:(\d+)", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, int(bound.group(1)), log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def list_services(port: int, cert: Path) -> set[str]:
    """The services reflection lists, asked over TLS with the token."""
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=[(access.TOKEN_METADATA, f"Bearer {TOKEN}")])
    return {s.name for s in reply.list_services_response.service}


@pytest.fixture(scope="module")
def remote_worker(tmp_path_factory):
    """One `rotary worker` on 0.0.0.0 with a token and `--tls-self-signed DIR`: (port, DIR)."""
    tmp = tmp_path_factory.mktemp("remote-worker")
    proc, port, _log = start_cli_worker(tmp)
    try:
        yield port, tmp / "tls"
    finally:
        stop(proc)


def test_the_self_signed_pair_is_as_documented(remote_worker):
    """docs/RELIABILITY.md TLS: "EC P-256, valid 825 days, for `localhost`, the host name, `127.0.0.1`,
    `::1` and the listen host ... in DIR (0700; the key 0600)", read back with `cryptography`."""
    _port, folder = remote_worker
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    valid = cert.not_valid_after_utc - cert.not_valid_before_utc
    # 825 days from when it was made (its start is back-dated a few minutes, for clocks a little behind)
    assert datetime.timedelta(days=825) <= valid <= datetime.timedelta(days=825, hours=1)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname()} <= set(names.get_values_for_type(x509.DNSName))
    ips = set(names.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("0.0.0.0")} <= ips
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600


def test_reflection_is_off_on_a_non_loopback_address(remote_worker, tmp_path):
    """README gRPC: reflection "is on by default for loopback and unix sockets and off elsewhere". A caller
    with the token, over TLS, gets UNIMPLEMENTED from the reflection service of a worker on 0.0.0.0; the
    same worker with `--reflection` lists its services (so the call itself would see reflection)."""
    port, folder = remote_worker
    with pytest.raises(grpc.RpcError) as err:
        list_services(port, folder / "cert.pem")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    proc, on_port, _log = start_cli_worker(tmp_path, "--reflection")
    try:
        assert "rotary.v1.Worker" in list_services(on_port, tmp_path / "tls" / "cert.pem")
    finally:
        stop(proc)


# -- The daemon's side of a worker: --worker-ca, --worker-token-file, $ROTARY_WORKER_CA ----------------------


@pytest.fixture
def tls_fake_worker(tmp_path):
    """The real worker service on a fake engine, on 0.0.0.0 (port from the OS), requiring the token and
    serving TLS with a self-signed pair: (port, cert.pem)."""
    cert, key = access.self_signed_pair(str(tmp_path / "tls"), [])
    service = WorkerService()
    service.engine = FakeEngine()
    service.load_message = "ready: fake"
    service.ready.set()
    server, _ = make_server(service, TOKEN, reflection=False, rpc_threads=16)
    port = server.add_secure_port("0.0.0.0:0", access.server_credentials(*access.read_pair(str(cert), str(key))))
    server.start()
    yield port, cert
    server.stop(0)


def invoked_completion(client: RawClient, uri: str, text: str) -> dict:
    client.request("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
    client.notify("initialized", {})
    client.notify("textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}})
    line = text.count("\n")
    return client.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": line, "character": len(text.rsplit("\n", 1)[-1])},
        "context": {"triggerKind": 1},  # invoked: waits for the worker to be ready
    }, timeout=90)


@pytest.mark.parametrize("how", ["flags", "environment", "no certificate"])
def test_rotary_lsp_reaches_a_tls_worker_with_the_documented_flags(tls_fake_worker, tmp_path, how):
    """docs/RELIABILITY.md: on a remote address the daemon speaks TLS with a token from
    `--worker-token-file` (or `$ROTARY_WORKER_TOKEN`) and trusts the worker's certificate from
    `--worker-ca` (or `$ROTARY_WORKER_CA`). A real `rotary lsp --worker HOST:PORT` over stdio completes
    through a worker that requires both; without the certificate (a self-signed one is in no system's
    roots) it gets no suggestion."""
    port, cert = tls_fake_worker
    address = f"{host_name_or_skip()}:{port}"
    assert not access.is_local_address(address)
    args, env = ["--worker", address], clean_env()
    if how == "flags":
        args += ["--worker-ca", str(cert), "--worker-token-file", str(token_file(tmp_path, 0o600))]
    elif how == "environment":
        env |= {access.WORKER_CA_ENV: str(cert), access.WORKER_TOKEN_ENV: TOKEN}
    else:
        args += ["--worker-token-file", str(token_file(tmp_path, 0o600))]
    proc = subprocess.Popen(
        rotary_command("lsp", *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    client = RawClient(proc.stdout, proc.stdin)
    try:
        answer = invoked_completion(client, "file:///remote.py", "def f():\n    ")
    finally:
        stop_daemon(proc, client)
    texts = [item["insertText"] for item in (answer["result"] or {"items": []})["items"]]
    assert texts == ([] if how == "no certificate" else [FAKE_COMPLETION]), answer


# -- LSP over TCP: before initialize ------------------------------------------------------------------------


@pytest.fixture
def tcp_daemon(tmp_path):
    """`rotary lsp --tcp 127.0.0.1:0` (the port from the OS, read back) with a worker that is not there:
    what happens before initialize needs none. Yields the port."""
    log = tmp_path / "lsp.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            rotary_command("lsp", "--tcp", "127.0.0.1:0", "--worker", f"unix:{tmp_path}/no-worker.sock"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=clean_env(),
        )
    deadline = time.monotonic() + 60
    while not (bound := re.search(r"listening on \('127\.0\.0\.1', (\d+)\)", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    try:
        yield int(bound.group(1))
    finally:
        stop(proc)


def connect(port: int) -> tuple[socket.socket, RawClient]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock, RawClient(sock.makefile("rb"), sock.makefile("wb"))


def initialize_request(client: RawClient) -> None:
    client.send({"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {"processId": None, "rootUri": None, "capabilities": {}}})


def test_lsp_over_tcp_reads_at_most_16_messages_and_10_s_before_initialize(tcp_daemon):
    """docs/RELIABILITY.md LSP over TCP: each connection is read "until its `initialize` (at most 10 s and
    16 messages; requests before it get ServerNotInitialized)". 15 requests and then initialize (16
    messages) make a session; 16 requests and then initialize are closed unanswered; a connection that
    sends nothing is closed, not before 10 s (a lower bound only: a timeout never fires early)."""
    port = tcp_daemon
    silent, silent_client = connect(port)
    silent_since = time.monotonic()

    over, over_client = connect(port)
    for i in range(16):
        over_client.send({"jsonrpc": "2.0", "id": i, "method": "textDocument/hover", "params": {}})
        assert over_client.read()["error"]["code"] == -32002  # ServerNotInitialized
    initialize_request(over_client)
    with pytest.raises((EOFError, ConnectionResetError)):  # a reset where the daemon closed with bytes unread
        over_client.read()  # the 17th message: closed, no answer
    over.close()

    within, within_client = connect(port)
    for i in range(15):
        within_client.send({"jsonrpc": "2.0", "id": i, "method": "textDocument/hover", "params": {}})
        assert within_client.read()["error"]["code"] == -32002
    initialize_request(within_client)
    answer = within_client.read()
    while answer.get("id") != "init":  # the session may send notifications first
        answer = within_client.read()
    assert "capabilities" in answer["result"]
    within_client.send({"jsonrpc": "2.0", "id": "bye", "method": "shutdown", "params": None})
    within_client.notify("exit", {})
    within.close()

    with pytest.raises(EOFError):
        silent_client.read()
    assert time.monotonic() - silent_since >= 10.0
    silent.close()
