"""Every test process gets 8 fake CPU devices, set before JAX initialises."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set too late?)"
    return jax.devices()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """One small tokenizer (512 pieces, the embedded corpus) for the loop tests of every module:
    training one per module would dominate their time."""
    from llmjax import data as data_lib
    from tests.helpers import tiny_config
    workdir = tmp_path_factory.mktemp("tokenizer")
    return data_lib.load_or_train_tokenizer(tiny_config().data, 512, str(workdir)).path


@pytest.fixture(scope="session")
def trained_workdir(devices, tokenizer_path, tmp_path_factory):
    """A workdir a real run left behind (tests/reliability_config.py for 2 steps): metrics, data
    spec and the checkpoint of step 2. Shared: the bad-input tests check they leave it unchanged,
    evaluation reads it."""
    from llmjax import main as main_lib
    from tests.test_bad_input import config_with
    workdir = tmp_path_factory.mktemp("trained")
    main_lib.run(config_with(tokenizer_path, {"total_steps": 2}), str(workdir))
    return workdir
