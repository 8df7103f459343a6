"""An offline synthetic image-text dataset: coloured shapes on black, with captions and questions.

Why: a multimodal decoder needs a dataset that exists on every machine, builds in seconds and has
answers that can be checked, so a short run shows whether the model learned to look at the image
(per-kind accuracy against chance) before anyone downloads COCO.

Each example is rendered from its own seed (split seed, index) with Pillow: 1-4 shapes (circle,
square, triangle) in distinct columns of a `size` x `size` canvas (so "left of" is unambiguous),
each centred in a cell of a 4 x 4 grid and at least three quarters as wide, in one of `COLOURS`,
drawn without antialiasing so every pixel is exactly a palette colour.

Two choices make both what and which colour a shape is learnable by a small ViT in a few CPU
minutes (measured with configs/multimodal_small.py:runlocal, whose 8-pixel patches are the 32-pixel
image's cells). Pastel colours: with pure colours (255, 0, 0) on black the colour carried 61% of a
patch's pixel variance and the shape 7%, and captioning taught the ViT colour alone (99% of its
output variance, shape 0.1%; shapes at chance after 2,400 steps); with the components at 128
instead of 0, shape won and colour was never learned; at 80 both are. Shapes centred in cells: a
shape straddling two patches was not learned at all in 800 steps.
Features:
  image     PNG-encoded uint8 [size, size, 3]
  text      a caption, e.g. "two red circles and a blue square. the red circle is left of the
            blue square."
  question, answer, kind   one question per example; kind is colour | count | shape | position
  objects   JSON list of the drawn shapes [{"shape", "colour", "x", "y", "r"}] left to right
            (what the caption and the answer were derived from; tests and evaluation read it)
Validation and test examples whose layout also occurs in train are redrawn, so held-out
accuracy is never memorisation. The builder config name carries every setting (size, split
sizes, seed), so different settings never share a cache entry.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from llmjax import progress
from llmjax.data import corpus

# Pastel: every colour lights all three channels (see the module docstring for why).
COLOURS = {"red": (255, 80, 80), "green": (80, 255, 80), "blue": (80, 80, 255),
           "yellow": (255, 255, 80), "purple": (210, 80, 255)}
SHAPES = ("circle", "square", "triangle")
MAX_SHAPES = 4
NUMBERS = ("zero", "one", "two", "three", "four")
KINDS = ("colour", "count", "shape", "position")
SPLITS = ("train", "validation", "test")
# Bump when the rendering or the text changes for the same settings; it is part of the cache key.
_FORMAT_VERSION = 3
DEFAULTS = {"image_size": 32, "train": 20_000, "validation": 1_000, "test": 1_000, "seed": 0}


def settings(data_cfg) -> dict[str, int]:
    """The dataset's settings from the config: data.image_size, data.shapes_train,
    data.shapes_validation (also the test split's size) and data.shapes_seed."""
    get = data_cfg.get
    return {"image_size": int(get("image_size", DEFAULTS["image_size"])),
            "train": int(get("shapes_train", DEFAULTS["train"])),
            # The test split is as large as validation: both are held out, one to tune on.
            **dict.fromkeys(("validation", "test"),
                            int(get("shapes_validation", DEFAULTS["validation"]))),
            "seed": int(get("shapes_seed", DEFAULTS["seed"]))}


def config_name(s: dict[str, int]) -> str:
    return (f"v{_FORMAT_VERSION}-s{s['image_size']}-n{s['train']}-{s['validation']}-{s['test']}"
            f"-seed{s['seed']}")


def layout(seed: int, split: str, index: int, size: int) -> list[dict[str, Any]]:
    """The shapes of one example, left to right: a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    cell = size // MAX_SHAPES
    n = int(rng.integers(1, MAX_SHAPES + 1))
    columns = sorted(rng.choice(MAX_SHAPES, n, replace=False).tolist())
    objects = []
    for col in columns:
        r = int(rng.integers(max(2, cell * 4 // 10), cell // 2 + 1))  # half the shape's width
        x = col * cell + cell // 2
        y = int(rng.integers(MAX_SHAPES)) * cell + cell // 2
        objects.append({"shape": SHAPES[rng.integers(len(SHAPES))],
                        "colour": list(COLOURS)[rng.integers(len(COLOURS))], "x": x, "y": y, "r": r})
    return objects


def render(objects: list[dict[str, Any]], size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the shapes on black, every pixel a palette colour or black."""
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for o in objects:
        x, y, r, fill = o["x"], o["y"], o["r"], COLOURS[o["colour"]]
        box = (x - r, y - r, x + r - 1, y + r - 1)
        if o["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r - 1, y + r - 1)], fill=fill)
    return np.asarray(image)


def _plural(word: str) -> str:
    return word + "s"


def _noun(count: int, colour: str, shape: str) -> str:
    return f"a {colour} {shape}" if count == 1 else f"{NUMBERS[count]} {colour} {_plural(shape)}"


def caption(objects: list[dict[str, Any]]) -> str:
    """Groups of (colour, shape) with their counts, ordered by their leftmost member; then, if two
    shapes can be named unambiguously, where the leftmost such one is relative to the rightmost."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o["colour"], o["shape"])] = groups.get((o["colour"], o["shape"]), 0) + 1
    parts = [_noun(n, c, s) for (c, s), n in groups.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    unique = [p for p in groups if groups[p] == 1]
    if len(unique) > 1:
        (c1, s1), (c2, s2) = unique[0], unique[-1]
        text += f". the {c1} {s1} is left of the {c2} {s2}"
    return text + "."


def question(objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, kind) about `objects`; the kind is drawn among those the image allows
    (a colour question needs a shape type that occurs once, a position question two
    distinguishable shapes)."""
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    pairs = [(o["colour"], o["shape"]) for o in objects]
    unique_shapes = [s for s in SHAPES if shapes.count(s) == 1]
    unique_colours = [c for c in COLOURS if colours.count(c) == 1]
    unique_pairs = [p for p in pairs if pairs.count(p) == 1]
    kinds = ["count"] + ["colour"] * bool(unique_shapes) + ["shape"] * bool(unique_colours) + (
        ["position"] * (len(unique_pairs) >= 2))
    kind = kinds[rng.integers(len(kinds))]
    if kind == "count":
        shape = SHAPES[rng.integers(len(SHAPES))]
        return f"how many {_plural(shape)} are there?", NUMBERS[shapes.count(shape)], kind
    if kind == "colour":
        shape = unique_shapes[rng.integers(len(unique_shapes))]
        return f"what colour is the {shape}?", colours[shapes.index(shape)], kind
    if kind == "shape":
        colour = unique_colours[rng.integers(len(unique_colours))]
        return f"what shape is the {colour} one?", shapes[colours.index(colour)], kind
    a, b = rng.choice(len(unique_pairs), 2, replace=False)
    (ca, sa), (cb, sb) = unique_pairs[a], unique_pairs[b]
    answer = "yes" if pairs.index((ca, sa)) < pairs.index((cb, sb)) else "no"
    return f"is the {ca} {sa} left of the {cb} {sb}?", answer, kind


def answer_space(kind: str) -> tuple[str, ...]:
    """Every answer a question of `kind` can have (its chance level is one over their number)."""
    return {"colour": tuple(COLOURS), "count": NUMBERS[:MAX_SHAPES + 1], "shape": SHAPES,
            "position": ("yes", "no")}[kind]


def _signature(objects) -> tuple:
    return tuple((o["shape"], o["colour"], o["x"], o["y"], o["r"]) for o in objects)


def example(seed: int, split: str, index: int, size: int, taken: frozenset = frozenset()) -> dict:
    """Example `index` of `split`: redrawn (a new sub-seed) while its layout is in `taken`."""
    attempt = 0
    while True:
        sub = index if attempt == 0 else index + attempt * (1 << 32)
        objects = layout(seed, split, sub, size)
        if _signature(objects) not in taken:
            break
        attempt += 1
    rng = np.random.default_rng([seed, SPLITS.index(split), sub, 1])
    q, a, kind = question(objects, rng)
    png = io.BytesIO()
    Image.fromarray(render(objects, size)).save(png, format="PNG")
    return {"image": png.getvalue(), "text": caption(objects), "question": q, "answer": a,
            "kind": kind, "objects": json.dumps(objects)}


class LlmjaxShapes(corpus.LocalBuilder):
    """Synthetic shapes with captions and one question each; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, settings: dict[str, int], **kwargs):
        self._settings = settings
        self._progress = None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self._settings["image_size"]
        return tfds.core.DatasetInfo(
            builder=self,
            description="Coloured shapes on black with captions and questions (llmjax).",
            disable_shuffling=True,  # record i is example i (Grain shuffles for training)
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                **{k: tfds.features.Text() for k in ("text", "question", "answer", "kind",
                                                     "objects")}}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        s = self._settings
        train = frozenset(_signature(layout(s["seed"], "train", i, s["image_size"]))
                          for i in range(s["train"]))
        return {split: self._generate_examples(split, frozenset() if split == "train" else train)
                for split in SPLITS if s[split] > 0}

    def _generate_examples(self, split: str, taken: frozenset):
        s = self._settings
        for i in range(s[split]):
            record = example(s["seed"], split, i, s["image_size"], taken)
            record["image"] = io.BytesIO(record["image"])  # stored as is: encoding needs TF
            yield i, record
            if self._progress is not None:
                self._progress.update()


_PREPARED: dict[tuple[str, str], LlmjaxShapes] = {}


def prepare(data_cfg) -> LlmjaxShapes:
    """Builds the shapes dataset for `data_cfg`'s settings once into the data dir; its builder."""
    s = settings(data_cfg)
    if s["image_size"] < 4 * MAX_SHAPES:
        raise ValueError(f"data.image_size={s['image_size']} is too small to draw {MAX_SHAPES} "
                         f"shapes side by side; set data.image_size to at least {4 * MAX_SHAPES}.")
    name, data_dir = config_name(s), corpus.resolve_data_dir(data_cfg)
    key = (data_dir, name)
    if key in _PREPARED:
        return _PREPARED[key]

    def make_builder():
        with corpus._quiet_tfds():
            return LlmjaxShapes(config=name, data_dir=data_dir, file_format="array_record",
                                settings=s)

    builder = make_builder()
    with corpus._quiet_tfds():
        prepared = builder.is_prepared()
    if not prepared:
        # Another process (a pytest worker, a host sharing the disk) may be building it: wait
        # for it and reuse its result (see corpus.prepare).
        with corpus._file_lock(os.path.join(data_dir, LlmjaxShapes.name, f"{name}.lock")):
            builder = make_builder()
            if not builder.is_prepared():
                total = sum(s[split] for split in SPLITS)
                with corpus._quiet_tfds(), progress.bar(total=total, desc=f"shapes {name}",
                                                        unit="example") as bar:
                    builder._progress = bar
                    try:
                        builder.download_and_prepare()
                    finally:
                        builder._progress = None
    _PREPARED[key] = builder
    return builder


def load_split(data_cfg, split: str):
    """Random-access records of `split` with `image` left PNG-encoded (decoded in the pipeline)."""
    return prepare(data_cfg).as_data_source(split=split,
                                            decoders={"image": tfds.decode.SkipDecoding()})
