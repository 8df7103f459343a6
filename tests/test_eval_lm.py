"""llmjax.evaluation.lm: log-likelihoods equal transformers' on tiny random GPT-2 and LLaMA
models (windows and rolling documents included), batching does not change a score, greedy flags
and stop strings behave; the lm-evaluation-harness adapter runs a local task through lm_eval's
own command line; in-loop evals resume with the run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llmjax.evaluation.lm import LM, rolling_windows  # noqa: E402

VOCAB = 96
RTOL = 1e-4
# name -> (transformers config class, kwargs); max_length is the context (32 and 64 tokens).
MODELS = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    "llama": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=False)),
}
CHARS = ["\n"] + [chr(c) for c in range(32, 127)][:VOCAB - 4]


def _char_tokenizer():
    """A character-level fast tokenizer (tokenizer.json) covering the model's 96 ids."""
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["[UNK]", "<s>", "</s>"])  # decode leaves them out
    return tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_eval")
    out = {}
    for name, (cls, kwargs) in MODELS.items():
        torch.manual_seed(0)
        config = getattr(transformers, cls)(**kwargs, bos_token_id=1, eos_token_id=2)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))  # logits far from uniform
        model.save_pretrained(root / name)
        _char_tokenizer().save(str(root / name / "tokenizer.json"))
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def lms(hf_dirs):
    return {name: LM.from_workdir(path) for name, path in hf_dirs.items()}


def _torch_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _logp(model, inputs):
    """transformers' float32 next-token log-probabilities [len(inputs), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([inputs])).logits[0].float(), -1).numpy()


def _requests(rng, max_length):
    """Mixed lengths: short pairs, and pairs longer than the context (the context is cut)."""
    out = []
    for ctx_len, cont_len in ((3, 1), (7, 5), (1, 9), (max_length - 4, 6), (max_length + 9, 4),
                              (2 * max_length + 3, 11)):
        out.append((rng.integers(3, VOCAB, ctx_len).tolist(),
                    rng.integers(3, VOCAB, cont_len).tolist()))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_loglikelihood_matches_transformers(name, hf_dirs, lms):
    lm, ref = lms[name], _torch_model(hf_dirs[name])
    assert lm.max_length == MODELS[name][1].get("n_positions",
                                                MODELS[name][1].get("max_position_embeddings"))
    rng = np.random.default_rng(1)
    requests = _requests(rng, lm.max_length)
    ours = lm.loglikelihood_tokens(requests, batch_size=4)
    for (ctx, cont), (lp, greedy) in zip(requests, ours):
        whole = (ctx + cont)[-(lm.max_length + 1):]  # the context loses its start
        logp = _logp(ref, whole[:-1])
        first = len(whole) - 1 - len(cont)
        want = sum(float(logp[first + k, t]) for k, t in enumerate(cont))
        np.testing.assert_allclose(lp, want, rtol=RTOL, atol=1e-4)
        assert isinstance(lp, float) and isinstance(greedy, bool)

    # Greedy: the continuation that is the argmax at every step is flagged, a changed one not.
    ctx = rng.integers(3, VOCAB, 5).tolist()
    cont = []
    with torch.no_grad():
        for _ in range(4):
            cont.append(int(ref(torch.tensor([ctx + cont])).logits[0, -1].argmax()))
    wrong = cont[:2] + [(cont[2] + 1) % VOCAB] + cont[3:]
    (_, g1), (_, g2) = lm.loglikelihood_tokens([(ctx, cont), (ctx, wrong)])
    assert g1 and not g2

    # Batching and padding do not change a score: mixed lengths together vs one at a time.
    alone = [lm.loglikelihood_tokens([r], batch_size=1)[0] for r in requests]
    np.testing.assert_allclose([a for a, _ in alone], [a for a, _ in ours], rtol=1e-6, atol=1e-5)
    assert [g for _, g in alone] == [g for _, g in ours]


@pytest.mark.parametrize("name", list(MODELS))
def test_rolling_matches_transformers_windows(name, hf_dirs, lms):
    lm, ref = lms[name], _torch_model(hf_dirs[name])
    L = lm.max_length
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, VOCAB, n).tolist() for n in (3 * L + 5, L, 7, 0)]
    ours = lm.loglikelihood_rolling_tokens(docs, batch_size=3)
    for doc, got in zip(docs, ours):
        windows = rolling_windows(doc, lm.start_id, L)
        assert [t for _, cont in windows for t in cont] == doc  # every token exactly once
        # transformers on the same windows: tokens [a, e) predicted from ext[max(0, e-L):e].
        ext, want, a = [lm.start_id] + doc, 0.0, 0
        while a < len(doc):
            e = min(a + L, len(doc))
            inputs = ext[max(0, e - L):e]
            assert len(inputs) <= L
            logp = _logp(ref, inputs)
            for j in range(a, e):
                want += float(logp[j - max(0, e - L), doc[j]])
            a = e
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-4)
    assert ours[-1] == 0.0
    # Text level: the counts perplexities divide by.
    out = lm.loglikelihood_rolling(["héllo world\nagain", ""])
    assert out[0]["tokens"] == len("héllo world\nagain") and out[0]["bytes"] == 18
    assert out[0]["words"] == 3 and out[1] == {"logprob": 0.0, "tokens": 0, "bytes": 0, "words": 0}


def test_text_pairs_and_generation(hf_dirs, lms):
    lm = lms["gpt2"]
    assert lm.family == "decoder" and lm.start_id == 1 and not lm.add_bos
    # encode(context + continuation) split at the context's tokens; trailing spaces move over.
    pairs = [("The cat ", "sat"), ("", "sat"), ("ab", "c")]
    want = lm.loglikelihood_tokens([(list(lm.tokenizer.encode("The cat")),
                                     lm.tokenizer.encode(" sat")),
                                    ([1], lm.tokenizer.encode("sat")),
                                    (lm.tokenizer.encode("ab"), lm.tokenizer.encode("c"))])
    assert lm.loglikelihood(pairs) == want

    # Greedy generation equals transformers' greedy decoding; stop strings cut the text.
    ref = _torch_model(hf_dirs["gpt2"])
    prompt = "def f(x):"
    ids = lm.tokenizer.encode(prompt)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    want = lm.tokenizer.decode(out[0, len(ids):].tolist())
    free = lm.generate_until([(prompt, {"until": [], "max_gen_toks": 12})])[0]
    assert free == want and len(free) > 8
    stop = free[4]
    two = free[6:8]
    got = lm.generate_until([(prompt, {"until": [stop], "max_gen_toks": 12}),
                             (prompt, {"until": [two, "never"], "max_gen_toks": 12}),
                             ("x", {"until": "\n", "max_gen_toks": 3})], batch_size=2)
    assert got[0] == free[:free.index(stop)] and got[1] == free[:free.index(two)]
    assert len(got[2]) <= 3


# Encoder-decoders score the continuation with the decoder; encoders give pseudo-log-likelihoods.
OTHER_FAMILIES = {
    "t5": ("T5Config", "AutoModelForSeq2SeqLM", dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)),
    "bart": ("BartConfig", "AutoModelForSeq2SeqLM", dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=40, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        decoder_start_token_id=2, forced_eos_token_id=None)),
    "bert": ("BertConfig", "AutoModelForMaskedLM", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=40, pad_token_id=0)),
}


@pytest.mark.parametrize("name", list(OTHER_FAMILIES))
def test_other_families_match_transformers(name, tmp_path):
    config_cls, auto, kwargs = OTHER_FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(getattr(transformers, config_cls)(**kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path)
    tok = _char_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"mask_token": "[UNK]", "bos_token": "<s>", "eos_token": "</s>"}))  # BERT's CLS and SEP
    lm = LM.from_workdir(str(tmp_path))
    rng = np.random.default_rng(3)
    if name == "bert":  # mask each token in turn ([UNK] stands for [MASK] here)
        texts = ["def f(x):", "ab"]
        got = lm.masked_logprob(texts, batch_size=4)
        for text, value in zip(texts, got):
            ids = [1] + lm.tokenizer.encode(text) + [2]  # bos / eos of the pretraining rows
            rows = torch.tensor([ids[:p] + [0] + ids[p + 1:] for p in range(1, len(ids) - 1)])
            with torch.no_grad():
                logp = torch.log_softmax(model(rows).logits.float(), -1).numpy()
            want = sum(float(logp[p - 1, p, ids[p]]) for p in range(1, len(ids) - 1))
            np.testing.assert_allclose(value, want, rtol=RTOL, atol=1e-4)
        return
    assert lm.decoder_start_id == kwargs["decoder_start_token_id"]
    requests = [(rng.integers(3, VOCAB, n).tolist(), rng.integers(3, VOCAB, m).tolist())
                for n, m in ((5, 3), (12, 1), (2, 9))]
    ours = lm.loglikelihood_tokens(requests, batch_size=2)
    for (ctx, cont), (lp, greedy) in zip(requests, ours):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx]),
                           decoder_input_ids=torch.tensor([[lm.decoder_start_id] + cont[:-1]]))
        logp = torch.log_softmax(logits.logits[0].float(), -1).numpy()
        np.testing.assert_allclose(lp, sum(float(logp[k, t]) for k, t in enumerate(cont)),
                                   rtol=RTOL, atol=1e-4)
        assert greedy == all(int(logp[k].argmax()) == t for k, t in enumerate(cont))
    assert len(lm.generate_until([("abc", {"until": ["x"], "max_gen_toks": 5})])) == 1


def test_bad_input(tmp_path, hf_dirs):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LM.from_workdir(str(tmp_path / "missing"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(hf_dirs["gpt2"], f), bare / f)
    with pytest.raises(ValueError, match="no tokenizer.model or tokenizer.json"):
        LM.from_workdir(str(bare))


# ------------------------------------------------------------------------------------------------
# In-loop evaluation tasks.

def _tiny_tasks(root):
    """A multiple-choice and a generation spec over four examples each (tasks.py's format)."""
    mc = [{"q": f"def f{i}(", "choices": ["x):", " = 1", "class A"], "answer": i % 3}
          for i in range(4)]
    gen = [{"q": f"import os{i}", "target": "\n"} for i in range(4)]
    for name, rows, spec in (
            ("tiny_mc", mc, "kind: multiple_choice\nprompt: \"{q}\"\nchoices: choices\n"
                            "answer: answer\n"),
            ("tiny_gen", gen, "kind: generation\nprompt: \"{q}\"\ntarget: target\n"
                              "until: [\"\\n\"]\nmax_gen_toks: 4\n")):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(f"name: {name}\ndata: {name}.jsonl\n{spec}")
    return f"{root / 'tiny_mc.yaml'},{root / 'tiny_gen.yaml'}"


@pytest.fixture(scope="module")
def runs(devices, tokenizer_path, tmp_path_factory):
    """A tiny run trained straight to step 4 and one stopped at step 2 and resumed, both
    scoring two local tasks after each eval loss (every 2 steps)."""
    from llmjax.train import train_and_evaluate
    root = tmp_path_factory.mktemp("in_loop")
    names = _tiny_tasks(root)
    straight, resumed = root / "straight", root / "resumed"
    train_and_evaluate(_loop_config(tokenizer_path, eval_tasks=names), str(straight))
    train_and_evaluate(_loop_config(tokenizer_path, eval_tasks=names, stop_at_step=2), str(resumed))
    train_and_evaluate(_loop_config(tokenizer_path, eval_tasks=names), str(resumed))
    return straight, resumed


def _loop_config(tokenizer_path, **overrides):
    from tests.helpers import tiny_config
    return tiny_config(**{"model.vocab_size": 512, "data.tokenizer": str(tokenizer_path),
                          "total_steps": 4, "log_every_steps": 2, "eval_every_steps": 2,
                          "eval_steps": 1, "checkpoint_every_steps": 2, "sample.max_new_tokens": 0,
                          "batch_size": 8, "seq_len": 32, "mesh.shape": (-1, 1, 1), **overrides})


@pytest.mark.slow
def test_in_loop_evals_resume(runs, tokenizer_path, tmp_path):
    from llmjax.train import train_and_evaluate

    def evals(workdir):
        rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if any(k.startswith("eval/") for k in r)]

    straight, resumed = runs
    want = evals(straight)
    assert [r["step"] for r in want] == [2, 4]
    assert {"eval/tiny_mc/accuracy", "eval/tiny_mc/accuracy_norm", "eval/tiny_gen/exact_match",
            "eval/tiny_gen/f1", "eval/tiny_mc/n"} <= set(want[0])
    assert evals(resumed) == want  # the same values at the same steps
    assert any(p.name.startswith("events") for p in (straight / "tb").iterdir())

    # An unknown task is one sentence, before anything is written to the workdir.
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=r"eval_tasks='nope': unknown task 'nope'"):
        train_and_evaluate(_loop_config(tokenizer_path, eval_tasks="nope"), str(fresh))
    assert not fresh.exists()


# ------------------------------------------------------------------------------------------------
# lm-evaluation-harness through its own command line.

HARNESS_TASKS = {
    "tiny_mc": """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""",
    "tiny_ppl": """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
""",
}


@pytest.mark.slow
def test_harness_cli(runs, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install "
                                          "lm-eval==0.4.13)")
    workdir = runs[0]
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    _tiny_tasks(tmp_path)  # tiny_mc.jsonl, tiny_gen.jsonl
    docs = ["import os\nprint(os.getcwd())\n" * 5, "def f(x):\n    return x + 1\n"]
    (tmp_path / "tiny_ppl.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name, spec in HARNESS_TASKS.items():
        (tasks_dir / f"{name}.yaml").write_text(f"task: {name}\n" + spec.format(data=tmp_path))
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "llmjax.evaluation.harness", "--model", "llmjax",
         "--model_args", f"workdir={workdir},batch_size=8", "--tasks", "tiny_mc,tiny_ppl,tiny_gen",
         "--include_path", str(tasks_dir), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]

    # The same numbers from LM directly.
    lm = LM.from_workdir(str(workdir))
    mc = [json.loads(x) for x in (tmp_path / "tiny_mc.jsonl").read_text().splitlines()]
    scores = lm.loglikelihood([(e["q"], " " + c) for e in mc for c in e["choices"]])
    right = [int(np.argmax([s for s, _ in scores[3 * i:3 * i + 3]])) == e["answer"]
             for i, e in enumerate(mc)]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(np.mean(right))
    rolled = lm.loglikelihood_rolling(docs)
    bpb = -sum(r["logprob"] for r in rolled) / sum(r["bytes"] for r in rolled) / np.log(2)
    assert results["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0

    bad = subprocess.run([sys.executable, "-m", "llmjax.evaluation.harness", "--model", "llmjax",
                          "--model_args", f"workdir={tmp_path / 'missing'}", "--tasks", "tiny_mc",
                          "--include_path", str(tasks_dir)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist" in bad.stderr.strip().splitlines()[-1]
