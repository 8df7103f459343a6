"""Preemption notices: SIGTERM (what TPU VMs, GKE and SLURM send before evicting a job).

The loop asks `reached(step)` after every step; when it says True the loop saves a checkpoint at
that step boundary and exits 0, so no finished step is lost.

- One process: a SIGTERM handler only sets a flag (a handler must not touch JAX); the next step
  boundary sees it.
- Several processes: JAX's preemption sync manager (started by `jax.distributed.initialize`, which
  listens for SIGTERM itself) agrees on one step at which every host saves together:
  `multihost_utils.reached_preemption_sync_point`. A host that saved alone would leave a
  checkpoint the others never wrote.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    def __init__(self):
        self.multihost = jax.process_count() > 1
        self.received: int | None = None
        self._previous = None
        # Python can install handlers only from the main thread; elsewhere (a notebook's worker
        # thread) SIGTERM keeps its default meaning.
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def reached(self, step: int) -> bool:
        if self.multihost:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
