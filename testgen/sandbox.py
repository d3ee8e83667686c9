"""Running generated tests in a sandbox: no network, a read-only filesystem, no process left behind.

Only `rotary tests --check` and `rotary bench tests` run generated code; the worker and the
daemon never do (they generate text). Each run:
- copies the module under test and the test file into a fresh temporary directory, which is the
  child's working directory and HOME, and is deleted afterwards;
- starts the child under `unshare --user --map-root-user --net --mount --pid --fork --kill-child
  --mount-proc` (where user namespaces are refused but we are root: the same without a user
  namespace). Before the tests are imported, the child (the runner, below) sets up:
  - network: its own network namespace, in which no interface is up, not even loopback;
  - filesystem: its own mount namespace, in which /tmp, /var/tmp, /run, /dev/shm and the
    temporary directory's parent are empty (other programs' unix sockets, a worker's or Docker's,
    cannot be reached), every mount is read-only (mount_setattr(2), recursive) and the test's
    temporary directory alone is writable; `extra_path` folders are shown read-only;
  - processes: the runner is PID 1 of its own PID namespace, so when it ends or is killed (at the
    timeout; or when unshare is, `--kill-child`), the kernel kills every process the tests started,
    in a new session or not;
  - privileges: then `setpriv` drops every capability (bounding set too, securebits noroot locked,
    no_new_privs), so the tests cannot remount, unmount or mount anything;
- where that cannot be set up, `isolation()` says why and `run_tests` refuses (SandboxUnavailable)
  unless the caller passes `allow_network=True` (`--allow-network`): the tests then run in the
  temporary directory with the network, the whole filesystem writable and no PID namespace;
- limits its address space (2 GiB) and its CPU time; at the wall-clock timeout kills PID 1 of the
  namespace (not isolated: the process group, also when the run ends), and returns only when unshare
  has, that is once no process of the run is left;
- takes the results from a file descriptor of their own (an unlinked temporary file, `pass_fds`),
  never from stdout: what the tests print cannot pose as the report. Test code runs in the runner's
  interpreter, so code written to forge results still could; the sandbox bounds what the tests can
  do, not what they may claim;
- runs each `test_*` function on its own (a failure or an error in one does not stop the others),
  optionally under coverage.py (line and branch coverage of the module under test, its import
  lines excluded as TestEval does).

Internal switch, for tests of the refusal: `ROTARY_SANDBOX_UNAVAILABLE=REASON` in the environment
makes `isolation()` report that it cannot isolate, for that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache

DEFAULT_TIMEOUT_S = 20.0
MEMORY_LIMIT = 2 << 30
PER_TEST_TIMEOUT_S = 5
FORCE_UNAVAILABLE = "ROTARY_SANDBOX_UNAVAILABLE"  # the internal switch (see above)
# Emptied in the sandbox: where other programs keep their unix sockets and scratch files.
MASKED = ("/tmp", "/var/tmp", "/run", "/dev/shm")
NAMESPACES = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
DROP_PRIVILEGES = (
    "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs",
    "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked,+keep_caps_locked",
)

# The child. First pass (under unshare, as root of its namespaces): confine, then exec itself again
# through setpriv without privileges. Second pass: import the test module, run each test function,
# write the report to the report descriptor.
RUNNER = r'''
import json, os, signal, sys, traceback
config = json.loads(sys.argv[1])
confine = config.pop("confine", None)
if confine is not None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV, MS_BIND, MS_REC = 2, 4, 4096, 16384
    SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")

    class MountAttr(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    def read_only(path, on, recursive):
        attr = MountAttr(MOUNT_ATTR_RDONLY if on else 0, 0 if on else MOUNT_ATTR_RDONLY, 0, 0)
        flags = AT_RECURSIVE if recursive else 0
        check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")

    shown = [*confine["readable"], confine["writable"]]  # the writable one last: it wins where they nest
    held = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in shown]  # reachable once masked
    for path in confine["masked"]:
        check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=64k"), f"tmpfs on {path}")
    for path, fd in zip(shown, held):
        os.makedirs(path, exist_ok=True)
        check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
        os.close(fd)
    read_only("/", True, recursive=True)
    read_only(confine["writable"], False, recursive=False)
    os.chdir(confine["writable"])  # the old working directory is the masked one underneath
    os.execv(confine["setpriv"], [confine["setpriv"], *confine["drop"], "--", sys.executable, "-I", sys.argv[0], json.dumps(config)])

report_file = os.fdopen(config["report_fd"], "w", encoding="utf-8")
os.set_inheritable(report_file.fileno(), False)  # the tests' own subprocesses do not get it
module_name, test_module, per_test = config["module"], config["test_module"], config["per_test"]
sys.path[:0] = [os.getcwd()] + config["path"]
cov = None
if config["coverage"]:
    import coverage
    cov = coverage.Coverage(branch=True, include=[os.path.join(os.getcwd(), module_name + ".py")], data_file=None)
    cov.exclude(r"^\s*(import\s|from\s+\S+\s+import\s)")  # import lines run on import: TestEval excludes them
    cov.start()
results = {}
def alarm(signum, frame):
    raise TimeoutError(f"the test ran over {per_test} s")
signal.signal(signal.SIGALRM, alarm)
try:
    mod = __import__(test_module)
    names = [n for n in dir(mod) if n.startswith("test") and callable(getattr(mod, n))]
    names.sort(key=lambda n: getattr(getattr(mod, n), "__code__", None) and getattr(mod, n).__code__.co_firstlineno or 0)
    for name in names:
        signal.alarm(per_test)
        try:
            getattr(mod, name)()
            results[name] = ["passed", ""]
        except AssertionError as exc:
            results[name] = ["failed", ("AssertionError: " + str(exc))[:300]]
        except BaseException as exc:
            results[name] = ["error", (type(exc).__name__ + ": " + str(exc))[:300]]
        finally:
            signal.alarm(0)
    load_error = ""
except BaseException as exc:
    load_error = (type(exc).__name__ + ": " + str(exc))[:500]
report = {"results": results, "load_error": load_error}
if cov is not None:
    cov.stop()
    try:
        cov.json_report(outfile="_coverage.json")
        with open("_coverage.json") as f:
            files = json.load(f)["files"]
        summary = next(iter(files.values()))["summary"] if files else None
        if summary is not None:
            report["coverage"] = {
                "statements": summary["num_statements"], "missing": summary["missing_lines"],
                "branches": summary.get("num_branches", 0), "missing_branches": summary.get("missing_branches", 0),
            }
    except Exception as exc:  # no data (nothing imported the module): no coverage figures
        report["coverage_error"] = str(exc)[:300]
report_file.write(json.dumps(report))
report_file.flush()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


class SandboxUnavailable(RuntimeError):
    """Generated code would run without isolation, and the caller did not allow that."""


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...]  # the unshare command line; empty: none can be set up here
    setpriv: str
    note: str  # what the run gets, or why there is no sandbox

    @property
    def available(self) -> bool:
        return bool(self.prefix)


WITHOUT_SANDBOX = "with the network, the whole filesystem writable and no PID namespace"
UNISOLATED_NOTE = f"NOT isolated (--allow-network): run {WITHOUT_SANDBOX}"


@dataclass
class RunResult:
    results: dict[str, str] = field(default_factory=dict)  # test name -> passed / failed / error
    messages: dict[str, str] = field(default_factory=dict)
    load_error: str = ""  # the test file could not be imported (every test then counts as not passed)
    timed_out: bool = False
    network: str = ""  # Isolation.note, or UNISOLATED_NOTE
    line_cov: float | None = None
    branch_cov: float | None = None
    coverage: dict | None = None
    output: str = ""  # the child's stdout/stderr tail, for diagnosis

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results.values() if r == "passed")


def isolation() -> Isolation:
    """The sandbox this machine allows, or why there is none (checked once per process, by a real run)."""
    forced = os.environ.get(FORCE_UNAVAILABLE)
    if forced:
        return Isolation((), "", f"{FORCE_UNAVAILABLE} is set ({forced})")
    return _probe()


def refusal(iso: Isolation) -> str:
    """What a command says when it will not run generated code (before it generates any)."""
    return (
        f"generated tests are not run without a sandbox, and none can be set up here ({iso.note}). "
        f"Pass --allow-network to run them anyway, {WITHOUT_SANDBOX}."
    )


def running_anyway(iso: Isolation) -> str:
    """What a command says, before it generates anything, when --allow-network lets tests run without a sandbox."""
    return f"warning: no sandbox can be set up here ({iso.note}); --allow-network: the tests will run {WITHOUT_SANDBOX}"


@lru_cache(maxsize=1)
def _probe() -> Isolation:
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if not unshare or not setpriv:
        return Isolation((), "", "util-linux's unshare and setpriv are needed and not both on PATH")
    candidates = [((unshare, "--user", "--map-root-user", *NAMESPACES), "user")]
    if os.geteuid() == 0:
        candidates.append(((unshare, *NAMESPACES), "root"))
    failures = []
    for prefix, kind in candidates:
        iso = Isolation(prefix, setpriv, f"isolated ({kind}, network, mount and PID namespaces; read-only filesystem but the test's directory; no capabilities)")
        try:
            run = _run(iso, "m", "", "", "test_probe", 30.0, False, PER_TEST_TIMEOUT_S, [])
        except OSError as exc:
            failures.append(f"{kind} namespaces: {exc}")
            continue
        if run.load_error == "" and not run.timed_out:
            return iso
        failures.append(f"{kind} namespaces: " + (run.output.strip().splitlines() or [run.load_error])[-1])
    return Isolation((), "", "; ".join(failures))


def _limits(cpu_seconds: int) -> tuple[list[str], object]:
    """(a command prefix, a preexec hook) that start the generated tests with their resource limits:
    address space MEMORY_LIMIT, CPU time `cpu_seconds`, no core file. util-linux's prlimit where it is
    installed: a preexec hook makes subprocess fork this process, and a fork of a process with gRPC's
    threads (the CLI's client, the worker) can break in the child before it runs anything."""
    prlimit = shutil.which("prlimit")
    if prlimit:
        return [prlimit, f"--as={MEMORY_LIMIT}", f"--cpu={cpu_seconds}:{cpu_seconds + 1}", "--core=0", "--"], None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return [], apply


def run_tests(
    module_name: str,
    module_source: str,
    test_source: str,
    test_module: str = "test_generated",
    timeout: float = DEFAULT_TIMEOUT_S,
    coverage: bool = False,
    per_test_timeout: int = PER_TEST_TIMEOUT_S,
    extra_path: list[str] | None = None,
    allow_network: bool = False,
) -> RunResult:
    """Run the test functions of `test_source` against `module_source` (importable as `module_name`).

    `extra_path`: folders the child may import from after the temporary one (the module's own
    folder, for its sibling imports); shown read-only. Raises SandboxUnavailable where the tests
    cannot be isolated, unless `allow_network`."""
    iso = isolation()
    if not iso.available and not allow_network:
        raise SandboxUnavailable(refusal(iso))
    return _run(iso, module_name, module_source, test_source, test_module, timeout, coverage, per_test_timeout, extra_path or [])


def _run(iso: Isolation, module_name, module_source, test_source, test_module, timeout, coverage, per_test_timeout, extra_path) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="rotary-tests-") as tmp, tempfile.TemporaryFile() as report, tempfile.TemporaryFile() as output:
        for name, text in ((module_name, module_source), (test_module, test_source), ("_rotary_runner", RUNNER)):
            with open(os.path.join(tmp, name + ".py"), "w", encoding="utf-8") as f:
                f.write(text)
        config = {
            "module": module_name, "test_module": test_module, "per_test": per_test_timeout, "coverage": coverage,
            "path": [os.path.abspath(p) for p in extra_path], "report_fd": report.fileno(),
        }
        if iso.available:
            config["confine"] = {
                "writable": os.path.realpath(tmp),
                "readable": _interpreter_folders() + [os.path.realpath(p) for p in extra_path if os.path.isdir(p)],
                "masked": _masked(), "setpriv": iso.setpriv, "drop": DROP_PRIVILEGES,
            }
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1"}
        limits, preexec = _limits(int(timeout) + 1)
        proc = subprocess.Popen(
            [*limits, *iso.prefix, sys.executable, "-I", "_rotary_runner.py", json.dumps(config)],
            cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, pass_fds=(report.fileno(),),
            start_new_session=True, preexec_fn=preexec,
        )
        result = RunResult(network=iso.note if iso.available else UNISOLATED_NOTE)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            result.timed_out = True
        if result.timed_out or not iso.available:
            _kill(proc, iso.available)
        proc.wait()  # isolated: unshare returns once the kernel has killed the whole PID namespace
        output.seek(max(0, output.seek(0, os.SEEK_END) - 2000))
        result.output = output.read().decode("utf-8", "replace")
        report.seek(0)
        try:
            data = json.loads(report.read().decode("utf-8"))
        except ValueError:
            data = None
        if data is None:
            if not result.timed_out:
                result.load_error = f"the test process exited with code {proc.returncode} without a report"
            return result
        for name, (outcome, message) in data["results"].items():
            result.results[name] = outcome
            if message:
                result.messages[name] = message
        result.load_error = data.get("load_error", "")
        cov = data.get("coverage")
        if cov is not None:
            result.coverage = cov
            result.line_cov = (cov["statements"] - cov["missing"]) / cov["statements"] if cov["statements"] else 1.0
            result.branch_cov = (cov["branches"] - cov["missing_branches"]) / cov["branches"] if cov["branches"] else 1.0
        return result


def _interpreter_folders() -> list[str]:
    """What the runner's interpreter needs that lies in an emptied folder (a venv, or Python itself,
    under /tmp: a clone checked out there), shown again read-only."""
    masked = _masked()
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    return sorted(p for p in needed if any(p == q or p.startswith(q + os.sep) for q in masked))


def _masked() -> list[str]:
    """The folders emptied in the sandbox: MASKED and the temporary folder, outermost only."""
    found = {os.path.realpath(p) for p in (*MASKED, tempfile.gettempdir())}
    found = sorted(p for p in found if p != "/" and os.path.isdir(p))
    return [p for p in found if not any(p.startswith(q + os.sep) for q in found)]


def _kill(proc: subprocess.Popen, isolated: bool) -> None:
    """Kill what is left of a run. Isolated: PID 1 of its namespace, unshare's child (the kernel kills
    every other process in the namespace before PID 1 is gone, and unshare waits for it). Not isolated,
    or no child to be found: the process group (what left it in a new session is out of reach)."""
    children = []
    if isolated:
        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:  # gone already, or a kernel without CONFIG_PROC_CHILDREN
            pass
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if children:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
