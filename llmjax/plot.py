"""Training curves of one or more runs, as a PNG (matplotlib, no display needed):

    python -m llmjax.plot --workdir=/tmp/gpt_small_local --out=/tmp/curves.png
    python -m llmjax.plot --workdir=/tmp/run_a /tmp/run_b --out=/tmp/compare.png

Three panels against the step: loss (train loss as a line, eval loss with dots, and the unigram
baseline, the eval loss of a model that knows only token frequencies, dashed), learning rate, and
tokens/s. One colour per run, named by its workdir in the legend. The main job draws
WORKDIR/curves.png this way when it ends. Workdirs and --out may be gs:// paths (etils epath).

Reads WORKDIR/metrics.jsonl (llmjax/metrics.py): one JSON object per log step with `step` and
`loss`, `learning_rate`, `tokens_per_sec`, `eval_loss`, `unigram_eval_loss` among its keys. A
resumed run appends to the same file; when a step was logged twice, the later line wins.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Sequence

from llmjax import paths

# Panel -> the metrics.jsonl keys it draws.
TRAIN_LOSS, EVAL_LOSS, UNIGRAM = "loss", "eval_loss", "unigram_eval_loss"
LEARNING_RATE, TOKENS_PER_SEC = "learning_rate", "tokens_per_sec"
KEYS = (TRAIN_LOSS, EVAL_LOSS, UNIGRAM, LEARNING_RATE, TOKENS_PER_SEC)


def read_metrics(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
    """`{key: (steps, values)}` for the plotted keys present in WORKDIR/metrics.jsonl, by step.

    Raises FileNotFoundError (workdir or file missing) or ValueError (nothing to plot) with a
    one-line message. A line that is not JSON (the torn last line of a killed run) is skipped."""
    directory = paths.path(workdir)
    path = directory / "metrics.jsonl"
    if not path.exists():
        what = "does not exist" if not directory.exists() else "has no metrics.jsonl"
        raise FileNotFoundError(f"{workdir} {what}; give the --workdir of an llmjax training run "
                                "(it writes metrics.jsonl at its first log step).")
    by_key: dict[str, dict[int, float]] = {k: {} for k in KEYS}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        for key in KEYS:
            if key in record:
                try:
                    value = float(record[key])  # "nan" / "inf" as written for non-finite values
                except (TypeError, ValueError):
                    continue
                by_key[key][int(record["step"])] = value if math.isfinite(value) else math.nan
    series = {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items() if v}
    if not series:
        raise ValueError(f"{path} has no {', '.join(KEYS)} values yet; nothing to plot.")
    return series


def _label(workdir: str, width: int = 48) -> str:
    text = str(workdir).rstrip("/")
    return text if len(text) <= width else "..." + text[-(width - 3):]


def draw(workdirs: Sequence[str], out: str, *, title: str | None = None) -> str:
    """Draws the curves of `workdirs` (one colour each) into `out` (PNG, or another format
    matplotlib writes, by suffix); returns `out`."""
    runs = [(w, read_metrics(w)) for w in workdirs]  # every error before any drawing
    fmt = paths.path(out).suffix.lstrip(".").lower() or "png"

    import matplotlib
    matplotlib.use("Agg")  # files only; never a window
    from matplotlib import ticker
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(9, 9), layout="constrained")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"--out={out}: matplotlib cannot write .{fmt} files; use .png "
                         f"(or one of {', '.join(sorted(fig.canvas.get_supported_filetypes()))}).")
    loss_ax, lr_ax, tps_ax = fig.subplots(3, 1, sharex=True, height_ratios=(2, 1, 1))
    colours = matplotlib.colormaps["tab10"].colors
    for i, (workdir, series) in enumerate(runs):
        colour = colours[i % len(colours)]
        if TRAIN_LOSS in series:
            loss_ax.plot(*series[TRAIN_LOSS], color=colour, lw=1.5)
        if EVAL_LOSS in series:
            loss_ax.plot(*series[EVAL_LOSS], color=colour, lw=1, marker="o", ms=4, alpha=0.8)
        if UNIGRAM in series:
            loss_ax.axhline(series[UNIGRAM][1][-1], color=colour, ls="--", lw=1)
        if LEARNING_RATE in series:
            lr_ax.plot(*series[LEARNING_RATE], color=colour, lw=1.5)
        if TOKENS_PER_SEC in series:
            tps_ax.plot(*series[TOKENS_PER_SEC], color=colour, lw=1.5)

    loss_ax.set_ylabel("loss (nats/token)")
    fig.legend(handles=[Line2D([], [], color=colours[i % len(colours)], lw=2, label=_label(w))
                        for i, (w, _) in enumerate(runs)],
               loc="outside upper center", ncols=min(len(runs), 2), fontsize="small")
    styles = [Line2D([], [], color="grey", lw=1.5, label="train loss"),
              Line2D([], [], color="grey", lw=1, marker="o", ms=4, label="eval loss"),
              Line2D([], [], color="grey", ls="--", lw=1, label="unigram baseline (eval)")]
    loss_ax.legend(handles=styles, loc="best", fontsize="small")
    lr_ax.set_ylabel("learning rate")
    lr_ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.1e"))
    tps_ax.set_ylabel("tokens/s")
    tps_ax.yaxis.set_major_formatter(ticker.EngFormatter())
    tps_ax.set_xlabel("step")
    for ax, keys in ((loss_ax, (TRAIN_LOSS, EVAL_LOSS, UNIGRAM)), (lr_ax, (LEARNING_RATE,)),
                     (tps_ax, (TOKENS_PER_SEC,))):
        ax.grid(alpha=0.3)
        if not any(k in series for _, series in runs for k in keys):
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center",
                    color="grey")
    if title:
        loss_ax.set_title(title)

    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=110)
    target = paths.path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
    return out


def write_curves(workdir: str) -> str:
    """WORKDIR/curves.png from the run's own metrics (the main job calls this when it ends)."""
    return draw([workdir], str(paths.path(workdir) / "curves.png"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage block
        from llmjax.cli import fail
        fail(f"{message}; usage: python -m llmjax.plot --workdir=DIR [DIR ...] --out=FILE.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m llmjax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", nargs="+", action="extend", default=[], metavar="DIR",
                        help="one or more training workdirs (local or gs://)")
    parser.add_argument("more", nargs="*", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="the image to write (default: WORKDIR/curves.png for one "
                        "workdir; required for several)")
    parser.add_argument("--title", help="the figure's title")
    args = parser.parse_args(argv)
    workdirs = args.workdir + args.more
    if not workdirs:
        parser.error("--workdir is required")
    if not args.out and len(workdirs) > 1:
        parser.error("--out is required with several workdirs")
    out = args.out or str(paths.path(workdirs[0]) / "curves.png")
    try:
        draw(workdirs, out, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        from llmjax.cli import fail
        fail(str(e))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
