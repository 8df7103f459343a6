"""EleutherAI's lm-evaluation-harness on llmjax models: the model type `llmjax`.

    python -m llmjax.evaluation.harness --model llmjax \\
        --model_args workdir=runs/gpt_small_local,batch_size=32 --tasks lambada_openai
    python -m llmjax.evaluation.harness --model llmjax --model_args workdir=path/to/hf_dir \\
        --tasks my_task --include_path my_tasks/            # local YAML tasks

The command is lm_eval's own (every flag of `lm_eval run` works); this module registers the
model type first, because lm_eval 0.4 finds model types only in its registry, not through
package entry points. From Python, `import llmjax.evaluation.harness` and then
`lm_eval.simple_evaluate(model="llmjax", model_args="workdir=...")` does the same.

model_args: workdir (an llmjax run or a Hugging Face model directory, as `LM.from_workdir`),
batch_size (rows per scoring batch; default 16, or lm_eval's --batch_size when it is a number),
mesh_shape (e.g. "1x-1x1": devices along data, fsdp, tensor; default all on data) and
add_bos (true/false: put bos before contexts; default true for llmjax runs, false for Hugging
Face models). The requests go to `llmjax.evaluation.lm.LM`, which follows lm-evaluation-
harness's tokenization, truncation and rolling-window conventions, so the numbers are
comparable with its Hugging Face backend. lm-eval is an optional extra (`pip install
lm-eval==0.4.13`); llmjax's own `python -m llmjax.evaluate` needs none of it.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model

from llmjax.evaluation.lm import LM


def _mesh_shape(value) -> tuple[int, ...]:
    if value is None:
        return (-1, 1, 1)
    parts = str(value).replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"mesh_shape={value!r} is not three integers like 1x-1x1 (data x fsdp x "
                         "tensor, one of them -1 for the rest).")
    return shape


@register_model("llmjax")
class LlmjaxLM(HarnessLM):
    """An llmjax run or Hugging Face directory behind lm_eval's model interface."""

    def __init__(self, workdir: str | None = None, batch_size=None, mesh_shape=None,
                 add_bos=None, **unused):
        super().__init__()
        if not workdir:
            raise ValueError("the llmjax model needs --model_args workdir=DIR (an llmjax run or a "
                             "Hugging Face model directory).")
        self.lm = LM.from_workdir(str(workdir), _mesh_shape(mesh_shape))
        if add_bos is not None:
            self.lm.add_bos = str(add_bos).lower() in ("1", "true", "yes")
        size = str(batch_size) if batch_size is not None else ""
        self.batch_size = int(size) if size.isdigit() and int(size) > 0 else 16

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """model_args win over lm_eval's own flags (its --batch_size defaults to 1)."""
        from lm_eval.utils import simple_parse_args_string
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(simple_parse_args_string(arg_string))
        return cls(**args)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**args, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "path", "") or "llmjax").replace("/", "__")

    def _cached(self, kind: str, requests, results):
        for request, result in zip(requests, results):
            self.cache_hook.add_partial(kind, request.args, result)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return self._cached("loglikelihood", requests,
                            self.lm.loglikelihood(pairs, batch_size=self.batch_size))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = self.lm.loglikelihood_rolling([r.args[0] for r in requests],
                                            batch_size=self.batch_size)
        return self._cached("loglikelihood_rolling", requests, [o["logprob"] for o in out])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        batch = [(r.args[0], dict(r.args[1] or {})) for r in requests]
        return self._cached("generate_until", requests,
                            self.lm.generate_until(batch, batch_size=self.batch_size))


def main() -> None:
    """lm_eval's command line with the `llmjax` model type registered; a bad workdir or model
    argument ends with one line on stderr."""
    import lm_eval.models  # noqa: F401  (lm_eval's own model types stay available)
    from lm_eval.__main__ import cli_evaluate
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
