"""Decoding with a KV cache, and the command line that uses a trained run.

    python -m llmjax.generate --workdir=DIR --prompt="def fib(n):"      # one continuation
    python -m llmjax.generate --workdir=DIR                             # prompts from stdin
    python -m llmjax.generate --workdir=DIR --benchmark                 # decode speed
    python -m llmjax.generate --workdir=DIR --image=cat.png --prompt="caption:"   # multimodal
    echo '{"image": "cat.png", "prompt": "question: what colour? answer:"}' | \
        python -m llmjax.generate --workdir=DIR                         # (image, prompt) pairs
    --config.sample.temperature=0.7 --config.sample.top_k=40 --config.sample.top_p=0.9
    --config.sample.max_new_tokens=64 --config.sample.seed=1            # sampling overrides

The run's saved config (in its newest checkpoint), its tokenizer (WORKDIR/tokenizer.model or the
config's data.tokenizer) and the newest checkpoint's parameters are used.

The command dispatches on the run's model.family: a decoder continues the prompt (below); an
encoder-decoder decodes a target from it as its encoder input, greedily, by sampling, or by beam
search with --config.sample.num_beams=4 --config.sample.length_penalty=0.6 (llmjax/beam_search.py);
an encoder lists the --config.sample.top_k likeliest tokens of each <mask> in it
(llmjax/fill_mask.py); a multimodal decoder continues the prompt after the image (loaded and
resized by llmjax/data/images.py), which it encodes once into the KV cache
(`MultimodalGenerator`); its stdin lines are JSON objects {"image": path (or "images": [paths]),
"prompt": text}.

Decoding: the prompts are laid out in one [batch, prompt_len] array (left-padded by default, so
every row's last prompt token is in the same column; right padding works too), each row with its
own positions (0 at its first real token). One jitted prefill writes the prompts into a KV cache of
prompt_len + max_new_tokens columns; then a jitted `lax.while_loop` samples one token per step,
feeds it back through the cache and stops early once every row has produced a stop token. Padding
columns are never attended to, so a row's result does not depend on what else is in the batch
(greedy decoding of a batch equals decoding each prompt alone).

Sampling: temperature 0 is greedy; otherwise the logits are divided by the temperature, cut to the
`top_k` largest (0: all) and to the smallest set whose probability reaches `top_p` (1: all), and
a token is drawn with the key fold_in(key(seed), step): the same seed gives the same text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import paths
from llmjax.models.decoder import init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (static under jit: each setting compiles once)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0  # 1: no cut

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling settings {self} are out of range; need temperature >= 0, "
                             "top_k >= 0 and 0 < top_p <= 1.")


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets every logit outside the top-k / nucleus (top-p) set to -inf. logits: [batch, vocab]."""
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        # Keep a token while the tokens before it have not yet reached top_p (the first always).
        kept = jnp.where(before < top_p, ordered, jnp.inf)
        logits = jnp.where(logits < kept.min(-1, keepdims=True), neg, logits)
    return logits


def choose(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    if sampling.temperature == 0.0:
        return logits.argmax(-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def layout(prompts: Sequence[Sequence[int]], *, padding: str = "left", bucket: int = 16):
    """Prompts of different lengths -> (tokens, segment_ids, positions) [batch, P] and each row's
    last prompt column. P is the longest prompt rounded up to `bucket` (fewer recompilations)."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding={padding!r} is not one of 'left', 'right'.")
    lengths = np.array([len(p) for p in prompts])
    width = int(-(-lengths.max() // bucket) * bucket)
    tokens = np.zeros((len(prompts), width), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for row, p in enumerate(prompts):
        start = width - len(p) if padding == "left" else 0
        tokens[row, start:start + len(p)] = p
        segments[row, start:start + len(p)] = 1
        positions[row, start:start + len(p)] = np.arange(len(p))
    last = (np.full(len(prompts), width - 1) if padding == "left" else lengths - 1).astype(np.int32)
    return tokens, segments, positions, last


@dataclasses.dataclass
class Output:
    tokens: list[list[int]]  # per row, the new tokens up to (not including) a stop token
    stopped: list[bool]  # whether the row ended at a stop token


class Compiled:
    """One model's graph, config and mesh, as the static `self` of jitted methods: equal instances
    (same model, same mesh) share compilations, so a new one per prompt does not recompile.

    Under a mesh (pass `mesh` and `rules`, or call inside `sharding.use_mesh`), caches and
    activations are sharded by the model's logical axis names like in training."""

    def __init__(self, graphdef, model_cfg, *, mesh=None, rules=None):
        from llmjax.sharding import rules_from_config
        self.graphdef, self.cfg = graphdef, model_cfg
        self.mesh, self.rules = mesh, None if rules is None else rules_from_config(rules)

    def _key(self):
        return (type(self), self.graphdef, self.cfg, self.mesh, self.rules)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Compiled) and self._key() == other._key()

    def _context(self):
        if self.mesh is None:
            import contextlib
            return contextlib.nullcontext()
        from llmjax import sharding
        return sharding.use_mesh(self.mesh, self.rules)


class Generator(Compiled):
    """Compiled prefill and decode for one decoder; call `generate` for each batch of prompts."""

    @functools.partial(jax.jit, static_argnums=(0, 6))
    def _prefill(self, params, tokens, segments, positions, last, cache_len):
        model = nnx.merge(self.graphdef, params)
        cache = init_cache(self.cfg, tokens.shape[0], cache_len)
        logits, cache = model(tokens, segments, positions, cache=cache)
        return logits[jnp.arange(tokens.shape[0]), last], cache

    @functools.partial(jax.jit, static_argnums=(0, 6, 7, 8))
    def _decode(self, params, logits, cache, next_pos, key, steps, sampling, stop):
        """Up to `steps` tokens: [batch, steps], with stop_id-padding after each row's stop."""
        model = nnx.merge(self.graphdef, params)
        batch = logits.shape[0]
        stop_ids = jnp.asarray(stop if stop else (-1,), jnp.int32)

        def cond(carry):
            i, _, _, _, done, _ = carry
            return (i < steps) & ~done.all()

        def body(carry):
            i, cache, logits, pos, done, out = carry
            token = choose(logits, jax.random.fold_in(key, i), sampling)
            token = jnp.where(done, stop_ids[0], token)  # finished rows repeat a stop token
            out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
            done = done | jnp.isin(token, stop_ids)
            logits, cache = model(token[:, None], jnp.ones((batch, 1), jnp.int32), pos[:, None],
                                  cache=cache)
            return i + 1, cache, logits[:, 0], pos + 1, done, out

        out = jnp.full((batch, steps), stop_ids[0], jnp.int32)
        carry = (jnp.zeros((), jnp.int32), cache, logits, next_pos, jnp.zeros(batch, bool), out)
        return jax.lax.while_loop(cond, body, carry)[-1]

    def check(self, prompts, max_new_tokens: int) -> int:
        """Validates the prompts; returns the number of new tokens that fit the context."""
        if not len(prompts):
            raise ValueError("no prompts given; pass at least one prompt.")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; give at least one token of text to continue.")
            if len(p) >= self.cfg.max_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens but the model's context is "
                                 f"model.max_len={self.cfg.max_len} tokens; shorten the prompt.")
            if max(p) >= self.cfg.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size}); "
                                 "use the run's own tokenizer.")
        room = self.cfg.max_len - max(len(p) for p in prompts)
        if max_new_tokens > room:
            logging.warning("max_new_tokens=%d cut to %d to fit model.max_len=%d.", max_new_tokens,
                            room, self.cfg.max_len)
        return min(max_new_tokens, room)

    def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] = (),
                 padding: str = "left") -> Output:
        steps = self.check(prompts, max_new_tokens)
        stop = tuple(int(s) for s in stop_ids)
        tokens, segments, positions, last = layout(prompts, padding=padding)
        next_pos = np.array([len(p) for p in prompts], np.int32)
        with self._context():
            logits, cache = self._prefill(params, tokens, segments, positions, last,
                                          tokens.shape[1] + steps)
            out = self._decode(params, logits, cache, next_pos, jax.random.key(seed), steps,
                               sampling, stop)
        return _cut_at_stop(out, stop)


def _cut_at_stop(out, stop: tuple[int, ...]) -> Output:
    """Each generated row up to (not including) its first stop id, and whether it stopped."""
    rows, stopped = [], []
    for row in np.asarray(jax.device_get(out)).tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        rows.append(row if cut is None else row[:cut])
        stopped.append(cut is not None)
    return Output(rows, stopped)


class MultimodalGenerator(Generator):
    """`Generator` for model.family='multimodal': the prefill writes each row's images (encoded
    once by the ViT) and then its prompt into the KV cache, with the prefix-LM mask (image columns
    bidirectional); the text then decodes with the cache exactly as for a text decoder."""

    @functools.partial(jax.jit, static_argnums=(0, 8))
    def _prefill_images(self, params, tokens, segments, positions, last, images, image_segments,
                        cache_len):
        model = nnx.merge(self.graphdef, params)
        cache = init_cache(self.cfg, tokens.shape[0], self.cfg.image_tokens + cache_len)
        logits, cache = model.prefill(tokens, segments, positions, images, image_segments, cache)
        return logits[jnp.arange(tokens.shape[0]), last], cache

    def image_batch(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Per prompt a list of 1..max_images images [size, size, 3] (or one array) -> (images
        [B, M, size, size, 3], image_segment_ids [B, M]), unused slots empty."""
        cfg = self.cfg
        shape = (cfg.image_size, cfg.image_size, 3)
        pixels = np.zeros((len(images), cfg.max_images, *shape), np.float32)
        segments = np.zeros((len(images), cfg.max_images), np.int32)
        for row, given in enumerate(images):
            given = [given] if isinstance(given, np.ndarray) and given.ndim == 3 else list(given)
            if not given:
                raise ValueError(f"prompt {row} has no image; a multimodal model answers about an "
                                 "image: give one (--image=path.png).")
            if len(given) > cfg.max_images:
                raise ValueError(f"prompt {row} has {len(given)} images but the model takes at "
                                 f"most model.max_images={cfg.max_images}.")
            for slot, image in enumerate(given):
                if np.shape(image) != shape:
                    raise ValueError(f"image {slot} of prompt {row} has shape {np.shape(image)}, "
                                     f"not the model's {shape}; load it with "
                                     "llmjax.data.images.load_image(path, model.image_size).")
                pixels[row, slot], segments[row, slot] = image, 1
        return pixels, segments

    def generate(self, params, prompts, *, images, max_new_tokens: int,
                 sampling: Sampling = Sampling(), seed: int = 0, stop_ids: Sequence[int] = (),
                 padding: str = "left") -> Output:
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists; give one "
                             "list of images per prompt.")
        pixels, image_segments = self.image_batch(images)
        steps = self.check(prompts, max_new_tokens)
        longest = max(len(p) for p in prompts)
        room = self.cfg.max_len - self.cfg.image_tokens - longest
        if room < 1:
            raise ValueError(f"a prompt of {longest} tokens after {self.cfg.image_tokens} image "
                             f"tokens leaves no room in model.max_len={self.cfg.max_len}; shorten it.")
        steps = min(steps, room)
        stop = tuple(int(s) for s in stop_ids)
        tokens, segments, positions, last = layout(prompts, padding=padding)
        # Decoding continues after the row's image tokens (the prefill shifts the prompt itself).
        next_pos = (np.array([len(p) for p in prompts])
                    + image_segments.sum(1) * self.cfg.num_patches).astype(np.int32)
        with self._context():
            logits, cache = self._prefill_images(params, tokens, segments, positions, last, pixels,
                                                 image_segments, tokens.shape[1] + steps)
            out = self._decode(params, logits, cache, next_pos, jax.random.key(seed), steps,
                               sampling, stop)
        return _cut_at_stop(out, stop)


def generate(graphdef, model_cfg, params, prompts, **kw) -> Output:
    """One-shot `Generator(graphdef, model_cfg).generate(params, prompts, **kw)`."""
    return Generator(graphdef, model_cfg).generate(params, prompts, **kw)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt as the model saw documents in training: [bos] + pieces (no eos)."""
    if not text:
        raise ValueError("the prompt is empty; give at least one character of text to continue.")
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_id
    return ([bos] if bos is not None and bos >= 0 else []) + ids


def sample_text(graphdef, model_cfg, params, tokenizer, sample_cfg, prompts=None, *,
                data_cfg=None, mesh=None, rules=None, images=None) -> list[str]:
    """What the model family does with `prompts` (default: [sample.prompt]) under the config's
    sample settings: a decoder continues each prompt (stopping at the tokenizer's eos); an
    encoder-decoder decodes a target for each as its encoder input (`data_cfg`, the run's data
    section, says how inputs were tokenized and how the decoder starts; llmjax/beam_search.py,
    default span corruption); an encoder lists the
    top-k candidates of each <mask> (llmjax/fill_mask.py; the default prompt gets a <mask>
    appended when it has none); a multimodal decoder continues each prompt after its `images`
    (one list of [size, size, 3] arrays in [-1, 1] per prompt), and needs them."""
    if images is not None and model_cfg.family != "multimodal":
        raise ValueError(f"an image was given but this run's model.family={model_cfg.family!r} "
                         "reads text only; drop --image or use a multimodal run.")
    if model_cfg.family == "multimodal" and images is None:
        raise ValueError("this run is multimodal (model.family='multimodal') and answers about an "
                         "image: pass --image=path.png, or JSON lines {\"image\": ..., "
                         "\"prompt\": ...} on stdin.")
    if model_cfg.family == "encoder_decoder":
        from llmjax.beam_search import seq2seq_text
        texts = [sample_cfg.prompt] if prompts is None else list(prompts)
        data_cfg = {"objective": "span_corruption"} if data_cfg is None else data_cfg
        return seq2seq_text(graphdef, model_cfg, params, tokenizer, sample_cfg, texts,
                            data_cfg=data_cfg, mesh=mesh, rules=rules)
    if model_cfg.family == "encoder":
        from llmjax.data.objectives import MASK_PIECE
        from llmjax.fill_mask import fill_mask_text
        texts = list(prompts) if prompts is not None else [
            sample_cfg.prompt if MASK_PIECE in sample_cfg.prompt else sample_cfg.prompt + MASK_PIECE]
        return fill_mask_text(graphdef, model_cfg, params, tokenizer, texts,
                              top_k=int(sample_cfg.top_k) or 5)
    texts = [sample_cfg.prompt] if prompts is None else list(prompts)
    sampling = Sampling(float(sample_cfg.temperature), int(sample_cfg.top_k),
                        float(sample_cfg.get("top_p", 1.0)))
    eos = tokenizer.eos_id
    kw = dict(max_new_tokens=int(sample_cfg.max_new_tokens), sampling=sampling,
              seed=int(sample_cfg.get("seed", 0)), stop_ids=(eos,) if eos >= 0 else ())
    encoded = [encode_prompt(tokenizer, t) for t in texts]
    if model_cfg.family == "multimodal":
        out = MultimodalGenerator(graphdef, model_cfg, mesh=mesh, rules=rules).generate(
            params, encoded, images=images, **kw)
    else:
        out = generate(graphdef, model_cfg, params, encoded, **kw)
    return [t + tokenizer.decode(new) for t, new in zip(texts, out.tokens)]


# ------------------------------------------------------------------------------------------------
# A trained run: its config, tokenizer and newest parameters.


@dataclasses.dataclass
class Run:
    config: Any  # ml_collections.ConfigDict (the saved, resolved config)
    model_cfg: Any
    graphdef: Any
    params: Any
    tokenizer: Any
    step: int
    mesh: Any
    rules: Any


def load_run(workdir: str, mesh_shape=(-1, 1, 1)) -> Run:
    import ml_collections

    from llmjax import sharding, steps
    from llmjax.checkpoint import restore_params, saved_config
    from llmjax.data.tokenizer import Tokenizer
    from llmjax.models import ModelConfig, resolve_attention

    saved, _ = saved_config(workdir)
    config = ml_collections.ConfigDict(saved)
    rules = sharding.rules_from_config(config.get("sharding_rules", sharding.DEFAULT_RULES))
    mesh = sharding.make_mesh(mesh_shape)
    model_cfg = resolve_attention(ModelConfig.from_config(config.model),
                                  mesh.devices.flat[0].platform, config.get("seq_len"))
    graphdef, abstract = steps.abstract_model(model_cfg)
    with nnx.logical_axis_rules(rules):
        shardings = sharding.param_shardings(abstract, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
    params, _, step = restore_params(workdir, target)
    tokenizer_path = paths.path(config.data.get("tokenizer", "")
                                or paths.path(workdir) / "tokenizer.model")
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}; the run's workdir should hold "
                                "tokenizer.model (or its config data.tokenizer a .model path).")
    return Run(config, model_cfg, graphdef, params, Tokenizer.load(tokenizer_path), step, mesh,
               rules)


# ------------------------------------------------------------------------------------------------
# Decode benchmark.


def time_phases(start, decode, repeats: int) -> tuple[float, float]:
    """Median seconds of `start()` and of `decode(start's result)`, after a compiling round."""
    start_s, decode_s = [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        out = jax.block_until_ready(start())
        t1 = time.perf_counter()
        jax.block_until_ready(decode(out))
        if r:
            start_s.append(t1 - t0)
            decode_s.append(time.perf_counter() - t1)
    return float(np.median(start_s)), float(np.median(decode_s))


def speed(batch: int, new_tokens: int, start: float, decode: float) -> dict:
    return {"per_token_ms": round(1e3 * decode / new_tokens, 3),
            "decode_tokens_per_sec": round(batch * new_tokens / decode, 1),
            "tokens_per_sec": round(batch * new_tokens / (start + decode), 1),
            "device": jax.devices()[0].device_kind}


def print_benchmark(rows: list[dict], what: str, start: str, length_key: str, start_key: str):
    for r in rows:
        print(f"{what} batch {r['batch']}: {r['tokens_per_sec']:.0f} tokens/s (decode only "
              f"{r['decode_tokens_per_sec']:.0f}), {start} of {r[length_key]} tokens "
              f"{r[start_key]:.1f} ms, {r['per_token_ms']:.2f} ms per token, {r['device']}")
        print(json.dumps(r))


def benchmark(run: Run, *, batch_sizes=(1, 8), prompt_len: int = 32, new_tokens: int = 64,
              repeats: int = 3) -> list[dict]:
    """Prefill latency, per-token latency and tokens/s of greedy decoding with no early stop."""
    gen = Generator(run.graphdef, run.model_cfg, mesh=run.mesh, rules=run.rules)
    new_tokens = min(new_tokens, run.model_cfg.max_len - prompt_len)
    rng = np.random.default_rng(0)
    results = []
    for batch in batch_sizes:
        prompts = rng.integers(1, run.model_cfg.vocab_size, (batch, prompt_len)).tolist()
        tokens, segments, positions, last = layout(prompts, bucket=1)
        next_pos = np.full(batch, prompt_len, np.int32)
        key = jax.random.key(0)
        with gen._context():
            prefill, decode = time_phases(
                lambda: gen._prefill(run.params, tokens, segments, positions, last,
                                     prompt_len + new_tokens),
                lambda out: gen._decode(run.params, *out, next_pos, key, new_tokens, Sampling(), ()),
                repeats)
        results.append({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                        "prefill_ms": round(1e3 * prefill, 2),
                        **speed(batch, new_tokens, prefill, decode)})
    return results


# ------------------------------------------------------------------------------------------------
# Command line.


def _sample_settings(run: Run, argv_overrides) -> Any:
    """The run's saved `sample` section with the --config.sample.* values given on the command
    line laid over it."""
    from llmjax.config import base_config
    sample = base_config().sample
    sample.update({k: v for k, v in run.config.get("sample", {}).items() if k in sample})
    for key, value in argv_overrides.items():
        sample[key] = value
    return sample


# Errors a user can cause (as in llmjax.main, whose flags this entry point cannot import).
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _no_benchmark(family: str) -> str:
    """Why --benchmark does not apply to a run of `family` (decoders and encoder-decoders only)."""
    if family == "multimodal":
        return ("--benchmark times text-only prompts; a multimodal run answers about images, "
                "whose prefill it does not time: time a real request with --image and --prompt.")
    return ("--benchmark measures decoding; an encoder run has none (fill-mask is one forward "
            "pass).")


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _fail(f"a --config.sample override does not fit ({type(e).__name__}: {e}); the keys are "
              "sample.prompt, max_new_tokens, temperature, top_k, top_p, seed, num_beams and "
              "length_penalty.")


def main(argv):
    from absl import flags

    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config.sample.key=value.")
    if not flags.FLAGS.workdir:
        _fail("--workdir is required: a training run's directory (checkpoints + tokenizer).")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only notes are not news here
    # Only the sample settings named on the command line override the run's own.
    given = {a.split("=", 1)[0][len("--config.sample."):] for a in sys.argv[1:]
             if a.startswith("--config.sample.")}
    overrides = {k: flags.FLAGS.config.sample[k] for k in given}
    try:
        run = load_run(flags.FLAGS.workdir)
        if flags.FLAGS.benchmark and run.model_cfg.family == "encoder_decoder":
            from llmjax.beam_search import benchmark as seq2seq_benchmark
            print_benchmark(seq2seq_benchmark(run), "seq2seq decode", "encode + cache",
                            "input_len", "encode_ms")
            return
        if flags.FLAGS.benchmark and run.model_cfg.family != "decoder":
            raise ValueError(_no_benchmark(run.model_cfg.family))
        if flags.FLAGS.benchmark:
            print_benchmark(benchmark(run), "decode", "prefill", "prompt_len", "prefill_ms")
            return
        sample = _sample_settings(run, overrides)
        from llmjax.validate import check_sample
        check_sample(sample)
        args = (run.graphdef, run.model_cfg, run.params, run.tokenizer, sample)
        kw = dict(data_cfg=run.config.data)
        multimodal = run.model_cfg.family == "multimodal"
        if flags.FLAGS.image is not None or (multimodal and flags.FLAGS.prompt is not None):
            if flags.FLAGS.prompt is None:
                raise ValueError("--image needs --prompt (the text to continue after the image).")
            kw["images"] = _load_images(run, [flags.FLAGS.image] if flags.FLAGS.image else None)
        if flags.FLAGS.prompt is not None:
            with _mesh(run):
                print(sample_text(*args, prompts=[flags.FLAGS.prompt], **kw)[0])
            return
    except USER_ERRORS as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    # Interactive: one prompt per line until end of input; a bad prompt does not end the session.
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            prompt, line_kw = line, kw
            if multimodal:  # {"image": path or "images": [paths], "prompt": text}
                prompt, paths = _image_request(line)
                line_kw = dict(kw, images=_load_images(run, paths))
            with _mesh(run):
                print(sample_text(*args, prompts=[prompt], **line_kw)[0], flush=True)
        except USER_ERRORS as e:
            print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)


def _image_request(line: str) -> tuple[str, list[str]]:
    """(prompt, image paths) from one JSON line of a multimodal session."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"a multimodal run reads JSON lines {{\"image\": path, \"prompt\": "
                         f"text}} on stdin; this line is not JSON ({e.msg}).") from None
    paths = request.get("images", [request["image"]] if "image" in request else None) \
        if isinstance(request, dict) else None
    if not paths or not isinstance(request.get("prompt"), str):
        raise ValueError("each stdin line of a multimodal run needs \"image\" (or \"images\") and "
                         "\"prompt\", e.g. {\"image\": \"cat.png\", \"prompt\": \"caption:\"}.")
    return request["prompt"], list(paths)


def _load_images(run: Run, paths):
    """[[image arrays]] for one prompt, or None (no image given); a text run refuses images."""
    if paths is None:
        return None
    if run.model_cfg.family != "multimodal":
        raise ValueError(f"--image was given but this run's model.family={run.model_cfg.family!r} "
                         "reads text only; drop --image or use a multimodal run.")
    from llmjax.data.images import load_image
    return [[load_image(p, run.model_cfg.image_size) for p in paths]]


def _mesh(run: Run):
    from llmjax import sharding
    return sharding.use_mesh(run.mesh, run.rules)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    from llmjax.config import base_config
    import ml_collections
    flags.DEFINE_string("workdir", None, "A training run's directory.")
    flags.DEFINE_string("prompt", None, "Text to continue (decoder), to decode from (encoder-"
                        "decoder) or with <mask>s to fill (encoder); without it, read from stdin.")
    flags.DEFINE_string("image", None, "Multimodal runs: an image file the prompt is about "
                        "(resized to the model's image_size).")
    flags.DEFINE_bool("benchmark", False, "Print decode speed (batch 1 and 8) instead of text.")
    try:  # the overrides in sys.argv are applied as the flag is defined
        config_flags.DEFINE_config_dict(
            "config", ml_collections.ConfigDict({"sample": base_config().sample}),
            "Sampling overrides: --config.sample.temperature=0.7 and so on.", lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        given = [a for a in sys.argv[1:] if a.startswith("--config")]
        _fail(f"a --config override in {given} names an unknown key or has the wrong type "
              f"({type(e).__name__}); the keys are sample.prompt, sample.max_new_tokens, "
              "sample.temperature, sample.top_k, sample.top_p, sample.seed, sample.num_beams and "
              "sample.length_penalty.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=_parse_flags)
