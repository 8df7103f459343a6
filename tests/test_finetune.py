"""Fine-tuning: SFT rows score only the response, JSONL errors name the line, freezing freezes,
init_from loads parameters with a fresh optimizer, and the shipped task is well formed."""

import json

import jax
import numpy as np
import pytest

from llmjax import sharding, steps
from llmjax.checkpoint import Checkpointer
from llmjax.data import finetune, tasks
from llmjax.evaluation import stdlib_modules
from tests.helpers import synthetic_batches, tiny_config


class CharTokenizer:
    """One id per character (ids 3..): enough to check where the weights fall."""

    bos_id, eos_id, unk_id, vocab_size = 1, 2, 0, 128

    def encode(self, text):
        return [3 + ord(c) - 32 for c in text]  # printable ASCII

    def decode(self, ids):
        return "".join(chr(i - 3 + 32) for i in ids if i >= 3)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_sft_rows_score_only_the_response(tmp_path):
    files = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "ab", "response": "xyz"},
                                                   {"prompt": "long prompt", "response": "r"}])
    tok = CharTokenizer()
    row = finetune.SftRow(tok, seq_len=8).map(finetune.read_jsonl(files)[0])
    # tokens = bos a b x y z eos: targets a b x y z eos; the last four (x y z eos) are scored.
    np.testing.assert_array_equal(row["inputs"][:6], [1] + tok.encode("abxyz"))
    np.testing.assert_array_equal(row["targets"][:6], tok.encode("abxyz") + [2])
    np.testing.assert_array_equal(row["weights"], [0, 0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4, 5, 0, 0])
    scored = row["targets"][row["weights"] == 1]
    assert tok.decode(scored) == "xyz"

    cfg = tiny_config(**{"data.task": "sft", "data.files": files, "data.eval_files": files}).data
    train = finetune.make_train_iterator(cfg, tok, seq_len=8, batch_size=2, seed=0,
                                         process_index=0, process_count=1)
    batch = next(train)
    assert batch["weights"].sum() == 4 + 2 and batch["inputs"].shape == (2, 8)
    # The long example lost the start of its prompt, not its response: bos "prompt" r eos.
    long = [r for r in batch["inputs"].tolist() if r[0] == 1 and r[1] == tok.encode("p")[0]]
    assert long == [[1] + tok.encode("prompt") + tok.encode("r")]
    state = train.get_state()  # checkpointable: the position comes back
    following = next(train)
    train.set_state(state)
    np.testing.assert_array_equal(next(train)["inputs"], following["inputs"])
    evals = finetune.make_eval_batches(cfg, tok, seq_len=8, batch_size=4, num_batches=5,
                                       process_index=0, process_count=1)
    assert len(evals) == 1 and evals[0]["weights"].sum() == 6  # 2 examples + 2 empty rows


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "",
                                               {"prompt": "c"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'response'"):
        finetune.read_jsonl(bad)
    broken = write_jsonl(tmp_path / "broken.jsonl", ['{"prompt": "a", '])
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        finetune.read_jsonl(broken)
    with pytest.raises(FileNotFoundError, match="no JSONL file matches"):
        finetune.read_jsonl(str(tmp_path / "missing*.jsonl"))
    with pytest.raises(ValueError, match="data.task='nope' is not one of"):
        finetune.pipeline_for({"task": "nope"})


def build(config, devices):
    mesh = sharding.make_mesh(config.mesh.shape, devices[:int(np.prod(config.mesh.shape))])
    with sharding.use_mesh(mesh, config.sharding_rules):
        built = steps.build(config, mesh)
        state = built.init()
    return built, state, mesh


def train(built, state, mesh, config, n):
    with sharding.use_mesh(mesh, config.sharding_rules):
        for batch in synthetic_batches(config, n):
            state, _ = built.train_step(state, sharding.global_batch(batch, built.batch_sharding))
    return state


def test_freeze_really_freezes(devices):
    config = tiny_config(**{"optim.freeze": "embedding$", "optim.weight_decay": 0.5})
    built, state, mesh = build(config, devices)
    before = jax.device_get(state["params"])
    after = jax.device_get(train(built, state, mesh, config, 3)["params"])
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(after)[0]:
        frozen = path[-1].key == "embedding"
        same = np.array_equal(value, flat_before[path])
        assert same == frozen, (path, frozen)
    with pytest.raises(ValueError, match="optim.freeze='nothing_matches' matches no parameter"):
        build(tiny_config(**{"optim.freeze": "nothing_matches"}), devices)


def test_init_from_loads_params_with_a_fresh_optimizer(devices, tmp_path):
    config = tiny_config("llama")
    built, state, mesh = build(config, devices)
    state = train(built, state, mesh, config, 2)
    ckpt = Checkpointer(str(tmp_path / "pre"), max_to_keep=1, async_save=False)
    ckpt.save(2, state, None, config.to_dict(), force=True)
    ckpt.close()

    # Fine-tune on another mesh (2 x 2 x 2): parameters come back resharded, bit for bit.
    fine = tiny_config("llama", init_from=str(tmp_path / "pre"), **{"mesh.shape": (2, 2, 2)})
    built8, fresh, mesh8 = build(fine, devices)
    with sharding.use_mesh(mesh8, fine.sharding_rules):
        restored, step = finetune.restore_init(fine, built8, fresh)
    assert step == 2 and int(restored["step"]) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]),
                 jax.device_get(state["params"]))
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
    assert not any(x.any() for x in leaves(restored["opt_state"]))  # moments and counts: zero
    assert any(x.any() for x in leaves(state["opt_state"]))  # the trained one's moved
    q = restored["params"]["layers"]["attn"]["query"]["kernel"]
    assert q.sharding == built8.state_shardings["params"]["layers"]["attn"]["query"]["kernel"]

    other = tiny_config("llama", init_from=str(tmp_path / "pre"), **{"model.d_model": 64})
    built_other, fresh_other, _ = build(other, devices)
    with pytest.raises(ValueError, match=r"\(init_from\) was trained with a different model "
                                         r"\(model.d_model=32 there but 64 now\)"):
        finetune.restore_init(other, built_other, fresh_other)


def test_shipped_task_is_well_formed():
    splits = tasks.stdlib_module_examples(modules=("tarfile", "http"), per_class=40)
    train, validation = splits["train"], splits["validation"]
    assert len(train) + len(validation) == 80 and validation
    assert {e["response"] for e in train} == {" tarfile", " http"}
    assert all(e["prompt"].startswith("Docstring: ") and e["prompt"].endswith("\nModule:")
               for e in train)
    assert tasks.stdlib_module_examples(modules=("tarfile", "http"), per_class=40) == splits
    assert 0.3 <= stdlib_modules.majority_accuracy(train, validation) <= 0.7


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A 'pretrained' run (a saved checkpoint + tokenizer.model) and a short SFT run from it."""

    from llmjax.data.tokenizer import train_tokenizer
    from llmjax.train import train_and_evaluate

    root = tmp_path_factory.mktemp("sft")
    records = [{"prompt": f"Q{i}: what is {i} + {i}?", "response": f" {2 * i}"} for i in range(40)]
    files = {s: write_jsonl(root / f"{s}.jsonl", records[:32] if s == "train" else records[32:])
             for s in ("train", "eval")}
    pre = tiny_config("llama", **{"model.vocab_size": 512})
    tokenizer = train_tokenizer([json.dumps(r) for r in records] * 20, 512, root / "pre" / "tokenizer.model")
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(mesh, pre.sharding_rules):
        built = steps.build(pre, mesh)
        state = built.init()
    ckpt = Checkpointer(str(root / "pre"), max_to_keep=1, async_save=False)
    ckpt.save(7, state, None, pre.to_dict(), force=True)
    ckpt.close()

    fine = tiny_config("llama", init_from=str(root / "pre"), **{
        "model.vocab_size": 512, "data.task": "sft", "data.files": files["train"],
        "data.eval_files": files["eval"], "total_steps": 6, "batch_size": 8, "seq_len": 24,
        "eval_every_steps": 6, "eval_steps": 4, "log_every_steps": 3, "checkpoint_every_steps": 6,
        "sample.max_new_tokens": 3, "sample.prompt": "Q3: what is 3 + 3?", "mesh.shape": (-1, 1, 1),
        "optim.freeze": "embedding$"})
    last = train_and_evaluate(fine, str(root / "sft"))
    return root, tokenizer, state, last


@pytest.mark.slow
def test_sft_run_end_to_end(devices, sft_run):
    root, tokenizer, pre_state, last = sft_run
    records = [json.loads(line) for line in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in records if "eval_loss" in r)
    assert first_eval["step"] == 0  # the pretrained starting point, evaluated before any update
    assert last["eval_loss"] < first_eval["eval_loss"] and np.isfinite(last["eval_loss"])
    assert last["sample"].startswith("Q3: what is 3 + 3?")
    # The tokenizer is the init_from run's (copied, so the workdir serves llmjax.generate).
    assert (root / "sft" / "tokenizer.model").read_bytes() == (
        root / "pre" / "tokenizer.model").read_bytes()
    # The frozen embedding table is the pretrained one, bit for bit; the rest moved.
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(root / "sft" / "checkpoints") as mngr:
        params = mngr.restore(6, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]["params"]
    np.testing.assert_array_equal(params["token_embed"]["embedding"],
                                  jax.device_get(pre_state["params"]["token_embed"]["embedding"]))
    assert not np.array_equal(params["lm_head"]["kernel"],
                              jax.device_get(pre_state["params"]["lm_head"]["kernel"]))


@pytest.mark.slow
def test_generate_cli(devices, sft_run):
    import os
    import pathlib
    import subprocess
    import sys

    root = sft_run[0]
    repo = pathlib.Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "llmjax.generate", f"--workdir={root / 'sft'}",
           "--config.sample.max_new_tokens=2", "--config.sample.temperature=0"]
    one = subprocess.run(cmd + ["--prompt=Q1: what is"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("Q1: what is") and len(one.stdout.splitlines()) == 1
    # Interactive: a prompt per stdin line; a blank line is skipped; the same prompt, same text.
    many = subprocess.run(cmd, input="Q1: what is\n\nQ2\n", capture_output=True, text=True, env=env)
    assert many.returncode == 0, many.stderr
    lines = many.stdout.splitlines()
    assert lines[0] == one.stdout.splitlines()[0] and lines[1].startswith("Q2")
    empty = subprocess.run(cmd + ["--prompt="], capture_output=True, text=True, env=env)
    assert empty.returncode == 2 and empty.stderr.strip() == (
        "error: the prompt is empty; give at least one character of text to continue.")
    bad = subprocess.run(cmd + ["--prompt=x", "--config.sample.topk=3"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: a --config override")


def test_sft_from_a_prepared_tfds_dataset(tmp_path):
    """The catalog path: a TFDS dataset prepared as array_record, read by name, with the features
    named by data.prompt_key / data.response_key (here one of our text corpora, whose features
    are `path` and `text`, since catalog datasets cannot be downloaded offline)."""
    from llmjax.data import corpus
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"body {i}")
    text = tiny_config(**{"data.name": "text", "data.files": str(tmp_path / "*.txt"),
                          "data.data_dir": str(tmp_path / "tfds"),
                          "data.validation_fraction": 0.3}).data
    builder = corpus.prepare(text)
    cfg = tiny_config(**{"data.task": "sft", "data.data_dir": str(tmp_path / "tfds"),
                         "data.name": f"{builder.name}/{builder.builder_config.name}",
                         "data.prompt_key": "path", "data.response_key": "text"}).data
    train = finetune.load_examples(cfg, "train")
    validation = finetune.load_examples(cfg, "validation")
    assert len(train) + len(validation) == 6 and validation
    assert all(e["response"] == "body " + e["prompt"][3] for e in train + validation)
    with cfg.unlocked():
        cfg.response_key = "answer"
    with pytest.raises(ValueError, match="has no feature 'answer'"):
        finetune.load_examples(cfg, "train")
