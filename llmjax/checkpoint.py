"""Orbax checkpoints of a run: train state, data-iterator state and the resolved config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Saves are asynchronous (the arrays are
copied off the devices, then written in the background) and atomic (Orbax writes into a temporary
directory and renames it when complete), so the newest *complete* step is always restorable.
Restoring takes abstract arrays that carry the current mesh's shardings, so a run saved on one
mesh shape resumes on another.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath


class _IteratorSnapshot:
    """The data iterator's state taken at save time.

    An async save writes after the loop has moved on; handing Grain's handler a frozen copy makes
    the saved position the one that matches the saved train state. Grain's handler writes one file
    per process, which is what multi-host data sharding needs.
    """

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
        # Orbax's array writer needs an absolute path; remote paths (gs://...) already are.
        local = "://" not in str(workdir)
        self.directory = epath.Path(os.path.abspath(workdir) if local else workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator)),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """Restores the train state onto the shardings in `abstract_state` and moves the data
        iterator to its saved position (in place). Returns the restored train state."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        restored = self.manager.restore(step, args=args)
        logging.info("restored checkpoint at step %d from %s", step, self.directory)
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

