"""The parent of a multi-host trainer (llmjax/supervise.py) with stand-in children: an abort
caused by a lost peer becomes one line and exit status 4, any other crash passes through whole,
exit statuses and SIGTERM go through."""

import signal
import subprocess
import sys
import textwrap

from llmjax import multihost

# What the coordination client prints in a process whose coordinator died, then aborts.
JAX_ABORT = textwrap.dedent("""
    import os, sys, time
    from llmjax import supervise
    supervise.report_to_parent(1, 2, 8.0)
    print("step 1/9 | loss 3.2", flush=True)
    # One write, as the C++ logger emits these lines within microseconds of each other.
    sys.stderr.write("W1202 17:27:02.307713    8169 preemption_sync_manager.cc:147] Failed to retrieve preemption notice: UNAVAILABLE: Socket closed\\n"
                     "F1202 17:27:02.307831    8169 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died\\n"
                     "*** Check failure stack trace: ***\\n    @     0x7f5d18240634  absl::LogMessage::SendToLog()\\n")
    sys.stderr.flush()
    os.abort()
""")
OTHER_ABORT = textwrap.dedent("""
    import os, sys
    sys.stderr.write("F1202 17:27:02.307831    8169 foo.cc:80] Check failed: x == y\\n")
    sys.stderr.write("*** Check failure stack trace: ***\\n")
    sys.stderr.flush()
    os.abort()
""")
LOGS_THEN_EXIT = textwrap.dedent("""
    import sys
    sys.stderr.write("I1202 17:27:02.307831    8169 distributed.py:172] Connecting\\n")
    sys.stderr.write("error: data.files matches nothing.\\n")
    sys.exit(2)
""")
WAITS_FOR_TERM = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: (sys.stderr.write("got SIGTERM\\n"), sys.exit(0)))
    sys.stderr.write("ready\\n"); sys.stderr.flush()
    time.sleep(60)
    sys.exit(1)
""")


def supervise(script, tmp_path, after=None):
    """Runs llmjax.supervise.run over `script` in a parent process; returns (status, stdout,
    stderr). `after`: called with the parent once it is running."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys; from llmjax import supervise; "
         f"sys.exit(supervise.run([sys.executable, '-c', {script!r}]))"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if after:
        after(parent)
    out, err = parent.communicate(timeout=60)
    return parent.returncode, out, err


def test_an_abort_from_a_lost_coordinator_is_one_line(tmp_path):
    code, out, err = supervise(JAX_ABORT, tmp_path)
    assert code == multihost.EXIT_LOST_PROCESS
    assert out == "step 1/9 | loss 3.2\n"
    assert err.splitlines() == [err.strip()], err  # one line: no C++ log, no stack trace
    assert err.startswith("error: process 1 lost the coordinator, process 0")
    assert "Start every process again with the same command" in err


def test_any_other_crash_passes_through_whole(tmp_path):
    code, _, err = supervise(OTHER_ABORT, tmp_path)
    assert code == 128 + signal.SIGABRT
    assert "Check failed: x == y" in err and "stack trace" in err and "error:" not in err


def test_exit_status_and_log_lines_pass_through(tmp_path):
    code, _, err = supervise(LOGS_THEN_EXIT, tmp_path)
    assert code == 2
    assert err.splitlines() == ["I1202 17:27:02.307831    8169 distributed.py:172] Connecting",
                                "error: data.files matches nothing."]


def test_sigterm_reaches_the_child(tmp_path):
    def term(parent):
        assert parent.stderr.readline() == "ready\n"  # the child is up and has set its handler
        parent.send_signal(signal.SIGTERM)
    code, _, err = supervise(WAITS_FOR_TERM, tmp_path, after=term)
    assert code == 0 and "got SIGTERM" in err, err
