"""Benchmarks: `rotary bench NAME`. Each measures a baseline and Rotary's path side by side in one run."""

from __future__ import annotations

import argparse

BENCHMARKS = ("quality", "latency", "edits", "decode", "tests", "exit", "load")


def add_bench_parser(sub, func) -> None:
    b = sub.add_parser("bench", help="benchmarks (baseline and new path side by side, with ratios)")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("--json", default=None, metavar="PATH", help="write machine-readable results here")
    b.add_argument("--limit", type=int, default=None, help="at most this many cases")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="a small, fast run")
    b.add_argument("--corpus", default=None, metavar="DIR", help="folder of source files to draw cases from (default: the standard library)")
    b.add_argument("--model", default=None)
    b.add_argument("--contexts", default=None, help="edits: context sizes in tokens with optional case counts, e.g. 1024:200,4096:60 (the default)")
    b.add_argument("--data", default=None, metavar="PATH", help="tests: a TestEval-format .jsonl (default: TestEval's leetcode-py.jsonl, shipped in bench/data/testeval)")
    b.add_argument("--methods", default=None, help="tests: the drafters to compare, comma-separated (default: plain,ngram,ast-strict,ast,ast+ngram; plain is always run)")
    b.add_argument(
        "--allow-network", action="store_true",
        help="tests: where no sandbox can be set up, run the generated tests anyway, with the network and the filesystem writable (default: refuse)",
    )
    b.add_argument("--cursor", choices=("indent", "col0"), default="indent", help="quality: cursor after the auto-indentation (the editor's case) or at column 0")
    b.add_argument("--sizes", default=None, help="load: the numbers of editors to run, comma-separated (default: 1,5,20)")
    b.add_argument(
        "--keystrokes", type=int, default=None, metavar="K",
        help="load: each editor types only the first K keystrokes of its stretch, then asks once more "
        "(default: all of it, about 300 characters, --quick 90; a few, e.g. 10, make a smoke run of seconds)",
    )
    b.add_argument("--decoding-mode", default=None, choices=("lossless", "plain", "earlyExit"), help="load: the daemons' decodingMode setting (default: theirs, lossless)")
    b.add_argument(
        "--peer", default=None, choices=("none", "llama.cpp"),
        help="decode: run llama.cpp (node-llama-cpp's prebuilt binary, `make peer-setup`) on the same GGUF, threads and "
        "contexts in the same run (default: llama.cpp when installed and the model is a GGUF, else none, saying why)",
    )
    b.add_argument(
        "--precision", default=None, choices=("exact", "fp16", "int4", "auto"),
        help="decode: the precision results.own runs in, beside float32 (results.exact); default $ROTARY_PRECISION, else auto. "
        "Other benchmarks run the worker's default: set $ROTARY_PRECISION to compare",
    )
    b.add_argument("--thresholds", default=None, help="exit: exit-controller thresholds besides the calibrated one, e.g. 0.8,0.95")
    b.set_defaults(func=func)


def add_soak_parser(sub, func) -> None:
    s = sub.add_parser("soak", help="long randomized checks, run on demand (docs/RELIABILITY.md)")
    s.add_argument(
        "name", choices=("edits", "kills"),
        help="edits: random LSP edit sequences, daemon vs worker vs a reference; "
        "kills: SIGKILL the daemon's worker mid-completion, then check the next completion and the document",
    )
    s.add_argument("--sequences", type=int, default=10_000, help="edits: how many sequences")
    s.add_argument("--kills", type=int, default=100, help="kills: how many times to kill the worker")
    s.add_argument("--max-seconds", type=float, default=None, help="kills: stop after this long (reported)")
    s.add_argument(
        "--kill-delay", default="0.05,0.6", metavar="MIN,MAX",
        help="kills: the SIGKILL comes a random MIN to MAX seconds after the completion request (default 0.05,0.6: "
        "mostly mid-completion with the embedded model; a tiny model answers sooner, e.g. 0,0.05)",
    )
    s.add_argument("--model", default=None, help="kills: the model of the daemon's worker (default: the embedded one)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, metavar="PATH", help="write machine-readable results here")
    s.set_defaults(func=func)


def run_benchmark(args: argparse.Namespace) -> int:
    if args.name == "quality":
        from .quality import main

        return main(args)
    if args.name == "latency":
        from .latency import main

        return main(args)
    if args.name == "edits":
        from .edits import main

        return main(args)
    if args.name == "decode":
        from .decode import main

        return main(args)
    if args.name == "tests":
        from .tests import main

        return main(args)
    if args.name == "exit":
        from .exit import main

        return main(args)
    if args.name == "load":
        from .load import main

        return main(args)
    raise SystemExit(f"unknown benchmark {args.name}")
