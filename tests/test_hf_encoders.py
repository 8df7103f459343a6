"""Hugging Face interop for the encoder (BERT, RoBERTa) and encoder-decoder (T5 v1.0 / v1.1, BART)
families: logit parity with `transformers` (PyTorch, CPU) in both directions, offline.

As in test_hf.py, tiny random models are built from config objects with every weight perturbed
(a wrongly mapped LayerNorm bias changes the logits), saved with save_pretrained, imported,
compared on padded batches whose encoder and decoder sides have different lengths, exported and
loaded back by transformers' Auto classes.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax import checkpoint, convert  # noqa: E402
from llmjax.data import objectives  # noqa: E402
from llmjax.interop import hf  # noqa: E402
from tests import family_helpers as fh  # noqa: E402
from test_hf import _rewrite  # noqa: E402

ATOL = 1e-4
VOCAB = 96
PAD = 1  # RoBERTa's and BART's pad id; real tokens avoid 0-2 (RoBERTa numbers positions by it)

# name -> (transformers model class, config class, kwargs, Auto class that loads it back).
VARIANTS = {
    # BertForPreTraining files carry the pooler and the next-sentence head as published BERTs do.
    "bert": ("BertForPreTraining", "BertConfig", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=40), "AutoModelForMaskedLM"),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=42, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=PAD, tie_word_embeddings=False), "AutoModelForMaskedLM"),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20),
        "AutoModelForSeq2SeqLM"),
    "t5_v1_1": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False), "AutoModelForSeq2SeqLM"),
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=40, scale_embedding=True), "AutoModelForSeq2SeqLM"),
}
SEQ2SEQ = ("t5", "t5_v1_1", "bart")


def _build(name, seed=0):
    cls, config_cls, kwargs, _ = VARIANTS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    with torch.no_grad():
        if name == "t5_v1_1":  # transformers 5 ties T5's head at init; v1.1 files carry their own
            model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
        # Every tensor matters, norms and biases included. T5 v1.1's gated MLP multiplies two
        # perturbed projections: a smaller step keeps its logits as well conditioned as the others
        # (at 0.2, float32 rounding alone moves transformers' own logits by 1e-4).
        scale = 0.1 if name == "t5_v1_1" else 0.2
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
        if name == "bart":  # a buffer, not a parameter
            model.final_logits_bias.add_(0.2 * torch.randn_like(model.final_logits_bias))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_encoders")
    out = {}
    for name in VARIANTS:
        _build(name).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _batch(seed=0, batch=3, length=16, dec_length=12, vocab=VOCAB):
    """Right-padded encoder ids (lengths 16, 11, 5) and decoder ids (lengths 7, 12, 3)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    dec = rng.integers(3, vocab, (batch, dec_length))
    dec_mask = np.ones_like(dec)
    dec_mask[0, 7:] = 0
    dec_mask[2, 3:] = 0
    ids[mask == 0] = PAD
    dec[dec_mask == 0] = PAD
    return ids, mask, dec, dec_mask


def _args(name, batch):
    ids, mask, dec, dec_mask = batch
    return (ids, mask, dec, dec_mask) if name in SEQ2SEQ else (ids, mask)


def _hf_logits(model_dir, name, batch):
    auto = getattr(transformers, VARIANTS[name][3])
    model = auto.from_pretrained(model_dir).eval()
    ids, mask, dec, dec_mask = (torch.tensor(x) for x in batch)
    with torch.no_grad():
        if name in SEQ2SEQ:
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                        decoder_attention_mask=dec_mask)
        else:
            out = model(input_ids=ids, attention_mask=mask)
    return out.logits.float().numpy()


def _close(ours, ref, name, batch):
    real = (batch[3] if name in SEQ2SEQ else batch[1]).astype(bool)
    assert ours.shape == ref.shape
    assert np.abs(ref[real]).max() > 1.0, "logits too small to tell a wrong mapping apart"
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_export_parity(name, hf_dirs, tmp_path):
    batch = _batch()
    ref = _hf_logits(hf_dirs[name], name, batch)
    model, config = hf.load(hf_dirs[name])
    ours = hf.logits(model, *_args(name, batch))
    assert ours.dtype == np.float32
    _close(ours, ref, name, batch)
    # A padded row gives the logits the same row gets alone, unpadded, on both sides.
    ids, mask, dec, dec_mask = batch
    alone = (hf.logits(model, ids[2:3, :5], None, dec[2:3, :3]) if name in SEQ2SEQ
             else hf.logits(model, ids[2:3, :5]))
    n = alone.shape[1]
    np.testing.assert_allclose(alone[0], ours[2, :n], atol=1e-5)

    out = hf.save(model, config, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    _close(_hf_logits(out, name, batch), ref, name, batch)


def test_translated_configs(hf_dirs):
    bert = hf.load(hf_dirs["bert"])[1]
    assert (bert.model.pooler, bert.model.type_vocab_size, bert.model.position_offset) == (True, 2, 0)
    assert (bert.model.norm_eps, bert.model.activation, bert.model.max_len) == (1e-12, "gelu_exact", 40)
    assert (bert.data.objective, bert.data.mask_dynamic, bert.sample.max_new_tokens) == ("mlm", False, 0)
    roberta = hf.load(hf_dirs["roberta"])[1].model
    # 42 position rows, the first pad + 1 = 2 unused: 40 positions.
    assert (roberta.position_offset, roberta.max_len, roberta.type_vocab_size) == (2, 40, 1)
    assert (roberta.pooler, roberta.tie_embeddings, roberta.norm_eps) == (False, False, 1e-5)
    t5 = hf.load(hf_dirs["t5"])[1]
    m = t5.model
    # head_dim 8 = d_model / num_heads: written 0 (derived), as config files write it.
    assert (m.num_layers, m.num_decoder_layers, m.head_dim, m.activation) == (2, 3, 0, "relu")
    assert (m.tie_embeddings, m.scale_decoder_output, m.scale_attention, m.use_bias) == (
        True, True, False, False)
    assert (m.relative_attention_num_buckets, m.relative_attention_max_distance) == (8, 20)
    assert t5.data.objective == "span_corruption"
    v11 = hf.load(hf_dirs["t5_v1_1"])[1].model
    assert (v11.activation, v11.tie_embeddings, v11.scale_decoder_output, v11.num_decoder_layers) == (
        "gated_gelu", False, False, 0)
    bart = hf.load(hf_dirs["bart"])[1]
    m = bart.model
    assert (m.scale_embeddings, m.num_decoder_layers, m.final_logits_bias, m.position_offset) == (
        True, 1, True, 2)
    assert (bart.data.objective, bart.seq_len) == ("text_infilling", 40)


@pytest.mark.parametrize("style", list(fh.STYLES))
def test_llmjax_model_exports(style, tmp_path):
    """A model of llmjax's preset style -> transformers: same logits; and back, same parameters.

    The parameters are random (norm scales around 1), not llmjax's init, whose zero biases and unit
    scales would hide a mixed-up bias or norm (and compiling the init costs seconds)."""
    from flax import nnx
    from llmjax import steps
    cfg = fh.tiny_model_cfg(style)
    graphdef, state = steps.abstract_model(cfg)
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (rng.normal(0, 0.2, a.shape) + (path[-1].key == "scale")).astype(np.float32),
        nnx.to_pure_dict(state))
    if style == "t5":  # the tied head scales its input by d_model**-0.5: a larger table offsets it
        params["token_embed"]["embedding"] *= 8
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    name = style if style in SEQ2SEQ else "bert"  # which Auto class loads it
    batch = _batch(seed=7, vocab=cfg.vocab_size)
    ours = hf.logits(model, *_args(name, batch))
    out = hf.save(model, cfg, tmp_path / style)
    config = json.loads((tmp_path / style / "config.json").read_text())
    assert config["model_type"] == ("roberta" if style == "roberta" else name.split("_")[0])
    _close(_hf_logits(out, name, batch), ours, name, batch)
    back, _ = hf.load(out)  # and back: the same parameters, bit for bit
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(back, nnx.Param)), params)


def test_t5_untied_head_with_scaled_output(hf_dirs, tmp_path):
    """transformers 5 unties a T5 head the file carries and still scales the decoder output
    (scale_decoder_outputs): ours holds that factor in the head's weights, both ways."""
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dirs["t5"])
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight + 0.3 * torch.randn_like(
            model.shared.weight))
    model.save_pretrained(tmp_path / "untied")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["scale_decoder_outputs"]
    batch = _batch()
    ref = _hf_logits(str(tmp_path / "untied"), "t5", batch)
    ours, config = hf.load(tmp_path / "untied")
    assert (config.model.tie_embeddings, config.model.scale_decoder_output) == (False, True)
    _close(hf.logits(ours, *batch), ref, "t5", batch)
    _close(_hf_logits(hf.save(ours, config, tmp_path / "back"), "t5", batch), ref, "t5", batch)


def test_legacy_layernorm_names(hf_dirs, tmp_path):
    """BERT files converted from the original TensorFlow checkpoints say gamma/beta."""
    def rename(tensors):
        for n in [n for n in tensors if "LayerNorm." in n]:
            tensors[n.replace(".weight", ".gamma").replace(".bias", ".beta")] = tensors.pop(n)
    old = _rewrite(hf_dirs["bert"], tmp_path / "old", edit_tensors=rename)
    batch = _batch()
    new, _ = hf.load(hf_dirs["bert"])
    np.testing.assert_array_equal(hf.logits(hf.load(old)[0], *batch[:2]), hf.logits(new, *batch[:2]))


def test_bad_inputs(hf_dirs, tmp_path):
    dense = "bert.encoder.layer.1.output.dense.weight"
    missing = _rewrite(hf_dirs["bert"], tmp_path / "missing", edit_tensors=lambda t: t.pop(dense))
    with pytest.raises(ValueError, match=f"tensor '{dense}' is missing"):
        hf.load(missing)

    shape = _rewrite(hf_dirs["t5"], tmp_path / "shape", edit_config=lambda c: c.update(d_ff=64))
    with pytest.raises(ValueError, match=r"'encoder.block.0.layer.1.DenseReluDense.wi.weight'.*"
                                         r"shape \[48, 32\].*\[64, 32\]"):
        hf.load(shape)

    silu = _rewrite(hf_dirs["t5_v1_1"], tmp_path / "silu",
                    edit_config=lambda c: c.update(feed_forward_proj="gated-silu"))
    with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'.*'gated-gelu'"):
        hf.load(silu)

    for key in ("normalize_before", "add_final_layer_norm"):
        mbart = _rewrite(hf_dirs["bart"], tmp_path / key, edit_config=lambda c: c.update({key: True}))
        with pytest.raises(ValueError, match=f"{key}=True.*mBART is not supported"):
            hf.load(mbart)

    v11 = _rewrite(hf_dirs["t5_v1_1"], tmp_path / "headless", edit_tensors=lambda t: t.pop(
        "lm_head.weight"), edit_config=lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="'lm_head.weight' is missing"):
        hf.load(v11)

    t5, config = hf.load(hf_dirs["t5"])
    with pytest.raises(ValueError, match="needs decoder_input_ids"):
        hf.logits(t5, np.full((1, 4), 5))
    bert, bert_config = hf.load(hf_dirs["bert"])
    with pytest.raises(ValueError, match="encoder-only"):
        hf.logits(bert, np.full((1, 4), 5), decoder_input_ids=np.full((1, 4), 5))
    config.model.use_bias = True
    with pytest.raises(ValueError, match="model.use_bias=True cannot be written as Hugging "
                                         "Face's T5ForConditionalGeneration"):
        hf.save(t5, config, tmp_path / "biased")
    bert_config.model.activation = "relu"
    with pytest.raises(ValueError, match="model.activation='relu'.*BertForMaskedLM"):
        hf.save(bert, bert_config, tmp_path / "relu")
    assert not (tmp_path / "biased").exists() and not (tmp_path / "relu").exists()


def _t5_spiece(path, texts, vocab_size):
    """A SentencePiece model with T5's ids: pad 0, eos 1, unk 2, no bos, no sentinel pieces."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(path)[:-6],
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   byte_fallback=True, minloglevel=2, num_threads=1)
    return spm.SentencePieceProcessor(model_file=str(path))


def _text():
    import pydoc_data.topics
    return list(pydoc_data.topics.topics.values())


def _t5_with_spiece(root, extra_ids=16, **kwargs):
    root.mkdir()
    sp = _t5_spiece(root / "spiece.model", _text()[:60], 400)
    (root / "tokenizer_config.json").write_text(json.dumps({"extra_ids": extra_ids}))
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=sp.vocab_size() + extra_ids + 4, **kwargs)
    transformers.T5ForConditionalGeneration(config).save_pretrained(root)
    return sp


def test_convert_t5_keeps_hugging_face_sentinels(tmp_path):
    sp = _t5_with_spiece(tmp_path / "hf", d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=2)
    workdir = tmp_path / "workdir"
    convert.convert(str(tmp_path / "hf"), str(workdir))
    assert (workdir / "tokenizer.model").read_bytes() == (tmp_path / "hf" / "spiece.model").read_bytes()
    saved, _ = checkpoint.saved_config(str(workdir))
    data = saved["data"]
    assert (data["sentinels_at_top"], data["num_sentinels"], data["objective"]) == (
        True, 16, "span_corruption")
    assert data["tokenizer"] == str(workdir / "tokenizer.model")

    import ml_collections
    from llmjax.data.tokenizer import Tokenizer
    data_cfg = ml_collections.ConfigDict(data)
    tok = Tokenizer.load(data["tokenizer"])
    top = sp.vocab_size() + 15  # Hugging Face's <extra_id_0>
    assert objectives.sentinel_ids(data_cfg, tok) == list(range(top, top - 16, -1))
    objectives.check_setup(data_cfg, tok, 64)  # no <mask> piece needed
    row = objectives.SpanCorruptionRow(data_cfg, tok, 64)
    tokens = np.asarray(tok.encode(_text()[0])[:80] + [tok.eos_id], np.int32)
    ex = row.random_map({"tokens": tokens, "tokens_segment_ids": np.ones_like(tokens)},
                        np.random.default_rng(0))
    assert ex["decoder_inputs"][0] == 0  # T5 starts decoding from pad
    assert ex["targets"][0] == top and top in ex["inputs"]  # the first span is <extra_id_0>

    out = tmp_path / "back"
    convert.convert(str(workdir), str(out))
    assert (out / "spiece.model").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (0, 1, 0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)  # offline, from spiece.model
    assert [hf_tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in (0, 15)] == [top, top - 15]
    batch = _batch()
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    got = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    ids = torch.tensor(batch[0])
    with torch.no_grad():
        np.testing.assert_allclose(got(input_ids=ids, decoder_input_ids=ids).logits.numpy(),
                                   ref(input_ids=ids, decoder_input_ids=ids).logits.numpy(),
                                   atol=ATOL)


def test_convert_bert_says_the_tokenizer_stays(hf_dirs, tmp_path, capsys):
    src = tmp_path / "bert"
    shutil.copytree(hf_dirs["bert"], src)
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    convert.convert(str(src), str(tmp_path / "workdir"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WordPiece" in err[0] and "not carried" in err[0]
    assert not (tmp_path / "workdir" / "tokenizer.model").exists()
    saved, _ = checkpoint.saved_config(str(tmp_path / "workdir"))
    assert saved["model"]["pooler"] and saved["data"]["tokenizer"] == ""
    out = convert.convert(str(tmp_path / "workdir"), str(tmp_path / "back"))
    batch = _batch()
    _close(_hf_logits(out, "bert", batch), _hf_logits(hf_dirs["bert"], "bert", batch), "bert", batch)


def _train(workdir, run, corpus, tmp_path, *extra):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, "-m", "llmjax.main", f"--config={workdir}/config.py", f"--workdir={run}",
         "--config.total_steps=6", "--config.seq_len=64", "--config.batch_size=8",
         "--config.log_every_steps=3", "--config.eval_every_steps=6", "--config.eval_steps=1",
         "--config.data.name=text", f"--config.data.files={corpus}/*.txt",
         f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.optim.learning_rate=3e-3",
         "--config.optim.warmup_steps=1", "--config.optim.name=adamw", *extra],
        capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_converted_t5_and_bert_continue_training(tmp_path):
    """python -m llmjax.main --config=<converted>/config.py continues T5's span corruption (with
    Hugging Face's tokenizer and sentinels) and BERT's masked LM from the converted weights, and
    python -m llmjax.generate uses the result."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    topics = _text()
    for i in range(0, len(topics), 10):
        (corpus / f"{i}.txt").write_text("\n\n".join(topics[i:i + 10]))
    _t5_with_spiece(tmp_path / "t5", d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=2,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    bert = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    for name, src in (("t5", tmp_path / "t5"), ("bert", bert)):
        workdir, run = tmp_path / f"{name}_converted", tmp_path / f"{name}_run"
        convert.convert(str(src), str(workdir))
        out = _train(workdir, run, corpus, tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"initialised from {workdir}" in out.stdout
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if "loss" in m]
        assert len(losses) >= 2 and all(np.isfinite(losses)), metrics
        assert any("eval_loss" in m for m in metrics)
        # T5 trains with the carried spiece.model; BERT's WordPiece stayed behind, so the run
        # trained a SentencePiece tokenizer of its own.
        assert (run / "tokenizer.model").exists() == (name == "bert")
        # ... and its result is used: T5 decodes a prompt with a sentinel, BERT fills a mask.
        prompt = "the <extra_id_0> of the" if name == "t5" else "the <mask> of the"
        gen = subprocess.run(
            [sys.executable, "-m", "llmjax.generate", f"--workdir={run}", f"--prompt={prompt}",
             "--config.sample.max_new_tokens=4", "--config.sample.num_beams=2",
             "--config.sample.top_k=3"], capture_output=True, text=True,
            env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=600)
        assert gen.returncode == 0, gen.stderr[-2000:]
        # A random T5 may end at once (an empty answer); fill-mask always lists candidates.
        assert name == "t5" or (gen.stdout.startswith("<mask> 1:")
                                and len(re.findall(r" \d\.\d+", gen.stdout)) == 3), gen.stdout


def test_sharded_import_matches_one_device(hf_dirs, devices):
    """Inside sharding.use_mesh, load places each stack's parameters by our rules; same logits."""
    from llmjax import sharding
    batch = _batch()
    one, _ = hf.load(hf_dirs["t5_v1_1"])
    expected = hf.logits(one, *batch)
    mesh = sharding.make_mesh((2, 2, 2), devices)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        model, _ = hf.load(hf_dirs["t5_v1_1"])
        kernel = model.decoder.layers.cross_attn.query.kernel[...]
        # [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor.
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        got = hf.logits(model, *batch)
    # Sharded contractions sum in another order: float32 rounding at logits up to ~20.
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)
