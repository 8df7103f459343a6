"""A loaded model that scores and generates text: what every evaluation task runs on.

    lm = LM.from_workdir("runs/gpt_small_local")        # an llmjax run, or a Hugging Face dir
    lm.loglikelihood([("The capital of France is", " Paris")])   # [(logprob, is_greedy)]
    lm.loglikelihood_rolling(["a whole document ..."])           # [{"logprob", "tokens", ...}]
    lm.generate_until([("Q: 2+2?\\nA:", {"until": ["\\n"], "max_gen_toks": 8})])

The methods follow lm-evaluation-harness's model interface (Gao et al. 2021), with its
conventions, so numbers are comparable with what it reports for Hugging Face models:

- loglikelihood: the pair is tokenized as encode(context + continuation) split after the
  context's token count (trailing spaces of the context move to the continuation); an empty
  context becomes the start token (bos, else eos). Decoders score the last max_length tokens of
  context + continuation (the context loses its start); encoder-decoders encode the context and
  score the continuation with the decoder, which starts from its training start token.
- loglikelihood_rolling: a document's total log-likelihood from disjoint windows of max_length
  tokens; the first predicts tokens 1..N from the start token, each later one is a full window
  whose first tokens are context only, so every token is scored exactly once.
- generate_until: greedy (or sampled) continuation over the KV cache (llmjax.generate, or
  llmjax.beam_search for encoder-decoders), cut at the first stop string.

Requests are sorted by length, cut into batches of `batch_size` rows (rounded up to the
data-parallel devices) and padded to a power-of-two width, so few shapes compile; the jitted
functions live on a `generate.Compiled` object, shared by every LM of the same model and mesh.
Everything runs under `sharding.use_mesh(mesh, rules)`: parameters and activations are sharded
as in training. Padding rows and columns carry segment id 0, so a row's score does not depend on
what else is in its batch.

An llmjax run's documents start with bos in training, so its contexts get a bos in front
(`add_bos`); a Hugging Face model is fed text as lm-evaluation-harness feeds it (no bos).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.generate import Compiled, Sampling


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _width(n: int, cap: int) -> int:
    """The padded length of a batch whose longest row has n tokens: a power of two >= 16, at most
    `cap` when n fits it (so a handful of shapes compile per max_length)."""
    w = 16
    while w < n:
        w *= 2
    return max(n, min(w, cap))


def _sums(logits, targets, weights):
    """Per row: the sum of log p(target) over the weighted positions and whether each of them is
    the argmax. Padding may hold any value (a fully masked row): `where`, not a product."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    scored = weights > 0
    total = jnp.where(scored, picked, 0.0).sum(-1)
    greedy = ((logits.argmax(-1) == targets) | ~scored).all(-1)
    return total, greedy


class Scorer(Compiled):
    """The jitted scoring passes of one model on one mesh (equal instances share compilations).
    Results come back replicated, so every process of a multi-host mesh can read them."""

    def _replicated(self, out):
        if self.mesh is None:
            return out
        from jax.sharding import NamedSharding, PartitionSpec
        return jax.lax.with_sharding_constraint(out, NamedSharding(self.mesh, PartitionSpec()))

    @functools.partial(jax.jit, static_argnums=0)
    def _causal(self, params, tokens, segments, positions, targets, weights):
        logits = nnx.merge(self.graphdef, params)(tokens, segments, positions)
        return self._replicated(_sums(logits, targets, weights))

    @functools.partial(jax.jit, static_argnums=0)
    def _seq2seq(self, params, tokens, segments, positions, dec_tokens, dec_segments,
                 dec_positions, targets, weights):
        logits = nnx.merge(self.graphdef, params)(
            tokens, segments, positions, decoder_tokens=dec_tokens,
            decoder_segment_ids=dec_segments, decoder_positions=dec_positions)
        return self._replicated(_sums(logits, targets, weights))

    @functools.partial(jax.jit, static_argnums=0)
    def _classify(self, params, tokens, segments, positions):
        logits = nnx.merge(self.graphdef, params)(tokens, segments, positions)
        return self._replicated(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def rolling_windows(tokens: Sequence[int], start_id: int, max_length: int):
    """lm-evaluation-harness's get_rolling_token_windows (context_len 1) made disjoint:
    (context, continuation) pairs whose continuations cover `tokens` once, each pair at most
    max_length + 1 tokens (the model sees max_length of them)."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_length, len(tokens))
    windows = [([start_id], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        windows.append((tokens[end - max_length - 1:end - n], tokens[end - n:end]))
        done = end
    return windows


def _padded_rows(rows: list[np.ndarray], width: int, count: int) -> np.ndarray:
    out = np.zeros((count, width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class LM:
    """A loaded model that scores and generates text (an llmjax run, or a Hugging Face directory
    through llmjax.interop.hf). See the module docstring for the conventions."""

    def __init__(self, graphdef, model_cfg, params, tokenizer, *, max_length: int, mesh=None,
                 rules=None, step: int = 0, data_cfg=None, add_bos: bool = True,
                 decoder_start_id: int | None = None):
        from llmjax import sharding
        self.graphdef, self.model_cfg, self.params = graphdef, model_cfg, params
        self.tokenizer = tokenizer
        self.family = model_cfg.family
        self.max_length = int(max_length)
        self.mesh, self.rules = mesh, rules
        self.step = int(step)
        self.data_cfg = dict(data_cfg or {})
        self.add_bos = add_bos
        if model_cfg.family == "encoder_decoder" and decoder_start_id is None:
            from llmjax.data.objectives import decoder_start_id as start_of
            decoder_start_id = start_of(self.data_cfg, tokenizer)
        self.decoder_start_id = decoder_start_id  # encoder-decoders: the decoder's first input
        labels = tuple(self.data_cfg.get("labels", ()) or ())
        self.labels = list(labels) if model_cfg.num_labels and labels else (
            [str(i) for i in range(model_cfg.num_labels)] if model_cfg.num_labels else None)
        self._rows_multiple = (1 if mesh is None else
                               sharding.data_parallel_size(mesh, sharding.rules_from_config(rules)))
        self._scorer = Scorer(graphdef, model_cfg, mesh=mesh, rules=rules)

    # --------------------------------------------------------------------------------------------
    # Construction.

    @classmethod
    def from_parts(cls, graphdef, model_cfg, params, tokenizer, *, max_length: int, mesh, rules,
                   step: int = 0, data_cfg=None, add_bos: bool = True,
                   decoder_start_id: int | None = None) -> "LM":
        """From what is in memory (the training loop's state: no reload)."""
        return cls(graphdef, model_cfg, params, tokenizer, max_length=max_length, mesh=mesh,
                   rules=rules, step=step, data_cfg=data_cfg, add_bos=add_bos,
                   decoder_start_id=decoder_start_id)

    @classmethod
    def from_run(cls, run) -> "LM":
        """From a `llmjax.generate.Run` (load_run's result)."""
        return cls.from_parts(run.graphdef, run.model_cfg, run.params, run.tokenizer,
                              max_length=run.config.seq_len, mesh=run.mesh, rules=run.rules,
                              step=run.step, data_cfg=run.config.data.to_dict())

    @classmethod
    def from_workdir(cls, path: str, mesh_shape=(-1, 1, 1)) -> "LM":
        """An llmjax workdir (its newest checkpoint and tokenizer) or a Hugging Face model
        directory (config.json + safetensors, and its tokenizer.model or tokenizer.json)."""
        from llmjax import paths
        where = paths.path(path)
        if not where.exists():
            raise FileNotFoundError(f"{path} does not exist; give an llmjax workdir (with "
                                    "checkpoints/) or a Hugging Face model directory.")
        if (where / "config.json").exists() and not (where / "checkpoints").exists():
            return cls._from_hf(os.fspath(path), mesh_shape)
        from llmjax.generate import load_run
        return cls.from_run(load_run(path, mesh_shape))

    @classmethod
    def _from_hf(cls, path: str, mesh_shape) -> "LM":
        from llmjax import sharding, steps
        from llmjax.evaluation import hf_tokenizer
        from llmjax.interop import hf
        from llmjax.models import ModelConfig, resolve_attention
        _, hf_config = hf.read_config(path)
        tokenizer = hf_tokenizer.load(path, hf_config)  # before the weights: fail fast
        mesh = sharding.make_mesh(mesh_shape)
        rules = sharding.DEFAULT_RULES
        with sharding.use_mesh(mesh, rules):
            model, config = hf.load(path)
        model_cfg = resolve_attention(ModelConfig.from_config(config.model),
                                      mesh.devices.flat[0].platform, config.seq_len)
        graphdef, _ = steps.abstract_model(model_cfg)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        start = hf_config.get("decoder_start_token_id")  # BART starts from eos, T5 from pad
        return cls(graphdef, model_cfg, params, tokenizer, max_length=config.seq_len, mesh=mesh,
                   rules=rules, data_cfg=config.data.to_dict(), add_bos=False,
                   decoder_start_id=None if start is None else int(start))

    # --------------------------------------------------------------------------------------------
    # Helpers.

    @property
    def start_id(self) -> int:
        """The token a document starts from: bos, or eos where there is no bos (GPT-2's
        <|endoftext|>), as lm-evaluation-harness's prefix token."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None and bos >= 0 else self.tokenizer.eos_id

    def _context(self):
        return self._scorer._context()

    def _batches(self, order: Sequence[int], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        for i in range(0, len(order), batch_size):
            yield order[i:i + batch_size]

    def _rows(self, batch_size: int) -> int:
        return _round_up(batch_size, self._rows_multiple)

    def _need(self, *families: str, what: str):
        if self.family not in families:
            raise ValueError(f"{what} needs a model of family {' or '.join(families)}; this one is "
                             f"{self.family!r}" + (" (use classify or masked_logprob)."
                                                   if self.family == "encoder" else "."))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if not context:
            return [self.start_id], tok.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if self.family == "encoder_decoder":
            return self._encoder_input(context), tok.encode(continuation)
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        prefix = [tok.bos_id] if self.add_bos and tok.bos_id is not None and tok.bos_id >= 0 else []
        return prefix + ctx, whole[len(ctx):]

    def _encoder_input(self, text: str) -> list[int]:
        from llmjax.beam_search import encode_input
        from llmjax.data.objectives import encoder_start_ids
        if not text:
            return encoder_start_ids(self.data_cfg, self.tokenizer) + [self.tokenizer.eos_id]
        return encode_input(self.tokenizer, text, self.data_cfg)

    # --------------------------------------------------------------------------------------------
    # Scoring.

    def loglikelihood_tokens(self, requests: list[tuple[list[int], list[int]]],
                             batch_size: int = 16) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of log p(continuation | context) in float32,
        whether every continuation token is the argmax given the tokens before it)."""
        self._need("decoder", "encoder_decoder", what="log-likelihood scoring")
        L = self.max_length
        for i, (ctx, cont) in enumerate(requests):
            if not len(cont):
                raise ValueError(f"request {i} has an empty continuation; give at least one token "
                                 "to score.")
            if self.family == "decoder" and not len(ctx):
                raise ValueError(f"request {i} has an empty context; start it with the start "
                                 f"token (id {self.start_id}) so the first token has something "
                                 "to condition on.")
            if len(cont) > L:
                raise ValueError(f"request {i} has a continuation of {len(cont)} tokens, longer "
                                 f"than the model's context of {L}; score it with "
                                 "loglikelihood_rolling.")
        results: list[Any] = [None] * len(requests)
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        score = self._score_seq2seq if self.family == "encoder_decoder" else self._score_causal
        with self._context():
            for chunk in self._batches(order, batch_size):
                totals, greedy = score([requests[i] for i in chunk], self._rows(batch_size))
                for j, i in enumerate(chunk):
                    results[i] = (float(totals[j]), bool(greedy[j]))
        return results

    def _score_causal(self, pairs, rows: int):
        L = self.max_length
        inputs, targets, weights = [], [], []
        for ctx, cont in pairs:
            whole = np.asarray(list(ctx) + list(cont), np.int32)[-(L + 1):]
            inputs.append(whole[:-1])
            targets.append(whole[1:])
            w = np.zeros(len(whole) - 1, np.int32)
            w[len(w) - len(cont):] = 1
            weights.append(w)
        width = _width(max(len(x) for x in inputs), L)
        tokens = _padded_rows(inputs, width, rows)
        segments = _padded_rows([np.ones(len(x), np.int32) for x in inputs], width, rows)
        positions = _padded_rows([np.arange(len(x), dtype=np.int32) for x in inputs], width, rows)
        out = self._scorer._causal(self.params, tokens, segments, positions,
                                   _padded_rows(targets, width, rows),
                                   _padded_rows(weights, width, rows))
        return jax.device_get(out)

    def _score_seq2seq(self, pairs, rows: int):
        L = self.max_length
        start = self.decoder_start_id
        enc = [np.asarray(list(ctx)[-L:], np.int32) for ctx, _ in pairs]
        targets = [np.asarray(cont, np.int32) for _, cont in pairs]
        dec = [np.concatenate([[start], t[:-1]]).astype(np.int32) for t in targets]
        enc_width = _width(max(max(len(x) for x in enc), 1), L)
        dec_width = _width(max(len(x) for x in dec), L)
        ones = lambda xs, w: _padded_rows([np.ones(len(x), np.int32) for x in xs], w, rows)
        arange = lambda xs, w: _padded_rows([np.arange(len(x), dtype=np.int32) for x in xs], w,
                                            rows)
        out = self._scorer._seq2seq(
            self.params, _padded_rows(enc, enc_width, rows), ones(enc, enc_width),
            arange(enc, enc_width), _padded_rows(dec, dec_width, rows), ones(dec, dec_width),
            arange(dec, dec_width), _padded_rows(targets, dec_width, rows), ones(dec, dec_width))
        return jax.device_get(out)

    def loglikelihood(self, requests: list[tuple[str, str]],
                      batch_size: int = 16) -> list[tuple[float, bool]]:
        """(context, continuation) text pairs -> (log p(continuation | context), is_greedy)."""
        return self.loglikelihood_tokens([self._encode_pair(c, x) for c, x in requests],
                                         batch_size)

    def loglikelihood_rolling_tokens(self, docs: list[list[int]],
                                     batch_size: int = 16) -> list[float]:
        """Each document's total log-likelihood over disjoint rolling windows (module docstring);
        an empty document scores 0."""
        pairs, owner = [], []
        for d, doc in enumerate(docs):
            for window in rolling_windows(doc, self.start_id, self.max_length):
                pairs.append(window)
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, (logprob, _) in zip(owner, self.loglikelihood_tokens(pairs, batch_size)):
            totals[d] += logprob
        return totals

    def loglikelihood_rolling(self, texts: list[str], batch_size: int = 16) -> list[dict]:
        """Per text: {"logprob", "tokens", "bytes" (UTF-8), "words"}: the counts that per-token,
        per-byte (bits per byte) and per-word perplexities divide by."""
        ids = [self.tokenizer.encode(t) for t in texts]
        logprobs = self.loglikelihood_rolling_tokens(ids, batch_size)
        return [{"logprob": lp, "tokens": len(i), "bytes": len(t.encode("utf-8")),
                 "words": len(re.split(r"\s+", t.strip())) if t.strip() else 0}
                for lp, i, t in zip(logprobs, ids, texts)]

    # --------------------------------------------------------------------------------------------
    # Generation.

    def _stop_ids(self, until: Sequence[str]) -> tuple[int, ...]:
        """eos, and the single tokens that always write a stop string (so decoding may end
        early; the text is cut at the stop string either way)."""
        tok = self.tokenizer
        ids = [tok.eos_id] if tok.eos_id is not None and tok.eos_id >= 0 else []
        for s in until:
            encoded = tok.encode(s) if s else []
            if len(encoded) == 1 and s in tok.decode(encoded):
                ids.append(encoded[0])
        return tuple(dict.fromkeys(ids))

    def generate_until(self, requests: list[tuple[str, dict]], batch_size: int = 16) -> list[str]:
        """(context, gen_kwargs) -> the generated text up to the first stop string. gen_kwargs:
        until (a string or a list of them), max_gen_toks (default 64), do_sample (default False:
        greedy), temperature, top_k, top_p, seed."""
        self._need("decoder", "encoder_decoder", what="generation")
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, (_, kwargs) in enumerate(requests):
            s = _gen_settings(kwargs)
            settings.append(s)
            groups.setdefault((s["until"], s["max_gen_toks"], s["sampling"], s["seed"]),
                              []).append(i)
        out: list[Any] = [None] * len(requests)
        for (until, max_gen, sampling, seed), members in groups.items():
            texts = self._generate([requests[i][0] for i in members], until, max_gen, sampling,
                                   seed, batch_size)
            for i, text in zip(members, texts):
                out[i] = text
        return out

    def _generate(self, contexts, until, max_gen, sampling, seed, batch_size):
        tok = self.tokenizer
        stop_ids = self._stop_ids(until)
        if self.family == "encoder_decoder":
            prompts = [self._encoder_input(c)[-self.max_length:] for c in contexts]
        else:
            room = max(1, self.max_length - max_gen)
            prefix = [tok.bos_id] if self.add_bos and tok.bos_id >= 0 else []
            prompts = [(prefix + tok.encode(c))[-room:] if c else [self.start_id]
                       for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[Any] = [None] * len(prompts)
        rows = self._rows(batch_size)
        for chunk in self._batches(order, batch_size):
            batch = [prompts[i] for i in chunk]
            batch += [batch[0]] * (rows - len(batch))  # one batch shape for every chunk
            new = self._decode(batch, max_gen, sampling, seed, stop_ids)
            for j, i in enumerate(chunk):
                text = tok.decode(new[j])
                cuts = [text.find(s) for s in until if s and s in text]
                texts[i] = text[:min(cuts)] if cuts else text
        return texts

    def _decode(self, prompts, max_gen, sampling, seed, stop_ids) -> list[list[int]]:
        import logging
        if self.family == "encoder_decoder":
            from llmjax.beam_search import Seq2SeqGenerator
            gen = Seq2SeqGenerator(self.graphdef, self.model_cfg, mesh=self.mesh, rules=self.rules)
            return gen.generate(self.params, prompts, max_new_tokens=max_gen,
                                start_id=self.decoder_start_id, eos_id=self.tokenizer.eos_id,
                                sampling=sampling, seed=seed).tokens
        from llmjax.generate import Generator
        gen = Generator(self.graphdef, self.model_cfg, mesh=self.mesh, rules=self.rules)
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # "max_new_tokens cut" is expected here
        try:
            return gen.generate(self.params, prompts, max_new_tokens=max_gen, sampling=sampling,
                                seed=seed, stop_ids=stop_ids).tokens
        finally:
            logging.getLogger().setLevel(quiet)

    # --------------------------------------------------------------------------------------------
    # Encoders.

    def _framed(self, text: str) -> list[int]:
        """[bos] + text + [eos] as encoder rows are written in training (either end left out
        where the tokenizer has no such token), the text cut to fit max_length."""
        tok = self.tokenizer
        head = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
        tail = [tok.eos_id] if tok.eos_id is not None and tok.eos_id >= 0 else []
        room = max(0, self.max_length - len(head) - len(tail))
        return head + tok.encode(text)[:room] + tail

    def _encoder_rows(self, ids: list[list[int]], rows: int):
        width = _width(max(len(x) for x in ids), self.max_length)
        return (_padded_rows(ids, width, rows),
                _padded_rows([np.ones(len(x), np.int32) for x in ids], width, rows),
                _padded_rows([np.arange(len(x), dtype=np.int32) for x in ids], width, rows))

    def classify(self, texts: list[str], batch_size: int = 16) -> list[list[float]]:
        """Log-probabilities of each label (`self.labels`) for each text, from an encoder with a
        classification head; texts are read as in fine-tuning: [bos] + text + [eos]."""
        if self.family != "encoder" or not self.model_cfg.num_labels:
            raise ValueError("classify needs an encoder with a classification head "
                             "(model.num_labels > 0, fine-tuned with data.task='classification').")
        ids = [self._framed(t) for t in texts]
        out: list[Any] = [None] * len(texts)
        with self._context():
            for chunk in self._batches(range(len(texts)), batch_size):
                logp = jax.device_get(self._scorer._classify(
                    self.params, *self._encoder_rows([ids[i] for i in chunk],
                                                     self._rows(batch_size))))
                for j, i in enumerate(chunk):
                    out[i] = [float(x) for x in logp[j]]
        return out

    def masked_logprob(self, texts: list[str], batch_size: int = 16) -> list[float]:
        """Pseudo-log-likelihood of each text under a masked-LM encoder (Salazar et al. 2020):
        the sum over its tokens of log p(token | the text with that token masked), one row per
        token; [bos] + text + [eos] as in pretraining, the text cut to max_length - 2 tokens."""
        if self.family != "encoder" or self.model_cfg.num_labels:
            raise ValueError("masked_logprob needs a masked-LM encoder (no classification head).")
        tok = self.tokenizer
        mask = tok.mask_id
        rows, owner = [], []
        for d, text in enumerate(texts):
            ids = self._framed(text)
            first = 1 if tok.bos_id is not None and tok.bos_id >= 0 else 0
            last = len(ids) - (1 if tok.eos_id is not None and tok.eos_id >= 0 else 0)
            for p in range(first, last):
                masked = list(ids)
                masked[p] = mask
                w = np.zeros(len(ids), np.int32)
                w[p] = 1
                rows.append((np.asarray(masked, np.int32), np.asarray(ids, np.int32), w))
                owner.append(d)
        totals = [0.0] * len(texts)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        n = self._rows(batch_size)
        with self._context():
            for chunk in self._batches(order, batch_size):
                tokens, segments, positions = self._encoder_rows([rows[i][0] for i in chunk], n)
                width = tokens.shape[1]
                total, _ = jax.device_get(self._scorer._causal(
                    self.params, tokens, segments, positions,
                    _padded_rows([rows[i][1] for i in chunk], width, n),
                    _padded_rows([rows[i][2] for i in chunk], width, n)))
                for j, i in enumerate(chunk):
                    totals[owner[i]] += float(total[j])
        return totals


def _gen_settings(kwargs: dict) -> dict:
    """lm-evaluation-harness's gen_kwargs -> hashable decoding settings."""
    kwargs = dict(kwargs or {})
    until = kwargs.get("until", [])
    until = (until,) if isinstance(until, str) else tuple(until or ())
    max_gen = int(kwargs.get("max_gen_toks", 64))
    if max_gen < 1:
        raise ValueError(f"max_gen_toks={max_gen} must be at least 1.")
    temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
    if not kwargs.get("do_sample", False) or temperature == 0.0:
        sampling = Sampling()
    else:
        sampling = Sampling(temperature, int(kwargs.get("top_k", 0) or 0),
                            float(kwargs.get("top_p", 1.0) or 1.0))
    return {"until": until, "max_gen_toks": max_gen, "sampling": sampling,
            "seed": int(kwargs.get("seed", 0) or 0)}
