"""Generated tests run in a sandbox: a subprocess in a temporary directory, with a timeout, without network,
the filesystem read-only but that directory, in a PID namespace, results over a descriptor of their own.

The isolation tests below need the sandbox (user namespaces, or root); on a machine that cannot set it
up they are skipped with the reason, and `test_without_a_sandbox_...` checks the refusal there.
Each test marked "fails before" failed on the sandbox as it was before (subprocess + `unshare -rn`
only, results parsed from stdout), checked by running this file against that code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile

import pytest

from rotary.testgen import sandbox
from rotary.testgen.sandbox import run_tests
from rotary.completion.rpc.launch import python_command, rotary_command

MODULE = "def sign(x):\n    if x > 0:\n        return 1\n    return 0\n"

needs_sandbox = pytest.mark.skipif(not sandbox.isolation().available, reason=f"this machine cannot isolate: {sandbox.isolation().note}")


@pytest.fixture
def no_sandbox(monkeypatch):
    """The documented internal switch: the sandbox says it cannot isolate here."""
    monkeypatch.setenv("ROTARY_SANDBOX_UNAVAILABLE", "simulated by the test")


def test_outcomes_per_test_and_coverage():
    tests = (
        "from m import sign\n"
        "def test_pass():\n    assert sign(3) == 1\n"
        "def test_fail():\n    assert sign(3) == 2\n"
        "def test_error():\n    raise ValueError('boom')\n"
    )
    result = run_tests("m", MODULE, tests, coverage=True)
    assert result.results == {"test_pass": "passed", "test_fail": "failed", "test_error": "error"}
    assert "ValueError: boom" in result.messages["test_error"]
    assert result.passed == 1
    assert result.line_cov == 0.75 and result.branch_cov == 0.5  # `return 0` and the x <= 0 branch never ran


def test_runs_in_a_temporary_directory_that_is_removed():
    tests = "import os\ndef test_where():\n    open('left-behind.txt', 'w').write('x')\n    print('CWD=' + os.getcwd())\n"
    result = run_tests("m", MODULE, tests)
    assert result.results == {"test_where": "passed"}, result.messages
    where = result.output.split("CWD=")[1].split()[0]
    assert where != os.getcwd() and os.path.basename(where).startswith("rotary-tests-")
    assert not os.path.exists(where)  # the directory and what the test wrote there are gone
    assert not os.path.exists("left-behind.txt")


def test_a_hanging_test_file_is_killed_at_the_timeout():
    """The file sleeps for about a year: run_tests returns at all only because it killed it (a sandbox
    that waited would hold this test until pytest-timeout fails it)."""
    result = run_tests("m", MODULE, "import time\ntime.sleep(3e7)\n", timeout=2)
    assert result.timed_out and result.results == {}


def test_a_hanging_test_fails_alone():
    tests = "def test_loop():\n    while True:\n        pass\n\ndef test_ok():\n    assert True\n"
    result = run_tests("m", MODULE, tests, per_test_timeout=1)
    assert result.results == {"test_loop": "error", "test_ok": "passed"}
    assert "TimeoutError" in result.messages["test_loop"]


def test_a_test_gets_the_documented_resource_limits():
    """Generated code runs with at most MEMORY_LIMIT of address space, no core file and a CPU-time
    limit (its own limits, read from inside, and an allocation past the memory limit fails alone).
    Fails with no limits applied (checked: the 2 GiB allocation passes)."""
    tests = (
        "import resource\n"
        "def test_limits():\n"
        "    print('LIMITS', resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_CORE)[0],"
        " resource.getrlimit(resource.RLIMIT_CPU)[0])\n"
        f"def test_too_much_memory():\n    bytearray({sandbox.MEMORY_LIMIT})\n"
        "def test_ok():\n    assert True\n"
    )
    result = run_tests("m", MODULE, tests, timeout=30)
    assert result.results == {"test_limits": "passed", "test_too_much_memory": "error", "test_ok": "passed"}, result.messages
    assert "MemoryError" in result.messages["test_too_much_memory"]
    memory, core, cpu = (int(x) for x in result.output.split("LIMITS ")[1].split()[:3])
    assert memory == sandbox.MEMORY_LIMIT and core == 0 and 0 < cpu <= 31


def test_a_test_file_that_does_not_import_is_reported():
    result = run_tests("m", MODULE, "def test_x(:\n    pass\n")
    assert result.results == {} and "SyntaxError" in result.load_error


# -- network -------------------------------------------------------------------------------------------


def connect_to(port: int) -> str:
    return f"import socket\ndef test_net():\n    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"


@needs_sandbox
def test_a_listening_loopback_socket_cannot_be_reached():
    """A real server listens on 127.0.0.1 in this process; the sandboxed test's connection fails and
    the server sees nothing. (The old check connected to port 9, closed, and passed either way.)"""
    with socket.create_server(("127.0.0.1", 0)) as server:
        result = run_tests("m", MODULE, connect_to(server.getsockname()[1]))
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    assert result.network.startswith("isolated")
    assert result.results == {"test_net": "error"} and "Network is unreachable" in result.messages["test_net"]


def test_without_a_sandbox_generated_code_is_refused_before_it_runs(no_sandbox, tmp_path):
    """Fails before: where unshare was refused, the tests ran anyway, with network, and the note came after."""
    marker = tmp_path / "ran"
    with pytest.raises(sandbox.SandboxUnavailable) as refused:
        run_tests("m", MODULE, f"open({str(marker)!r}, 'w').write('ran')\n")
    assert "--allow-network" in str(refused.value) and "simulated by the test" in str(refused.value)
    assert not marker.exists()


def test_allow_network_runs_without_a_sandbox_and_says_so(no_sandbox):
    """The same real server is reached when the caller allows running without a sandbox: the check
    above can fail."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        result = run_tests("m", MODULE, connect_to(server.getsockname()[1]), allow_network=True)
        server.settimeout(5)
        server.accept()[0].close()  # the connection is there in the backlog
    assert result.results == {"test_net": "passed"}
    assert result.network.startswith("NOT isolated (--allow-network)")


# -- filesystem ------------------------------------------------------------------------------------------


@pytest.fixture
def outside():
    """A folder of this user's, outside /tmp (which the sandbox empties): the sandbox shows it read-only."""
    with tempfile.TemporaryDirectory(dir=os.path.expanduser("~"), prefix="rotary-sandbox-test-") as folder:
        yield folder


@needs_sandbox
def test_a_test_cannot_write_outside_its_directory(outside, tmp_path):
    """Fails before: the test wrote both files."""
    home, scratch = os.path.join(outside, "outside.txt"), str(tmp_path / "outside.txt")
    tests = (
        f"def test_home():\n    open({home!r}, 'w').write('x')\n"
        f"def test_tmp():\n    open({scratch!r}, 'w').write('x')\n"
    )
    result = run_tests("m", MODULE, tests)
    assert result.results == {"test_home": "error", "test_tmp": "error"}
    assert "Read-only file system" in result.messages["test_home"]
    assert "No such file or directory" in result.messages["test_tmp"]  # /tmp is empty in the sandbox
    assert not os.path.exists(home) and not os.path.exists(scratch)


@needs_sandbox
def test_a_test_cannot_remount_the_filesystem_writable(outside):
    """The tests run without capabilities: `mount -o remount,rw` is refused, and the write after it too.
    Fails before: as root, the remount succeeded (it was writable anyway) and so did the write."""
    target = os.path.join(outside, "outside.txt")
    tests = (
        "import subprocess\n"
        "def test_remount():\n"
        "    done = subprocess.run(['mount', '-o', 'remount,rw', '/'], capture_output=True, text=True)\n"
        "    print('MOUNT', done.returncode, done.stderr)\n"
        f"    open({target!r}, 'w').write('x')\n"
    )
    result = run_tests("m", MODULE, tests)
    assert "MOUNT " in result.output and "MOUNT 0" not in result.output
    assert result.results == {"test_remount": "error"} and "Read-only file system" in result.messages["test_remount"]
    assert not os.path.exists(target)


@needs_sandbox
def test_unix_sockets_in_tmp_cannot_be_reached(tmp_path):
    """/tmp (where a worker's socket lives), /run and the temporary folder are empty in the sandbox.
    Fails before: the test connected to this socket."""
    assert str(tmp_path).startswith(os.path.realpath(tempfile.gettempdir()) + "/")
    path = str(tmp_path / "worker.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        tests = f"import socket\ndef test_unix():\n    socket.socket(socket.AF_UNIX).connect({path!r})\n"
        result = run_tests("m", MODULE, tests)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.results == {"test_unix": "error"} and "FileNotFoundError" in result.messages["test_unix"]


@needs_sandbox
def test_the_module_folder_is_importable_read_only(tmp_path):
    """`extra_path` (the module's folder, for sibling imports) is shown, read-only, even under /tmp."""
    (tmp_path / "helper.py").write_text("VALUE = 7\n")
    tests = (
        "import helper\n"
        "def test_import():\n    assert helper.VALUE == 7\n"
        f"def test_write():\n    open({str(tmp_path / 'new.py')!r}, 'w')\n"
    )
    result = run_tests("m", MODULE, tests, extra_path=[str(tmp_path)])
    assert result.results == {"test_import": "passed", "test_write": "error"}
    assert not (tmp_path / "new.py").exists()


# -- processes --------------------------------------------------------------------------------------------


def fifo_is_held(fifo) -> bool:
    """Whether any process holds the FIFO open: a reader then waits; with none, it sees end-of-file."""
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.read(reader, 1)
        return False
    except BlockingIOError:
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb") as wake:
            wake.write(b"x")  # the holder reads it and exits: nothing is left behind when this test fails
        return True
    finally:
        os.close(reader)


@needs_sandbox
@pytest.mark.parametrize("ending", ["the run ends", "the timeout, the runner in a new session too"])
def test_a_setsid_child_does_not_outlive_the_run(tmp_path, ending):
    """A test starts a child in a new session that holds a FIFO open and waits on it. After the run a
    reader of the FIFO sees end-of-file only if no process holds it any more: an event, no sleep.
    Second case: the test also moves the runner itself into a new session and hangs, so the run ends
    at the timeout. Fails before (both): the child was alive, and this test then tells it to exit."""
    fifo = tmp_path / "held"
    os.mkfifo(fifo)
    timed_out = ending.startswith("the timeout")
    tests = (
        "import os, subprocess, sys, time\n"
        "def test_spawn():\n"
        f"    fd = os.open({str(fifo)!r}, os.O_RDWR)\n"
        "    subprocess.Popen([sys.executable, '-c', 'import os; os.read(3, 1)'], pass_fds=(fd,), start_new_session=True,\n"
        "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        + ("    try:\n        os.setsid()\n    except PermissionError:\n        pass  # a session leader already\n    time.sleep(60)\n" if timed_out else "")
    )
    result = run_tests("m", MODULE, tests, extra_path=[str(tmp_path)], timeout=3, per_test_timeout=60)
    assert not fifo_is_held(fifo), "the setsid child outlived the run"
    if timed_out:
        assert result.timed_out and result.results == {}
    else:
        assert result.results == {"test_spawn": "passed"}, result.messages


# -- the report --------------------------------------------------------------------------------------------


def test_a_printed_fake_report_does_not_replace_the_results():
    """Fails before: the last JSON line of stdout was taken as the report, so this file 'passed' twice."""
    fake = json.dumps({"results": {"test_fake": ["passed", ""], "test_ghost": ["passed", ""]}, "load_error": ""})
    tests = f"import os, sys\ndef test_fake():\n    print({fake!r})\n    sys.stdout.flush()\n    os._exit(0)\n"
    result = run_tests("m", MODULE, tests)
    assert result.results == {} and result.passed == 0
    assert "without a report" in result.load_error
    assert fake in result.output  # it was printed, and only shown as output


def test_printed_json_beside_real_results_is_output_only():
    tests = "def test_a():\n    print('{\"results\": {}, \"load_error\": \"\"}')\n\ndef test_b():\n    assert False\n"
    result = run_tests("m", MODULE, tests)
    assert result.results == {"test_a": "passed", "test_b": "failed"}


# -- the command line -------------------------------------------------------------------------------------


CLAMP = "def clamp(value, low, high):\n    return max(low, min(value, high))\n"


def rotary(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        rotary_command("--log-level", "warning", *args),
        check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_cli_check_refuses_without_a_sandbox_before_generating(tmp_path):
    """`rotary tests --check` says so and exits 2 before any worker starts; nothing is written.
    Fails before: there was no refusal (the tests were generated and run with network)."""
    (tmp_path / "clamp.py").write_text(CLAMP)
    out = rotary("tests", f"{tmp_path / 'clamp.py'}::clamp", "-n", "1", "--check", env={"ROTARY_SANDBOX_UNAVAILABLE": "simulated"}, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--allow-network" in out.stderr and "simulated" in out.stderr
    assert "[worker]" not in out.stderr and "[1/1]" not in out.stderr  # nothing started, nothing generated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clamp.py"]


def test_bench_tests_refuses_without_a_sandbox_before_loading_the_model():
    out = rotary("bench", "tests", "--quick", "--limit", "1", env={"ROTARY_SANDBOX_UNAVAILABLE": "simulated"}, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--allow-network" in out.stderr and "simulated" in out.stderr
    assert "verify cost" not in out.stderr  # the model was never loaded


@pytest.mark.model
def test_cli_check_with_allow_network_warns_before_running(tmp_path):
    """With --allow-network the warning comes first, before the tests are generated, and the
    check's line says the run was not isolated."""
    (tmp_path / "clamp.py").write_text(CLAMP)
    out = rotary(
        "tests", f"{tmp_path / 'clamp.py'}::clamp", "-n", "1", "--max-tokens", "32", "--check", "--allow-network",
        env={"ROTARY_SANDBOX_UNAVAILABLE": "simulated"},
    )
    assert out.returncode == 0, out.stderr
    warning = out.stderr.index("warning: no sandbox can be set up here (ROTARY_SANDBOX_UNAVAILABLE is set (simulated))")
    assert warning < out.stderr.index("[1/1]")
    assert "--check: NOT isolated (--allow-network)" in out.stdout and " of 1 passed" in out.stdout


@needs_sandbox
def test_an_interpreter_inside_an_emptied_folder_still_runs_the_tests():
    """The sandbox empties /tmp; a venv (or a clone) under /tmp is what CI and users may have. The
    interpreter's folders are shown again, read-only. Failed before: every outcome was an error,
    because the venv's python was gone inside the sandbox (found by `make test` in a clone under /tmp)."""
    import site

    with tempfile.TemporaryDirectory(dir=tempfile.gettempdir()) as folder:
        venv = os.path.join(folder, "venv")
        subprocess.run(python_command("-m", "venv", "--without-pip", venv), check=True)
        purelib = subprocess.run([os.path.join(venv, "bin", "python"), "-P", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(purelib, "outer.pth"), "w") as f:  # this venv's packages (rotary, coverage) as well
            f.write("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
        code = ("from rotary.testgen.sandbox import run_tests\n"
                "r = run_tests('m', 'def sign(x):\\n    return (x > 0) - (x < 0)\\n',"
                " 'from m import sign\\n\\ndef test_sign():\\n    assert sign(-3) == -1\\n')\n"
                "print(r.results, r.load_error, r.output[-500:])")
        out = subprocess.run([os.path.join(venv, "bin", "python"), "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("{'test_sign': 'passed'}"), out.stdout
