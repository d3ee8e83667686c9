"""Who may talk to a worker (and to the daemon over TCP): loopback addresses, access tokens, TLS.

Hand-written beside the generated stubs because both sides of the wire use it: the worker's
server interceptor, the daemon's channel to a worker, and the daemon's own TCP listener.

The rule (docs/RELIABILITY.md): a unix socket or a loopback address (127.0.0.0/8, ::1 as
`[::1]:port`, localhost) may be served as it is. An abstract unix socket (`unix-abstract:`) is
refused, to serve and to connect to: it has no file and so no permissions, and any process in
the network namespace (any local user) can connect to it; use `unix:/path` in a private folder. Any other address needs an access token and
TLS, and a server refuses to start without them. A token is checked on every call in constant
time (`hmac.compare_digest`); over gRPC it travels as `authorization: Bearer <token>` metadata.
Only the standard health service (grpc.health.v1.Health) answers without it, so load
balancers and Kubernetes probes work; it tells nothing but SERVING or NOT_SERVING.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
import socket
import stat
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_METADATA = "authorization"
# The daemon's session id, sent on every call: the worker keys documents by it (documents.py).
SESSION_METADATA = "rotary-session"
TOKEN_ENV = "ROTARY_TOKEN"  # the token a server (worker, `lsp --tcp`) requires
WORKER_TOKEN_ENV = "ROTARY_WORKER_TOKEN"  # the token the daemon sends to a worker
WORKER_CA_ENV = "ROTARY_WORKER_CA"  # PEM file the daemon trusts for a worker's TLS certificate
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # answered without a token


class AccessError(Exception):
    """A listen or connect that the access rule forbids, or a token/certificate that cannot be read."""


# -- addresses ---------------------------------------------------------------------------------------


def split_host_port(address: str) -> tuple[str, int | None]:
    """'host:port', '[v6]:port', 'host' -> (host, port); brackets removed."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, int(port) if port.isdigit() else None
    return address, None  # a bare host, or a bare IPv6 address


ABSTRACT_PREFIX = "unix-abstract:"


def is_local_address(address: str) -> bool:
    """True for a unix socket with a path or a loopback host (127.0.0.0/8, ::1 with or without
    brackets, localhost). Not for an abstract unix socket: it has no permissions (refuse_abstract)."""
    if address.startswith(ABSTRACT_PREFIX):
        return False
    if address.startswith("unix:"):
        return True
    host = split_host_port(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_abstract(address: str, what: str) -> None:
    """AccessError for an abstract unix socket: anyone on this machine could connect to it."""
    if address.startswith(ABSTRACT_PREFIX):
        raise AccessError(
            f"refusing {what} {address}: an abstract unix socket has no file permissions, so any local user "
            "can connect to it. Use unix:/path/in/a/private/folder (or a loopback address with a token) instead."
        )


def unix_socket_path(address: str) -> str | None:
    """The file of a `unix:path` or `unix:///path` address, else None."""
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:"):]
    return path[2:] if path.startswith("///") else path


# -- tokens --------------------------------------------------------------------------------------------


def load_token(token_file: str | None, env: str = TOKEN_ENV) -> str | None:
    """The token from a file (first line; warned about when others may read it) or the environment."""
    if token_file:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise AccessError(f"cannot read the token file {path}: {exc.strerror}") from exc
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s can be read by other users (chmod 600 it)", path)
        token = text.splitlines()[0].strip() if text else ""
    else:
        token = os.environ.get(env, "").strip()
    if token_file and not token:
        raise AccessError(f"the token file {token_file} is empty")
    if token and len(token) < 16:
        raise AccessError("an access token must have at least 16 characters")
    return token or None


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison (the time does not tell how much of a guess was right)."""
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def check_listen(address: str, token: str | None, tls: bool, what: str) -> None:
    """Refuse (AccessError, saying why) to serve a non-local address without a token and TLS, and
    an abstract unix socket at all."""
    refuse_abstract(address, f"to serve {what} on")
    if is_local_address(address):
        return
    missing = [name for name, ok in (("an access token (--token-file or $ROTARY_TOKEN)", token), (
        "TLS (--tls-cert and --tls-key, or --tls-self-signed DIR)", tls)) if not ok]
    if missing:
        raise AccessError(
            f"refusing to serve {what} on {address}: it is not a loopback address or a unix socket, "
            f"and anyone who can reach it could read and send source code. It needs {' and '.join(missing)}."
        )


# -- TLS -------------------------------------------------------------------------------------------------


def read_pair(cert: str, key: str) -> tuple[bytes, bytes]:
    try:
        return Path(cert).expanduser().read_bytes(), Path(key).expanduser().read_bytes()
    except OSError as exc:
        raise AccessError(f"cannot read the TLS certificate or key: {exc}") from exc


def self_signed_pair(folder: str, hosts: list[str]) -> tuple[Path, Path]:
    """cert.pem and key.pem in `folder` (0700; the key 0600), made once for `hosts` (and loopback).

    Clients trust cert.pem (`--worker-ca`, $ROTARY_WORKER_CA, or their TLS tunnel's CA file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(folder).expanduser()
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    for host in ["127.0.0.1", "::1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host and host not in ("localhost", socket.gethostname()):
                names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rotary self-signed")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


# -- the worker's side -------------------------------------------------------------------------------------


def _abort_handler(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    def abort(request, context):
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(abort, request_deserializer=None, response_serializer=None)


class WorkerInterceptor(grpc.ServerInterceptor):
    """Every call: the access token when one is set, and a request that parses.

    A request whose bytes are not its message (a string field that is not UTF-8, garbage) gets
    INVALID_ARGUMENT naming the message, where gRPC alone would answer INTERNAL."""

    def __init__(self, token: str | None = None):
        self.token = token

    def intercept_service(self, continuation, details):
        if self.token and not details.method.startswith(OPEN_METHODS):
            presented = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
            if not token_matches(f"Bearer {self.token}", presented):
                return _abort_handler(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong access token (send 'authorization: Bearer <token>' metadata)",
                )
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _parsed(handler.unary_unary, handler.request_deserializer, details.method),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _parsed_stream(handler.unary_stream, handler.request_deserializer, details.method),
                response_serializer=handler.response_serializer,
            )
        return handler


def _parse(deserialize, data: bytes, context, method: str):
    try:
        return deserialize(data)
    except Exception as exc:
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{method}: the request is not a valid message ({exc.__class__.__name__}; strings must be UTF-8)",
        )


def _parsed(behavior, deserialize, method):
    def call(data, context):
        return behavior(_parse(deserialize, data, context, method), context)

    return call


def _parsed_stream(behavior, deserialize, method):
    def call(data, context):
        yield from behavior(_parse(deserialize, data, context, method), context)

    return call


def server_credentials(cert: bytes, key: bytes) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key, cert)])


# -- the daemon's side --------------------------------------------------------------------------------------


class _CallMetadata:
    """Adds the daemon's metadata (access token, session) to every call.

    grpc.aio files an interceptor under the first kind it is an instance of (unary-unary before
    unary-stream), so one object of a class deriving from both would never see a streaming call
    such as Complete: each kind gets an instance of its own (`_metadata_interceptors`)."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.pairs)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


class _UnaryMetadata(_CallMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamMetadata(_CallMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def _metadata_interceptors(pairs: list[tuple[str, str]]) -> list | None:
    return [_UnaryMetadata(pairs), _StreamMetadata(pairs)] if pairs else None


def _remote_credentials(address: str, token: str | None, ca_file: str | None) -> grpc.ChannelCredentials:
    if not token:
        raise AccessError(
            f"worker {address} is not on this machine: set an access token ({WORKER_TOKEN_ENV} or "
            "--worker-token-file), and the worker's certificate if it is self-signed ($ROTARY_WORKER_CA or --worker-ca)"
        )
    root = None
    if ca_file:
        try:
            root = Path(ca_file).expanduser().read_bytes()
        except OSError as exc:
            raise AccessError(f"cannot read the worker's CA certificate {ca_file}: {exc.strerror}") from exc
    return grpc.ssl_channel_credentials(root_certificates=root)


def worker_channel(
    address: str, token: str | None = None, ca_file: str | None = None, session: str | None = None
) -> grpc.aio.Channel:
    """The daemon's channel to a worker: plain on a local address, TLS (required) elsewhere.

    `session`: the daemon's session id, sent with every call (the worker keeps each session's
    documents apart). Raises AccessError for a non-local address without a token: the daemon never
    sends documents in plain text or to a worker anyone could reach without one."""
    pairs = [(TOKEN_METADATA, f"Bearer {token}")] if token else []
    if session:
        pairs.append((SESSION_METADATA, session))
    interceptors = _metadata_interceptors(pairs)
    refuse_abstract(address, "to connect to a worker on")
    if is_local_address(address):
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    credentials = _remote_credentials(address, token, ca_file)
    return grpc.aio.secure_channel(address, credentials, interceptors=interceptors)


class _SyncTokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str):
        self.pair = (TOKEN_METADATA, f"Bearer {token}")

    def _details(self, details):
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self.pair],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


def sync_worker_channel(address: str, token: str | None = None, ca_file: str | None = None) -> grpc.Channel:
    """The same rule for a blocking client (`rotary complete`, benchmarks, scripts)."""
    refuse_abstract(address, "to connect to a worker on")
    if is_local_address(address):
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, _remote_credentials(address, token, ca_file))
    return grpc.intercept_channel(channel, _SyncTokenMetadata(token)) if token else channel
