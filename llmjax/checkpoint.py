"""Orbax checkpoints of a run: train state, data-iterator state and the resolved config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Saves are asynchronous (the arrays are
copied off the devices, then written in the background) and atomic (Orbax writes into a temporary
directory and renames it when complete), so the newest *complete* step is always restorable.
Restoring takes abstract arrays that carry the current mesh's shardings, so a run saved on one
mesh shape resumes on another.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from llmjax import paths, progress


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
        self.directory = paths.path(workdir) / "checkpoints"
        # A run killed during an async save leaves a <step>.orbax-checkpoint-tmp-* folder that
        # was never renamed into place; it is not a step, and is removed on the next start.
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self._open()

    def _open(self):
        self.manager = ocp.CheckpointManager(self.directory, options=self._options,
                                             item_names=("state", "data", "config", "loop"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, config: dict, *, force: bool = False,
             loop: dict | None = None) -> bool:
        """`data_iterator` may be None (a converted or exported checkpoint has no data position);
        `loop` is the loop's own small JSON state (counters that must survive a restart)."""
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        if loop is not None:
            items["loop"] = ocp.args.JsonSave(loop)
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
        with progress.ticker(f"restoring checkpoint {self.directory / str(step)}"):
            restored = self.manager.restore(step, args=args)
        logging.info("restored checkpoint at step %d from %s", step, self.directory)
        return restored["state"]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_loop(self, step: int) -> dict:
        if not (self.directory / str(step) / "loop").exists():  # saved before the item existed
            return {}
        return self.manager.restore(step, args=ocp.args.Composite(loop=ocp.args.JsonRestore()))["loop"]

    def restore_newest_good(self, abstract_state: Any, data_iterator, *, check_config=None,
                            allow_fresh_start: bool = False, warn=logging.warning):
        """Restores the newest checkpoint that reads back whole, newest first.

        A damaged step (truncated or missing files: Orbax or TensorStore fail to read it) is
        reported through `warn` and the previous one is tried. Returns (step, state, loop dict), or
        None when there is nothing to restore. When steps exist but none is readable, raises
        ValueError unless `allow_fresh_start`. Damaged steps are moved to
        WORKDIR/checkpoints_damaged/ (never deleted) only once the run goes on, so that the steps
        it saves next do not collide with them. `check_config(saved_config, where)` may raise to
        refuse a checkpoint (a user error, not damage); then nothing is moved.
        """
        damaged = []
        # A failed attempt may already have moved the iterator (the data item read back, the state
        # did not); a fresh start must begin where a new iterator does.
        start = copy.deepcopy(data_iterator.get_state()) if data_iterator is not None else None
        for step in sorted(self.manager.all_steps(), reverse=True):
            where = self.directory / str(step)
            try:
                saved_config = self.restore_config(step)
            except Exception as e:  # noqa: BLE001 - any failure to read means damaged
                damaged.append(step)
                warn(f"checkpoint {where} is damaged ({_first_line(e)}); trying the previous one")
                continue
            if check_config is not None:
                check_config(saved_config, where)
            try:
                state = self.restore(step, abstract_state, data_iterator)
                loop = self.restore_loop(step)
            except Exception as e:  # noqa: BLE001
                damaged.append(step)
                warn(f"checkpoint {where} is damaged ({_first_line(e)}); trying the previous one")
                continue
            self._set_aside(damaged)
            return step, state, loop
        if damaged and not allow_fresh_start:
            raise ValueError(
                f"no usable checkpoint in {self.directory}: steps {sorted(damaged)} cannot be read; "
                "restore them from a backup, use a new --workdir, or pass "
                "--config.allow_fresh_start=True to set them aside and start again from step 0.")
        self._set_aside(damaged)
        if damaged and data_iterator is not None:
            data_iterator.set_state(start)
        return None

    def _set_aside(self, steps):
        if not steps:
            return
        import jax
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            aside = self.directory.parent / "checkpoints_damaged"
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                logging.warning("moved damaged checkpoint %d to %s", step, target)
        multihost_utils.sync_global_devices("llmjax_set_aside_damaged_checkpoints")
        self.manager.close()
        self._open()  # the manager caches the list of steps

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):  # may be called more than once
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None



def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def resolve(path: str) -> tuple[epath.Path, int]:
    """A workdir, its checkpoints/ folder, or one step's folder -> (checkpoints folder, step).

    A workdir or checkpoints/ folder means its newest complete step."""
    p = paths.path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name.isdigit() and (p / "state").is_dir():
        return p.parent, int(p.name)
    steps = sorted(int(c.name) for c in p.iterdir() if c.name.isdigit()) if p.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no llmjax checkpoint under {path}; give a workdir, its "
                                "checkpoints/ folder or a checkpoints/<step> folder.")
    return p, steps[-1]


def saved_config(path: str) -> tuple[dict, int]:
    """The resolved config saved with a checkpoint (a workdir, its checkpoints/ or one step's
    folder; the newest step for the first two) and that step."""
    directory, step = resolve(path)
    if not (directory / str(step) / "config").is_dir():
        raise FileNotFoundError(f"the checkpoint {directory / str(step)} has no saved config; it "
                                "was not written by llmjax (or by its converters).")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers={"config": ocp.JsonCheckpointHandler()})
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    manager.close()
    return config, step


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
    with progress.ticker(f"restoring the parameters of {directory / str(step)}"):
        restored = manager.restore(step, args=args)
    manager.close()
    return restored["state"]["params"], restored["config"], step
