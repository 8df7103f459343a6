"""Text corpora as TFDS array_record datasets, read by random access (no TensorFlow needed).

`data.name` picks the corpus:
  * "stdlib" (default): this interpreter's standard-library sources and pydoc topics.
  * "text": the local files matched by `data.files` (globs separated by commas).
  * anything else: a TFDS catalog dataset already prepared as array_record in the data dir.

Local corpora are built once into `DATA_DIR/llmjax_text/<config>/` where the config name is a hash
of the document list and the hygiene settings, so different file sets, Python versions and
settings never share a cache entry. The build runs data hygiene (llmjax/data/hygiene: dedup,
validation-leak removal, PII scrubbing, quality flags; `data.hygiene`) and writes its report next
to the dataset (`hygiene_report.json`); `copy_hygiene_report` puts it in a run's workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from llmjax import paths, progress
from llmjax.data import documents as documents_lib
from llmjax.data import hygiene as hygiene_lib

DEFAULT_DATA_DIR = "~/.cache/llmjax/tfds"
LOCAL_CORPORA = ("stdlib", "text")
# Bump when the builder's output changes for the same inputs; it is part of every cache key.
_FORMAT_VERSION = 1
REPORT_NAME = "hygiene_report.json"  # next to the built dataset's dataset_info.json
WORKDIR_REPORT_NAME = "data_hygiene.json"
# Builders of corpora already prepared in this process, by (data_dir, config name): a second
# `load_split` then skips re-reading the dataset info from disk.
_PREPARED: dict[tuple[str, str], "LlmjaxText"] = {}


class LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder for data made on this machine (nothing downloaded); every config name is
    valid (it encodes the settings). Abstract: LlmjaxText and shapes.LlmjaxShapes build on it."""

    # TFDS looks for a checksums file next to the builder's source via `code_path`; for a builder
    # inside a regular package that lookup needs the `importlib_resources` backport (not a
    # dependency here). We download nothing, so there are no checksums to find.
    code_path = None

    # TFDS prints download sizes before and after a build; nothing is downloaded here and `prepare`
    # says what it builds in one line.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig:
        # Every name is a valid config: a hash of the settings (see `prepare`). Saying so here,
        # instead of passing a BuilderConfig object, keeps TFDS from warning about a "custom
        # data configuration" on every load.
        return tfds.core.BuilderConfig(name=name, version=version)


class LlmjaxText(LocalBuilder):
    """Local text documents with a held-out validation split; features `text` and `path`."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self,
        *,
        docs: Sequence[documents_lib.Document] = (),
        held_out: frozenset[str] = frozenset(),
        **kwargs,
    ):
        # The document list travels outside the BuilderConfig: TFDS logs the config's repr, and a
        # few thousand paths in a log line help nobody. The config name is their hash.
        self._docs = tuple(docs)
        self._held_out = held_out
        # path -> cleaned text of the documents hygiene kept; set by `prepare` before a build.
        self._cleaned: dict[str, str] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents, one file (or pydoc topic) per example.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(validation=False),
            "validation": self._generate_examples(validation=True),
        }

    def _generate_examples(self, validation: bool):
        for doc in self._docs:
            if (doc.path in self._held_out) == validation and doc.path in self._cleaned:
                yield doc.path, {"text": self._cleaned[doc.path], "path": doc.path}


def resolve_data_dir(data_cfg) -> str:
    """`data.data_dir`, else $LLMJAX_DATA_DIR, else ~/.cache/llmjax/tfds."""
    data_dir = (
        data_cfg.get("data_dir", "") or os.environ.get("LLMJAX_DATA_DIR", "") or DEFAULT_DATA_DIR
    )
    return os.path.abspath(os.path.expanduser(data_dir))


def prepare(data_cfg) -> LlmjaxText:
    """Builds the local corpus named by `data_cfg` unless it is cached; returns its builder."""
    name = data_cfg.get("name", "stdlib")
    fraction = float(data_cfg.get("validation_fraction", 0.02))
    if name == "stdlib":
        docs = documents_lib.stdlib_documents()
        prefix = f"stdlib-{documents_lib.python_tag()}"
    elif name == "text":
        docs = documents_lib.file_documents(data_cfg.get("files", ""))
        prefix = "files"
    else:
        raise ValueError(f"prepare() builds the local corpora {LOCAL_CORPORA}, not {name!r}.")
    hygiene = hygiene_lib.HygieneConfig.from_config(data_cfg.get("hygiene", None))
    digest = documents_lib.fingerprint(docs, fraction, _FORMAT_VERSION, hygiene.cache_key())
    config_name = f"{prefix}-{digest}"
    data_dir = resolve_data_dir(data_cfg)

    def make_builder():
        return LlmjaxText(
            config=config_name,
            data_dir=data_dir,
            file_format="array_record",
            docs=docs,
            held_out=frozenset(documents_lib.held_out(docs, fraction)),
        )

    key = (data_dir, config_name)
    if key in _PREPARED:
        return _PREPARED[key]
    with _quiet_tfds():
        builder = make_builder()
        prepared = builder.is_prepared()
    if prepared:
        _PREPARED[key] = builder
        return builder
    # Two processes (pytest workers, hosts sharing a disk) may build the same corpus at once. TFDS
    # writes into a temporary dir and renames it, but the loser's rename would fail on the existing
    # dir; an exclusive lock makes the second one wait and then reuse the first one's result.
    with _file_lock(os.path.join(data_dir, LlmjaxText.name, f"{config_name}.lock")):
        with _quiet_tfds():
            builder = make_builder()  # Re-created: TFDS only looks for prepared data on construction.
            prepared = builder.is_prepared()
        if not prepared:
            logging.warning(
                "Building corpus %s (%d documents) in %s once; later runs reuse it.",
                config_name, len(docs), data_dir,
            )
            report = _clean(builder, hygiene, desc=f"corpus {config_name}")
            with _quiet_tfds():
                builder.download_and_prepare()
            report.write(os.path.join(builder.data_dir, REPORT_NAME))
            if progress.is_main():
                print("\n".join(report.summary_lines()), flush=True)
    _PREPARED[key] = builder
    return builder


def _clean(builder: LlmjaxText, hygiene: hygiene_lib.HygieneConfig, desc: str):
    """Runs hygiene over the builder's documents (held-out ones first, so a training copy of a
    validation document is the one removed); stores the kept texts in the builder."""
    split = lambda d: "validation" if d.path in builder._held_out else "train"
    with progress.bar(total=len(builder._docs), desc=desc, unit="doc") as bar:
        kept, report = hygiene_lib.clean(
            ((d.path, split(d), d.read()) for d in builder._docs), hygiene,
            processes=hygiene.processes, progress=bar)
    builder._cleaned = {path: text for path, _, text in kept}
    for name in ("train", "validation"):
        if not any(s == name for _, s, _ in kept):
            raise ValueError(
                f"Data hygiene removed every {name} document of the corpus ("
                + "; ".join(report.summary_lines()[1:]) + "); add documents, raise "
                "data.validation_fraction, or relax data.hygiene (e.g. quality_filter='report').")
    return report


def hygiene_report_path(data_cfg) -> str | None:
    """The hygiene report of the local corpus named by `data_cfg` (None for other datasets)."""
    if data_cfg.get("name", "stdlib") not in LOCAL_CORPORA:
        return None
    path = os.path.join(prepare(data_cfg).data_dir, REPORT_NAME)
    return path if os.path.exists(path) else None


def copy_hygiene_report(data_cfg, workdir: str) -> str | None:
    """Copies the corpus's hygiene report to WORKDIR/data_hygiene.json (local or gs://), so a
    run says what was removed and replaced in the data it trained on; returns the copy's path."""
    if data_cfg.get("task", "lm") != "lm" or (source := hygiene_report_path(data_cfg)) is None:
        return None
    target = paths.path(workdir) / WORKDIR_REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, encoding="utf-8") as f:
        target.write_text(f.read())
    return str(target)


def load_split(data_cfg, split: str) -> TextSource:
    """Random-access texts of `split` of the corpus named by `data_cfg` (building it if local)."""
    name = data_cfg.get("name", "stdlib")
    if name in LOCAL_CORPORA:
        return TextSource(prepare(data_cfg).as_data_source(split=split), "text")
    data_dir = resolve_data_dir(data_cfg)
    try:
        # download=False: preparing a catalog dataset can mean hundreds of GB; that is a deliberate
        # offline step, never a side effect of starting training.
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (
        tfds.core.registered.DatasetNotFoundError,
        NotImplementedError,  # TFDS's answer for a dataset prepared as tfrecord, not array_record
        FileNotFoundError,
        AssertionError,
    ) as e:
        raise ValueError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared as array_record in {data_dir}; "
            f"prepare it with `tfds build {name} --file_format=array_record --data_dir={data_dir}` "
            "(or set data.data_dir to where it is, or data.name to 'stdlib' or 'text')."
        ) from e
    return TextSource(source, data_cfg.get("text_key", "text"))


class TextSource:
    """A TFDS data source seen as a sequence of `str`, for `grain.MapDataset.source`."""

    def __init__(self, source: Sequence[dict[str, Any]], text_key: str):
        self._source = source
        self._text_key = text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        return self._text(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        # array_record reads a batch of records in one call; grain uses this when it can.
        return [self._text(r) for r in self._source.__getitems__(indices)]

    def record(self, index: int) -> dict[str, Any]:
        """The full decoded example, e.g. to see its `path`."""
        return self._source[index]

    def _text(self, record: dict[str, Any]) -> str:
        try:
            text = record[self._text_key]
        except KeyError as e:
            raise ValueError(
                f"Examples have no feature {self._text_key!r} (they have {sorted(record)}); set data.text_key."
            ) from e
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)

    def __repr__(self) -> str:
        return f"TextSource({self._source!r}, text_key={self._text_key!r})"


@contextlib.contextmanager
def _quiet_tfds():
    """A first build is routine here: no progress bars, no warnings about the half-built folder."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
