"""Hugging Face interop: logit parity with `transformers` (PyTorch, CPU) in both directions.

Tiny random models are built from config objects (no network), every weight perturbed so that a
wrongly mapped tensor (even a LayerNorm bias) changes the logits, saved with save_pretrained, then
imported, compared, exported and loaded back by transformers' Auto classes.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax import checkpoint, convert, sharding, steps  # noqa: E402
from llmjax.interop import hf, safetensors_io  # noqa: E402

ATOL = 1e-4
VOCAB = 96

# name -> (transformers config class, kwargs): every variant the issue lists for the decoders.
VARIANTS = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                layer_norm_epsilon=1e-5)),
    "gpt2_untied": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=32, n_inner=48, tie_word_embeddings=False)),
    "llama": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=64, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False)),
    "llama_gqa_theta": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, rope_theta=500000.0,
                                            max_position_embeddings=64, tie_word_embeddings=False)),
    "llama_bias": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=1, num_attention_heads=2, head_dim=12,
                                       attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6,
                                       max_position_embeddings=64, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, max_position_embeddings=64,
                                       tie_word_embeddings=True)),
}


def _build(name, seed=0):
    cls, kwargs = VARIANTS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(**kwargs, bos_token_id=None, eos_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every tensor matters, norms and biases included
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in VARIANTS:
        _build(name).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _batch(seed=0, batch=3, length=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # right padding, as Hugging Face pads for training
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _hf_logits(model_dir, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def _close(ours, ref, mask):
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 1.0, "logits too small to tell a wrong mapping apart"
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_import_export_parity(name, hf_dirs, tmp_path):
    ids, mask = _batch()
    ref = _hf_logits(hf_dirs[name], ids, mask)
    model, config = hf.load(hf_dirs[name])
    ours = hf.logits(model, ids, mask)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    _close(ours, ref, mask)
    # A padded row gives the logits the same row gets alone, unpadded.
    alone = hf.logits(model, ids[2:3, :5])
    np.testing.assert_allclose(alone[0], ours[2, :5], atol=1e-5)
    # The scanned layout: every layer parameter is stacked over the layers axis.
    assert model.layers.attn.query.kernel.shape[0] == VARIANTS[name][1].get(
        "n_layer", VARIANTS[name][1].get("num_hidden_layers"))

    out = hf.save(model, config, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    _close(_hf_logits(out, ids, mask), ref, mask)


def test_translated_config(hf_dirs):
    _, gqa = hf.load(hf_dirs["llama_gqa_theta"])
    m = gqa.model
    assert (m.num_heads, m.num_kv_heads, m.head_dim, m.rope_theta) == (4, 2, 0, 500000.0)
    assert (m.position, m.norm, m.activation, m.use_bias, m.tie_embeddings) == (
        "rope", "rmsnorm", "swiglu", False, False)
    _, gpt = hf.load(hf_dirs["gpt2"])
    assert (gpt.model.mlp_dim, gpt.model.max_len, gpt.model.tie_embeddings) == (128, 32, True)
    assert gpt.seq_len == 32  # learned positions cap the training length
    assert "optim" in gpt and "data" in gpt  # a full config, not only the model section


def test_sharded_files_and_bfloat16(hf_dirs, tmp_path):
    model = _build("llama_gqa_theta")
    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "shards" / hf.INDEX_FILE)
    ids, mask = _batch()
    ref, _ = hf.load(hf_dirs["llama_gqa_theta"])
    sharded, _ = hf.load(tmp_path / "shards")
    np.testing.assert_array_equal(hf.logits(sharded, ids, mask), hf.logits(ref, ids, mask))

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    bf16, _ = hf.load(tmp_path / "bf16")
    want = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T.reshape(32, 2, 8)
    np.testing.assert_array_equal(np.asarray(bf16.layers.attn.key.kernel[1]), want)


def test_sharded_import_matches_one_device(hf_dirs, devices, tmp_path):
    ids, mask = _batch(seed=1, batch=8)
    one, _ = hf.load(hf_dirs["llama_gqa_theta"])
    expected = hf.logits(one, ids, mask)
    mesh = sharding.make_mesh((2, 2, 2), devices)
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        model, config = hf.load(hf_dirs["llama_gqa_theta"])
        kernel = model.layers.attn.query.kernel[...]
        # [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor, 4 shards each.
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert kernel.addressable_shards[0].data.shape == (2, 16, 2, 8)
        got = hf.logits(model, ids, mask)
        exported = hf.save(model, config, tmp_path / "from_mesh")  # gathers the shards
    np.testing.assert_allclose(got, expected, atol=1e-5)
    ref = _hf_logits(hf_dirs["llama_gqa_theta"], ids, mask)
    _close(got, ref, mask)
    _close(_hf_logits(exported, ids, mask), ref, mask)


def _tokenizer(path):
    from llmjax.data.tokenizer import train_tokenizer
    text = ["def add(a, b):\n    return a + b\n" * 20, "The quick brown fox jumps.\n" * 20]
    train_tokenizer(text, 300, path)


def test_convert_round_trip_and_training(hf_dirs, tmp_path):
    """HF -> llmjax workdir (trainable, with the tokenizer) -> HF again, equal logits."""
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["llama_tied"], src)
    _tokenizer(str(src / "tokenizer.model"))
    workdir = tmp_path / "workdir"
    assert convert.convert(str(src), str(workdir)).endswith(os.path.join("checkpoints", "0"))
    assert (workdir / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    saved, _ = checkpoint.saved_config(str(workdir))
    assert saved["model"]["num_kv_heads"] == 1 and saved["data"]["tokenizer"].endswith(
        "tokenizer.model")

    out = convert.convert(str(workdir / "checkpoints" / "0"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "tokenizer.model").is_file()
    hf_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (hf_config["pad_token_id"], hf_config["bos_token_id"], hf_config["eos_token_id"]) == (0, 2, 3)
    ids, mask = _batch()
    _close(_hf_logits(out, ids, mask), _hf_logits(hf_dirs["llama_tied"], ids, mask), mask)

    # The converted checkpoint trains: its config builds, its params restore into the train
    # state, and a few steps lower the loss on a repeated batch.
    import importlib.util
    spec = importlib.util.spec_from_file_location("converted_config", workdir / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update(seq_len=16, batch_size=8, total_steps=4)
    config.mesh.shape = (1, 1, 1)
    config.optim.update(learning_rate=1e-2, warmup_steps=1)
    mesh = sharding.make_mesh(config.mesh.shape, jax.devices()[:1])
    from tests.helpers import synthetic_batches
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        params, _, step = checkpoint.restore_params(str(workdir), built.abstract_state["params"])
        assert step == 0
        state = built.init()
        state["params"] = params
        batch = {k: jax.device_put(v, built.batch_sharding)
                 for k, v in synthetic_batches(config, 1)[0].items()}
        losses = []
        for _ in range(4):
            state, metrics = built.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        f = safetensors_io.File(dst / "model.safetensors")
        tensors = {n: np.array(f.get(n)) for n in f.names()}
        edit_tensors(tensors)
        safetensors_io.write(dst / "model.safetensors", tensors, {"format": "pt"})
    return dst


def test_bad_inputs(hf_dirs, tmp_path):
    gpt2 = hf_dirs["gpt2"]
    c_fc = "transformer.h.1.mlp.c_fc.weight"

    headless = _rewrite(hf_dirs["llama"], tmp_path / "headless",
                        edit_tensors=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="tensor 'lm_head.weight' is missing.*"
                                         "tie_word_embeddings=False"):
        hf.load(headless)

    mistral = _rewrite(gpt2, tmp_path / "mistral", edit_config=lambda c: c.update(model_type="mistral"))
    with pytest.raises(ValueError, match="model_type='mistral'.*supported model types"):
        hf.load(mistral)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(gpt2, "config.json"), pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never loads.*save_pretrained"):
        hf.load(pickled)

    missing = _rewrite(gpt2, tmp_path / "missing", edit_tensors=lambda t: t.pop(c_fc))
    with pytest.raises(ValueError, match=f"tensor '{c_fc}' is missing"):
        hf.load(missing)

    shape = _rewrite(gpt2, tmp_path / "shape", edit_config=lambda c: c.update(n_inner=64))
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.weight'.*shape \[32, 128\].*"
                                         r"\[32, 64\]"):
        hf.load(shape)

    def quantize(t):
        t[c_fc] = t[c_fc].astype(np.int8)
    int8 = _rewrite(gpt2, tmp_path / "int8", edit_tensors=quantize)
    with pytest.raises(ValueError, match=f"'{c_fc}'.*dtype I8.*dequantize"):
        hf.load(int8)

    extra = _rewrite(gpt2, tmp_path / "extra",
                     edit_tensors=lambda t: t.update({"transformer.h.0.attn.q_norm.weight":
                                                      np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match="'transformer.h.0.attn.q_norm.weight'.*no place"):
        hf.load(extra)

    scaled = _rewrite(hf_dirs["llama"], tmp_path / "scaled", edit_config=lambda c: c.update(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="rope_type='linear'"):
        hf.load(scaled)

    truncated = _rewrite(gpt2, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hf.load(truncated)

    model, config = hf.load(gpt2)
    config.model.norm = "rmsnorm"
    with pytest.raises(ValueError, match="no Hugging Face architecture matches"):
        hf.save(model, config, tmp_path / "nope")
    with pytest.raises(ValueError, match="decoder-only"):
        hf.logits(model, np.zeros((1, 4), np.int32), decoder_input_ids=np.zeros((1, 4), np.int32))


def test_cli_reports_one_line_errors(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    missing = str(tmp_path / "nowhere")
    run = subprocess.run([sys.executable, "-m", "llmjax.convert", missing, str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {missing} does not exist; give a Hugging Face model directory or an llmjax "
        "workdir / checkpoint."]


def _has_init_from():
    from llmjax.config import base_config
    return "init_from" in base_config()


@pytest.mark.slow
@pytest.mark.skipif(not _has_init_from(), reason="needs the trainer's config.init_from (fine-tuning)")
def test_converted_model_continues_training_and_generates(tmp_path):
    """python -m llmjax.main --config=<converted>/config.py trains from the converted weights."""
    import pydoc_data.topics
    from llmjax.data.tokenizer import train_tokenizer
    src, corpus = tmp_path / "hf", tmp_path / "corpus"
    src.mkdir()
    corpus.mkdir()
    topics = list(pydoc_data.topics.topics.values())
    for i in range(0, len(topics), 10):  # a few dozen documents: one is held out for validation
        (corpus / f"{i}.txt").write_text("\n\n".join(topics[i:i + 10]))
    tokenizer = train_tokenizer(topics, 512, str(src / "tokenizer.model"), max_chars=400_000)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    workdir = tmp_path / "converted"
    convert.convert(str(src), str(workdir))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = subprocess.run(
        [sys.executable, "-m", "llmjax.main", f"--config={workdir}/config.py",
         f"--workdir={tmp_path / 'run'}", "--config.total_steps=40", "--config.seq_len=64",
         "--config.batch_size=8", "--config.log_every_steps=20",
         "--config.eval_every_steps=40", "--config.eval_steps=2", "--config.data.name=text",
         f"--config.data.files={corpus}/*.txt", "--config.data.data_dir=" + str(tmp_path / "tfds"),
         "--config.optim.learning_rate=3e-3", "--config.optim.warmup_steps=5",
         "--config.sample.max_new_tokens=8"],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"initialised from {workdir}" in run.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    # The first evaluation is the converted (random) model: about ln(vocab); training lowers it.
    assert abs(evals[0] - np.log(tokenizer.vocab_size)) < 0.3 and evals[-1] < evals[0] - 1.0
    assert "sample:" in run.stdout
    # ... and the result goes back to transformers with the same logits.
    back = convert.convert(str(tmp_path / "run"), str(tmp_path / "back"))
    ids = np.array([[2] + tokenizer.encode("The for statement")])
    ours, _ = hf.load(back)
    np.testing.assert_allclose(hf.logits(ours, ids), _hf_logits(back, ids, np.ones_like(ids)),
                               atol=ATOL)
