"""The config schema every config file starts from, and helpers for variants.

A config file in configs/ calls `base_config()`, sets its model's published shape, and applies
`runlocal()` when its arg asks for it. Every key a user may override exists here, so ml_collections'
locked config rejects a misspelt `--config.key` with a clear error.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from llmjax.models import ModelConfig
from llmjax.sharding import DEFAULT_RULES


# The two decoder styles; a config file adds its published shape to one of them.
GPT2_STYLE = dict(position="learned", norm="layernorm", norm_eps=1e-5, activation="gelu",
                  use_bias=True, tie_embeddings=True)
LLAMA_STYLE = dict(position="rope", norm="rmsnorm", norm_eps=1e-5, activation="swiglu",
                   use_bias=False, tie_embeddings=False)


def gpt2_recipe(c: ml_collections.ConfigDict, *, learning_rate: float) -> None:
    """GPT-2/3-style pretraining at ~0.5M tokens a step, cosine decay after 2000 warmup steps."""
    c.seq_len = 1024
    c.batch_size = 512
    c.total_steps = 100_000
    c.optim.update(learning_rate=learning_rate, warmup_steps=2000, schedule="cosine",
                   weight_decay=0.1)


def gpt3_recipe(c: ml_collections.ConfigDict) -> None:
    """GPT-3 175B's recipe (Brown et al. 2020, table 2.1): 3.2M tokens a step (1536 x 2048),
    lr 0.6e-4 cosine after 375 warmup steps; bfloat16 compute, full remat, FSDP over the slice and
    tensor parallelism over 8 devices (a host)."""
    c.model.update(dtype="bfloat16", remat_policy="full")
    c.seq_len = 2048
    c.batch_size = 1536
    c.total_steps = 95_000
    c.mesh.shape = (1, -1, 8)
    c.optim.update(learning_rate=0.6e-4, warmup_steps=375, schedule="cosine", weight_decay=0.1)


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Sets dotted keys ("optim.learning_rate") of `c` in place, as --config.key=value would."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return c


def with_overrides(c: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """An unlocked copy of `c` with dotted keys set (`c` itself is left as it is)."""
    copy = c.copy_and_resolve_references()
    copy.unlock()
    return apply_overrides(copy, overrides)


def llama_recipe(c: ml_collections.ConfigDict, *, context: int, learning_rate: float) -> None:
    """The LLaMA papers' recipe: 4M tokens a step, AdamW (b2 0.95, eps 1e-5, wd 0.1), cosine
    after 2000 warmup steps; bfloat16 compute, full remat and FSDP over every device."""
    c.model.update(dtype="bfloat16", remat_policy="full")
    c.seq_len = context
    c.batch_size = 4 * 1024 * 1024 // context
    c.total_steps = 500_000
    c.mesh.shape = (1, -1, 1)
    c.optim.update(learning_rate=learning_rate, b2=0.95, eps=1e-5, warmup_steps=2000,
                   schedule="cosine", weight_decay=0.1)


def base_config() -> ml_collections.ConfigDict:
    """Every key and its default. Each key's comment (the lines right above it and the one at the
    end of its line) is its description in docs/config.md: `python -m llmjax.config_reference`
    regenerates that page and tests/test_docs.py fails when it is stale or a key has no comment."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # seeds initialisation, data order, dropout and sampling (keys derive from (seed, step))
    c.total_steps = 1000  # optimizer steps of the run (the schedule decays over them)
    c.stop_at_step = 0  # >0: checkpoint and exit at this step, resumable (time-sliced jobs, tests)
    c.batch_size = 32  # global, in sequences
    c.seq_len = 1024  # tokens per sequence (packed rows; encoder-decoders: the encoder input)
    c.microbatches = 1  # gradient accumulation: the batch is split into this many micro-batches
    # Decoders: the loss is computed this many positions at a time, so the float32
    # [batch, seq_len, vocab] logits are never whole (llmjax/losses.py); 0: all at once.
    c.loss_chunk = 0
    c.log_every_steps = 10  # steps between records in metrics.jsonl, TensorBoard and the console
    c.eval_every_steps = 200  # steps between evaluations on the validation split
    c.eval_steps = 10  # batches per evaluation
    # Evaluation tasks run after each eval loss (llmjax/evaluation/tasks.py): comma-separated names
    # of shipped tasks or paths of .yaml/.json specs; each metric is logged as eval/<task>/<metric>.
    c.eval_tasks = ""
    c.eval_tasks_limit = 0  # examples scored per task in those evaluations (0: all)
    c.checkpoint_every_steps = 500  # steps between checkpoints (the last step is always saved)
    c.max_to_keep = 3  # checkpoints kept in WORKDIR/checkpoints; older ones are deleted
    c.async_checkpointing = True  # False: the loop waits until each checkpoint is written
    c.peak_flops_per_device = 0.0  # for MFU; 0: look up the device (or measure it, on CPU)
    # What a NaN/Inf loss or gradient does (docs/reliability.md): "stop" ends the run naming the
    # step and the last good checkpoint; "skip" drops that update and counts it.
    c.nonfinite = "stop"
    # A workdir whose checkpoints are all unreadable may start again from step 0.
    c.allow_fresh_start = False
    # Test hook: steps (1-based) whose batch is poisoned (token ids out of the vocabulary -> NaN loss).
    c.fault_nonfinite_steps = ()

    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
    # ModelConfig() fills these two in from num_heads and d_model; 0 keeps them derived, so a
    # config that changes the heads gets the derived values, not GPT-2 small's.
    c.model.num_kv_heads = 0
    c.model.head_dim = 0

    c.data = ml_collections.ConfigDict(dict(
        # stdlib | text | prepared (token shards of `python -m llmjax.data.prepare` in data_dir) |
        # a TFDS catalog name prepared as array_record
        name="stdlib",
        files="",  # glob(s) of text files, for name='text' (fine-tuning: the training JSONL file(s))
        # where built/prepared TFDS datasets live ('' = ~/.cache/llmjax/tfds); for
        # name='prepared', the --out directory of `python -m llmjax.data.prepare`
        data_dir="",
        # the text feature of a TFDS dataset, or the field / column of JSONL, Parquet and Arrow
        # data.files (classification: the JSON key)
        text_key="text",
        split_train="train",  # the TFDS split trained on
        split_eval="validation",  # the TFDS split evaluated on
        validation_fraction=0.02,  # name='text': share of the documents held out for validation
        tokenizer="",  # path to a SentencePiece .model; '' trains one into the workdir
        tokenizer_train_chars=5_000_000,  # characters sampled to train a new tokenizer
        num_workers=0,  # Grain worker processes (0: in the training process)
        shuffle_tokens=1 << 19,  # packed rows are shuffled in windows of this many tokens
        # Pretraining objective (llmjax/data/objectives.py): causal_lm | mlm | span_corruption |
        # text_infilling. The last three need a tokenizer with a mask id and sentinel ids.
        objective="causal_lm",
        mask_rate=0.15,  # mlm: share of tokens scored (80% [MASK], 10% random, 10% kept)
        mask_dynamic=True,  # mlm: a new mask each time (RoBERTa) or one per document (BERT)
        noise_density=0.15,  # span_corruption: share of tokens dropped into the targets
        mean_noise_span_length=3.0,  # span_corruption: mean length of a dropped span
        num_sentinels=100,  # sentinel ids a trained tokenizer reserves (T5: 100 extra ids)
        # span_corruption: sentinel i is id vocab_size + num_sentinels - 1 - i, past the
        # tokenizer's pieces (Hugging Face T5's <extra_id_i>), not a piece of its own; the decoder
        # then starts from pad, as T5's. `python -m llmjax.convert` sets it for a converted T5.
        sentinels_at_top=False,
        infilling_rate=0.3,  # text_infilling: share of tokens masked, in Poisson-length spans
        poisson_lambda=3.0,  # text_infilling: mean span length
        permute_sentences=0.0,  # text_infilling: share of rows whose lines are shuffled (BART 1.0)
    ))

    c.optim = ml_collections.ConfigDict(dict(
        name="adamw",  # adamw | adafactor (llmjax/optim.py)
        learning_rate=6e-4,  # peak learning rate
        b1=0.9,  # AdamW first-moment decay
        b2=0.95,  # AdamW second-moment decay
        eps=1e-8,  # AdamW epsilon
        weight_decay=0.1,  # decoupled: each step subtracts lr(t) * weight_decay * param
        no_decay=r"(^|/)(bias|scale|embedding)$",  # regex of parameter paths with no weight decay
        grad_clip_norm=1.0,  # clip gradients to this global norm first (0 disables)
        schedule="cosine",  # cosine | linear | constant | rsqrt | wsd
        warmup_steps=100,  # linear warmup from 0 to the peak
        min_lr_ratio=0.1,  # final lr / peak for cosine, linear and wsd
        decay_fraction=0.2,  # wsd: share of all steps taken by the final linear decay
    ))

    # Fine-tuning: start from another run's parameters (a workdir, its checkpoints/ folder or one
    # checkpoints/<step> folder) with a fresh optimizer at step 0; the model sections must match.
    # Used only while the workdir has no checkpoint of its own (a restart resumes as usual).
    c.init_from = ""
    c.optim.freeze = ""  # regex of parameter paths kept frozen, e.g. "embedding$"
    # lm: language modelling on text | sft: JSONL {"prompt", "response"} |
    # seq2seq: JSONL {"input", "target"} | classification: JSONL {"text", "label"} |
    # captions / vqa: images with text / with a question and its answer (image_pipeline.py)
    c.data.task = "lm"
    c.data.eval_files = ""  # fine-tuning: JSONL file(s) of evaluation examples (train ones: data.files)
    c.data.prompt_key = "prompt"  # sft: the JSON key / TFDS feature of the prompt
    c.data.response_key = "response"  # sft: the JSON key / TFDS feature of the response
    c.data.input_key = "input"  # seq2seq (encoder-decoders): the JSON key / TFDS feature of the input
    c.data.target_key = "target"  # seq2seq: the JSON key / TFDS feature of the target
    c.data.label_key = "label"  # classification (encoders): the JSON key / TFDS feature of the label
    # classification: the label strings in id order (saved with the run's config, so evaluation and
    # prediction use the same mapping); model.num_labels must equal its length.
    c.data.labels = ()
    c.data.target_len = 0  # seq2seq: decoder length (0: seq_len)
    # Image-text data (data.task captions | vqa, llmjax/data/image_pipeline.py): data.name='shapes'
    # (synthetic, built on first use), JSONL data.files/eval_files, or a TFDS image-text dataset.
    c.data.image_size = 32  # images: side in pixels after resizing (must equal model.image_size)
    c.data.max_images = 1  # images: most images one packed row carries (must equal model.max_images)
    c.data.resize_images = True  # images: resize to image_size (False: another size is an error)
    c.data.image_dir = ""  # images: folder JSONL image paths are relative to ('': the JSONL's folder)
    c.data.shapes_train = 20_000  # name='shapes': training examples
    c.data.shapes_validation = 1_000  # name='shapes': validation (and test) examples
    c.data.shapes_seed = 0  # name='shapes': the seed the images are drawn from
    # Data hygiene while a local corpus (stdlib, text) is built or `llmjax.data.prepare` runs
    # (llmjax/data/hygiene; docs/data.md#hygiene). Part of the corpus's cache key.
    c.data.hygiene = ml_collections.ConfigDict(dict(
        enabled=True,  # False: keep every document as it is (no dedup, scrubbing or flags)
        dedup_exact=True,  # drop copies with the same normalised text (NFKC, case, punctuation)
        dedup_near=True,  # drop near copies: MinHash LSH over word shingles
        near_threshold=0.8,  # Jaccard similarity of shingle sets from which two are near copies
        num_perm=128,  # MinHash permutations (more: a finer similarity estimate, slower)
        shingle=5,  # words per shingle for near dedup
        scrub_pii=True,  # replace e-mails, phones, IPs, cards, ID numbers, secrets by <TYPE>
        quality_filter="report",  # report (flag and count, keep) | drop | off
        min_words=50,  # quality: fewer words raise too_few_words
        max_words=100_000,  # quality: more words raise too_many_words
        min_mean_word_length=3.0,  # quality: a shorter mean word length raises mean_word_length
        max_mean_word_length=10.0,  # quality: a longer mean word length raises mean_word_length
        max_symbol_word_ratio=0.1,  # quality: more '#' and '...' per word raise symbol_word_ratio
        max_bullet_lines_ratio=0.9,  # quality: more lines starting with a bullet raise bullet_lines
        max_ellipsis_lines_ratio=0.3,  # quality: more lines ending in '...' raise ellipsis_lines
        min_alpha_words_ratio=0.8,  # quality: fewer words with a letter raise alpha_words
        max_dup_line_fraction=0.3,  # quality: more repeated lines raise duplicate_lines
        max_top_ngram_fraction=(0.2, 0.18, 0.16),  # quality: top 2/3/4-gram share of characters
        processes=1,  # worker processes for scrubbing and hashing (same output for any number)
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),  # devices along (data, fsdp, tensor); one entry may be -1 (the rest)
        # Multi-slice (TPU slices over DCN) or multi-node GPU: how the slices / nodes lay out over
        # the same axes; mesh.shape is then one slice. (2, 1, 1): data parallel over two slices.
        dcn_shape=(1, 1, 1),
    ))
    c.sharding_rules = DEFAULT_RULES  # logical axis name -> mesh axes (llmjax/sharding.py)

    c.sample = ml_collections.ConfigDict(dict(
        prompt="def",  # the end-of-run sample's prompt
        max_new_tokens=64,  # tokens the end-of-run sample and llmjax.generate write (0: no sample)
        temperature=0.8,  # softmax temperature (0: greedy)
        top_k=40,  # sample from the k likeliest tokens (0: all)
    ))
    c.sample.top_p = 1.0  # nucleus sampling: keep the fewest tokens whose probability reaches it
    c.sample.seed = 0  # the same seed gives the same sample
    # Encoder-decoders: num_beams > 1 decodes by beam search, ranking finished outputs of n tokens
    # by logprob / ((5 + n) / 6) ** length_penalty (0: total log-probability; llmjax/beam_search.py).
    c.sample.num_beams = 1
    c.sample.length_penalty = 0.6  # beam search: the exponent in the ranking (see num_beams)
    return c


def parse_arg(arg: str | None, **defaults):
    """big_vision-style variant args: 'runlocal' or 'runlocal,key=value' -> ConfigDict of values
    typed like the defaults (a bare name sets a bool default to True). An unknown name or a value
    of the wrong type raises one ValueError sentence naming it (with the closest known name)."""
    import difflib
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"config arg {key!r} is not one of {sorted(defaults)}; {hint}"
                             "variants follow the file name, e.g. FILE.py:runlocal.")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("", "1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config arg {key}={value!r} is not a boolean; write {key} "
                                 f"(true) or {key}=false.")
            out[key] = value.lower() in ("", "1", "true", "yes")
        else:
            try:
                out[key] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"config arg {key}={value!r} is not a {kind.__name__}; write "
                                 f"{key}=<{kind.__name__}>.") from None
    return out


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any decoder config to train on a laptop CPU in minutes, keeping its architecture
    (position, norm, activation, bias, tying, grouped-query ratio)."""
    m = c.model
    groups = max(1, m.num_heads // (m.num_kv_heads or m.num_heads))
    m.d_model, m.num_layers, m.num_heads = 128, 4, 4
    m.num_kv_heads = max(1, 4 // groups)
    m.head_dim = 0
    m.mlp_dim = 512 if m.activation == "gelu" else 352  # SwiGLU keeps ~8/3 x d_model, as LLaMA
    m.vocab_size = 2048
    m.max_len = 256
    m.dtype = "float32"
    # Saving only the matmul outputs and recomputing the rest beats keeping everything on a CPU:
    # the scanned layers' stacked residuals cost more memory traffic than the recomputation
    # (1.28x faster steps measured on 2 CPU cores, 93 MiB compiled peak instead of 232).
    m.remat_policy = "minimal"
    c.seq_len = 128
    c.batch_size = 16
    c.total_steps = 1000
    c.log_every_steps = 50
    c.eval_every_steps = 250
    c.eval_steps = 8
    c.checkpoint_every_steps = 250
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.01
    c.data.tokenizer_train_chars = 3_000_000
    c.sample.max_new_tokens = 48
    return c
