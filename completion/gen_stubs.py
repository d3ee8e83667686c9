"""Regenerate the gRPC stubs from worker.proto: `make stubs`.

The generated files live in completion/rpc/ and are never edited by hand.
grpc_tools writes a top-level `import worker_pb2`; it is rewritten to a
relative import so the stubs work inside the `rotary.completion.rpc` package.
`--check` regenerates into a temporary folder and exits 1 when the checked-in
stubs differ (a test runs it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "worker.proto"
OUT = HERE / "rpc"
GENERATED = ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # build-time only dependency (the test extra)

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out_dir / "worker_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import worker_pb2 as", "from . import worker_pb2 as"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = parser.parse_args(argv)
    if not args.check:
        generate(OUT)
        print(f"wrote {', '.join(GENERATED)} to {OUT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in GENERATED if (Path(tmp) / n).read_bytes() != (OUT / n).read_bytes() if (OUT / n).exists()]
        stale += [n for n in GENERATED if not (OUT / n).exists()]
    if stale:
        print(f"stale gRPC stubs: {', '.join(stale)}; run make stubs", file=sys.stderr)
        return 1
    print("gRPC stubs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
