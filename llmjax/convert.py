"""Convert between Hugging Face model directories and llmjax checkpoints.

    python -m llmjax.convert HF_DIR WORKDIR     # Hugging Face -> llmjax (checkpoints/0)
    python -m llmjax.convert WORKDIR HF_DIR     # llmjax workdir / checkpoints/<step> -> Hugging Face

The direction follows the source: a directory with config.json is a Hugging Face model; one with
checkpoints/ (or a checkpoints/<step> folder) is llmjax's. An imported workdir holds
checkpoints/0/{state, config} (step 0, fresh optimizer state, the full llmjax config; encoders
and encoder-decoders with their pretraining objective), tokenizer.model when the Hugging Face
directory has a SentencePiece one (tokenizer.model, T5's spiece.model, sentencepiece.bpe.model;
a converted T5 keeps Hugging Face's sentinel ids via data.sentinels_at_top), and config.py, a
config file for the trainer that reproduces the saved config with `init_from` pointing at the
workdir:

    python -m llmjax.main --config=WORKDIR/config.py --workdir=NEW_RUN

BERT's WordPiece and RoBERTa's / BART's byte-level BPE tokenizers are not SentencePiece: the
weights convert, a warning says the tokenizer stays behind.
"""

from __future__ import annotations

import json
import os
import sys

from llmjax import paths

CONFIG_JSON = "llmjax_config.json"
TOKENIZER = "tokenizer.model"
SENTENCEPIECE_FILES = (TOKENIZER, "spiece.model", "sentencepiece.bpe.model")
T5_EXTRA_IDS = 100  # Hugging Face's T5Tokenizer default

_CONFIG_PY = '''"""Continue training the model converted into this directory by `python -m llmjax.convert`.

    python -m llmjax.main --config={here}/config.py --workdir=NEW_RUN [--config.key=value ...]
"""

import json
import os

import ml_collections


def get_config(arg=None):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "{config_json}")) as f:
        d = json.load(f)
    # JSON has no tuples; the trainer's overrides expect the schema's tuple types back.
    d["mesh"]["shape"] = tuple(d["mesh"]["shape"])
    d["sharding_rules"] = tuple(tuple(rule) for rule in d["sharding_rules"])
    return ml_collections.ConfigDict(d)
'''


def _sentencepiece_ids(model: bytes) -> dict:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=model)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def _t5_sentinels(src: str, tokenizer: str, config) -> None:
    """Hugging Face's T5 tokenizer appends its <extra_id_N> sentinels after the SentencePiece
    pieces, <extra_id_0> last; span corruption continues with those ids."""
    import sentencepiece as spm
    extra = T5_EXTRA_IDS
    tok_config = os.path.join(src, "tokenizer_config.json")
    if os.path.isfile(tok_config):
        with open(tok_config) as f:
            extra = int(json.load(f).get("extra_ids", extra))
    pieces = spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()
    if extra and pieces + extra <= config.model.vocab_size:
        config.data.sentinels_at_top, config.data.num_sentinels = True, extra
    else:
        print(f"warning: {tokenizer} has {pieces} pieces and {extra} extra ids, more than the "
              f"model's {config.model.vocab_size} rows, so span corruption has no sentinel ids; "
              "set data.num_sentinels and data.sentinels_at_top to match the model.",
              file=sys.stderr)


def hf_to_llmjax(src: str, workdir: str) -> str:
    """Imports a Hugging Face directory into a new llmjax workdir; returns the checkpoint path."""
    import jax.numpy as jnp
    from flax import nnx

    from llmjax import optim
    from llmjax.checkpoint import Checkpointer
    from llmjax.interop import hf

    out = paths.path(workdir)
    if (out / "checkpoints").is_dir():
        raise ValueError(f"{workdir} already has checkpoints; convert into a new, empty directory.")
    model, config = hf.load(src)
    family, _ = hf.read_config(src)
    out.mkdir(parents=True, exist_ok=True)
    names = (family.sentencepiece,) + tuple(n for n in SENTENCEPIECE_FILES if n != family.sentencepiece)
    tokenizer = next((os.path.join(src, n) for n in names if os.path.isfile(os.path.join(src, n))),
                     None)
    if tokenizer is None and family.tokenizer:
        print(f"warning: {family.model_type} uses {family.tokenizer}, not SentencePiece, so the "
              "tokenizer is not carried (the weights are): keep using the original tokenizer with "
              "the exported model, and to train here set data.tokenizer to a SentencePiece model "
              "with the same ids (a new one trained by llmjax changes what the embeddings mean).",
              file=sys.stderr)
    if tokenizer is not None:
        with open(tokenizer, "rb") as f:
            model_proto = f.read()
        (out / TOKENIZER).write_bytes(model_proto)
        pad = _sentencepiece_ids(model_proto)["pad_token_id"]
        if pad == 0:
            config.data.tokenizer = str(out / TOKENIZER)
            if family.model_type == "t5":
                _t5_sentinels(src, tokenizer, config)
        else:
            # Our data pipeline pads with id 0 (segment id 0 = padding); most published
            # SentencePiece models (LLaMA's) reserve 0 for <unk> and have no pad piece.
            print(f"warning: {TOKENIZER} has pad id {pad}, but llmjax's data pipeline needs pad id "
                  "0, so training will not use it (it is copied for generation and export).",
                  file=sys.stderr)
    if "init_from" in config:
        config.init_from = str(out)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx, _ = optim.make_optimizer(config.optim, config.total_steps)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    config_dict = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as Orbax stores it
    ckpt = Checkpointer(out, max_to_keep=config.max_to_keep, async_save=False)
    ckpt.save(0, state, None, config_dict, force=True)
    ckpt.close()
    (out / CONFIG_JSON).write_text(json.dumps(config_dict, indent=1))
    (out / "config.py").write_text(_CONFIG_PY.format(here=out, config_json=CONFIG_JSON))
    return str(out / "checkpoints" / "0")


def llmjax_to_hf(src: str, out_dir: str) -> str:
    """Exports an llmjax checkpoint's parameters as a Hugging Face directory."""
    import jax
    from flax import nnx

    from llmjax import checkpoint
    from llmjax.interop import hf
    from llmjax.models import ModelConfig
    from llmjax.steps import abstract_model

    config, _ = checkpoint.saved_config(src)
    model_cfg = ModelConfig.from_config(config["model"])
    hf.family_of(model_cfg)  # fail before reading any weights
    _, abstract = abstract_model(model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                   nnx.to_pure_dict(abstract))
    params, _, _ = checkpoint.restore_params(src, abstract_params)
    directory, _ = checkpoint.resolve(src)
    candidates = [config.get("data", {}).get("tokenizer", ""), directory.parent / TOKENIZER]
    tokenizer = next((paths.path(c) for c in candidates if c and paths.path(c).is_file()), None)
    model_proto = tokenizer.read_bytes() if tokenizer else None
    token_ids = _sentencepiece_ids(model_proto) if tokenizer else None
    if token_ids and model_cfg.family == "encoder_decoder":
        # The decoder starts from bos (llmjax's objectives) or pad (T5's conventions).
        t5_style = config.get("data", {}).get("sentinels_at_top") or token_ids["bos_token_id"] is None
        token_ids["decoder_start_token_id"] = token_ids["pad_token_id" if t5_style else "bos_token_id"]
    hf.save(params, model_cfg, out_dir, token_ids=token_ids)
    if tokenizer:
        family = hf.family_of(model_cfg)
        with open(os.path.join(out_dir, family.sentencepiece), "wb") as f:
            f.write(model_proto)
        if family.model_type == "t5":
            # T5Tokenizer appends `extra_ids` sentinels after the pieces: as many as span corruption
            # used at the top, or none when they are pieces of llmjax's own tokenizer.
            data = config.get("data", {})
            extra = int(data.get("num_sentinels", T5_EXTRA_IDS)) if data.get("sentinels_at_top") else 0
            with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
                json.dump({"extra_ids": extra}, f)
    return out_dir


def convert(src: str, dst: str) -> str:
    from llmjax.interop import hf
    if os.path.isfile(os.path.join(src, hf.CONFIG_FILE)):
        return hf_to_llmjax(src, dst)
    if paths.path(src).is_dir():
        return llmjax_to_hf(src, dst)
    raise FileNotFoundError(f"{src} does not exist; give a Hugging Face model directory or an "
                            "llmjax workdir / checkpoint.")


def main(argv=None):
    from llmjax import cli
    from llmjax.main import USER_ERRORS
    from absl import logging
    logging.set_verbosity(logging.ERROR)  # Orbax's read-only notices are not news here
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or any(a.startswith("-") for a in argv):
        cli.fail("usage: python -m llmjax.convert SRC DST (a Hugging Face directory and a new "
                 "llmjax workdir, or an llmjax workdir/checkpoint and a new Hugging Face directory).")
    try:
        out = convert(*argv)
    except USER_ERRORS as e:
        cli.fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
