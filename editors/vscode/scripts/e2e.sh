#!/usr/bin/env bash
# End-to-end test of the Rotary VS Code extension in a real VS Code.
#
# code-server 4.100.3 (it is VS Code 1.100.3; the last release that runs on
# node 20) is driven by Debian's Chromium through playwright-core: the script
# installs the freshly built .vsix, opens a Python file, types, waits for
# Rotary's ghost text, accepts it with Tab and checks the file against the
# server's own reply (read from the language client's trace, see
# e2e-driver.mjs).  A screenshot of each step is kept under artifacts/vscode-e2e/.
#
# Usage:  editors/vscode/scripts/e2e.sh [install|run|all]   (default: all)
#   install  only install the tooling (idempotent; run once per machine/CI image)
#   run      build the .vsix and run the test (tooling must be installed)
#   all      both
#
# Environment:
#   ROTARY_EDITORS_CACHE  where tooling goes (default ${XDG_CACHE_HOME:-~/.cache}/rotary-editors)
#   ROTARY_SERVER         the `rotary` executable the extension starts
#                         (default: the repo's .venv/bin/rotary, else `rotary` on PATH)
#   ROTARY_E2E_TIMEOUT_S  how long to wait for ghost text (default 180: first load of the model)
#   ROTARY_ARTIFACTS      where screenshots and logs go (default <repo>/artifacts/vscode-e2e)
#   ROTARY_VSIX           a .vsix built already, installed instead of building one
#   ROTARY_E2E_SCENARIO   basic (type, Tab, accept word, stats) or indent (Enter after a
#                         Python block opener, then Tab: the line keeps the editor's
#                         indentation) [basic]
#
# Everything listens on 127.0.0.1 only; every process started here is stopped on exit.
set -euo pipefail

MODE="${1:-all}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXT_DIR="$(cd "$HERE/.." && pwd)"
REPO="$(cd "$EXT_DIR/../.." && pwd)"
CACHE="${ROTARY_EDITORS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rotary-editors}"
CS_VERSION="4.100.3"
CS_DIR="$CACHE/code-server-$CS_VERSION"
DRIVER_DIR="$CACHE/driver"
PLAYWRIGHT_VERSION="1.65.1"
ARTIFACTS="${ROTARY_ARTIFACTS:-$REPO/artifacts/vscode-e2e}"
SCENARIO="${ROTARY_E2E_SCENARIO:-basic}"
export npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

log() { printf '[e2e] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_apt() {
  # chromium drives the UI; ripgrep replaces a binary VS Code downloads at install;
  # libkrb5-dev and a compiler build code-server's native modules.
  local missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v rg >/dev/null || missing+=(ripgrep)
  [ -e /usr/include/krb5.h ] || [ -e /usr/include/krb5/krb5.h ] || missing+=(libkrb5-dev)
  command -v g++ >/dev/null || missing+=(build-essential)
  command -v make >/dev/null || missing+=(make)
  command -v python3 >/dev/null || missing+=(python3)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    die "missing system packages: ${missing[*]} (sudo apt-get install -y ${missing[*]})"
  fi
}

install_code_server() {
  [ -f "$CS_DIR/.rotary-installed" ] && { log "code-server $CS_VERSION already in $CS_DIR"; return 0; }
  log "installing code-server $CS_VERSION into $CS_DIR (several minutes, once)"
  local tmp; tmp="$(mktemp -d "$CACHE/cs-build.XXXXXX")"
  (
    set -euo pipefail
    cd "$tmp"
    npm pack "code-server@$CS_VERSION" >/dev/null
    tar xzf "code-server-$CS_VERSION.tgz"
    cd package
    npm install --omit=dev --ignore-scripts --no-package-lock >/dev/null
    npm rebuild argon2 >/dev/null
    cd lib/vscode
    npm install --omit=dev --ignore-scripts --no-package-lock >/dev/null
    # The ripgrep postinstall downloads a binary; give it Debian's instead.
    mkdir -p node_modules/@vscode/ripgrep/bin
    cp "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
    MAKEFLAGS="-j${ROTARY_BUILD_JOBS:-2}" npm_config_yes=true npm rebuild --foreground-scripts >/dev/null
    ln -sfn node_modules node_modules.asar
    (cd extensions && npm install --omit=dev --no-package-lock >/dev/null)
    ln -sfn code-linux.sh bin/remote-cli/code-server 2>/dev/null || true
    ln -sfn browser-linux.sh bin/helpers/browser.sh 2>/dev/null || true
  )
  rm -rf "$CS_DIR"
  mv "$tmp/package" "$CS_DIR"
  rm -rf "$tmp"
  touch "$CS_DIR/.rotary-installed"
}

install_driver() {
  if [ -f "$DRIVER_DIR/node_modules/playwright-core/package.json" ] &&
     grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$DRIVER_DIR/node_modules/playwright-core/package.json"; then
    return 0
  fi
  log "installing playwright-core $PLAYWRIGHT_VERSION into $DRIVER_DIR (no browser download)"
  mkdir -p "$DRIVER_DIR"
  (cd "$DRIVER_DIR" && [ -f package.json ] || echo '{"private":true}' > package.json
   cd "$DRIVER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-package-lock "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
}

install_all() {
  mkdir -p "$CACHE"
  need_apt
  install_code_server
  install_driver
}

build_vsix() {
  # A .vsix built already (the test suite builds one per session, outside the repository): use it.
  if [ -n "${ROTARY_VSIX:-}" ]; then
    [ -f "$ROTARY_VSIX" ] || die "ROTARY_VSIX=$ROTARY_VSIX: no such file"
    echo "$ROTARY_VSIX"
    return
  fi
  log "building the .vsix"
  cd "$EXT_DIR"
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then npm ci >/dev/null; fi
  npm run --silent package >/dev/null
  ls -t "$EXT_DIR"/*.vsix | head -1
}

find_server() {
  if [ -n "${ROTARY_SERVER:-}" ]; then echo "$ROTARY_SERVER"; return; fi
  if [ -x "$REPO/.venv/bin/rotary" ]; then echo "$REPO/.venv/bin/rotary"; return; fi
  command -v rotary || die "no rotary executable (set ROTARY_SERVER)"
}

CS_PID=""
WORK=""
cleanup() {
  local rc=$?
  if [ -n "$CS_PID" ] && kill -0 "$CS_PID" 2>/dev/null; then
    # code-server was started in its own process group: stop it and its children
    # (extension host, the rotary server and its worker) together.
    kill -TERM -- "-$CS_PID" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CS_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$CS_PID" 2>/dev/null || true
  fi
  if [ -n "$WORK" ]; then
    # Keep VS Code's logs (extension host, the Rotary output channel) with the screenshots.
    [ -d "$WORK/ud/logs" ] && rm -rf "$ARTIFACTS/logs-$SCENARIO" && cp -r "$WORK/ud/logs" "$ARTIFACTS/logs-$SCENARIO" 2>/dev/null
    rm -rf "$WORK"
  fi
  exit $rc
}

run_test() {
  [ -f "$CS_DIR/.rotary-installed" ] || die "code-server not installed: run '$0 install' first"
  [ -d "$DRIVER_DIR/node_modules/playwright-core" ] || die "playwright-core not installed: run '$0 install' first"
  local vsix server port
  vsix="$(build_vsix)"
  server="$(find_server)"
  trap cleanup EXIT INT TERM
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/rotary-vscode-e2e.XXXXXX")"
  mkdir -p "$WORK/home" "$WORK/ud/User" "$WORK/ext" "$WORK/project" "$ARTIFACTS"
  rm -f "$ARTIFACTS"/*-"$SCENARIO"-*.png
  # A private HOME: code-server writes ~/.config/code-server/config.yaml.
  # The model cache stays the user's (XDG_CACHE_HOME): the first run converts the model once.
  export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}"
  export HOME="$WORK/home" XDG_CONFIG_HOME="$WORK/home/.config" XDG_DATA_HOME="$WORK/home/.local/share"
  cat > "$WORK/ud/User/settings.json" <<JSON
{
  "rotary.serverPath": "$server",
  "editor.inlineSuggest.enabled": true,
  "editor.quickSuggestions": {"other": false, "comments": false, "strings": false},
  "editor.suggestOnTriggerCharacters": false,
  "editor.acceptSuggestionOnEnter": "off",
  "workbench.startupEditor": "none",
  "workbench.tips.enabled": false,
  "workbench.enableExperiments": false,
  "security.workspace.trust.enabled": false,
  "telemetry.telemetryLevel": "off",
  "extensions.autoCheckUpdates": false,
  "extensions.autoUpdate": false,
  "update.mode": "none",
  "python.languageServer": "None",
  "rotary.trace.server": "verbose"
}
JSON
  printf 'import math\n\n\ndef add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n' > "$WORK/project/main.py"
  cp "$WORK/project/main.py" "$WORK/project/other.py"
  # A repository's own settings try to send the code elsewhere and load another model: the
  # extension must ignore both (they are read from the user's settings only).
  mkdir -p "$WORK/project/.vscode"
  printf '{"rotary.workerAddress": "127.0.0.1:9", "rotary.model": "%s/not-a-model"}\n' "$WORK/project" \
    > "$WORK/project/.vscode/settings.json"
  printf 'import math\n\n\n' > "$WORK/project/indent_def.py"
  cp "$WORK/project/indent_def.py" "$WORK/project/indent_with.py"
  log "installing $vsix into code-server"
  node "$CS_DIR/out/node/entry.js" --user-data-dir "$WORK/ud" --extensions-dir "$WORK/ext" \
    --install-extension "$vsix" > "$ARTIFACTS/install.log" 2>&1 || { cat "$ARTIFACTS/install.log" >&2; die "extension install failed"; }
  log "starting code-server on 127.0.0.1, a port the OS picks"
  # --log trace: the Rotary output channel logs at trace level, so the language client
  # writes the LSP traffic there (rotary.trace.server above); the driver reads the
  # server's replies from it.
  setsid node "$CS_DIR/out/node/entry.js" --auth none --bind-addr "127.0.0.1:0" \
    --disable-telemetry --disable-update-check --disable-workspace-trust --log trace \
    --user-data-dir "$WORK/ud" --extensions-dir "$WORK/ext" "$WORK/project" \
    > "$ARTIFACTS/code-server-$SCENARIO.log" 2>&1 &
  CS_PID=$!
  # It says where it listens: "HTTP server listening on http://127.0.0.1:PORT/".
  for _ in $(seq 1 240); do
    port="$(sed -n 's|.*HTTP server listening on http://127\.0\.0\.1:\([0-9][0-9]*\)/.*|\1|p' "$ARTIFACTS/code-server-$SCENARIO.log" | head -1)"
    [ -n "$port" ] && break
    kill -0 "$CS_PID" 2>/dev/null || { cat "$ARTIFACTS/code-server-$SCENARIO.log" >&2; die "code-server exited"; }
    sleep 0.5
  done
  [ -n "$port" ] || die "code-server never said where it listens"
  log "code-server listens on 127.0.0.1:$port"
  for _ in $(seq 1 120); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then break; fi
    kill -0 "$CS_PID" 2>/dev/null || { cat "$ARTIFACTS/code-server-$SCENARIO.log" >&2; die "code-server exited"; }
    sleep 0.5
  done
  log "driving chromium ($SCENARIO)"
  NODE_PATH="$DRIVER_DIR/node_modules" node "$HERE/e2e-driver.mjs" \
    --url "http://127.0.0.1:$port/?folder=$WORK/project" --scenario "$SCENARIO" \
    --project "$WORK/project" --logs "$WORK/ud/logs" --artifacts "$ARTIFACTS" \
    --driver "$DRIVER_DIR/node_modules/playwright-core/index.mjs" \
    --timeout-s "${ROTARY_E2E_TIMEOUT_S:-180}"
  log "passed; screenshots in $ARTIFACTS"
}

case "$MODE" in
  install) install_all ;;
  run) run_test ;;
  all) install_all; run_test ;;
  *) die "usage: $0 [install|run|all]" ;;
esac
