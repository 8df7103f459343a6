"""Fine-tuning: SFT rows score only the response, JSONL errors name the line, freezing freezes,
init_from loads parameters with a fresh optimizer, and the shipped task is well formed."""

import json

import jax
import numpy as np
import pytest

from llmjax import sharding, steps
from llmjax.checkpoint import Checkpointer
from llmjax.data import finetune, tasks
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
    assert 0.3 <= tasks.majority_accuracy(train, validation) <= 0.7
