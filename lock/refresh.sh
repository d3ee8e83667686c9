#!/usr/bin/env bash
# `make lock`: refresh lock/*.txt, the exact versions and hashes every set-up installs.
#   lock/python.txt  pyproject.toml's dependencies with the test extras, plus lock/build.in (pip, setuptools),
#                    resolved by pip-tools to the newest versions the ranges allow, torch's CPU build as a constraint
#   lock/torch.txt   the CPU build of torch (lock/torch.in), installed only into a venv without torch
#   lock/model.txt   the embedded model's wheel (lock/model.in), installed without its dependencies
# pip-tools runs from a venv of its own (build/lock-venv), pinned here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/lock-venv
if [ ! -x "$venv/bin/pip-compile" ]; then
    echo "lock: installing pip-tools into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -qq --disable-pip-version-check pip-tools==7.6.2
fi
echo "lock: resolving pyproject.toml [test] + lock/build.in -> lock/python.txt (a few minutes: hashes of every file)"
"$venv/bin/pip-compile" --quiet --upgrade --generate-hashes --strip-extras --extra test \
    --unsafe-package torch --constraint lock/torch.in \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --output-file lock/python.txt pyproject.toml lock/build.in 2> >(grep -v -e 'is ignored: it is neither' -e 'may be rejected by pip install' >&2)

downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
pin_file() {  # pin_file NAME: lock/NAME.in -> lock/NAME.txt, the one file pip picks here, with its hash
    local name=$1 spec
    spec=$(grep -v '^\s*#' "lock/$name.in" | grep -v '^\s*$')
    echo "lock: $spec -> lock/$name.txt"
    mkdir "$downloads/$name"
    "$venv/bin/pip" download -qq --disable-pip-version-check --no-deps -d "$downloads/$name" "$spec"
    {
        echo "# Made by lock/refresh.sh (make lock) from lock/$name.in: do not edit."
        echo "$spec \\"
        for file in "$downloads/$name"/*; do
            echo "    --hash=sha256:$(sha256sum "$file" | cut -d' ' -f1)"
        done
    } > "lock/$name.txt"
}
pin_file torch
pin_file model
echo "lock: done; run make test, then commit lock/ with pyproject.toml"
