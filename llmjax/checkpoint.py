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
        """`data_iterator` may be None (a converted or exported checkpoint has no data position)."""
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        """Restores the train state onto the shardings in `abstract_state` and moves the data
        iterator to its saved position (in place; skipped when None). Returns the train state."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        args = ocp.args.Composite(**items)
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



def resolve(path: str) -> tuple[epath.Path, int]:
    """A workdir, its checkpoints/ folder, or one step's folder -> (checkpoints folder, step).

    A workdir or checkpoints/ folder means its newest complete step."""
    local = "://" not in str(path)
    p = epath.Path(os.path.abspath(path) if local else path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name.isdigit() and (p / "state").is_dir():
        return p.parent, int(p.name)
    steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit()) if p.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no llmjax checkpoint under {path}; give a workdir, its "
                                "checkpoints/ folder or a checkpoints/<step> folder.")
    return p, steps[-1]


def restore_params(path: str, abstract_params: Any) -> tuple[Any, dict, int]:
    """Only the parameters (and the saved config) of a checkpoint, for fine-tuning and generation.

    `abstract_params` carries the target shardings; the optimizer state on disk is not read.
    Returns (params, saved config dict, step)."""
    directory, step = resolve(path)
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    item = {"params": abstract_params}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
        config=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    manager.close()
    return restored["state"]["params"], restored["config"], step
