"""The `rotary` command: worker, lsp, complete, tests, demo and bench.

Heavy imports (torch, transformers) happen inside the subcommands that need
them, so `rotary lsp` starts in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from rotary.completion.rpc.launch import DEFAULT_LISTEN, private_socket, spawn_worker
from rotary.completion.rpc.wire import AUTO, COMPLETION_MODE_BY_NAME

if TYPE_CHECKING:
    from pathlib import Path


def _setup_logging(level: str, stream=None) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream or sys.stderr,
    )


def _access(args: argparse.Namespace, listen: str, what: str):
    """(token, (cert, key) PEM bytes or None) for a server, or an AccessError saying why it must not start."""
    from rotary.completion.rpc.access import AccessError, check_listen, load_token, read_pair, self_signed_pair

    token = load_token(args.token_file)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise AccessError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert:
        tls = read_pair(args.tls_cert, args.tls_key)
    elif args.tls_self_signed:
        from rotary.completion.rpc.access import split_host_port

        cert, key = self_signed_pair(args.tls_self_signed, [split_host_port(listen)[0]])
        print(f"TLS with a self-signed certificate: clients trust {cert}", file=sys.stderr, flush=True)
        tls = read_pair(str(cert), str(key))
    check_listen(listen, token, tls is not None, what)
    return token, tls


def cmd_worker(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from rotary.completion.rpc.access import AccessError
    from rotary.completion.server import serve

    try:
        token, tls = _access(args, args.listen, "the worker")
    except AccessError as exc:
        print(f"rotary worker: {exc}", file=sys.stderr)
        return 2

    if args.precision:  # the model runner reads it (models/precision.py), as from the environment
        from rotary.models.precision import PRECISION_ENV

        os.environ[PRECISION_ENV] = args.precision

    def bound(address: str) -> None:
        how = ", ".join(n for n, on in (("TLS", tls), ("access token required", token)) if on)
        print(f"rotary worker listening on {address}{f' ({how})' if how else ''}", file=sys.stderr, flush=True)

    serve(
        args.listen,
        args.model,
        args.cache_mb,
        args.parent_pid,
        on_bound=bound,
        max_context_tokens=args.context_tokens,
        refresh_window=args.refresh_window,
        stale_budget=args.stale_budget,
        reflection=args.reflection,
        session_lease_s=args.session_lease,
        token=token,
        tls=tls,
    )
    return 0


def cmd_lsp(args: argparse.Namespace) -> int:
    # stdout carries LSP messages: logs go to stderr only.
    _setup_logging(args.log_level)
    # pygls logs every message at INFO; keep that for --log-level debug only.
    logging.getLogger("pygls").setLevel(logging.DEBUG if args.log_level == "debug" else logging.WARNING)
    from rotary.completion.rpc.access import WORKER_CA_ENV, WORKER_TOKEN_ENV, AccessError, load_token

    try:
        worker_token = load_token(args.worker_token_file, WORKER_TOKEN_ENV)
    except AccessError as exc:
        print(f"rotary lsp: {exc}", file=sys.stderr)
        return 2
    worker_ca = args.worker_ca or os.environ.get(WORKER_CA_ENV) or None
    if args.tcp:
        return _lsp_tcp(args, worker_token, worker_ca)
    from rotary.lsp.server import create_server

    create_server(args.worker or "", args.model or "", worker_token=worker_token, worker_ca=worker_ca).start_io()
    return 0


def _lsp_tcp(args: argparse.Namespace, worker_token: str | None, worker_ca: str | None) -> int:
    import ssl

    from rotary.completion.rpc.access import AccessError, split_host_port
    from rotary.lsp.tcp import TcpDaemon

    host, port = split_host_port(args.tcp)
    if port is None:
        print(f"rotary lsp: --tcp needs HOST:PORT, got {args.tcp!r}", file=sys.stderr)
        return 2
    try:
        token, tls = _access(args, args.tcp, "LSP")
    except AccessError as exc:
        print(f"rotary lsp: {exc}", file=sys.stderr)
        return 2
    context = None
    if tls:
        import tempfile

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory() as tmp:  # ssl loads a chain from files only
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, data in ((cert, tls[0]), (key, tls[1])):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            context.load_cert_chain(cert, key)
    idle = {"idle_s": args.idle_timeout} if args.idle_timeout is not None else {}  # else TcpDaemon's IDLE_S
    daemon = TcpDaemon(args.worker or "", args.model or "", token, context, worker_token, worker_ca, **idle)

    def bound(where: str) -> None:
        how = ", ".join(n for n, on in (("TLS", tls), ("access token required", token)) if on)
        print(f"rotary lsp listening on {where}{f' ({how})' if how else ''}", file=sys.stderr, flush=True)

    daemon.run(host, port, bound)
    return 0


def cmd_complete(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from pathlib import Path

    from rotary.completion.client import WorkerClient

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        return 2
    lines = text.split("\n")
    if not 1 <= args.line <= len(lines):
        print(f"--line {args.line} is outside {path} (1..{len(lines)})", file=sys.stderr)
        return 2
    line_text = lines[args.line - 1]
    column = len(line_text) if args.column is None else args.column - 1
    if not 0 <= column <= len(line_text):
        print(f"--column {args.column} is outside line {args.line} (1..{len(line_text) + 1})", file=sys.stderr)
        return 2
    offset = sum(len(ln) + 1 for ln in lines[: args.line - 1]) + column

    worker_proc = None
    address = args.worker
    if not address:
        worker_proc, address = _spawn_worker(args.model)
    try:
        client = WorkerClient(address)
        client.wait_ready(on_message=lambda m: print(f"[worker] {m}", file=sys.stderr))
        uri = path.resolve().as_uri()
        client.open(uri, text)
        try:
            suggestion, last = client.complete(uri, 1, offset, args.max_tokens, args.mode)
        finally:
            if worker_proc is None:  # a shared worker keeps nothing of ours (our own exits; its snapshot serves the next run)
                _close_quietly(client, uri)
        print(suggestion)
        if args.verbose and last is not None:
            print(f"[{last.stop_reason}] {last.stats}", file=sys.stderr)
        return 0
    finally:
        if worker_proc is not None:
            worker_proc.terminate()
            worker_proc.wait(timeout=10)


def _close_quietly(client, uri: str) -> None:
    import grpc

    try:
        client.close_document(uri)
    except grpc.RpcError as exc:  # the completion is printed all the same; the worker's lease drops it later
        print(f"could not close {uri} in the worker: {exc.details()}", file=sys.stderr)


def cmd_tests(args: argparse.Namespace) -> int:
    """Unit tests for FILE::QUALNAME through the worker's GenerateTests; written to a file, summarised."""
    _setup_logging(args.log_level)
    from pathlib import Path

    from rotary.completion.rpc.wire import MAX_TESTS
    from rotary.testgen.focal import find_focal
    from rotary.testgen.languages import TestGenError, UnsupportedLanguage
    from rotary.testgen.layout import layout

    def fail(message: str) -> int:
        print(f"rotary tests: {message}", file=sys.stderr)
        return 2

    file_part, sep, qualname = args.target.rpartition("::")
    if not sep or not file_part or not qualname:
        return fail(f"{args.target!r}: give FILE::QUALNAME, e.g. src/stack.py::Stack.push")
    path = Path(file_part)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return fail(f"cannot read {path}: {exc}")
    try:
        focal = find_focal(str(path), text, qualname, args.language or "")
    except (TestGenError, UnsupportedLanguage) as exc:
        return fail(str(exc))
    if not 1 <= args.count <= MAX_TESTS:
        return fail(f"-n {args.count}: between 1 and {MAX_TESTS} tests")
    if args.check and focal.language != "python":
        return fail(f"--check runs Python tests only ({path} is {focal.language}); drop --check to generate them")
    out = Path(args.out) if args.out else path.parent / layout(focal).file_name
    if out.is_symlink():  # also a dangling one (out.exists() says False): never written through
        return fail(f"{out} is a symbolic link; Rotary does not write through one (remove it or pass --out PATH)")
    if out.exists() and not args.force:
        return fail(f"{out} exists; pass --force to overwrite it or --out PATH")
    if args.check:  # said before anything is generated, not after
        from rotary.testgen.sandbox import isolation, refusal, running_anyway

        iso = isolation()
        if not iso.available and not args.allow_network:
            return fail(refusal(iso))
        if not iso.available:
            print(f"rotary tests: {running_anyway(iso)}", file=sys.stderr, flush=True)

    import grpc

    from rotary.completion.client import WorkerClient

    worker_proc, address = (None, args.worker) if args.worker else _spawn_worker(args.model)
    try:
        client = WorkerClient(address)
        client.wait_ready(on_message=lambda m: print(f"[worker] {m}", file=sys.stderr, flush=True))
        tests, last = [], None
        try:
            for reply in client.generate_tests(
                str(path), text, qualname, language_id=args.language or "", count=args.count,
                max_tokens=args.max_tokens, drafter=args.drafter, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, explain=args.explain,
            ):
                if reply.HasField("test"):
                    t = reply.test
                    tests.append(t)
                    s = t.stats
                    print(
                        f"[{reply.done_tests}/{reply.total_tests}] {t.name}: {s.tokens_generated} tokens, {s.forwards} forwards, "
                        f"{s.drafts_accepted} drafted tokens kept, {t.seconds:.1f} s" + ("" if t.syntax_ok else f" (does not parse: {t.syntax_error})"),
                        file=sys.stderr, flush=True,
                    )
                last = reply
        except grpc.RpcError as exc:
            return fail(f"{exc.code().name}: {exc.details()}")
        if last is None or not last.done:
            return fail("the worker ended the call before the last reply")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_new_file(out, last.file_text, overwrite=args.force)
        except FileExistsError:
            return fail(f"{out} appeared meanwhile; pass --force to overwrite it or --out PATH")
        except OSError as exc:
            return fail(f"cannot write {out}: {exc.strerror}" + (" (a symbolic link)" if out.is_symlink() else ""))
        tokens = sum(t.stats.tokens_generated for t in tests)
        forwards = sum(t.stats.forwards for t in tests)
        print(
            f"wrote {out}: {len(tests)} tests for {focal.display} ({sum(t.syntax_ok for t in tests)} parse), "
            f"{tokens} tokens in {forwards} forward passes ({forwards / max(tokens, 1):.2f} a token, drafter {args.drafter}), "
            f"{sum(t.seconds for t in tests):.1f} s"
        )
        if args.explain:
            _print_explain(tests)
        if args.check:
            _check_tests(path, text, out, last.file_text, args.allow_network)
        return 0
    finally:
        if worker_proc is not None:
            worker_proc.terminate()
            worker_proc.wait(timeout=10)


def _write_new_file(path, text: str, overwrite: bool) -> None:
    """Write `text` to `path`, never through a symbolic link (O_NOFOLLOW) and, unless `overwrite`,
    only as a new file (O_EXCL): what was checked before the generation cannot be swapped for a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if overwrite else os.O_EXCL)
    with os.fdopen(os.open(path, flags, 0o644), "w", encoding="utf-8") as f:
        f.write(text)


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{value}: give a number of seconds above 0")
    return seconds


def _print_explain(tests) -> None:
    """Per test: each draft, the pattern (or drafter) that made it, and how many of its tokens were kept."""
    for t in tests:
        drafts = list(t.drafts)
        kept = sum(d.accepted for d in drafts)
        print(f"\n{t.name}: {len(drafts)} drafts, {kept} of {sum(d.proposed for d in drafts)} drafted tokens kept")
        for d in drafts:
            who = f"pattern #{d.group} {d.pattern!r}" if d.source == "ast" else d.source
            print(f"  {d.accepted:>2}/{d.proposed:<2} {d.text!r:<48} <- {who}")


def _check_tests(source: Path, text: str, out: Path, test_text: str, allow_network: bool) -> None:
    """Run the written tests in the sandbox (testgen/sandbox.py), or, with --allow-network where there is none, without."""
    from rotary.testgen.sandbox import run_tests

    result = run_tests(
        source.stem, text, test_text, test_module=out.stem, extra_path=[str(source.resolve().parent)], allow_network=allow_network
    )
    print(f"\n--check: {result.network}; a subprocess in a temporary directory")
    if result.timed_out:
        print("  timed out")
    if result.load_error:
        print(f"  the test file did not import: {result.load_error}")
    for name, outcome in result.results.items():
        message = result.messages.get(name, "")
        print(f"  {outcome:<7} {name}" + (f"  {message}" if message else ""))
    print(f"  {result.passed} of {len(result.results)} passed")


def _spawn_worker(model: str | None):
    """Start a private worker on a unix socket (for one-shot commands): (process, address)."""
    _, address = private_socket()
    return spawn_worker(address, model), address


def cmd_demo(args: argparse.Namespace) -> int:
    from rotary.demo import run_demo

    return run_demo(serve_after=not args.no_serve, model=args.model, listen=args.listen)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    """Prepare the embedded (or given) model once in the cache dir (config, tokenizer, facts), so later loads need no transformers."""
    _setup_logging(args.log_level)
    from rotary.models.loader import ModelLoadError, resolve_model_dir

    try:
        path = resolve_model_dir(args.model, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Fit the exit heads, their controller and the abstention gate (completion/calibrate.py)."""
    _setup_logging(args.log_level)
    from rotary.bench.corpus import python_files
    from rotary.completion.calibrate import main

    return main(args, python_files(args.corpus))


def cmd_bench(args: argparse.Namespace) -> int:
    from rotary.bench import run_benchmark

    return run_benchmark(args)


def cmd_soak(args: argparse.Namespace) -> int:
    from rotary.bench.soak import main

    return main(args)


def _add_access_arguments(parser: argparse.ArgumentParser, for_tcp: bool = False) -> None:
    """Token and TLS of a server: needed for any address but loopback and unix sockets (docs/RELIABILITY.md)."""
    scope = " of --tcp" if for_tcp else ""
    parser.add_argument(
        "--token-file", default=None, metavar="PATH",
        help=f"file holding the access token{scope} clients must send (default: $ROTARY_TOKEN; at least 16 characters)",
    )
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help=f"TLS certificate{scope} (with --tls-key)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help=f"TLS private key{scope}")
    parser.add_argument(
        "--tls-self-signed", default=None, metavar="DIR",
        help=f"TLS{scope} with a self-signed pair kept in DIR (made on first use); clients trust DIR/cert.pem",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotary",
        description="Rotary: self-hosted, editor-integrated code completion. "
        "An editor starts `rotary lsp`; the daemon starts a model worker (`rotary worker`) and talks to it over gRPC.",
    )
    parser.add_argument("--log-level", default=os.environ.get("ROTARY_LOG_LEVEL", "info"), help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="serve the model over gRPC (the daemon starts one itself by default)")
    w.add_argument(
        "--listen", default=DEFAULT_LISTEN,
        help=f"host:port, [v6]:port or unix:/path (default {DEFAULT_LISTEN}); an address other than loopback "
        "or a unix socket needs --token-file (or $ROTARY_TOKEN) and TLS",
    )
    w.add_argument("--model", default=None, help="local Hugging Face model directory or .gguf file (default: embedded SmolLM2-135M)")
    w.add_argument(
        "--precision", choices=("exact", "fp16", "int4", "auto"), default=None,
        help="the matrix products' precision: exact (float32), fp16, int4 (the GGUF's 4-bit blocks), or auto "
        "(the fastest whose deviation stays below llama.cpp's, measured once per machine); default $ROTARY_PRECISION, else auto",
    )
    w.add_argument("--cache-mb", type=int, default=1024, help="memory budget of the per-document KV caches")
    w.add_argument("--context-tokens", type=int, default=2048, help="tokens before the cursor the model sees at most")
    w.add_argument(
        "--refresh-window", type=int, default=128,
        help="re-encode stale cached tokens among the last N before the cursor (0: never)",
    )
    w.add_argument(
        "--stale-budget", type=int, default=1024,
        help="a document with more stale cached tokens is refreshed in the background at once, not only when idle",
    )
    w.add_argument(
        "--session-lease", type=float, default=120.0, metavar="SECONDS",
        help="drop the documents of a daemon that has not called for this long (daemons call every 2 s)",
    )
    w.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (used by the daemon)")
    w.add_argument("--allow-remote", action="store_true", help=argparse.SUPPRESS)  # older spelling; token and TLS decide
    _add_access_arguments(w)
    w.add_argument(
        "--reflection", action=argparse.BooleanOptionalAction, default=None,
        help="serve gRPC server reflection, for grpcurl (default: on for loopback and unix sockets, off elsewhere)",
    )
    w.set_defaults(func=cmd_worker)

    lsp = sub.add_parser("lsp", help="the language server an editor starts (stdio by default)")
    lsp.add_argument("--stdio", action="store_true", help="serve LSP over stdio (the default; accepted for clients that pass it)")
    lsp.add_argument(
        "--tcp", default=None, metavar="HOST:PORT",
        help="serve LSP over TCP instead of stdio, one editor at a time; an address other than loopback "
        "needs --token-file (or $ROTARY_TOKEN) and TLS",
    )
    lsp.add_argument(
        "--idle-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
        help="--tcp: end an editor's session after this long without a message from it (default 300), "
        "so that a silent client cannot keep the one editor slot",
    )
    lsp.add_argument(
        "--worker", default=None, metavar="ADDR",
        help="connect to a running worker instead of starting one (an editor's workerAddress setting "
        "needs your confirmation; this flag does not, and wins over it)",
    )
    lsp.add_argument(
        "--model", default=None,
        help="model for the daemon's own worker (wins over the editor's model setting, which needs your confirmation)",
    )
    lsp.add_argument(
        "--worker-token-file", default=None, metavar="PATH",
        help="access token sent to a worker (default: $ROTARY_WORKER_TOKEN); needed for a worker on another machine",
    )
    lsp.add_argument(
        "--worker-ca", default=None, metavar="PEM",
        help="certificate a remote worker's TLS certificate must chain to, e.g. its self-signed cert.pem "
        "(default: $ROTARY_WORKER_CA, else the system's roots)",
    )
    _add_access_arguments(lsp, for_tcp=True)
    lsp.set_defaults(func=cmd_lsp)

    c = sub.add_parser("complete", help="one completion at a position of a file, printed to stdout")
    c.add_argument("file")
    c.add_argument("--line", type=int, required=True, help="1-based line")
    c.add_argument("--column", type=int, default=None, help="1-based column in characters (default: end of line)")
    c.add_argument("--worker", default=None, metavar="ADDR", help="use a running worker (default: start one)")
    c.add_argument("--model", default=None)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--mode", choices=tuple(COMPLETION_MODE_BY_NAME), default=AUTO)
    c.add_argument("-v", "--verbose", action="store_true", help="print the stop reason and stats to stderr")
    c.set_defaults(func=cmd_complete)

    t = sub.add_parser("tests", help="generate unit tests for a function (FILE::QUALNAME) and write them to a file")
    t.add_argument("target", help="FILE::QUALNAME, e.g. src/stack.py::Stack.push (Java: Class.method, C++: Class::method)")
    t.add_argument("-n", dest="count", type=int, default=5, help="tests to generate (default 5)")
    t.add_argument("--out", default=None, metavar="PATH", help="the test file (default: test_<module>.py beside FILE)")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.add_argument("--explain", action="store_true", help="print, per test, which pattern drafted which tokens and how many were kept")
    t.add_argument(
        "--check", action="store_true",
        help="run the tests (Python) in a sandbox: a subprocess in a temp dir, a timeout, no network, the filesystem read-only but that dir",
    )
    t.add_argument(
        "--allow-network", action="store_true",
        help="with --check, where no sandbox can be set up (no user namespaces, not root): run the tests anyway, "
        "with the network and the filesystem writable (without it, --check refuses before generating)",
    )
    t.add_argument(
        "--drafter", choices=("plain", "ngram", "ast", "ast+ngram", "ast-strict"), default="ast+ngram",
        help="who drafts tokens ahead (greedy output is the same with each; see docs/BENCHMARKS.md)",
    )
    t.add_argument("--max-tokens", type=int, default=128, help="token budget of each test (default 128)")
    t.add_argument("--temperature", type=float, default=0.0, help="> 0: sample instead of greedy decoding")
    t.add_argument("--top-p", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0, help="sampling seed")
    t.add_argument("--language", default=None, help="python, java or cpp (default: from FILE's extension)")
    t.add_argument("--worker", default=None, metavar="ADDR", help="use a running worker (default: start one)")
    t.add_argument("--model", default=None)
    t.set_defaults(func=cmd_tests)

    d = sub.add_parser("demo", help="start worker and daemon, complete a sample file through real LSP, then keep serving")
    d.add_argument("--model", default=None)
    d.add_argument("--no-serve", action="store_true", help="exit after the demo completion")
    d.add_argument("--listen", default=DEFAULT_LISTEN, help=f"where the demo's worker serves (default {DEFAULT_LISTEN})")
    d.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare-model", help="prepare the model once in the cache dir (done by make)")
    p.add_argument("--model", default=None)
    p.set_defaults(func=cmd_prepare_model)

    k = sub.add_parser("calibrate", help="fit early-exit heads and the abstention gate for a model on a corpus of code")
    k.add_argument("--model", default=None)
    k.add_argument("--corpus", default=None, metavar="DIR", help="folder of Python files (default: the standard library)")
    k.add_argument("--exit-layers", default=None, help="comma-separated 0-based layers to exit after (default 9,14,19,24,27)")
    k.add_argument("--rank", type=int, default=32, help="rank of each exit adapter (default 32)")
    k.add_argument("--tokens", type=int, default=None, help="training tokens for the exit heads (default 20000; --quick 6000)")
    k.add_argument("--points", type=int, default=None, help="completion points for the abstention gate (default 200, half as many held out; --quick 60)")
    k.add_argument("--agreement", type=float, default=0.9, help="held-out agreement with the full model the exit threshold keeps")
    # 0.6, not 0.5: a threshold that shows exactly half of the training completions showed 40% of held-out ones.
    k.add_argument("--min-shown", type=float, default=0.6, help="the abstention threshold shows at least this fraction of the training completions")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--quick", action="store_true")
    k.add_argument("--gate-only", action="store_true", help="keep the model's exit heads; refit the abstention gate alone")
    k.add_argument("--out", default=None, metavar="PATH", help="write the artifact here instead of the cache (where the worker looks for it)")
    k.set_defaults(func=cmd_calibrate)

    from rotary.bench import add_bench_parser, add_soak_parser

    add_bench_parser(sub, cmd_bench)
    add_soak_parser(sub, cmd_soak)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is fetched from a model hub: every model is a local folder or file. The libraries that
    # could reach one (huggingface_hub, and the `kernels` package transformers imports) are told so,
    # and the processes Rotary starts inherit it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
