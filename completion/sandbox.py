"""Running generated tests: in a subprocess, in a temporary directory, with a timeout, without network.

Only `rotary tests --check` and `rotary bench tests` run generated code; the worker and the
daemon never do (they generate text). Each run:
- copies the module under test and the test file into a fresh temporary directory, which is the
  child's working directory and HOME, and is deleted afterwards;
- starts a new Python process (`-I`: no user site, no PYTHON* variables) in its own session,
  under `unshare -rn` (a new network namespace with no interfaces: no network) when the kernel
  allows it, else without network isolation, which the result says (`network`);
- limits its address space (2 GiB) and its CPU time, and kills its whole process group when the
  wall-clock timeout passes;
- runs each `test_*` function on its own (a failure or an error in one does not stop the others),
  optionally under coverage.py (line and branch coverage of the module under test, its import
  lines excluded as TestEval does).
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

# The child: import the test module, run each test function, report JSON on its own last line.
RUNNER = r'''
import json, os, signal, sys, traceback
module_name, test_module, per_test, want_coverage = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
sys.path[:0] = [os.getcwd()] + [p for p in sys.argv[5].split(os.pathsep) if p]
cov = None
if want_coverage:
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
sys.stdout.write("\n" + json.dumps(report) + "\n")
sys.stdout.flush()
os._exit(0)
'''


@dataclass
class RunResult:
    results: dict[str, str] = field(default_factory=dict)  # test name -> passed / failed / error
    messages: dict[str, str] = field(default_factory=dict)
    load_error: str = ""  # the test file could not be imported (every test then counts as not passed)
    timed_out: bool = False
    network: str = ""  # "isolated (unshare -rn)" or why it is not
    line_cov: float | None = None
    branch_cov: float | None = None
    coverage: dict | None = None
    output: str = ""  # the child's stdout/stderr tail, for diagnosis

    @property
    def passed(self) -> int:
        return sum(1 for r in self.results.values() if r == "passed")


@lru_cache(maxsize=1)
def network_isolation() -> tuple[list[str], str]:
    """The command prefix that takes the network away, and a note saying what it is."""
    unshare = shutil.which("unshare")
    if unshare:
        try:
            probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
            if probe.returncode == 0:
                return [unshare, "-rn"], "isolated (unshare -rn: no network)"
            reason = probe.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]
            return [], f"NOT isolated: unshare -rn failed ({reason[0]})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [], f"NOT isolated: unshare -rn failed ({exc})"
    return [], "NOT isolated: unshare is not available"


def _limits(cpu_seconds: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_tests(
    module_name: str,
    module_source: str,
    test_source: str,
    test_module: str = "test_generated",
    timeout: float = DEFAULT_TIMEOUT_S,
    coverage: bool = False,
    per_test_timeout: int = PER_TEST_TIMEOUT_S,
    extra_path: list[str] | None = None,
) -> RunResult:
    """Run the test functions of `test_source` against `module_source` (importable as `module_name`).

    `extra_path`: folders the child may import from after the temporary one (the module's own
    folder, for its sibling imports); nothing is written there."""
    prefix, note = network_isolation()
    with tempfile.TemporaryDirectory(prefix="rotary-tests-") as tmp:
        with open(os.path.join(tmp, module_name + ".py"), "w", encoding="utf-8") as f:
            f.write(module_source)
        with open(os.path.join(tmp, test_module + ".py"), "w", encoding="utf-8") as f:
            f.write(test_source)
        with open(os.path.join(tmp, "_rotary_runner.py"), "w", encoding="utf-8") as f:
            f.write(RUNNER)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [*prefix, sys.executable, "-I", "_rotary_runner.py", module_name, test_module, str(per_test_timeout), "1" if coverage else "0",
               os.pathsep.join(extra_path or [])]
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_limits(int(timeout) + 1),
        )
        result = RunResult(network=note)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            result.timed_out = True
        text = out.decode("utf-8", "replace")
        result.output = text[-2000:]
        report = _last_json(text)
        if report is None:
            if not result.timed_out:
                result.load_error = f"the test process exited with code {proc.returncode} without a report"
            return result
        for name, (outcome, message) in report["results"].items():
            result.results[name] = outcome
            if message:
                result.messages[name] = message
        result.load_error = report.get("load_error", "")
        cov = report.get("coverage")
        if cov is not None:
            result.coverage = cov
            result.line_cov = (cov["statements"] - cov["missing"]) / cov["statements"] if cov["statements"] else 1.0
            result.branch_cov = (cov["branches"] - cov["missing_branches"]) / cov["branches"] if cov["branches"] else 1.0
        return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None
