"""Held-out VQA accuracy of a multimodal run on the shapes dataset, per question kind vs chance.

    python -m llmjax.evaluation.vqa --workdir=/tmp/mm_local_vqa [--split=validation] [--limit=1000]

Why a command of its own: the text tasks (tasks.py) hand prompts to an `lm.LM`, which has no
images; here every question comes with its image. Each question is asked as in training
(image_pipeline.vqa_prompt, then greedy decoding until eos or `--max_new_tokens`), the answer is
its first word in lower case (data.vqa.normalize_answer) and is right when it equals the stored
answer. Prints one JSON object: per kind and "all", accuracy, chance (one over the kind's possible
answers), majority (always the split's most common answer of that kind) and count. The split is
the run's own dataset settings (its saved config), so the images are those it was trained at.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from llmjax.data import image_pipeline
from llmjax.data import vqa as vqa_data


def answer(run, examples: Sequence[dict], *, batch_size: int = 50,
           max_new_tokens: int = 4) -> list[str]:
    """The run's greedy answer (decoded text) to each example ({"image", "question"})."""
    import jax  # pylint: disable=g-import-not-at-top

    from llmjax.generate import MultimodalGenerator, encode_prompt  # pylint: disable=g-import-not-at-top
    gen = MultimodalGenerator(run.graphdef, run.model_cfg, mesh=run.mesh, rules=run.rules)
    tok, out = run.tokenizer, []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prompts = [encode_prompt(tok, image_pipeline.vqa_prompt(e["question"])) for e in batch]
        with jax.set_mesh(run.mesh):
            result = gen.generate(run.params, prompts, images=[[e["image"]] for e in batch],
                                  max_new_tokens=max_new_tokens, stop_ids=(tok.eos_id,))
        out.extend(tok.decode(t) for t in result.tokens)
    return out


def evaluate(workdir: str, *, split: str = "validation", limit: int | None = None,
             batch_size: int = 50) -> dict[str, dict[str, float]]:
    """Per-kind accuracy (vqa_data.vqa_accuracy) of the run in `workdir` on `split`'s first
    `limit` questions (all of them without a limit)."""
    from llmjax.generate import load_run  # pylint: disable=g-import-not-at-top
    run = load_run(workdir)
    data = run.config.data
    if data.get("name") != "shapes":
        raise ValueError(f"the run in {workdir} trained on data.name={data.get('name')!r}; this "
                         "evaluation asks the shapes dataset's questions (data.name='shapes').")
    examples = []
    for e in vqa_data.vqa_examples(data, split):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(e)
    return vqa_data.vqa_accuracy(answer(run, examples, batch_size=batch_size), examples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmjax.evaluation.vqa",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a multimodal run's workdir")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--limit", type=int, default=None, help="ask only the first N questions")
    parser.add_argument("--batch_size", type=int, default=50)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} must be at least 1.")
    try:
        result = evaluate(args.workdir, split=args.split, limit=args.limit,
                          batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: {m: round(v, 3) if isinstance(v, float) else v for m, v in r.items()}
                      for k, r in result.items()}))


if __name__ == "__main__":
    main()
