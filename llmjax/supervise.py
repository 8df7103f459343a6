"""A small parent for each process of a multi-host run, so that losing a peer is one line.

When process 0 of a run dies, the coordination-service client in every other process polls the
error and aborts its process within a second (a C++ `LOG(FATAL)`, a check-failure stack trace and
Python's fault-handler dump of every thread), before llmjax's watchdog (llmjax/multihost.py) can
say anything; gloo, XLA's CPU collectives, may also `std::terminate` a process whose peer's socket
closes in the middle of a collective. Neither can be caught inside the process: the client's
missed-heartbeat callback is the only hook, and it is C++ that aborts before any Python runs.

So `python -m llmjax.main --distributed ...` (or with --coordinator_address) runs the trainer as a
child of this parent, which
- leaves the child's stdout alone (inherited) and passes its stderr through line by line, holding
  C++ log lines back for `HOLD_S` seconds in case they turn out to be the start of such an abort;
- once the child prints the start of a fatal abort, keeps everything that follows; if the child
  then dies of a signal and what it printed says a peer or the coordination service went away,
  prints the watchdog's one line (naming process 0 when that is what the child lost) and exits
  with EXIT_LOST_PROCESS; any other crash is passed through whole;
- forwards SIGTERM (preemption) to the child (Ctrl-C reaches the child itself: they share the
  process group) and exits with the child's status;
- has the kernel kill the child if the parent itself is killed (PR_SET_PDEATHSIG), so nothing
  keeps running, or holding the accelerator, after its launcher is gone.

The child tells the parent its process index, the process count and the watchdog timeout through
a pipe (LLMJAX_SUPERVISOR_FD), since JAX may have found them in the cluster's environment.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

ENV_CHILD = "LLMJAX_SUPERVISED"
ENV_FD = "LLMJAX_SUPERVISOR_FD"
HOLD_S = 2.0
# A C++ (glog/absl) log line: severity, date, time, thread, file:line].
_CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [\w.\-]+:\d+\]")
# The first line of an abort that may be the loss of a peer.
_FATAL_START = ("Terminating process because the JAX distributed service detected fatal errors",
                "terminate called after throwing an instance of", "Fatal Python error: Aborted",
                "*** Check failure stack trace: ***")
# What an abort prints when its cause was a peer or the coordination service going away.
_PEER_LOST = ("JAX distributed service detected fatal errors", "gloo::IoException",
              "Connection reset by peer", "Connection closed by peer", "Socket closed")


def should_supervise(distributed: bool) -> bool:
    return distributed and os.environ.get(ENV_CHILD) != "1"


def report_to_parent(process_id: int, num_processes: int, timeout_s: float) -> None:
    """Called by the child once jax.distributed is up: who it is, for the parent's line."""
    fd = os.environ.pop(ENV_FD, None)
    if fd is None:
        return
    try:
        with os.fdopen(int(fd), "w") as f:
            f.write(f"{process_id} {num_processes} {timeout_s}\n")
    except OSError:
        pass  # the parent is gone; PR_SET_PDEATHSIG ends this process


def _die_with_parent():
    """In the child, before exec: SIGKILL when the parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run(command: list[str] | None = None) -> int:
    """Runs `command` (default: this same command) as a supervised child; returns the exit status
    to exit with."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{ENV_CHILD: "1", ENV_FD: str(write_fd)})
    # sys.orig_argv: the interpreter's own arguments too (-m llmjax.main, -u, -X ...).
    command = command or [sys.executable, *sys.orig_argv[1:]]
    child = subprocess.Popen(command, env=env, pass_fds=(write_fd,),
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    os.close(write_fd)
    signal.signal(signal.SIGTERM, lambda s, _frame: child.send_signal(s))
    # Ctrl-C reaches the child directly (same process group); forwarding it would deliver it twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    who: list[str] = []
    reader = threading.Thread(target=lambda: who.extend(os.fdopen(read_fd).read().split()),
                              daemon=True)
    reader.start()
    lines: queue.Queue = queue.Queue()

    def pump():
        for raw in child.stderr:
            lines.put(raw.decode("utf-8", "replace"))
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()

    held: list[str] = []  # C++ log lines (and what follows them) not yet passed on
    held_since = 0.0
    aborting = False
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            if not aborting and any(s in line for s in _FATAL_START):
                aborting = True
            if aborting or held or _CPP_LOG.match(line):
                if not held:
                    held_since = time.monotonic()
                held.append(line)
            else:
                _write(line)
        if held and not aborting and time.monotonic() - held_since > HOLD_S:
            _write("".join(held))
            held = []
    code = child.wait()
    reader.join(timeout=5)  # the pipe is closed once the child is gone
    text = "".join(held)
    if code < 0 and aborting and any(s in text for s in _PEER_LOST):
        print(_lost_line(who, text), file=sys.stderr, flush=True)
        from llmjax.multihost import EXIT_LOST_PROCESS
        return EXIT_LOST_PROCESS
    _write(text)
    return code if code >= 0 else 128 - code


def _write(text: str):
    sys.stderr.write(text)
    sys.stderr.flush()


def _lost_line(who: list[str], text: str) -> str:
    from llmjax.multihost import lost_line
    pid, n, timeout_s = (int(who[0]), int(who[1]), float(who[2])) if len(who) == 3 else (-1, 0, 0.0)
    service = "JAX distributed service" in text
    if pid > 0 and service:  # the coordination service lives in process 0
        return lost_line(None, pid, n, timeout_s, "its coordination service went away")
    what = "its coordination service reported a fatal error" if service else \
        "a collective's connection to it closed"
    me = f"this process ({pid})" if pid >= 0 else "this process"
    return (f"error: another process of the run stopped ({what}), so {me} stops too. Start every "
            f"process again with the same command: the run resumes from the newest checkpoint "
            f"all of them finished.")
