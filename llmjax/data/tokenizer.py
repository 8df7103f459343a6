"""SentencePiece BPE tokenizer: trained in-process on the corpus, or loaded from a .model file.

Ids 0-3 are fixed: pad=0 (the loss mask and segment id 0 agree on it), unk=1, bos=2, eos=3.
Training keeps text exactly as written (identity normalization, no dummy prefix, whitespace
runs allowed as pieces, newlines ordinary characters) and uses byte fallback, so
`decode(encode(text)) == text` for any string, code indentation included.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence

from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm

from llmjax import progress
from llmjax.data import corpus

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DEFAULT_TRAIN_CHARS = 5_000_000
# SentencePiece trains on "sentences" of at most max_sentence_length bytes and silently drops
# longer ones; we feed groups of whole lines up to _CHUNK_CHARS (<= 4 bytes per char fits).
_CHUNK_CHARS = 8192
_MAX_SENTENCE_BYTES = 4 * _CHUNK_CHARS
_TRAIN_THREADS = 4


class Tokenizer:
    """A SentencePiece model with the ids the pipeline relies on."""

    pad_id = PAD_ID

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._proto = model_proto
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"Tokenizer {path or ''} has pad id {self._sp.pad_id()}, but llmjax needs pad id 0 "
                "(segment id 0 and the loss mask mean padding); train one with train_tokenizer()."
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(epath.Path(path).read_bytes(), path=os.fspath(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def mask_id(self) -> int:
        """The <mask> piece's id (masked LM, text infilling)."""
        from llmjax.data.objectives import MASK_PIECE  # pylint: disable=g-import-not-at-top
        i = self._sp.piece_to_id(MASK_PIECE)
        if i == self._sp.unk_id():
            raise ValueError(
                f"The tokenizer {self.path or '(in memory)'} has no {MASK_PIECE} piece, which the "
                "data objective needs; train a new one (leave data.tokenizer empty and use a new "
                "--workdir) or give one with <mask> and <extra_id_N> user-defined symbols."
            )
        return i

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of the T5 sentinels <extra_id_0>, <extra_id_1>, ... (span corruption)."""
        if not hasattr(self, "_sentinels"):
            from llmjax.data.objectives import sentinel_piece  # pylint: disable=g-import-not-at-top
            ids = []
            while (i := self._sp.piece_to_id(sentinel_piece(len(ids)))) != self._sp.unk_id():
                ids.append(i)
            self._sentinels = ids
        if not self._sentinels:
            raise ValueError(
                f"The tokenizer {self.path or '(in memory)'} has no sentinel pieces (<extra_id_0>, "
                "...), which span corruption needs; train a new one (leave data.tokenizer empty and "
                "use a new --workdir) or give one with <extra_id_N> user-defined symbols."
            )
        return self._sentinels

    @property
    def first_ordinary_id(self) -> int:
        """The first id after the control ids and the reserved (user-defined) pieces."""
        i = EOS_ID + 1
        while i < self.vocab_size and (self._sp.is_control(i) or self._sp.IdToPiece(i).startswith(
                ("<mask>", "<extra_id_"))):
            i += 1
        return i

    @property
    def line_break_ids(self) -> list[int]:
        """Ids of pieces that contain a line break (sentence ends for sentence permutation)."""
        return [i for i in range(self.vocab_size)
                if "\n" in self._sp.IdToPiece(i) or self._sp.IdToPiece(i) == "<0x0A>"]

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # SentencePiece renders pad/bos/eos as nothing, so decoding a padded row is fine.
        return self._sp.decode([int(i) for i in ids])

    # Pickled by value (the serialized model, a few hundred KB) so grain worker processes can use it.
    def __getstate__(self):
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_path: str | os.PathLike | None,
    *,
    max_chars: int = DEFAULT_TRAIN_CHARS,
    reserved: Sequence[str] = (),
) -> Tokenizer:
    """Trains a BPE tokenizer on (the first `max_chars` characters of) `texts`; saves it if asked.

    `vocab_size` is an upper bound: BPE cannot learn more pieces than a small corpus has pairs to
    merge, and SentencePiece then fails unless `hard_vocab_limit=False`, which we always pass. On a
    corpus big enough it makes no difference; on a tiny one the vocabulary comes out smaller (with a
    warning), which a model with a larger `vocab_size` accepts (see `check_vocab`).
    `reserved` pieces (<mask>, the sentinels) get the ids right after the control ids, 4, 5, ...
    """
    start = time.perf_counter()
    model = io.BytesIO()
    # Progress: a bar while SentencePiece reads the sample (its length is known), then a ticker
    # while it merges pieces (its length is not).
    reading = progress.bar(total=max_chars, desc="tokenizer sample", unit="char", unit_scale=True)
    merging = contextlib.ExitStack()

    def chunks():
        for chunk in _training_chunks(texts, max_chars):
            reading.update(len(chunk))
            yield chunk
        reading.close()
        merging.enter_context(progress.ticker(f"training a {vocab_size}-piece tokenizer"))

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chunks(),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            # The pieces do not depend on the thread count, but the saved model records it: a fixed
            # count makes the .model file byte-identical on every machine.
            num_threads=_TRAIN_THREADS,
            minloglevel=2,
            **({"user_defined_symbols": list(reserved)} if reserved else {}),
        )
    except RuntimeError as e:
        if "smaller than required_chars" not in str(e):
            raise
        raise ValueError(
            f"A vocab_size of {vocab_size} cannot hold every distinct character of the corpus "
            "(SentencePiece said: " + str(e).split("]")[-1].strip() + "); increase the vocab size."
        ) from e
    finally:
        reading.close()
        merging.close()
    tokenizer = Tokenizer(model.getvalue(), path=os.fspath(model_path) if model_path else None)
    if tokenizer.vocab_size < vocab_size:
        logging.warning(
            "The tokenizer corpus supports only %d of the %d requested pieces; using %d.",
            tokenizer.vocab_size,
            vocab_size,
            tokenizer.vocab_size,
        )
    logging.info(
        "Trained a %d-piece tokenizer in %.1f s.", tokenizer.vocab_size, time.perf_counter() - start
    )
    if model_path:
        _write_atomically(epath.Path(model_path), model.getvalue())
    return tokenizer


def load_or_train_tokenizer(data_cfg, vocab_size: int, workdir: str | os.PathLike) -> Tokenizer:
    """The tokenizer a run uses: `data.tokenizer` if set, else WORKDIR/tokenizer.model, else new.

    A new one is trained on a deterministic sample (`data.tokenizer_train_chars`, default 5 M
    characters) of the train split and saved in the workdir, so a resumed run reuses it. Every host
    of a multi-host run trains the same model from the same corpus, so it does not matter which
    host's file lands last.
    """
    if data_cfg.get("name", "") == "prepared":
        return _prepared_tokenizer(data_cfg, epath.Path(workdir) / "tokenizer.model")
    if path := data_cfg.get("tokenizer", ""):
        return Tokenizer.load(path)
    path = epath.Path(workdir) / "tokenizer.model"
    if path.exists():
        return Tokenizer.load(path)
    source = corpus.load_split(data_cfg, data_cfg.get("split_train", "train"))
    max_chars = int(data_cfg.get("tokenizer_train_chars", DEFAULT_TRAIN_CHARS))
    from llmjax.data.objectives import reserved_pieces  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    tokenizer = train_tokenizer(
        _sample_documents(source, max_chars), vocab_size, path, max_chars=max_chars,
        reserved=reserved_pieces(data_cfg),
    )
    if progress.is_main():
        print(f"trained a {tokenizer.vocab_size}-piece tokenizer in "
              f"{time.perf_counter() - start:.1f}s: {path}", file=sys.stderr, flush=True)
    return tokenizer


def _prepared_tokenizer(data_cfg, workdir_copy: epath.Path) -> Tokenizer:
    """A prepared corpus's own tokenizer (data.tokenizer, or a workdir's from an earlier run, must
    be the same model), copied into the workdir so generate and evaluate find it there."""
    from llmjax.data import prepare  # pylint: disable=g-import-not-at-top
    data_dir = data_cfg.get("data_dir", "")
    tokenizer = prepare.load_tokenizer(data_dir)
    for other in filter(None, [data_cfg.get("tokenizer", ""),
                               workdir_copy if workdir_copy.exists() else None]):
        prepare.check_tokenizer(data_dir, Tokenizer.load(other))
    if not workdir_copy.exists():
        _write_atomically(workdir_copy, tokenizer._proto)  # pylint: disable=protected-access
    return tokenizer


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fails if the tokenizer can produce ids the model's embedding has no row for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"The tokenizer ({tokenizer.path or 'in memory'}) has {tokenizer.vocab_size} pieces but "
            f"model.vocab_size is {model_vocab_size}, so some token ids would be out of range; set "
            f"model.vocab_size to at least {tokenizer.vocab_size} or point data.tokenizer at a "
            "smaller tokenizer."
        )


def _sample_documents(source: Sequence[str], max_chars: int) -> Iterator[str]:
    """Documents in a fixed pseudo-random order until `max_chars`: a sample of the whole corpus
    rather than its first files (which may all be one kind), identical on every run and host."""
    order = np.random.default_rng(0).permutation(len(source))
    total = 0
    for i in order:
        if total >= max_chars:
            return
        text = source[int(i)]
        total += len(text)
        yield text


def _training_chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Groups of whole lines (newlines kept, so BPE learns them) of at most _CHUNK_CHARS."""
    remaining = max_chars
    for text in texts:
        text = text[:remaining]
        remaining -= len(text)
        chunk, size = [], 0
        for line in text.splitlines(keepends=True):
            while len(line) > _CHUNK_CHARS:  # A pathological line: cut it rather than lose it.
                yield line[:_CHUNK_CHARS]
                line = line[_CHUNK_CHARS:]
            if size + len(line) > _CHUNK_CHARS:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            yield "".join(chunk)
        if remaining <= 0:
            return


def _write_atomically(path: epath.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    # Readers see the old file or the whole new one, never half of it; replace, not rename: every
    # host of a multi-host run writes the same bytes here, and the later one must not fail.
    tmp.replace(path)
