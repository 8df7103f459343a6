"""The Grain input pipeline for causal-LM pretraining: documents in, packed token batches out.

(`data.objective` other than causal_lm: masked LM, span corruption and text infilling reuse the
sharding, shuffling and packing below and then corrupt each row; see `_objective_batches` and
objectives.py for their batches.)

Per process, in order:
  1. the process's shard of the documents (taken before any tokenizing, so hosts read disjoint
     documents and never tokenize someone else's);
  2. shuffled with `seed`, a new order every epoch, repeated forever (train only);
  3. tokenized as `[bos] + ids + [eos]` and turned into the pair `inputs = t[:-1]`,
     `targets = t[1:]`, so every token of the document is a target exactly once;
  4. packed by concat-then-split into rows of `seq_len` and batched.

A batch is a dict of int32 numpy arrays, each `[batch_size // process_count, seq_len]`:
  inputs, targets  token ids; targets[t] is the token after inputs[t] in the same document.
  segment_ids      1, 2, 3... for the documents packed into a row; 0 marks padding (only eval's
                   or a finite stream's last row can have any). Attend only within a segment;
                   mask the loss with segment_ids != 0.
  weights          1 where the target is scored by the loss, 0 elsewhere (padding).
  positions        position within the segment, 0 at its first token.
A document longer than the room left in a row continues in the next row as a new segment whose
positions start again at 0: the (inputs, targets) pairs are cut at row boundaries, which is the
same as chunking the token sequence into pieces of seq_len + 1 that overlap by one token.

Why concat-then-split: it wastes nothing (rows are full; first-fit or best-fit packing would pad
every row where the next document does not fit, and cut documents longer than seq_len anyway),
its state is a parent position plus a slice (cheap to checkpoint and to restore exactly), and it
is what LM pretraining pipelines (T5, MaxText) do.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from llmjax import paths
from llmjax.data import corpus
from llmjax.data import objectives
from llmjax.data.tokenizer import Tokenizer

_FEATURES = ("inputs", "targets")


def make_train_iterator(
    data_cfg,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    workdir: str | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over this process's training batches.

    `batch_size` is global; each process gets `batch_size // process_count` rows. The same
    arguments give the same batches; `it.get_state()` / `it.set_state()` (or Orbax through
    `grain.checkpoint.CheckpointSave(it)`) resume exactly. If `workdir` is given, process 0
    records the pipeline's settings in WORKDIR/data_spec.json and warns when a resumed run's
    settings differ (a restored position would then point into a different stream).
    """
    process_index, process_count = _process(process_index, process_count)
    rows = _rows_per_process(batch_size, process_count)
    split = data_cfg.get("split_train", "train")
    source = load_split(data_cfg, split, tokenizer)
    docs = _shard(grain.MapDataset.source(source), process_index, process_count, split, strict=True)
    if objectives.check_objective(data_cfg.get("objective", "causal_lm")) != "causal_lm":
        ds = _objective_batches(docs, data_cfg, tokenizer, seq_len, rows, seed, train=True)
    else:
        docs = docs.shuffle(seed).repeat()  # Shuffling before repeat reseeds it every epoch.
        ds = _pack_and_batch(docs.map(_TokenizeDocument(tokenizer)), data_cfg, seq_len, rows, seed)
    if workers := int(data_cfg.get("num_workers", 0)):
        # Each worker runs steps 2-4 on its own slice of the documents; the output is still
        # deterministic, but changes if num_workers changes.
        if not flags.FLAGS.is_parsed():
            # Grain's workers read its absl flags; outside an absl app (notebooks, pytest) nothing has
            # parsed them, so take their defaults rather than fail in the first worker.
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    if workdir is not None and process_index == 0:
        _record_spec(
            workdir,
            data_cfg,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            process_count=process_count,
            num_docs=len(source),
        )
    return iter(ds)


def make_eval_batches(
    data_cfg,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """`num_batches` batches of the evaluation split, the same on every call.

    Documents are read in their stored order (no shuffling) and cycled if the split is too small
    to fill `num_batches`, so every evaluation sees exactly the same tokens.
    """
    process_index, process_count = _process(process_index, process_count)
    rows = _rows_per_process(batch_size, process_count)
    split = data_cfg.get("split_eval", "validation")
    source = load_split(data_cfg, split, tokenizer)
    docs = _shard(
        grain.MapDataset.source(source), process_index, process_count, split, strict=False
    )
    # The fixed row shuffle spreads the batches over many documents (a stdlib file is hundreds of
    # rows long) while keeping every evaluation's tokens identical.
    if objectives.check_objective(data_cfg.get("objective", "causal_lm")) != "causal_lm":
        ds = _objective_batches(docs, data_cfg, tokenizer, seq_len, rows, 0, train=False)
    else:
        ds = _pack_and_batch(
            docs.repeat().map(_TokenizeDocument(tokenizer)), data_cfg, seq_len, rows, seed=0
        )
    return list(itertools.islice(iter(ds), num_batches))


def load_split(data_cfg, split: str, tokenizer: Tokenizer):
    """The documents of `split`: texts (a corpus) or token-id arrays (data.name='prepared', whose
    tokenizer must be `tokenizer`); the tokenize steps below take either."""
    if data_cfg.get("name", "stdlib") == "prepared":
        from llmjax.data import prepare  # pylint: disable=g-import-not-at-top
        prepare.check_tokenizer(data_cfg.get("data_dir", ""), tokenizer)
        return prepare.PreparedSource(data_cfg.data_dir, split)
    return corpus.load_split(data_cfg, split)


def _with_ends(tokenizer: Tokenizer, doc: str | np.ndarray, *, bos: bool) -> np.ndarray:
    """int32 `[bos] + ids + [eos]` (bos optional) of a text, or of a prepared document's ids."""
    ids = doc if isinstance(doc, np.ndarray) else np.asarray(tokenizer.encode(doc), np.int32)
    head = [tokenizer.bos_id] if bos else []
    return np.concatenate([np.asarray(head, np.int32), ids, [tokenizer.eos_id]]).astype(np.int32)


class _TokenizeDocument(grain.transforms.Map):
    """text -> {"inputs": t[:-1], "targets": t[1:]} with t = [bos] + encode(text) + [eos]."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def map(self, text: str | np.ndarray) -> dict[str, np.ndarray]:
        tok = self._tokenizer
        ids = _with_ends(tok, text, bos=True)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def _pack_and_batch(
    tokenized: grain.MapDataset, data_cfg, seq_len: int, rows: int, seed: int
) -> grain.IterDataset:
    packed = _pack(tokenized, data_cfg, {k: seq_len for k in _FEATURES}, seed)
    return _JsonStateIterDataset(packed.batch(rows, drop_remainder=True).map(_model_batch))


def _pack(tokenized: grain.MapDataset, data_cfg, length_struct: dict[str, int],
          seed: int) -> grain.IterDataset:
    """Concat-then-split packing into rows of `length_struct` lengths, window-shuffled."""
    seq_len = min(length_struct.values())
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    # Threads tokenize ahead while the training loop waits on the accelerator. SentencePiece holds
    # the GIL, so they add no parallelism (data.num_workers does). A small buffer keeps a fresh or
    # restored iterator from tokenizing hundreds of documents before its first batch.
    read = grain.ReadOptions(
        num_threads=int(data_cfg.get("read_threads", 2)),
        prefetch_buffer_size=int(data_cfg.get("read_buffer", 16)),
    )
    packed = grain.experimental.ConcatThenSplitIterDataset(
        tokenized.to_iter_dataset(read), length_struct=length_struct
    )
    # Consecutive rows are consecutive pieces of one document (a stdlib module fills hundreds of
    # rows), so batches drawn straight from the packer are highly correlated and training stalls.
    # A window shuffle over `data.shuffle_tokens` worth of rows mixes many documents into each
    # batch; its state is the window's start plus a position, so resume stays exact.
    window = max(1, int(data_cfg.get("shuffle_tokens", 1 << 19)) // seq_len)
    return grain.experimental.WindowShuffleIterDataset(packed, window_size=window, seed=seed)


class _TokenizeText(grain.transforms.Map):
    """text -> {"tokens": [bos] + encode(text) + [eos]} (no bos for span corruption, as T5)."""

    def __init__(self, tokenizer: Tokenizer, *, bos: bool):
        self._tokenizer, self._bos = tokenizer, bos

    def map(self, text: str | np.ndarray) -> dict[str, np.ndarray]:
        tok = self._tokenizer
        return {"tokens": _with_ends(tok, text, bos=self._bos)}


def _objective_batches(docs: grain.MapDataset, data_cfg, tokenizer: Tokenizer, seq_len: int,
                       rows: int, seed: int, *, train: bool) -> grain.IterDataset:
    """Batches of a denoising objective (see objectives.py for what each example holds).

    Documents are tokenized and packed by concat-then-split as for causal LM, into rows of the
    raw length the objective needs (span corruption: T5's tokens_length, longer than seq_len),
    then each row is corrupted. Static MLM masks each document once, before shuffling and
    packing, so a document keeps its mask in every epoch.
    """
    objective = data_cfg.objective
    objectives.check_setup(data_cfg, tokenizer, seq_len)
    order = (lambda d: d.shuffle(seed).repeat()) if train else (lambda d: d.repeat())
    if objective == "mlm" and not data_cfg.get("mask_dynamic", True):
        masked = docs.map(_TokenizeText(tokenizer, bos=True)).random_map(
            objectives.MlmRow(data_cfg, tokenizer), seed=seed)
        packed = _pack(order(masked), data_cfg, {k: seq_len for k in ("inputs", "targets", "weights")},
                       seed).map(_static_mlm_row)
    else:
        length = seq_len
        if objective == "span_corruption":
            length = objectives.span_corruption_lengths(
                seq_len, data_cfg.noise_density, data_cfg.mean_noise_span_length)[0]
        tokenized = order(docs).map(_TokenizeText(tokenizer, bos=objective != "span_corruption"))
        transform = {"mlm": lambda: objectives.MlmRow(data_cfg, tokenizer),
                     "span_corruption": lambda: objectives.SpanCorruptionRow(data_cfg, tokenizer, seq_len),
                     "text_infilling": lambda: objectives.TextInfillingRow(data_cfg, tokenizer, seq_len),
                     }[objective]()
        packed = _pack(tokenized, data_cfg, {"tokens": length}, seed).random_map(transform, seed=seed)
    return _JsonStateIterDataset(packed.batch(rows, drop_remainder=True))


def _static_mlm_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"inputs": packed["inputs"], "targets": packed["targets"],
            "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"],
            "weights": packed["weights"]}


def _model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Packing gives both features the same segments (they have equal lengths), so one copy of the
    # segment ids and positions describes both.
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": packed["inputs_segment_ids"],
        "positions": packed["inputs_positions"],
        # The loss weight of each target: objectives (SFT, masked LM, span corruption) score only
        # some positions; plain language modelling scores every non-padding one.
        "weights": (packed["inputs_segment_ids"] != 0).astype(np.int32),
    }


class _JsonStateIterDataset(grain.IterDataset):
    """Makes the pipeline's state survive a JSON round trip, as Orbax checkpoints it.

    grain 0.2.18's concat-then-split marks "no remainder" with the tuple (-1, -1) in its state and
    compares against that tuple; JSON gives back the list [-1, -1], which then reads as a remainder
    of zero tokens and silently drops a document on restore. Turning the slices back into tuples
    before `set_state` restores the exact position.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())


class _JsonStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
    if isinstance(state, dict):
        return {
            k: (
                {f: tuple(sl) for f, sl in v.items()}
                if k == "remainder_slices"
                else _slices_as_tuples(v)
            )
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [_slices_as_tuples(v) for v in state]
    return state


def _shard(
    docs: grain.MapDataset, index: int, count: int, split: str, *, strict: bool
) -> grain.MapDataset:
    if len(docs) >= count:
        return docs[index::count]
    if strict:
        raise ValueError(
            f"Split {split!r} has {len(docs)} documents, fewer than the {count} processes that must "
            "each read a disjoint share; use a larger corpus or fewer processes."
        )
    # Evaluation only: every process evaluates the whole (tiny) split rather than nothing.
    logging.warning(
        "Split %r has %d documents for %d processes; each process reads all of them.",
        split,
        len(docs),
        count,
    )
    return docs


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # pylint: disable=g-import-not-at-top

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, {count}), got {index}.")
    return index, count


def _rows_per_process(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"The global batch size {batch_size} must be a positive multiple of the {process_count} "
            "processes, each of which loads an equal share; change the batch size."
        )
    return batch_size // process_count


def _record_spec(workdir: str, data_cfg, tokenizer: Tokenizer, **settings: Any) -> None:
    spec = {
        "data": {k: data_cfg[k] for k in sorted(data_cfg.keys())},
        "tokenizer_vocab_size": tokenizer.vocab_size,
        **settings,
    }
    spec = json.loads(json.dumps(spec, default=str))  # Plain JSON types, comparable after reload.
    path = paths.path(workdir) / "data_spec.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != spec:
            changed = sorted(
                k for k in spec.keys() | previous.keys() if spec.get(k) != previous.get(k)
            )
            logging.warning(
                "The data pipeline differs from the one recorded in %s (%s); a restored iterator "
                "position refers to the old stream.",
                path,
                ", ".join(changed),
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2, sort_keys=True))
