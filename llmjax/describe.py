"""Print a config's size as one JSON line, from abstract shapes (no memory for the weights).

    python -m llmjax.describe --config=configs/llama2_70b.py
"""

from __future__ import annotations

import json

from absl import app

from llmjax import cli


def describe(config) -> dict:
    from llmjax import steps
    from llmjax.models import ModelConfig
    model_cfg = ModelConfig.from_config(config.model)
    counts = steps.count_params(model_cfg)
    return {"family": model_cfg.family, **counts,
            "flops_per_token": steps.flops_per_token(
                model_cfg, config.seq_len, steps.batch_shapes(config, model_cfg)["targets"][1]),
            "seq_len": config.seq_len, "tokens_per_step": config.batch_size * config.seq_len}


def main(argv):
    del argv
    try:
        print(json.dumps(describe(cli.require_config())))
    except ValueError as e:
        cli.fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
