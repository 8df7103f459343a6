"""The lost-process watchdog (llmjax/multihost.py) against an in-memory key-value store: who is
reported lost, when, and what a finished process is. tests/test_multiprocess.py hangs a real
process of a two-process run."""

import threading
import time

import pytest

from llmjax import multihost


class Store:
    """The coordination service's key-value calls the watchdog uses; `hang` blocks every call."""

    def __init__(self):
        self.data, self.hang = {}, threading.Event()

    def _wait(self):
        while self.hang.is_set():
            time.sleep(0.05)

    def key_value_set(self, key, value, allow_overwrite=False):
        self._wait()
        self.data[key] = value

    def key_value_try_get(self, key):
        self._wait()
        if key not in self.data:
            raise RuntimeError(f"NOT_FOUND: {key}")
        return self.data[key]

    def key_value_dir_get(self, prefix):
        self._wait()
        return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


def watch(store, pid, n=3, timeout_s=1.0):
    """A watchdog whose stop() records its verdict instead of exiting the process."""
    dog = multihost.Watchdog(store, pid, n, timeout_s)
    verdicts = []

    def stop(lost, reason=""):
        if dog.active:
            verdicts.append((lost, reason, time.monotonic()))
            dog.active = False
    dog.stop = stop
    dog.start()
    return dog, verdicts


def beat(store, pids, seconds):
    """Other processes beating for `seconds`."""
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        for p in pids:
            store.key_value_set(f"llmjax/alive/{p}", str(i), allow_overwrite=True)
        i += 1
        time.sleep(0.1)


def test_process_zero_reports_the_silent_process_within_the_bound():
    store = Store()
    dog, verdicts = watch(store, 0)
    start = time.monotonic()
    beat(store, [1, 2], 1.5)  # both alive for longer than the timeout
    assert not verdicts
    silent_from = time.monotonic()
    beat(store, [1], 3)  # process 2 goes silent
    assert verdicts and verdicts[0][0] == [2], verdicts
    # Not before the timeout counted from the last beat the watchdog saw (up to a beat and a poll
    # before `silent_from`), not after the bound (+ slack for a busy machine).
    assert 1.0 - 0.1 - dog.interval_s - 0.1 <= verdicts[0][2] - silent_from <= 1.0 * 4 / 3 + 1.5
    assert store.data["llmjax/lost"] == "2"  # the mark every other process reads
    assert time.monotonic() - start < 10


def test_other_processes_read_the_mark_and_watch_process_zero():
    store = Store()
    dog, verdicts = watch(store, 1)
    beat(store, [0], 0.5)
    store.key_value_set("llmjax/lost", "2")
    beat(store, [0], 0.5)
    assert verdicts and verdicts[0][0] == [2]
    store2 = Store()
    dog, verdicts = watch(store2, 1)
    beat(store2, [0], 0.5)  # then process 0 stops beating (its service still answers)
    time.sleep(1.8)
    assert verdicts and verdicts[0][0] is None and "no heartbeat" in verdicts[0][1]


def test_a_store_that_stops_answering_is_a_lost_coordinator():
    store = Store()
    dog, verdicts = watch(store, 2)
    beat(store, [0], 0.5)
    store.hang.set()  # process 0 stopped: every call blocks
    time.sleep(1.8)
    store.hang.clear()
    assert verdicts and verdicts[0][0] is None and "no answer from it" in verdicts[0][1]


def test_a_finished_process_is_not_lost():
    store = Store()
    dog, verdicts = watch(store, 0, n=2)
    beat(store, [1], 0.5)
    store.key_value_set("llmjax/done/1", "1")  # process 1 ended its run normally
    time.sleep(1.8)
    assert not verdicts
    dog.active = False


@pytest.mark.parametrize("lost, reason, expected", [
    ([1], "", "error: process 1 of 4 stopped answering for 60 s (died or hung), so this process (0)"),
    ([1, 3], "", "error: processes 1, 3 of 4 stopped answering"),
    (None, "no answer from it for 60 s", "error: process 2 lost the coordinator, process 0 (no answer"),
])
def test_the_line(lost, reason, expected):
    line = multihost.lost_line(lost, 0 if lost else 2, 4, 60, reason)
    assert line.startswith(expected) and "\n" not in line
    assert line.endswith("Start every process again with the same command: the run resumes from "
                         "the newest checkpoint all of them finished.")
