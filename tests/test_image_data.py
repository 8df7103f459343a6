"""Image-text data: load_image, the synthetic shapes builder, the image pipeline and VQA scoring."""

import io
import json

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from llmjax.data import corpus, image_pipeline, shapes, vqa
from llmjax.data.images import load_image, normalize
from llmjax.data.tokenizer import train_tokenizer

SEQ_LEN, ROWS, MAX_IMAGES = 48, 4, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _cfg(data_dir, **kw):
    return ml_collections.ConfigDict({**dict(
        name="shapes", task="captions", data_dir=data_dir, image_size=32, max_images=MAX_IMAGES,
        resize_images=True, shapes_train=200, shapes_validation=40, shapes_seed=0,
        split_train="train", split_eval="validation"), **kw})


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return train_tokenizer(image_pipeline.tokenizer_texts(_cfg(data_dir), 100_000), 512, None)


def _png(path, size=(40, 30), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


# --- load_image ----------------------------------------------------------------------------------

def test_load_image_resizes_and_normalizes(tmp_path):
    path = _png(tmp_path / "red.png")
    x = load_image(path, 16)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], 1.0)
    np.testing.assert_allclose(x[..., 1:], -1.0)
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")  # grey -> RGB, mid value ~0
    g = load_image(tmp_path / "grey.png", 8, resize=False)
    assert g.shape == (8, 8, 3) and abs(float(g.mean())) < 0.01
    noisy = load_image(open(path, "rb").read(), 32)
    assert -1.0 <= noisy.min() and noisy.max() <= 1.0


def test_load_image_errors_are_one_sentence(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for args, words in [((tmp_path / "bad.png", 16), ["bad.png", "decode"]),
                        ((tmp_path / "missing.png", 16), ["missing.png", "no such file"]),
                        ((_png(tmp_path / "r.png"), 16, False), ["40x30", "16x16",
                                                                 "data.resize_images"])]:
        with pytest.raises(ValueError) as e:
            load_image(*args)
        message = str(e.value)
        assert all(w in message for w in words), message
        assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message


# --- the shapes dataset ----------------------------------------------------------------------------

def test_shapes_are_deterministic_and_match_their_text():
    a, b = shapes.example(0, "train", 7, 32), shapes.example(0, "train", 7, 32)
    assert a == b
    assert shapes.example(1, "train", 7, 32) != a
    for i in range(60):
        e = shapes.example(0, "train", i, 32)
        objects = json.loads(e["objects"])
        pixels = np.asarray(Image.open(__import__("io").BytesIO(e["image"])).convert("RGB"))
        for name, rgb in shapes.COLOURS.items():
            drawn = int(np.all(pixels == rgb, axis=-1).sum())
            assert (drawn > 0) == any(o["colour"] == name for o in objects), (i, name)
        assert [o["x"] for o in objects] == sorted(o["x"] for o in objects)
        for o in objects:  # every shape's colour is at its centre, the centre of a grid cell
            assert tuple(pixels[o["y"], o["x"]]) == shapes.COLOURS[o["colour"]]
            assert o["x"] % 8 == o["y"] % 8 == 4 and 3 <= o["r"] <= 4
        for o in objects:
            assert o["colour"] in e["text"] and o["shape"] in e["text"]
        assert e["answer"] in shapes.answer_space(e["kind"])
        if e["kind"] == "count":
            shape = e["question"].split()[2][:-1]
            assert e["answer"] == shapes.NUMBERS[sum(o["shape"] == shape for o in objects)]
        if e["kind"] == "colour":
            shape = e["question"].split()[-1][:-1]
            assert [o["colour"] for o in objects if o["shape"] == shape] == [e["answer"]]


def test_shapes_builder_splits(data_dir):
    cfg = _cfg(data_dir)
    train, val, test = (shapes.load_split(cfg, s) for s in shapes.SPLITS)
    assert (len(train), len(val), len(test)) == (200, 40, 40)
    # What is stored is what the generator drew (TFDS may re-encode the PNG, never the pixels).
    np.testing.assert_array_equal(load_image(train[5]["image"], 32),
                                  load_image(shapes.example(0, "train", 5, 32)["image"], 32))
    layouts = {s: {r["objects"] for r in src} for s, src in
               (("train", train), ("validation", val), ("test", test))}
    assert not layouts["train"] & layouts["validation"] and not layouts["train"] & layouts["test"]
    assert layouts["validation"] != layouts["test"]


# --- the pipeline ------------------------------------------------------------------------------------

def _check_batch(b, image_size=32):
    L = SEQ_LEN
    for k in ("inputs", "targets", "segment_ids", "positions", "weights"):
        assert b[k].shape == (ROWS, L) and b[k].dtype == np.int32, k
    assert b["images"].shape == (ROWS, MAX_IMAGES, image_size, image_size, 3)
    assert b["images"].dtype == np.float32
    assert b["image_segment_ids"].shape == (ROWS, MAX_IMAGES)
    assert b["image_segment_ids"].dtype == np.int32
    assert b["images"].min() >= -1 and b["images"].max() <= 1
    for r in range(ROWS):
        seg, img = b["segment_ids"][r], b["image_segment_ids"][r]
        assert set(img[img > 0]) <= set(seg[seg > 0])  # every image belongs to a text segment
        assert not b["images"][r][img == 0].any()  # empty slots are zero
        assert not b["weights"][r][seg == 0].any()
        for s in set(seg[seg > 0]):
            assert list(b["positions"][r][seg == s]) == list(range(int((seg == s).sum())))


def _assert_resumes_exactly(it, make, steps: int):
    """A fresh iterator from `make()` given `it`'s state (as the checkpoint stores it, JSON) yields
    the same next `steps` batches as `it`."""
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(steps)]
    restored = make()
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(steps))):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def test_caption_batches_and_exact_resume(data_dir, tokenizer):
    cfg = _cfg(data_dir)
    make = lambda: image_pipeline.make_train_iterator(cfg, tokenizer, seq_len=SEQ_LEN,
                                                       batch_size=ROWS, seed=3, process_index=0,
                                                       process_count=1)
    it = make()
    for _ in range(3):
        _check_batch(b := next(it))
        assert ((b["weights"] == 1) == (b["segment_ids"] > 0)).all()  # captions: all scored
    # Shapes draws one image per example: each text segment has exactly one image.
    seg = b["segment_ids"][0]
    assert sorted(b["image_segment_ids"][0][b["image_segment_ids"][0] > 0]) == sorted(set(seg[seg > 0]))
    _assert_resumes_exactly(it, make, 4)


def test_vqa_weights_cover_only_the_answer(data_dir, tokenizer):
    cfg = _cfg(data_dir, task="vqa")
    b = next(image_pipeline.make_train_iterator(cfg, tokenizer, seq_len=SEQ_LEN, batch_size=ROWS,
                                                seed=0, process_index=0, process_count=1))
    _check_batch(b)
    answers = set(sum((shapes.answer_space(k) for k in shapes.KINDS), ()))
    for r in range(ROWS):
        seg = b["segment_ids"][r]
        for s in set(seg[seg > 0]):
            scored = b["targets"][r][(seg == s) & (b["weights"][r] == 1)]
            assert scored[-1] == tokenizer.eos_id
            answer = tokenizer.decode([int(t) for t in scored[:-1]])
            assert answer.startswith(" ") and answer.strip() in answers
            assert b["weights"][r][seg == s][0] == 0  # the question is not scored
    # An answer is the same tokens as the word inside a caption (what pretraining taught), not
    # the word-initial pieces no caption contains.
    for word in ("red", "purple", "three", "triangle"):
        assert tokenizer.encode(image_pipeline.vqa_answer(word)) == tokenizer.encode(
            f"a {word}")[len(tokenizer.encode("a")):]


def test_eval_batches_repeat(data_dir, tokenizer):
    kw = dict(seq_len=SEQ_LEN, batch_size=ROWS, num_batches=2, process_index=0, process_count=1)
    a = image_pipeline.make_eval_batches(_cfg(data_dir), tokenizer, **kw)
    b = image_pipeline.make_eval_batches(_cfg(data_dir), tokenizer, **kw)
    assert len(a) == 2
    for x, y in zip(a, b):
        _check_batch(x)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_image_folder_jsonl(tmp_path, tokenizer):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", (50, 40), (255, 0, 0))
    _png(folder / "b.png", (32, 32), (0, 0, 255))
    lines = [{"image": "imgs/a.png", "text": "a red square."},
             {"images": ["imgs/a.png", "imgs/b.png"], "text": "a red square and a blue one."},
             {"image": "imgs/b.png", "question": "what colour is it?", "answer": "blue"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
    cfg = ml_collections.ConfigDict(dict(name="", task="captions", image_size=32,
                                         max_images=MAX_IMAGES, resize_images=True,
                                         files=str(tmp_path / "train.jsonl"), eval_files="",
                                         image_dir=""))
    examples = image_pipeline.read_image_jsonl(cfg.files)
    assert [len(e["images"]) for e in examples] == [1, 2, 1]
    cfg.files = str(tmp_path / "captions.jsonl")
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(l) for l in lines[:2]) + "\n")
    b = next(image_pipeline.make_train_iterator(cfg, tokenizer, seq_len=SEQ_LEN, batch_size=ROWS,
                                                seed=0, process_index=0, process_count=1))
    _check_batch(b)
    two = [r for r in range(ROWS) if np.count_nonzero(b["image_segment_ids"][r]) >= 2]
    assert two  # the two-image example's images share one segment (or rows pack two examples)
    red = b["images"][b["image_segment_ids"] > 0]
    assert red.shape[1:] == (32, 32, 3)
    cfg.task, cfg.files = "vqa", str(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match="question"):
        next(image_pipeline.make_train_iterator(cfg, tokenizer, seq_len=SEQ_LEN, batch_size=ROWS,
                                                seed=0, process_index=0, process_count=1))


# --- a TFDS image-text dataset, as `tfds build NAME --file_format=array_record` leaves it ---

CAPTIONS = {"train": ["a red circle.", "two blue squares.", "a green triangle.",
                      "a yellow circle and a red square.", "three purple triangles.",
                      "a blue circle."],
            "validation": ["a green square.", "two red circles.", "a purple square."]}


class _TestCaptions(corpus.LocalBuilder, skip_registration=True):
    """`image` (PNG, a different size per example, none of them square) and `text`: each image one
    solid colour, the caption's first colour word. Not registered, so the reading process knows
    the dataset only by its files, as it knows one that `tfds build` prepared elsewhere."""

    name = "llmjax_test_captions"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in CAPTIONS}

    def _generate_examples(self, split):
        for i, text in enumerate(CAPTIONS[split]):
            png = io.BytesIO()
            Image.new("RGB", (40 + 4 * i, 24 + 2 * i), _colour(text)).save(png, format="PNG")
            png.seek(0)
            yield f"{split}-{i}", {"image": png, "text": text}


class _TestTextOnly(corpus.LocalBuilder, skip_registration=True):
    name = "llmjax_test_text_only"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"text": "a red circle."}


def _colour(text):
    return shapes.COLOURS[next(w for w in text.split() if w in shapes.COLOURS)]


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("user_tfds"))
    with corpus._quiet_tfds():
        for builder in (_TestCaptions, _TestTextOnly):
            builder(data_dir=folder, file_format="array_record").download_and_prepare()
    return folder


def _tfds_cfg(captions_dir, **kw):
    return ml_collections.ConfigDict({**dict(
        name="llmjax_test_captions", task="captions", data_dir=captions_dir, image_size=32,
        max_images=MAX_IMAGES, resize_images=True, split_train="train",
        split_eval="validation"), **kw})


def _segments(b, tokenizer):
    """(caption, its images) of every text segment of batch `b`."""
    found = []
    for r in range(ROWS):
        seg, img = b["segment_ids"][r], b["image_segment_ids"][r]
        for s in sorted(set(seg[seg > 0])):
            targets = b["targets"][r][seg == s]
            assert targets[-1] == tokenizer.eos_id
            text = tokenizer.decode([int(t) for t in targets[:-1]])
            found.append((text, b["images"][r][img == s]))
    return found


def test_tfds_image_text_dataset_from_files(captions_dir, tokenizer):
    """A TFDS dataset the process has no code for, prepared as array_record: read from its files,
    resized to data.image_size, each caption with its own image, and resumed exactly."""
    assert "llmjax_test_captions" not in tfds.list_builders(with_community_datasets=False)
    assert isinstance(tfds.builder("llmjax_test_captions", data_dir=captions_dir),
                      tfds.core.read_only_builder.ReadOnlyBuilder)
    cfg = _tfds_cfg(captions_dir)
    assert sorted(image_pipeline.tokenizer_texts(cfg, 10_000)) == sorted(CAPTIONS["train"])
    make = lambda: image_pipeline.make_train_iterator(cfg, tokenizer, seq_len=SEQ_LEN,
                                                       batch_size=ROWS, seed=5, process_index=0,
                                                       process_count=1)
    it = make()
    seen = set()
    for _ in range(3):
        _check_batch(b := next(it))
        assert ((b["weights"] == 1) == (b["segment_ids"] > 0)).all()
        for text, pixels in _segments(b, tokenizer):
            assert text in CAPTIONS["train"], text
            assert pixels.shape == (1, 32, 32, 3)  # resized from 40x24 and up
            want = normalize(np.asarray(_colour(text), np.uint8))
            np.testing.assert_allclose(pixels[0], np.broadcast_to(want, (32, 32, 3)), atol=1e-6)
            seen.add(text)
    assert seen == set(CAPTIONS["train"])
    _assert_resumes_exactly(it, make, 3)
    evals = image_pipeline.make_eval_batches(cfg, tokenizer, seq_len=SEQ_LEN, batch_size=ROWS,
                                             num_batches=1, process_index=0, process_count=1)
    _check_batch(evals[0])
    assert {t for t, _ in _segments(evals[0], tokenizer)} == set(CAPTIONS["validation"])


def test_tfds_image_text_dataset_errors(captions_dir, tokenizer):
    def first_batch(**kw):
        return next(image_pipeline.make_train_iterator(
            _tfds_cfg(captions_dir, **kw), tokenizer, seq_len=SEQ_LEN, batch_size=ROWS, seed=0,
            process_index=0, process_count=1))
    for kw, words in [(dict(resize_images=False), ["not the expected 32x32", "data.resize_images"]),
                      (dict(name="llmjax_test_missing"), ["'llmjax_test_missing'", "not prepared",
                                                          "tfds build llmjax_test_missing"]),
                      (dict(name="llmjax_test_text_only"), ["no feature 'image'", "['text']"])]:
        with pytest.raises(ValueError) as e:
            first_batch(**kw)
        message = str(e.value)
        assert all(w in message for w in words), message
        assert "\n" not in message and message.endswith("."), message


def test_vqa_chance_levels_and_accuracy(data_dir):
    examples = list(vqa.vqa_examples(_cfg(data_dir), "test"))
    assert len(examples) == 40 and examples[0]["image"].shape == (32, 32, 3)
    levels = vqa.chance_levels(examples)
    assert levels["count"]["chance"] == 1 / 5 and levels["colour"]["chance"] == 1 / 5
    assert sum(v["count"] for v in levels.values()) == 40
    perfect = vqa.vqa_accuracy([e["answer"].title() + "." for e in examples], examples)
    assert perfect["all"]["accuracy"] == 1.0
    blind = vqa.vqa_accuracy(["no"] * len(examples), examples)
    assert blind["all"]["accuracy"] < 0.5


def test_trainer_hooks(data_dir):
    """train.py's data calls (finetune.pipeline_for, tokenizer_data) reach the image pipeline, and
    the image settings are refused where nothing reads them."""
    from llmjax import validate
    from llmjax.config import base_config
    from llmjax.data import finetune
    cfg = _cfg(data_dir)
    assert finetune.pipeline_for(cfg) == (image_pipeline.make_train_iterator,
                                          image_pipeline.make_eval_batches)
    text = finetune.tokenizer_data(cfg)
    assert text.name == "text" and text.task == "lm"
    assert "red" in open(sorted(__import__("glob").glob(text.files))[0]).read()
    config = base_config()
    config.data.max_images = 2
    with pytest.raises(ValueError, match="data.max_images=2 only applies"):
        validate.check_ignored_keys(config)
    config.data.task, config.data.name = "vqa", "shapes"
    validate.check_ignored_keys(config)


# --- the real loop on shapes: exact resume, the held-out VQA command -----------------------------

def _loop_config(data_dir, **overrides):
    """The tiny multimodal model of test_multimodal.py (one image slot, 16x16 in 8x8 patches) on
    the shapes data, through the real loop: 4 steps, a checkpoint every 2."""
    from tests.test_multimodal import tiny_config
    return tiny_config(**{
        "model.vocab_size": 512, "model.max_images": 1, "model.max_len": 4 + 24, "seq_len": 24,
        "batch_size": 8, "mesh.shape": (-1, 1, 1), "total_steps": 4, "checkpoint_every_steps": 2,
        "log_every_steps": 1,
        "eval_every_steps": 4, "eval_steps": 1, "sample.max_new_tokens": 0,
        "data.name": "shapes", "data.task": "vqa", "data.data_dir": data_dir,
        "data.image_size": 16, "data.max_images": 1, "data.shapes_train": 64,
        "data.shapes_validation": 12, **overrides})


@pytest.fixture(scope="module")
def vqa_run(devices, data_dir, tmp_path_factory):
    from llmjax.train import train_and_evaluate
    workdir = tmp_path_factory.mktemp("vqa_run")
    train_and_evaluate(_loop_config(data_dir), str(workdir))
    return workdir


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.slow
def test_multimodal_run_resumes_exactly(vqa_run, data_dir, tmp_path):
    """Stopped after the checkpoint of step 2 and restarted: the image pipeline's state and the
    model's come back, so steps 3 and 4 see the same packed batches and give the same losses."""
    from llmjax.train import train_and_evaluate
    train_and_evaluate(_loop_config(data_dir, stop_at_step=2), str(tmp_path))
    train_and_evaluate(_loop_config(data_dir), str(tmp_path))
    assert len(_losses(vqa_run)) == 4
    assert _losses(tmp_path) == _losses(vqa_run)


@pytest.mark.slow
def test_vqa_evaluation_command(vqa_run, data_dir, monkeypatch, capsys):
    from llmjax.evaluation import vqa as vqa_eval
    examples = list(vqa.vqa_examples(_cfg(data_dir, image_size=16, shapes_train=64,
                                          shapes_validation=12), "validation"))[:6]
    # The real model answers every question (a string each; untrained, so not scored here).
    result = vqa_eval.evaluate(str(vqa_run), limit=6)
    assert result["all"]["count"] == 6
    assert {k: v["chance"] for k, v in result.items() if k != "all"} == {
        k: 1 / len(shapes.answer_space(k)) for k in {e["kind"] for e in examples}}
    # Known answers: right on the first four questions (in the generated form, after a space
    # and with a full stop), a wrong word of the right kind on the last two.
    wrong = {"colour": "red", "count": "zero", "shape": "circle", "position": "yes"}
    def known(run, asked, **kw):
        assert [e["question"] for e in asked] == [e["question"] for e in examples]
        return [f" {e['answer']}." for e in asked[:4]] + [
            " blue" if wrong[e["kind"]] == e["answer"] else " " + wrong[e["kind"]]
            for e in asked[4:]]
    monkeypatch.setattr(vqa_eval, "answer", known)
    vqa_eval.main([f"--workdir={vqa_run}", "--limit=6"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["all"] == {"accuracy": round(4 / 6, 3), "count": 6}
    kinds = [e["kind"] for e in examples]
    for kind in set(kinds):
        right = sum(1 for i, k in enumerate(kinds) if k == kind and i < 4)
        assert printed[kind]["accuracy"] == round(right / kinds.count(kind), 3)


@pytest.mark.slow
def test_generate_benchmark_refuses_a_multimodal_run(vqa_run):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "llmjax.generate", f"--workdir={vqa_run}",
                          "--benchmark"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "a multimodal run answers about images" in last and "encoder" not in last, out.stderr
