"""The training loop: read it top to bottom.

    mesh -> data (tokenizer, iterators) -> model and optimizer (sharded init) -> restore ->
    compile -> loop (step, log, eval, checkpoint) -> sample

Restarting the same command in the same workdir resumes from the newest complete checkpoint:
parameters, optimizer state, step and the data iterator's position all come back, so the resumed
run is the same run.
"""

from __future__ import annotations

import functools
import logging
import sys
import time

import jax
import numpy as np

from llmjax import data as data_lib
from llmjax import metrics as metrics_lib
from llmjax import progress, sharding, steps
from llmjax.checkpoint import Checkpointer, check_same_model
from llmjax.data import finetune
from llmjax.generate import sample_text
from llmjax.preemption import Preemption
from llmjax.validate import validate_config


def evaluate(built, params, eval_batches) -> dict:
    sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    for local in eval_batches:
        out = jax.device_get(built.eval_step(params, sharding.global_batch(local, built.batch_sharding)))
        for k in sums:
            sums[k] += float(out[k])
    loss = sums["loss_sum"] / max(sums["count"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
            "eval_accuracy": sums["correct"] / max(sums["count"], 1.0)}


def evaluate_tasks(config, built, params, tokenizer, mesh, rules, step: int) -> dict:
    """config.eval_tasks scored on the in-memory parameters (no reload): {"eval/<task>/<metric>":
    value}. Scoring is deterministic (greedy decoding, fixed few-shot draws), so a resumed run
    logs the values an uninterrupted one logs."""
    from llmjax.evaluation import tasks
    from llmjax.evaluation.lm import LM
    from llmjax.validate import eval_task_names
    lm = LM.from_parts(built.graphdef, built.model_cfg, params, tokenizer,
                       max_length=config.seq_len, mesh=mesh, rules=rules, step=step,
                       data_cfg=config.data.to_dict())
    record = {}
    for name in eval_task_names(config):
        task = tasks.get(name)
        for metric, value in tasks.run(task, lm, limit=config.eval_tasks_limit or None).items():
            record[f"eval/{task.name}/{metric}"] = float(value)
    return record


class NonFiniteError(RuntimeError):
    """The run stopped on a NaN/Inf loss or gradient (config.nonfinite="stop")."""


class NonFiniteGuard:
    """Acts on the train step's `nonfinite` flags (its update was already not applied).

    "skip": counts them (logged as skipped_steps and kept in checkpoints). "stop": raises
    NonFiniteError naming the first such step and the last checkpoint saved before it.
    """

    def __init__(self, mode: str, skipped: int, ckpt: Checkpointer):
        self.mode, self.skipped, self.ckpt = mode, int(skipped), ckpt
        self.pending: list[tuple[int, jax.Array]] = []
        self.last_saved = ckpt.latest_step()

    def add(self, step: int, flag: jax.Array):
        self.pending.append((step, flag))

    def saved(self, step: int):
        self.last_saved = step

    def check(self):
        if not self.pending:
            return
        flags = jax.device_get([f for _, f in self.pending])
        bad = [s for (s, _), f in zip(self.pending, flags) if int(f)]
        self.pending = []
        self.skipped += len(bad)
        if bad and self.mode == "stop":
            good = ("none saved yet" if self.last_saved is None
                    else str(self.ckpt.directory / str(self.last_saved)))
            raise NonFiniteError(
                f"non-finite loss or gradient at step {bad[0]} (its update was not applied); the "
                f"last good checkpoint is {good}; lower the learning rate, check the data, or set "
                "--config.nonfinite=skip to skip such steps.")


def draw_curves(workdir: str, say, warn) -> None:
    """WORKDIR/curves.png (llmjax.plot) at the end of a run. The run itself has finished and
    saved by then, so a figure that cannot be drawn is a warning, not a failed run."""
    from llmjax import plot
    try:
        say(f"curves: {plot.write_curves(workdir)}")
    except Exception as e:  # noqa: BLE001
        warn(f"could not draw {workdir}/curves.png: {type(e).__name__}: {e}")


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if a checkpoint is there); returns the last metrics."""
    validate_config(config, workdir)
    jax.config.update("jax_threefry_partitionable", True)
    is_main = jax.process_index() == 0
    say = functools.partial(print, flush=True) if is_main else (lambda *a, **k: None)

    # ----------------------------------------------------------------------------------------
    # Mesh.
    mesh = sharding.mesh_from_config(config)
    rules = sharding.rules_from_config(config.sharding_rules)
    # Outside the mesh context: on a CPU the peak is measured with a one-device matmul.
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0], config.peak_flops_per_device)
    say(f"mesh {dict(zip(mesh.axis_names, mesh.devices.shape))} over {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)")

    # ----------------------------------------------------------------------------------------
    # Model, optimizer and jitted steps (validated against the mesh before anything compiles).
    with sharding.use_mesh(mesh, rules):
        built = steps.build(config, mesh)
    model_cfg = built.model_cfg
    counts = steps.count_params(model_cfg)
    flops_per_token = steps.flops_per_token(model_cfg, config.seq_len,
                                            steps.batch_shapes(config, model_cfg)["targets"][1])
    say(f"model: {counts['params']:,} parameters ({counts['non_embedding_params']:,} non-embedding), "
        f"{flops_per_token / 1e6:.1f} MFLOPs per token")

    # ----------------------------------------------------------------------------------------
    # Data: tokenizer (trained on first use, cached in the workdir), train iterator, eval batches.
    finetune.adopt_tokenizer(config, workdir)  # init_from: the pretrained run's tokenizer
    tokenizer = data_lib.load_or_train_tokenizer(finetune.tokenizer_data(config.data),
                                                 model_cfg.vocab_size, workdir)
    data_lib.check_vocab(tokenizer, model_cfg.vocab_size)
    data_kw = dict(seq_len=config.seq_len, batch_size=config.batch_size,
                   process_index=jax.process_index(), process_count=jax.process_count())
    make_train_iterator, make_eval_batches = finetune.pipeline_for(config.data)  # lm or sft
    train_iter = make_train_iterator(config.data, tokenizer, seed=config.seed, workdir=workdir,
                                     **data_kw)
    eval_batches = make_eval_batches(config.data, tokenizer, num_batches=config.eval_steps, **data_kw)
    if is_main:  # what hygiene removed and replaced in a local corpus, next to data_spec.json
        data_lib.corpus.copy_hygiene_report(config.data, workdir)

    # ----------------------------------------------------------------------------------------
    # Initialise directly sharded, or restore the newest checkpoint onto this mesh.
    ckpt = Checkpointer(workdir, max_to_keep=config.max_to_keep,
                        async_save=config.async_checkpointing)
    warn = functools.partial(print, "warning:", file=sys.stderr, flush=True) if is_main else (
        lambda *a, **k: None)
    with sharding.use_mesh(mesh, rules):
        # The newest checkpoint that reads back whole; a damaged one is reported and skipped.
        restored = ckpt.restore_newest_good(
            built.abstract_state, train_iter,
            allow_fresh_start=config.get("allow_fresh_start", False),
            check_config=lambda saved, where: check_same_model(saved, config, where), warn=warn)
        writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
        if restored is None:
            state, loop_state = built.init(), {}
            baseline = data_lib.unigram_entropy(eval_batches)
            say(f"unigram baseline (token frequencies only): eval loss {baseline:.3f}")
            writer.write(0, {"unigram_eval_loss": baseline})
            if config.init_from:  # fine-tuning: pretrained parameters, fresh optimizer, step 0
                state, from_step = finetune.restore_init(config, built, state)
                record = evaluate(built, state["params"], eval_batches)
                writer.write(0, record)
                say(f"initialised from {config.init_from} (step {from_step}): "
                    + metrics_lib.format_line(0, config.total_steps, record))
        else:
            latest, state, loop_state = restored
            say(f"resumed from step {latest}")

        # ------------------------------------------------------------------------------------
        # Compile ahead of time: the compile time is measured apart from step times.
        t0 = time.perf_counter()
        with progress.ticker("compiling the train step"):
            train_step = built.train_step.lower(state, steps.abstract_batch(config, built)).compile()
        say(f"compiled the train step in {time.perf_counter() - t0:.1f}s")

        # ------------------------------------------------------------------------------------
        # Loop.
        tokens_per_step = config.batch_size * config.seq_len
        step = int(jax.device_get(state["step"]))
        last = {}
        t_log, steps_since_log = time.perf_counter(), 0
        end = min(config.stop_at_step or config.total_steps, config.total_steps)
        preemption = Preemption()
        # Non-finite steps: each step's flag stays on the device until the next log or save, so
        # checking costs no extra synchronisation. The update of a flagged step was not applied.
        guard = NonFiniteGuard(config.get("nonfinite", "stop"), loop_state.get("skipped_steps", 0),
                               ckpt)
        poisoned = set(config.get("fault_nonfinite_steps", ()))
        try:
            while step < end:
                local = next(train_iter)
                if step + 1 in poisoned:  # fault injection: out-of-vocabulary ids -> NaN loss
                    local = dict(local, inputs=np.full_like(local["inputs"], model_cfg.vocab_size))
                batch = sharding.global_batch(local, built.batch_sharding)
                state, step_metrics = train_step(state, batch)
                step += 1
                steps_since_log += 1
                guard.add(step, step_metrics["nonfinite"])

                if step % config.log_every_steps == 0 or step == config.total_steps:
                    guard.check()
                    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    record["loss_tokens"] = int(record["loss_tokens"])
                    del record["nonfinite"]
                    record["skipped_steps"] = guard.skipped
                    elapsed = time.perf_counter() - t_log
                    record["step_time_ms"] = 1e3 * elapsed / steps_since_log
                    record["tokens_per_sec"] = tokens_per_step * steps_since_log / elapsed
                    record["mfu"] = metrics_lib.mfu(record["tokens_per_sec"], flops_per_token,
                                                    jax.device_count(), peak)
                    record["host_rss_mib"] = metrics_lib.host_rss_mib()
                    writer.write(step, record)
                    say(metrics_lib.format_line(step, config.total_steps, record))
                    last.update(record)
                    t_log, steps_since_log = time.perf_counter(), 0

                paused = False
                if step % config.eval_every_steps == 0 or step == config.total_steps:
                    record = evaluate(built, state["params"], eval_batches)
                    writer.write(step, record)
                    say(metrics_lib.format_line(step, config.total_steps, record))
                    last.update(record)
                    if config.get("eval_tasks", ""):
                        record = evaluate_tasks(config, built, state["params"], tokenizer, mesh,
                                                rules, step)
                        writer.write(step, record)
                        say(metrics_lib.format_line(step, config.total_steps, record))
                        last.update(record)
                    paused = True

                preempted = preemption.reached(step)
                if step % config.checkpoint_every_steps == 0 or step == end or preempted:
                    guard.check()  # never save past a non-finite step in "stop" mode
                    t0 = time.perf_counter()
                    ckpt.save(step, state, train_iter, config.to_dict(), force=True,
                              loop={"skipped_steps": guard.skipped})
                    # How long the loop waits for a save (async: the copy off the devices only).
                    blocked_ms = 1e3 * (time.perf_counter() - t0)
                    writer.write(step, {"checkpoint_blocking_ms": blocked_ms})
                    say(f"step {step}: checkpoint saving (the loop waited {blocked_ms:.0f} ms)")
                    guard.saved(step)
                    paused = True
                if preempted:
                    ckpt.close()
                    say(f"preempted (SIGTERM): saved checkpoint {ckpt.directory / str(step)} at "
                        f"step {step}; run the same command to resume.")
                    writer.close()
                    return last

                if paused:  # evaluation and saving are not training time
                    t_log, steps_since_log = time.perf_counter(), 0
            guard.check()
        finally:
            preemption.close()
            ckpt.close()  # lets an async save finish, also when the loop stops on an error
        writer.close()
        if is_main:
            draw_curves(workdir, say, warn)

        # ------------------------------------------------------------------------------------
        # Sample: a short continuation from the trained model.
        # (A multimodal run samples about an image: llmjax.generate --image, not here.)
        if config.sample.max_new_tokens > 0 and model_cfg.family != "multimodal":
            text = sample_text(built.graphdef, model_cfg, state["params"], tokenizer, config.sample,
                               data_cfg=config.data)[0]
            say("sample:\n" + text)
            last["sample"] = text
    logging.info("done at step %d", step)
    return last
