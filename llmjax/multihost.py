"""JAX's multi-controller runtime, started so that a lost process ends the others in bounded time.

Left alone, when one process of a run dies the others wait in their next collective until JAX's
coordination service misses its heartbeats (100 s by default), then JAX aborts them with a fatal
C++ log and a stack dump; a process that hangs (stopped, swapping, a stuck filesystem) is not
noticed at all until that timeout either. llmjax adds a watchdog thread per process, with its own
heartbeat through the coordination service's key-value store:

- every process bumps a counter `llmjax/alive/<id>` every `timeout_s / 6` seconds;
- process 0 watches every counter; one that has not moved for `timeout_s` marks its process lost
  (`llmjax/lost`), and every process that reads the mark, process 0 included, prints one line
  naming the lost process(es) and how to resume, and exits with EXIT_LOST_PROCESS;
- the other processes watch process 0's counter and the store itself: when process 0 (which runs
  the coordination service) stops or cannot be reached, they print one line and exit the same way.

So the others stop at most `timeout_s` plus two beats (`timeout_s * 4/3`) after a process died or
hung, and JAX's own heartbeat timeout is set above that so its abort never comes first. A
collective that fails at once (a peer's socket closes) is handed to the watchdog too (see
`explain_failure`), so the line names the lost process rather than a gloo/NCCL error. The two
aborts no code in the process can catch (JAX's own when process 0 dies, gloo's on a closed socket)
are turned into the same line by the process's parent, llmjax/supervise.py. Restarting
every process with the same command resumes from the newest checkpoint: orbax finalises a step
only once every process has written its part.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_LOST_PROCESS = 4
DEFAULT_TIMEOUT_S = 60
_PREFIX = "llmjax/alive/"
_DONE_PREFIX = "llmjax/done/"
_LOST_KEY = "llmjax/lost"

_watchdog: "Watchdog | None" = None
_stopping = threading.Lock()


def initialize(coordinator_address=None, num_processes=None, process_id=None, *,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """`jax.distributed.initialize` (what it cannot detect from SLURM, a TPU VM or the JAX_*
    environment must be given), then the lost-process watchdog (for more than one process)."""
    import jax
    from jax._src import distributed

    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=int(timeout_s * 2) + 30)
    from llmjax import supervise
    supervise.report_to_parent(jax.process_index(), jax.process_count(), timeout_s)
    if jax.process_count() > 1:
        global _watchdog
        _watchdog = Watchdog(distributed.global_state.client, jax.process_index(),
                             jax.process_count(), timeout_s)
        _watchdog.start()


def lost_line(lost: list[int] | None, process_id: int, num_processes: int, timeout_s: float,
              reason: str = "") -> str:
    if lost:
        who = ("process " if len(lost) == 1 else "processes ") + ", ".join(map(str, lost))
        what = (f"{who} of {num_processes} stopped answering for {timeout_s:g} s (died or hung), "
                f"so this process ({process_id}) stops too")
    else:
        what = (f"process {process_id} lost the coordinator, process 0 "
                f"({reason or 'no heartbeat'}), so it stops too")
    return (f"error: {what}. Start every process again with the same command: the run resumes "
            f"from the newest checkpoint all of them finished.")


class Watchdog(threading.Thread):
    """The heartbeat described in the module docstring (a daemon thread)."""

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
        super().__init__(name="llmjax-watchdog", daemon=True)
        self.client, self.pid, self.n, self.timeout_s = client, process_id, num_processes, timeout_s
        self.interval_s = max(0.2, timeout_s / 6)
        self.active = True

    def run(self):
        beat = 0
        now = time.monotonic()
        seen = {p: ("", now) for p in range(self.n)}  # process -> (last counter, when it moved)
        self.answered = now  # when the store last answered a whole round
        threading.Thread(target=self._watch_store, name="llmjax-watchdog-store", daemon=True).start()
        while self.active:
            try:
                self.client.key_value_set(f"{_PREFIX}{self.pid}", str(beat), allow_overwrite=True)
                beat += 1
                if self.pid == 0:
                    self._watch_all(seen)
                else:
                    self._watch_coordinator(seen)
            except Exception as e:  # pylint: disable=broad-except
                if not self.active:  # finished meanwhile: the store may be shutting down
                    return
                # The store lives in process 0: a failing call means it is gone or unreachable.
                reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
                self.stop(None, reason)
            self.answered = time.monotonic()
            time.sleep(self.interval_s)

    def _watch_store(self):
        """A call into a stopped or unreachable process 0 can block for minutes: this second thread
        notices a round that has not come back within the timeout."""
        while self.active:
            time.sleep(self.interval_s)
            if time.monotonic() - self.answered > self.timeout_s:
                self.stop(None, f"no answer from it for {self.timeout_s:g} s")

    def _watch_all(self, seen):
        now = time.monotonic()
        counters = dict(self.client.key_value_dir_get(_PREFIX))
        done = {int(k[len(_DONE_PREFIX):]) for k, _ in self.client.key_value_dir_get(_DONE_PREFIX)}
        for p in range(1, self.n):
            value = counters.get(f"{_PREFIX}{p}", "")
            if value != seen[p][0]:
                seen[p] = (value, now)
        lost = [p for p in range(1, self.n) if now - seen[p][1] > self.timeout_s and p not in done]
        if lost:
            self.client.key_value_set(_LOST_KEY, ",".join(map(str, lost)), allow_overwrite=True)
            self.stop(lost)

    def _watch_coordinator(self, seen):
        now = time.monotonic()
        lost = self._lost_mark()
        if lost:
            self.stop(lost)
        if self._try_get(f"{_DONE_PREFIX}0") is not None:
            return  # process 0 finished its run and stops beating
        value = self._try_get(f"{_PREFIX}0") or ""
        if value != seen[0][0]:
            seen[0] = (value, now)
        if now - seen[0][1] > self.timeout_s:
            self.stop(None, f"no heartbeat for {self.timeout_s:g} s")

    def _lost_mark(self) -> list[int]:
        return [int(p) for p in (self._try_get(_LOST_KEY) or "").split(",") if p]

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:  # pylint: disable=broad-except
            if "NOT_FOUND" in str(e):
                return None
            raise

    def stop(self, lost, reason: str = ""):
        if not self.active or not _stopping.acquire(blocking=False):
            return  # finished, or the other watchdog thread is already saying it
        print(lost_line(lost, self.pid, self.n, self.timeout_s, reason), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: the main thread may sit in a collective that never returns, and JAX's
        # exit handler would wait at a shutdown barrier for the lost process.
        os._exit(EXIT_LOST_PROCESS)  # pylint: disable=protected-access


def finish() -> None:
    """This process ended its run normally: it stops beating and is not reported as lost."""
    if _watchdog is not None and _watchdog.active:
        _watchdog.active = False
        _watchdog.client.key_value_set(f"{_DONE_PREFIX}{_watchdog.pid}", "1", allow_overwrite=True)


def abandon() -> None:
    """This process is stopping on an error: it stops beating, so if the others go on without it
    they report it lost within the bound instead of waiting for it in a collective."""
    if _watchdog is not None:
        _watchdog.active = False


def explain_failure(error: BaseException) -> None:
    """Called with an unexpected error in a multi-process run: if a lost process is behind it (a
    collective that failed because a peer went away), waits for the watchdog to say which one and
    exit; returns (for the caller to re-raise) if everybody is still there after the bound."""
    if _watchdog is None or not _watchdog.active:
        return
    deadline = time.monotonic() + _watchdog.timeout_s + 3 * _watchdog.interval_s
    while time.monotonic() < deadline:  # the watchdog exits the process if someone is lost
        time.sleep(_watchdog.interval_s)
