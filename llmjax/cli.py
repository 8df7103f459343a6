"""Flags shared by the command-line entry points (train, describe, benchmark)."""

from __future__ import annotations

import difflib
import pathlib
import re
import sys
import traceback

from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/gpt_small.py or configs/gpt_small.py:runlocal; "
    "override any key with --config.key=value.", lock_config=True)


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """absl flag parsing with one-line errors instead of tracebacks (pass to app.run).

    ml_collections loads the --config file while parsing (and only reports a missing file when
    the config is first used, which an override does at once); every way that can fail ends here
    in one line: a missing file (with the closest name), a bad variant after the colon, an error
    raised by the file's own code (with its line), an override key or value that does not fit."""
    from llmjax import xla_flags  # before any JAX backend starts
    xla_flags.apply()
    spec = _config_spec(argv)
    if spec:
        _check_config_file(spec)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(_flag_error(str(e), spec))
    except OSError as e:  # the config file could not be loaded and an override touched it
        fail(f"cannot load the --config file {spec!r}: {_last_line(str(e))}.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections applies --config.a.b=value overrides while parsing; a key that is not in
        # the (locked) config or a value of the wrong type lands here.
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        fail(f"a --config override does not fit the config ({_override_reason(e)}); check "
             f"{overrides} against the keys and types in {spec}.")
    except Exception as e:  # noqa: BLE001 - code in the config file itself (SyntaxError, NameError)
        fail(f"the --config file {spec!r} failed to load: {_where(e, spec)}{type(e).__name__}: "
             f"{_last_line(str(e))}.")


def _config_spec(argv) -> str | None:
    """The value of --config (FILE or FILE:ARG) on the command line (the last one wins)."""
    spec = None
    for i, arg in enumerate(argv[1:], 1):
        match = re.match(r"^--?config(=(.*))?$", arg)
        if match:
            spec = match.group(2) if match.group(1) is not None else (
                argv[i + 1] if i + 1 < len(argv) else None)
    return spec


def _check_config_file(spec: str) -> None:
    path = pathlib.Path(spec.split(":", 1)[0])
    if path.is_file():
        return
    folder = path.parent if path.parent.is_dir() else pathlib.Path("configs")
    names = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=1)
    hint = f"; did you mean {str(folder / close[0])!r}?" if close else (
        f"; the config files are in {folder}/." if names else
        "; give a config file, e.g. --config=configs/gpt_small.py:runlocal.")
    what = "is a directory, not a file" if path.is_dir() else "No such file"
    fail(f"cannot load the --config file {str(path)!r}: {what}{hint}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1].rstrip(".") if lines else ""


def _flag_error(text: str, spec: str | None) -> str:
    if "Error whilst parsing config file" not in text:
        return f"{_last_line(text)}." if "Traceback" in text else f"{text}."
    # ml_collections wraps a ValueError/TypeError raised by get_config in its traceback text.
    path = (spec or "").split(":", 1)[0]
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    lines = [n for f, n in frames if path and pathlib.Path(f).name == pathlib.Path(path).name]
    where = f" (line {lines[-1]})" if lines else ""
    return f"the --config file {spec!r} failed to load{where}: {_last_line(text)}."


def _where(error: BaseException, spec: str) -> str:
    path = pathlib.Path(spec.split(":", 1)[0])
    if isinstance(error, SyntaxError) and error.lineno:
        return f"line {error.lineno}: "
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if pathlib.Path(f.filename).name == path.name]
    return f"line {lines[-1]}: " if lines else ""


def _override_reason(error: BaseException) -> str:
    text = error
    while isinstance(text, BaseException):  # ml_collections nests a KeyError in AttributeError
        text = text.args[0] if text.args else str(text)
    text = " ".join(str(text).split())
    if "does not exist" in text and "Did you mean" in text:  # drop the list of every field
        text = text.split(". Other fields")[0] + ". " + text[text.index("Did you mean"):]
    return f"{type(error).__name__}: {text}"


def require_config():
    try:
        config = CONFIG.value
        if config is not None:
            config.keys()  # a file that failed to load raises only when first used
    except OSError as e:  # the config file could not be loaded
        reason = str(e).strip().splitlines()[-1].strip()
        fail(f"cannot load the --config file: {reason}.")
    if config is None:
        fail("--config is required, e.g. --config=configs/gpt_small.py:runlocal.")
    return config
