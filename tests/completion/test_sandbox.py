"""Generated tests run in a sandbox: a subprocess in a temporary directory, with a timeout, without network."""

from __future__ import annotations

import os
import time

from rotary.completion.sandbox import network_isolation, run_tests

MODULE = "def sign(x):\n    if x > 0:\n        return 1\n    return 0\n"


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


def test_runs_in_a_temporary_directory_that_is_removed(tmp_path):
    marker = tmp_path / "where.txt"
    tests = (
        "import os\n"
        f"def test_where():\n    open({str(marker)!r}, 'w').write(os.getcwd())\n    open('left-behind.txt', 'w').write('x')\n"
    )
    result = run_tests("m", MODULE, tests)
    where = marker.read_text()
    assert result.results == {"test_where": "passed"}
    assert where != os.getcwd() and os.path.basename(where).startswith("rotary-tests-")
    assert not os.path.exists(where)  # the directory and what the test wrote there are gone
    assert not os.path.exists("left-behind.txt")


def test_a_hanging_test_file_is_killed_at_the_timeout():
    started = time.monotonic()
    result = run_tests("m", MODULE, "import time\ntime.sleep(60)\n", timeout=2)
    assert result.timed_out and result.results == {}
    assert time.monotonic() - started < 15


def test_a_hanging_test_fails_alone():
    tests = "def test_loop():\n    while True:\n        pass\n\ndef test_ok():\n    assert True\n"
    result = run_tests("m", MODULE, tests, per_test_timeout=1)
    assert result.results == {"test_loop": "error", "test_ok": "passed"}
    assert "TimeoutError" in result.messages["test_loop"]


def test_network_is_isolated_or_the_result_says_it_is_not():
    prefix, note = network_isolation()
    tests = "import socket\ndef test_net():\n    socket.create_connection(('127.0.0.1', 9), timeout=2)\n"
    result = run_tests("m", MODULE, tests)
    assert result.network == note
    if prefix:  # unshare -rn: even loopback is down in the new namespace
        assert note.startswith("isolated")
        assert result.results == {"test_net": "error"} and "Errno" in result.messages["test_net"]
    else:
        assert note.startswith("NOT isolated")


def test_a_test_file_that_does_not_import_is_reported():
    result = run_tests("m", MODULE, "def test_x(:\n    pass\n")
    assert result.results == {} and "SyntaxError" in result.load_error
