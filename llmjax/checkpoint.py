"""Orbax checkpoints of a run: train state, data-iterator state and the resolved config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}. Saves are asynchronous (the arrays are
copied off the devices, then written in the background) and atomic (Orbax writes into a temporary
directory and renames it when complete), so the newest *complete* step is always restorable.
Restoring takes abstract arrays that carry the current mesh's shardings, so a run saved on one
mesh shape resumes on another.

Silent corruption: every step saved by this version carries `manifest.json` (the size and SHA-256
of each of its files), written after the data and before Orbax renames the step into place (for an
async save from Orbax's post-finalization callback, in the background), so a step that is complete
has one. Restoring checks the step against it first: a flipped byte in any file counts as damage,
like a truncated or missing file, and the previous step is restored instead. A step without a
manifest (written before manifests existed) is accepted as before. `python -m llmjax.checkpoint
verify --workdir=DIR` checks every step without restoring it.

A save that fails (a full disk: OSError ENOSPC, or any other write error) raises
`CheckpointWriteError`, one sentence naming the step's path and the free space; the unfinished
step was never renamed into place, so the previous checkpoints are intact, and its temporary folder
is removed at the next start.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
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


MANIFEST = "manifest.json"
_TMP = ".orbax-checkpoint-tmp"


class DamagedCheckpoint(ValueError):
    """A step's files do not match its manifest."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk or a failing write); one line for the user."""


def _hash(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """Every file of a step's items (state/, data/, config/, loop/; relative name -> path). The
    step folder's own files (Orbax's _CHECKPOINT_METADATA and commit marker, rewritten when the
    step is committed, and the manifest) are not item data and are left out."""
    step_dir = epath.Path(step_dir)
    out, stack = {}, [c for c in step_dir.iterdir() if c.is_dir()]
    while stack:
        for child in stack.pop().iterdir():
            if child.is_dir():
                stack.append(child)
            else:
                out[str(child.relative_to(step_dir))] = child
    return out


def write_manifest(step_dir: epath.Path) -> None:
    """Records the size and SHA-256 of every file of a finished step in STEP/manifest.json."""
    step_dir = epath.Path(step_dir)
    files = {name: {"size": path.stat().length, "sha256": _hash(path)}
             for name, path in sorted(_files(step_dir).items())}
    tmp = step_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    tmp.rename(step_dir / MANIFEST)


def verify_step(step_dir: epath.Path) -> bool:
    """Checks a step's files against its manifest; raises DamagedCheckpoint naming the first
    file that is missing or differs. Returns False when the step has no manifest (saved before
    manifests existed), True when every file matches."""
    step_dir = epath.Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{manifest} is unreadable ({e})") from e
    for name, want in files.items():
        path = step_dir / name
        if not path.exists():
            raise DamagedCheckpoint(f"{name} is missing")
        size = path.stat().length
        if size != want["size"]:
            raise DamagedCheckpoint(f"{name} has {size} bytes, the manifest {want['size']}")
        if _hash(path) != want["sha256"]:
            raise DamagedCheckpoint(f"{name} differs from its manifest (SHA-256)")
    return True


def free_space(path: epath.Path) -> str:
    """The free space of the file system holding `path` (its nearest existing parent), in words."""
    if "://" in str(path):
        return "free space unknown (remote storage)"
    p = os.fspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        free = shutil.disk_usage(p or "/").free
    except OSError:
        return "free space unknown"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if free >= scale:
            return f"{free / scale:.1f} {unit} free"
    return f"{free} bytes free"


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind an error Orbax raised (it may wrap or chain it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _QuietWriteFailures(logging.Filter):
    """Drops Orbax's tracebacks of a failed background write (an OSError such as ENOSPC): the
    failure surfaces as one CheckpointWriteError sentence that names the step and the free space."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        from_orbax = "orbax" in (record.pathname or "")
        return not (from_orbax and record.levelno >= logging.ERROR and (
            _os_error(error) is not None or "No space left" in record.getMessage()))


_QUIET = _QuietWriteFailures()


class Checkpointer:
    def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
        self.directory = paths.path(workdir) / "checkpoints"
        self._async = async_save
        self._saving_step = None
        self._failed = False
        if _QUIET not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_QUIET)
        # A run killed during an async save leaves a <step>.orbax-checkpoint-tmp-* folder that
        # was never renamed into place; it is not a step, and is removed on the next start.
        # The manifest of an async save is written after the data and before that rename.
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_unfinished)
            if async_save else None)
        self._open()

    def _step_in_progress(self) -> epath.Path | None:
        """The folder the save of `_saving_step` writes into: Orbax's temporary folder (renamed
        into place once finished), or the step folder itself where Orbax marks completion with a
        commit file instead (object stores)."""
        step = self._saving_step
        tmp = sorted(self.directory.glob(f"{step}{_TMP}*"), key=lambda p: p.name)
        if tmp:
            return tmp[-1]
        final = self.directory / str(step)
        return final if final.is_dir() else None

    def _seal_unfinished(self):
        import jax
        if jax.process_index() != 0:
            return
        step_dir = self._step_in_progress()
        if step_dir is None:
            raise FileNotFoundError(f"the save of step {self._saving_step} left no folder in "
                                    f"{self.directory}")
        write_manifest(step_dir)

    def _write_error(self, error: BaseException) -> CheckpointWriteError:
        self._failed = True
        cause = _os_error(error)
        reason = (os.strerror(cause.errno) if cause is not None and cause.errno
                  else f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}")
        previous = [s for s in self.manager.all_steps() if s != self._saving_step] if self.manager else []
        kept = (f"the previous checkpoint {self.directory / str(max(previous))} is intact"
                if previous else "no earlier checkpoint exists")
        where = self.directory / str(self._saving_step)
        out = CheckpointWriteError(
            f"could not write checkpoint {where} ({reason}; {free_space(self.directory)} on "
            f"{self.directory}); {kept}; free space (or fix the storage) and run the same "
            "command to resume.")
        out.errno = cause.errno if cause is not None and cause.errno else errno.EIO
        return out

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
        try:
            # The previous async save finishes first (Orbax would wait for it too): its errors
            # surface here, and the finalize callback knows which step it seals.
            self.manager.wait_until_finished()
            self._saving_step = step
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
            if saved and not self._async:
                import jax
                if jax.process_index() == 0:
                    write_manifest(self.directory / str(step))
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._write_error(e) from e
        return saved

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

        A damaged step (a file that differs from the step's manifest, or truncated or missing
        files: Orbax or TensorStore fail to read it) is reported through `warn` and the previous one is tried. Returns (step, state, loop dict), or
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
                verify_step(where)  # a flipped byte anywhere; no manifest: saved before them
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
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from e

    def close(self):  # may be called more than once
        if self.manager is None:
            return
        if self._failed:  # already reported: close quietly, keeping the first error
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                logging.warning("closing the checkpoint manager after a failed save", exc_info=True)
            self.manager = None
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            error = self._write_error(e)
            self.close()
            raise error from e
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
    Returns (params, saved config dict, step). A step that differs from its manifest is refused
    (DamagedCheckpoint, a ValueError naming the file)."""
    directory, step = resolve(path)
    try:
        verify_step(directory / str(step))
    except DamagedCheckpoint as e:
        raise DamagedCheckpoint(f"the checkpoint {directory / str(step)} is damaged ({e}); give "
                                "another step's folder, e.g. checkpoints/<step>.") from e
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    item = {"params": abstract_params}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
        config=ocp.args.JsonRestore())
    # stderr: generate and fill_mask print their output on stdout.
    with progress.ticker(f"restoring the parameters of {directory / str(step)}", stream=sys.stderr):
        restored = manager.restore(step, args=args)
    manager.close()
    return restored["state"]["params"], restored["config"], step


def verify(workdir: str, out=print) -> int:
    """Checks every step of a workdir (or its checkpoints/ folder) against its manifest without
    restoring anything; one line per step. Returns the number of damaged steps."""
    p = paths.path(workdir)
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints folder under {workdir}; give a run's --workdir.")
    entries = sorted(directory.iterdir(), key=lambda c: c.name)
    steps = sorted(int(c.name) for c in entries if c.name.isdigit())
    for c in entries:
        if _TMP in c.name:
            out(f"{c}: an unfinished save (not a step; removed at the next start)")
    if not steps:
        raise FileNotFoundError(f"no checkpoint steps in {directory}.")
    damaged = 0
    for step in steps:
        where = directory / str(step)
        try:
            checked = verify_step(where)
        except (DamagedCheckpoint, OSError) as e:
            damaged += 1
            out(f"step {step}: DAMAGED: {e} ({where})")
            continue
        if checked:
            out(f"step {step}: ok ({len(_files(where))} files match {MANIFEST})")
        else:
            out(f"step {step}: no {MANIFEST} (saved before manifests existed); not checked")
    return damaged


def _main(argv=None) -> int:
    import argparse
    import sys
    parser = argparse.ArgumentParser(
        prog="python -m llmjax.checkpoint",
        description="verify: check every checkpoint step of a run against its manifest "
                    "(SHA-256 of each file) without restoring it.")
    parser.add_argument("command", choices=["verify"])
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    args = parser.parse_args(argv)
    try:
        damaged = verify(args.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if damaged:
        print(f"error: {damaged} damaged step(s) in {args.workdir}; a run restores the newest "
              "good one and sets the damaged ones aside.", file=sys.stderr)
    return 1 if damaged else 0


if __name__ == "__main__":
    raise SystemExit(_main())


# Model keys that change how the step computes, not which parameters exist: a resumed or
# fine-tuning run may change them (e.g. bfloat16 compute, remat, dropout for fine-tuning; the
# initialiser only matters at step 0).
COMPUTE_ONLY_KEYS = ("dtype", "remat_policy", "dropout_rate", "attention", "init")


def check_same_model(saved: dict, config, where, fine_tuning: bool = False) -> None:
    """Refuses to restore a checkpoint into a differently shaped model (one line, before Orbax
    fails deep inside with a shape error). Batch, length, optimizer, data and the compute-only
    model keys may change. A key the saved config lacks (it predates the key) counts as its default.
    `fine_tuning` (init_from): a checkpoint without a classification head (num_labels 0) may start
    a classifier, whose new head is then initialised fresh."""
    from llmjax.config import base_config
    defaults = base_config().model.to_dict()
    current = json.loads(json.dumps(config.model.to_dict()))
    saved_model = json.loads(json.dumps({**defaults, **saved.get("model", {})}))
    changed = sorted(k for k in current
                     if k not in COMPUTE_ONLY_KEYS and saved_model.get(k) != current[k])
    if fine_tuning and not saved_model.get("num_labels"):
        changed = [k for k in changed if k != "num_labels"]
    if changed:
        diffs = ", ".join(f"model.{k}={saved_model.get(k)!r} there but {current[k]!r} now"
                          for k in changed)
        raise ValueError(f"the checkpoint {where} was trained with a different model ({diffs}); "
                         "use the original config or a new --workdir.")
