"""The Grain pipeline for image-text data: examples with images in, packed multimodal batches out.

`data.task` picks the objective:
  captions  pretraining: tokens = [bos] + encode(text) + [eos]; every target is scored.
  vqa       tokens = [bos] + encode(vqa_prompt(question)) + encode(vqa_answer(answer)) + [eos]; the
            answer's tokens and the eos are scored (the model is not trained to ask questions).
Sources (`image_examples`): data.name="shapes" (the synthetic dataset, shapes.py); JSONL files
in data.files (train) / data.eval_files (evaluation), one object per line with "image" (a path
relative to data.image_dir, default the JSONL file's folder) or "images" (a list of them) and
"text", or "question" and "answer"; any other data.name is a TFDS dataset prepared as
array_record with an `image` feature and `text` (or `question`, `answer`) features.

Per process: the process's shard of the examples, shuffled with the seed (a new order every
epoch, train only), decoded (images.load_image: RGB, resized to data.image_size, [-1, 1]) and
tokenized in the pipeline's threads, then packed first-fit: a row takes whole examples until the
next one would overflow seq_len tokens or data.max_images images (examples are never split, so an
image never loses its caption). A batch is a dict of numpy arrays:
  inputs, targets, segment_ids, positions, weights   int32 [B, L], as pipeline.py's (segment 0 is
                     padding; positions restart at 0 in each segment; weights mark scored targets)
  images             float32 [B, M, H, W, 3] in [-1, 1]; M = data.max_images, empty slots zero
  image_segment_ids  int32 [B, M]: the text segment each image belongs to (0: empty slot)
The iterator is a grain.DatasetIterator whose state (get_state / set_state, JSON) the checkpoint
saves like the text pipeline's, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from llmjax.data import corpus, images as images_lib, pipeline, shapes
from llmjax.data.tokenizer import Tokenizer

TASKS = ("captions", "vqa")
TEXT_FEATURES = ("inputs", "targets", "weights")


def vqa_prompt(question: str) -> str:
    """The text before the answer in a VQA row; generation must prompt with exactly this."""
    return f"question: {question} answer:"


def vqa_answer(answer: str) -> str:
    """The answer's text as it follows the prompt: after a space, so its words are the same
    tokens as in the captions ("▁red", not the word-initial "red" that no caption contains) and
    what the model learned from captions carries over to the answers."""
    return " " + answer.strip()


# ---------------------------------------------------------------------------------------------
# Sources: every example is {"images": [path | encoded bytes | uint8 pixels], "text"} or
# {"images": [...], "question", "answer"}, images still encoded (decoding is the pipeline's work).

def image_examples(data_cfg, split: str) -> Sequence[dict[str, Any]]:
    """Random-access examples of `split` ("train" or "validation") for the configured source."""
    name = data_cfg.get("name", "")
    if name == "shapes":
        return _RecordSource(shapes.load_split(data_cfg, _tfds_split(data_cfg, split)))
    files = data_cfg.get("files", "") if split == "train" else data_cfg.get("eval_files", "")
    if files:
        return read_image_jsonl(files, data_cfg.get("image_dir", ""))
    if not name or name in corpus.LOCAL_CORPORA:
        raise ValueError(f"data.task={data_cfg.get('task')!r} needs image-text data: set "
                         "data.name='shapes', data.files / data.eval_files (JSONL), or data.name "
                         "to a TFDS image-text dataset prepared as array_record.")
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir, tfds_split = corpus.resolve_data_dir(data_cfg), _tfds_split(data_cfg, split)
    try:
        # What tfds.data_source(..., download=False) does, with the features looked at first: a
        # decoder for a feature the dataset lacks fails deep in TFDS ("Error while flattening
        # dict"), before _RecordSource could say that the image is missing.
        builder = tfds.builder(name, data_dir=data_dir)
        features = sorted(builder.info.features.keys())
        source = builder.as_data_source(
            split=tfds_split,
            decoders={"image": tfds.decode.SkipDecoding()} if "image" in features else None)
    except (tfds.core.registered.DatasetNotFoundError, NotImplementedError, FileNotFoundError,
            AssertionError) as e:
        raise ValueError(f"TFDS dataset {name!r} (split {tfds_split!r}) is not prepared as "
                         f"array_record in {data_dir}; prepare it with `tfds build {name} "
                         f"--file_format=array_record --data_dir={data_dir}`.") from e
    if "image" not in features:
        raise ValueError(f"TFDS dataset {name!r} has no feature 'image' (it has {features}); "
                         "image-text data needs an 'image' feature and 'text' (or 'question' and "
                         "'answer') features.")
    return _RecordSource(source, text_key=data_cfg.get("text_key", "text"))


def _tfds_split(data_cfg, split: str) -> str:
    return data_cfg.get("split_train" if split == "train" else "split_eval", split)


class _RecordSource:
    """TFDS records (an `image` feature, encoded or decoded) seen as examples."""

    def __init__(self, source, text_key: str = "text"):
        self._source, self._text_key = source, text_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        if "image" not in record:
            raise ValueError(f"Example {index} has no feature 'image' (it has {sorted(record)}); "
                             "image-text data needs an 'image' feature.")
        example = {"images": [record["image"]]}
        for field, key in (("text", self._text_key), ("question", "question"),
                           ("answer", "answer")):
            if key in record:
                value = record[key]
                example[field] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return example


def read_image_jsonl(files: str, image_dir: str = "") -> list[dict[str, Any]]:
    """The examples of JSONL `files` (comma-separated paths or globs); image paths are made
    absolute against `image_dir`, or else the folder of the JSONL file that names them."""
    examples = []
    for pattern in filter(None, (p.strip() for p in files.split(","))):
        paths = sorted(glob.glob(os.path.expanduser(pattern)))
        if not paths:
            raise FileNotFoundError(f"no JSONL file matches {pattern!r}; check data.files / "
                                    "data.eval_files.")
        for path in paths:
            base = os.path.expanduser(image_dir) or os.path.dirname(os.path.abspath(path))
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        examples.append(_jsonl_example(line, f"{path}:{number}", base))
    if not examples:
        raise ValueError(f"the JSONL files {files!r} hold no examples.")
    return examples


def _jsonl_example(line: str, where: str, base: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object.") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object; each line must be one JSON object.")
    listed = record.get("images", [record["image"]] if "image" in record else None)
    has_text = "text" in record or ("question" in record and "answer" in record)
    if not isinstance(listed, list) or not has_text:
        raise ValueError(f"{where}: each line needs \"image\" (or a list \"images\") and \"text\" "
                         "(or \"question\" and \"answer\").")
    example = {k: str(record[k]) for k in ("text", "question", "answer") if k in record}
    example["images"] = [os.path.join(base, os.path.expanduser(str(p))) for p in listed]
    return example


# ---------------------------------------------------------------------------------------------
# Per-example transformation and the batch.

class ImageTextRow(grain.transforms.Map):
    """An example -> {"inputs", "targets", "weights": [n <= seq_len], "images": [k, H, W, 3]}."""

    def __init__(self, data_cfg, tokenizer: Tokenizer, seq_len: int):
        self.tokenizer, self.seq_len, self.task = tokenizer, seq_len, data_cfg.get("task", "captions")
        self.size = int(data_cfg.get("image_size", 32))
        self.resize = bool(data_cfg.get("resize_images", True))
        self.max_images = int(data_cfg.get("max_images", 1))

    def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        if self.task == "vqa":
            if "question" not in example or "answer" not in example:
                raise ValueError(f"data.task='vqa' needs examples with \"question\" and \"answer\" "
                                 f"(this one has {sorted(example)}); use data.task='captions'.")
            question = tok.encode(vqa_prompt(example["question"]))
            answer = tok.encode(vqa_answer(example["answer"])) + [tok.eos_id]
            # Too long: the question loses its start (the bos and the scored answer stay), then
            # the answer its end. A row holds seq_len + 1 tokens (inputs and targets overlap).
            keep = max(0, self.seq_len - len(answer))
            prompt = [tok.bos_id] + question[len(question) - keep:] if keep else [tok.bos_id]
            tokens, scored_from = prompt + answer, len(prompt) - 1
        else:
            if "text" not in example:
                raise ValueError(f"data.task='captions' needs examples with \"text\" (this one has "
                                 f"{sorted(example)}); use data.task='vqa'.")
            tokens, scored_from = [tok.bos_id] + tok.encode(example["text"]) + [tok.eos_id], 0
        tokens = np.asarray(tokens[:self.seq_len + 1], np.int32)  # a caption loses its end
        weights = (np.arange(len(tokens) - 1) >= scored_from).astype(np.int32)
        listed = example["images"]
        if len(listed) > self.max_images:
            raise ValueError(f"An example has {len(listed)} images but a row holds at most "
                             f"data.max_images={self.max_images}; raise data.max_images.")
        pixels = np.zeros((len(listed), self.size, self.size, 3), np.float32)
        for i, image in enumerate(listed):
            pixels[i] = images_lib.load_image(image, self.size, self.resize)
        return {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights, "images": pixels}


def _model_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"inputs": packed["inputs"], "targets": packed["targets"],
            "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"],
            "weights": packed["weights"], "images": packed["images"],
            "image_segment_ids": packed["images_segment_ids"]}


def _batches(examples: grain.MapDataset, data_cfg, tokenizer: Tokenizer, seq_len: int, rows: int,
             seed: int, *, train: bool) -> grain.IterDataset:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 for image-text rows, got {seq_len}.")
    max_images = int(data_cfg.get("max_images", 1))
    if max_images < 1:
        raise ValueError(f"data.max_images={max_images} must be at least 1; set it to the most "
                         "images one packed row may carry.")
    read = grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 2)),
                             prefetch_buffer_size=int(data_cfg.get("read_buffer", 16)))
    rows_ds = examples.map(ImageTextRow(data_cfg, tokenizer, seq_len)).to_iter_dataset(read)
    lengths = {**{k: seq_len for k in TEXT_FEATURES}, "images": max_images}
    # First-fit over a batch's worth of bins: whole examples only, and the bins' order shuffled
    # (train) so a batch does not always put the short examples in its last rows. The packer's
    # state is its parent's position plus the example that did not fit, so resume is exact.
    packed = grain.experimental.FirstFitPackIterDataset(
        rows_ds, length_struct=lengths, num_packing_bins=max(rows, 8), seed=seed,
        shuffle_bins=train)
    return pipeline._JsonStateIterDataset(packed.batch(rows, drop_remainder=True).map(_model_batch))


def make_train_iterator(data_cfg, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                        seed: int, process_index=None, process_count=None,
                        workdir=None) -> grain.DatasetIterator:
    """Endless, checkpointable batches of this process's share of the training examples."""
    del workdir
    process_index, process_count = pipeline._process(process_index, process_count)
    rows = pipeline._rows_per_process(batch_size, process_count)
    ds = grain.MapDataset.source(image_examples(data_cfg, "train"))
    ds = pipeline._shard(ds, process_index, process_count, "train", strict=True)
    return iter(_batches(ds.shuffle(seed).repeat(), data_cfg, tokenizer, seq_len, rows, seed,
                         train=True))


def make_eval_batches(data_cfg, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int, process_index=None,
                      process_count=None) -> list[dict[str, np.ndarray]]:
    """`num_batches` batches of the evaluation examples in stored order (cycled if too few), the
    same on every call."""
    process_index, process_count = pipeline._process(process_index, process_count)
    rows = pipeline._rows_per_process(batch_size, process_count)
    ds = grain.MapDataset.source(image_examples(data_cfg, "validation"))
    ds = pipeline._shard(ds, process_index, process_count, "validation", strict=False)
    batches = _batches(ds.repeat(), data_cfg, tokenizer, seq_len, rows, 0, train=False)
    return list(itertools.islice(iter(batches), num_batches))


def tokenizer_texts(data_cfg, max_chars: int) -> list[str]:
    """Texts of the training examples (captions, questions in their prompt, answers) until
    `max_chars`, to train a tokenizer that knows the words the model must read and write."""
    texts, total = [], 0
    source = image_examples(data_cfg, "train")
    for i in range(len(source)):
        example = source[i]
        for text in (example.get("text"), example.get("question") and vqa_prompt(example["question"]),
                     example.get("answer") and vqa_answer(example["answer"])):
            if text:
                texts.append(text)
                total += len(text)
        if total >= max_chars:
            break
    return texts


def tokenizer_data(data_cfg):
    """The data section a new tokenizer is trained from: the training examples' texts (at most
    data.tokenizer_train_chars), written once as text files into the data dir and read as a
    data.name='text' corpus, so the tokenizer knows the captions', questions' and answers' words."""
    import hashlib  # pylint: disable=g-import-not-at-top
    texts = tokenizer_texts(data_cfg, int(data_cfg.get("tokenizer_train_chars", 5_000_000)))
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    folder = os.path.join(corpus.resolve_data_dir(data_cfg), "llmjax_image_text", digest)
    parts = 16  # documents, so that holding out a validation share leaves most of them to train on
    if not os.path.isdir(folder):
        tmp = f"{folder}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for k in range(parts):
            with open(os.path.join(tmp, f"part-{k:02d}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(texts[k::parts]) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same texts first
            import shutil  # pylint: disable=g-import-not-at-top
            shutil.rmtree(tmp, ignore_errors=True)
    source = data_cfg.copy_and_resolve_references()
    with source.unlocked():
        source.name, source.files, source.task = "text", os.path.join(folder, "*.txt"), "lm"
    return source
