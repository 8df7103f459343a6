"""Progress on the console for the phases that can take a while before the first step: building
the corpus, training the tokenizer, restoring a checkpoint, compiling.

Two forms, both on stdout (stderr is kept for errors and warnings) and both silent for a phase
shorter than a few seconds:
  * `bar`: the total is known (documents, characters): a tqdm bar with count, rate and ETA,
    e.g. `corpus stdlib-py311-9559f84936f4:  41%|####1     | 307/750 [00:04<00:06, 71.2 doc/s]`.
  * `ticker`: the total is not known (a compile, an Orbax restore, SentencePiece's merges): a line
    `still compiling the train step (15 s)` after 5 s, then every 10 s.
The caller prints the one-line result (e.g. `compiled the train step in 21.3s`) itself.

Only process 0 of a multi-host run prints. This module sits below everything else in llmjax (it
imports no other part of it), so the data layer can use it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

DELAY_S = 5.0  # a phase shorter than this prints nothing; a bar on a non-terminal (a log file,
# a notebook cell) updates this often, so a log gets a few updates, not hundreds
EVERY_S = 10.0  # a ticker repeats this often


def is_main() -> bool:
    """Process 0 of a multi-host run (a process that has not started JAX counts as process 0)."""
    if "jax" not in sys.modules:
        return True
    import jax
    return jax.process_index() == 0


def bar(iterable=None, *, total: int | None, desc: str, unit: str = "it",
        unit_scale: bool = False):
    """A tqdm bar on stdout that appears only once the phase has run for DELAY_S seconds.

    Use as tqdm: wrap an iterable, or `with bar(...) as b: b.update(n)`."""
    from tqdm import tqdm
    tty = sys.stdout.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
               file=sys.stdout, delay=DELAY_S, mininterval=0.5 if tty else DELAY_S,
               ascii=not tty, disable=not is_main(), dynamic_ncols=True)


@contextlib.contextmanager
def ticker(doing: str, *, first_s: float | None = None, every_s: float | None = None,
           stream=None):
    """Prints `still <doing> (N s)` to `stream` (stdout; stderr where stdout is a command's
    output, as generate's) after `first_s` (DELAY_S) seconds, then every `every_s` (EVERY_S)
    seconds, until the block ends: for phases of unpredictable length."""
    if not is_main():
        yield
        return
    first_s = DELAY_S if first_s is None else first_s
    every_s = EVERY_S if every_s is None else every_s
    stop = threading.Event()
    start = time.perf_counter()

    def tick():
        wait = first_s
        while not stop.wait(wait):
            print(f"still {doing} ({time.perf_counter() - start:.0f} s)",
                  file=stream or sys.stdout, flush=True)
            wait = every_s

    thread = threading.Thread(target=tick, name="llmjax-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
