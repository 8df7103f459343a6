"""Every error a user can cause from the config or the data: one line, before compilation, and the
existing workdir is left as it was. One test per row of the "Bad configs and data" table in
docs/configs.md.

The runs go through `llmjax.main.run` (what `python -m llmjax.main` calls) in this process; the
command line's own `error:` printing is covered in test_train.py::test_bad_input_is_one_line.
"""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from llmjax import data as data_lib
from llmjax import main as main_lib
from llmjax import steps as steps_lib
from llmjax.validate import _AT_LEAST
from tests import reliability_config
from tests.helpers import apply_overrides


def config_with(tokenizer_path, overrides):
    c = reliability_config.get_config()
    c.data.tokenizer = str(tokenizer_path)
    return apply_overrides(c, overrides)


def tree_files(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "dir" for p in sorted(pathlib.Path(path).rglob("*"))}


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if a run gets as far as compiling the train step."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached compilation")
    monkeypatch.setattr(steps_lib, "abstract_batch", refuse)


def check_refused(config, workdir, message):
    before = tree_files(workdir)
    with pytest.raises(main_lib.USER_ERRORS) as info:
        main_lib.run(config, str(workdir))
    line = main_lib.one_line(info.value)
    assert message in line, line
    text = info.value.args[0] if info.value.args else ""
    assert "\n" not in str(text).strip(), text  # the whole message is one line
    assert tree_files(workdir) == before  # the workdir is exactly as it was


# Config keys that must be positive or non-negative: one row each, from validate's own table.
@pytest.mark.parametrize("key, low", _AT_LEAST, ids=[k for k, _ in _AT_LEAST])
def test_too_small_value(tokenizer_path, trained_workdir, no_compile, key, low):
    check_refused(config_with(tokenizer_path, {key: low - 1}), trained_workdir,
                  f"{key}={low - 1} must be at least {low}")


ROWS = {
    # Config values.
    "negative learning rate": ({"optim.learning_rate": -1e-3}, "optim.learning_rate=-0.001 is negative"),
    "NaN learning rate": ({"optim.learning_rate": float("nan")}, "must be a finite number"),
    "negative clip norm": ({"optim.grad_clip_norm": -1.0}, "optim.grad_clip_norm=-1.0 is negative"),
    "negative weight decay": ({"optim.weight_decay": -0.1}, "optim.weight_decay=-0.1 is negative"),
    "negative temperature": ({"sample.temperature": -0.5}, "sample.temperature=-0.5 is negative"),
    "dropout of 1": ({"model.dropout_rate": 1.0}, "model.dropout_rate=1.0 must be in [0, 1)"),
    "validation fraction 0": ({"data.validation_fraction": 0.0}, "data.validation_fraction=0.0"),
    "unknown nonfinite mode": ({"nonfinite": "ignore"}, "nonfinite='ignore' is not one of"),
    "fault step 0": ({"fault_nonfinite_steps": (0,)}, "fault_nonfinite_steps=(0,) must list"),
    "missing tokenizer file": ({"data.tokenizer": "/nonexistent/spm.model"},
                               "data.tokenizer='/nonexistent/spm.model' does not exist"),
    "unknown optimizer": ({"optim.name": "sgdd"}, "Unknown optim.name 'sgdd'"),
    "unknown schedule": ({"optim.schedule": "cosin"}, "Unknown optim.schedule 'cosin'"),
    "unknown remat policy": ({"model.remat_policy": "some"}, "model.remat_policy='some'"),
    "unknown activation": ({"model.activation": "relu6"}, "model.activation='relu6'"),
    "unknown family": ({"model.family": "diffusion"}, "model.family='diffusion' is not one of"),
    "family mixed with another's keys": ({"model.family": "encoder"},
                                         "model.family='encoder' takes position 'learned' or"),
    "d_model not divisible by heads": ({"model.d_model": 30}, "model.d_model=30 is not divisible"),
    "heads not divisible by kv heads": ({"model.num_kv_heads": 3},
                                        "model.num_heads=8 is not divisible by model.num_kv_heads=3"),
    "splash with a sequence not a multiple of 128": ({"model.attention": "splash"},
                                                     "attention='splash' needs a sequence length"),
    "splash with dropout": ({"model.attention": "splash", "model.dropout_rate": 0.1},
                            "attention='splash' has no attention dropout"),
    "cudnn in float32": ({"model.attention": "cudnn"}, "attention='cudnn' needs model.dtype"),
    "negative causal block": ({"model.causal_block": -1}, "model.causal_block=-1 must be >= 0"),
    # Config against the devices.
    "mesh needs more devices": ({"mesh.shape": (16, 1, 1)}, "needs 16 devices but 8 are available"),
    "mesh with two -1": ({"mesh.shape": (-1, -1, 1)}, "has more than one -1"),
    "mesh with a zero": ({"mesh.shape": (0, 1, 8)}, "has an entry that is not positive"),
    "mesh with three axes only": ({"mesh.shape": (8, 1)}, "must have 3 entries"),
    "heads not divisible by tensor": ({"model.num_heads": 4, "model.num_kv_heads": 4,
                                       "mesh.shape": (1, 1, 8)},
                                      "model.num_heads=4 is not divisible by the tensor axis (8)"),
    "batch not divisible by devices": ({"batch_size": 12}, "batch_size=12 (per micro-batch 12) is "
                                                           "not divisible by the 8 data-parallel"),
    "batch not divisible by microbatches": ({"microbatches": 3}, "not divisible by microbatches=3"),
    "sequence longer than learned positions": ({"model.position": "learned", "seq_len": 128},
                                               "seq_len=128 exceeds model.max_len=64"),
    # Data.
    "text glob matches nothing": ({"data.name": "text", "data.files": "/nonexistent/*.txt"},
                                  "/nonexistent/*.txt"),
    "TFDS dataset not prepared": ({"data.name": "no_such_dataset"},
                                  "TFDS dataset 'no_such_dataset' (split 'train') is not prepared"),
    "tokenizer larger than the vocabulary": ({"model.vocab_size": 100},
                                             "has 512 pieces but model.vocab_size is 100"),
    # Keys that only apply to another data.name, data.task, data.objective or model.family
    # (validate.IGNORED_UNLESS): set where the run would never read them.
    "data.files without data.name=text": ({"data.files": "/my/corpus/*.txt"},
                                          "data.files='/my/corpus/*.txt' only applies when "
                                          "data.name='text'"),
    "data.files with a shipped task": ({"data.task": "sft", "data.name": "stdlib_modules",
                                        "data.files": "/my/train.jsonl"},
                                       "data.name='stdlib_modules' is a task shipped with its own"),
    "data.eval_files for language modelling": ({"data.eval_files": "/my/eval.jsonl"},
                                               "data.eval_files='/my/eval.jsonl' only applies"),
    "sft keys without data.task=sft": ({"data.prompt_key": "question"},
                                       "data.prompt_key='question' only applies when "
                                       "data.task='sft'"),
    "seq2seq keys without data.task=seq2seq": ({"data.target_len": 16},
                                               "data.target_len=16 only applies when "
                                               "data.task='seq2seq'"),
    "labels without data.task=classification": ({"data.labels": ("neg", "pos")},
                                                "data.labels=('neg', 'pos') only applies when "
                                                "data.task='classification'"),
    "mlm keys without data.objective=mlm": ({"data.mask_rate": 0.3},
                                            "data.mask_rate=0.3 only applies when "
                                            "data.objective='mlm'"),
    "span corruption keys without its objective": ({"data.noise_density": 0.3},
                                                   "data.noise_density=0.3 only applies when "
                                                   "data.objective='span_corruption'"),
    "infilling keys without its objective": ({"data.permute_sentences": 1.0},
                                             "data.permute_sentences=1.0 only applies when "
                                             "data.objective='text_infilling'"),
    "TFDS splits on a local corpus": ({"data.split_eval": "test"},
                                      "data.split_eval='test' only applies when data.name is a "
                                      "TFDS dataset"),
    "beams for a decoder": ({"sample.num_beams": 4},
                            "sample.num_beams=4 only applies when "
                            "model.family='encoder_decoder'"),
    "length penalty without beams": ({"sample.length_penalty": 1.0},
                                     "sample.length_penalty=1.0 only applies when beam search"),
    # Config against the workdir's checkpoint.
    "model differs from the checkpoint": ({"model.d_model": 64},
                                          "model.d_model=32 there but 64 now"),
}


@pytest.mark.parametrize("name", ROWS)
def test_bad_input(tokenizer_path, trained_workdir, no_compile, name):
    overrides, message = ROWS[name]
    check_refused(config_with(tokenizer_path, overrides), trained_workdir, message)


def test_tokenizer_file_that_is_not_sentencepiece(tokenizer_path, trained_workdir, no_compile,
                                                   tmp_path):
    bad = tmp_path / "spm.model"
    bad.write_bytes(b"not a model")
    check_refused(config_with(tokenizer_path, {"data.tokenizer": str(bad)}), trained_workdir,
                  "is not a SentencePiece model")


def test_workdir_that_is_a_file(tokenizer_path, no_compile, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        main_lib.run(config_with(tokenizer_path, {}), str(path))
    assert path.read_text() == "x"


def test_all_checkpoints_damaged(tokenizer_path, trained_workdir, no_compile, tmp_path):
    workdir = tmp_path / "damaged"
    shutil.copytree(trained_workdir, workdir)
    for victim in (workdir / "checkpoints/2/state").rglob("*"):
        if victim.is_file():
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    check_refused(config_with(tokenizer_path, {}), workdir,
                  "no usable checkpoint in")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # still there


def test_fewer_documents_than_processes(tokenizer_path, tmp_path):
    """Needs two processes to reach through main; the pipeline's own check, called as process 0
    of 2 over a corpus of two files (one of which is held out for evaluation)."""
    for i in range(2):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 50)
    config = config_with(tokenizer_path, {"data.name": "text", "data.files": f"{tmp_path}/*.txt",
                                          "data.data_dir": str(tmp_path / "tfds")})
    tokenizer = data_lib.Tokenizer.load(tokenizer_path)
    with pytest.raises(ValueError, match=r"fewer than the 2 processes"):
        data_lib.make_train_iterator(config.data, tokenizer, seq_len=32, batch_size=8, seed=0,
                                     process_index=0, process_count=2)


# ------------------------------------------------------------------------------------------------
# The command line: a config that fails to load is one line, whether or not overrides follow.

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def broken_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken_configs")
    (folder / "syntax.py").write_text("def get_config(arg=None)\n    return None\n")
    (folder / "name.py").write_text("def get_config(arg=None):\n    return undefined_name\n")
    return folder


CLI_ROWS = {
    "misspelt file, then an override": (
        ["--config=configs/gpt_smal.py", "--config.total_steps=3"],
        "cannot load the --config file 'configs/gpt_smal.py': No such file; did you mean "
        "'configs/gpt_small.py'?"),
    "misspelt file": (["--config=configs/gpt_smal.py"], "did you mean 'configs/gpt_small.py'?"),
    "misspelt folder": (["--config=config/gpt_small.py"], "did you mean 'configs/gpt_small.py'?"),
    "a folder": (["--config=configs"], "'configs': is a directory, not a file"),
    "misspelt variant": (["--config=configs/gpt_small.py:runlokal"],
                         "config arg 'runlokal' is not one of ['bench_tiny', 'runlocal']; did you "
                         "mean 'runlocal'?"),
    "misspelt variant, then an override": (
        ["--config=configs/gpt_small.py:runlokal", "--config.total_steps=3"],
        "did you mean 'runlocal'?"),
    "variant value not a boolean": (["--config=configs/gpt_small.py:runlocal=ture"],
                                    "config arg runlocal='ture' is not a boolean"),
    "syntax error in the file": (["--config={broken}/syntax.py", "--config.total_steps=3"],
                                 "syntax.py' failed to load: line 1: SyntaxError"),
    "error raised by the file": (["--config={broken}/name.py"],
                                 "name.py' failed to load: line 2: NameError: name "
                                 "'undefined_name' is not defined"),
    "misspelt override key": (["--config=configs/gpt_small.py", "--config.total_stepz=3"],
                              "Did you mean \"total_steps\" instead of \"total_stepz\"?"),
    "files without data.name=text": (["--config=configs/gpt_small.py:runlocal",
                                      "--config.data.files=/my/corpus/*.txt"],
                                     "data.files='/my/corpus/*.txt' only applies when "
                                     "data.name='text'"),
}


@pytest.mark.parametrize("name", CLI_ROWS)
def test_config_that_does_not_load_is_one_line(trained_workdir, broken_configs, name):
    args, message = CLI_ROWS[name]
    args = [a.format(broken=broken_configs) for a in args]
    before = tree_files(trained_workdir)
    out = subprocess.run([sys.executable, "-m", "llmjax.main", *args,
                          f"--workdir={trained_workdir}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert tree_files(trained_workdir) == before
