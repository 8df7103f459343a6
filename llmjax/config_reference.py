"""docs/config.md, the config reference, generated from `base_config()` and its comments.

Every key of `llmjax.config.base_config()` with its default and its description. A key's
description is its comment in the source: the comment lines right above its assignment plus the
comment at the end of the assignment's last line. Keys are assigned in `base_config()` (llmjax/
config.py), as `c.key = ...`, `c.section.key = ...` or `key=...` inside `c.section =
ConfigDict(dict(...))`; the `model` section's keys are the fields of `ModelConfig`
(llmjax/models/__init__.py), described by the comments there.

    python -m llmjax.config_reference            # rewrite docs/config.md
    python -m llmjax.config_reference --check    # exit 1 if docs/config.md is stale

tests/test_docs.py runs the check, so the page cannot drift from the code.
"""

from __future__ import annotations

import ast
import io
import pathlib
import sys
import tokenize
from typing import Any

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "config.md"
REGENERATE = "python -m llmjax.config_reference"
_LONG = 60  # a default whose repr is longer than this is printed below its table


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text per line number, and the lines that hold only a comment."""
    comments, alone = {}, set()
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                code_lines.add(line)
    alone = {line for line in comments if line not in code_lines}
    return comments, alone


def _describe(node: ast.AST, comments: dict[int, str], alone: set[int]) -> str:
    """The comment block right above `node` and the comment at the end of its last line."""
    above, line = [], node.lineno - 1
    while line in alone:
        above.append(comments[line])
        line -= 1
    parts = above[::-1]
    if node.end_lineno in comments and node.end_lineno not in alone:
        parts.append(comments[node.end_lineno])
    return " ".join(parts)


def _dotted(target: ast.AST) -> str | None:
    """'c.data.task' -> 'data.task'; None for anything not rooted at `c`."""
    names = []
    while isinstance(target, ast.Attribute):
        names.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == "c" and names:
        return ".".join(names[::-1])
    return None


def _source_of(path: pathlib.Path) -> tuple[ast.Module, dict[int, str], set[int]]:
    source = path.read_text()
    comments, alone = _comments(source)
    return ast.parse(source), comments, alone


def descriptions() -> dict[str, str]:
    """Dotted key -> description, in the order the source assigns the keys."""
    out: dict[str, str] = {}
    tree, comments, alone = _source_of(ROOT / "llmjax" / "models" / "__init__.py")
    model_fields = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "ModelConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    model_fields["model." + item.target.id] = _describe(item, comments, alone)

    tree, comments, alone = _source_of(ROOT / "llmjax" / "config.py")
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "base_config")
    for stmt in func.body:
        if not isinstance(stmt, ast.Assign) or len(stmt.targets) != 1:
            continue
        key = _dotted(stmt.targets[0])
        if key is None:
            continue
        if key == "model":
            out.update(model_fields)
            continue
        if key.startswith("model."):
            continue  # described by ModelConfig's field
        call = stmt.value
        if (isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Call)
                and isinstance(call.args[0].func, ast.Name) and call.args[0].func.id == "dict"):
            for kw in call.args[0].keywords:
                out[f"{key}.{kw.arg}"] = _describe(kw, comments, alone)
            continue
        out[key] = _describe(stmt, comments, alone)
    return out


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default value, for every leaf of `config`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def entries() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every key of base_config(), in source order; a key
    the source scan does not find comes last with an empty description."""
    from llmjax.config import base_config

    defaults = flatten(base_config())
    described = descriptions()
    order = [k for k in described if k in defaults] + sorted(set(defaults) - set(described))
    return [(k, defaults[k], described.get(k, "")) for k in order]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    sections: dict[str, list[tuple[str, Any, str]]] = {}
    for key, value, text in entries():
        section = key.split(".")[0] if "." in key else ""
        sections.setdefault(section, []).append((key, value, text))
    lines = [
        "# Config reference",
        "",
        f"Generated from `llmjax.config.base_config()` by `{REGENERATE}`; do not edit by hand",
        "(tests/test_docs.py fails when this page and the code disagree). Each description is the",
        "key's comment in llmjax/config.py (the `model` section: llmjax/models/__init__.py).",
        "Every config file in configs/ starts from these defaults and changes some of them; any key",
        "can be set on the command line, `--config.optim.learning_rate=3e-4`, and a misspelt one is",
        "rejected. How to run a config: [configs.md](configs.md).",
    ]
    for section, rows in sections.items():
        lines += ["", f"## `{section}`" if section else "## Top level", "",
                  "| key | default | description |", "|---|---|---|"]
        long = []
        for key, value, text in rows:
            shown = repr(value)
            if len(shown) > _LONG:
                long.append((key, value))
                shown = "below"
            text = text.replace("<", "&lt;")  # checkpoints/<step>, <extra_id_i>: not HTML
            lines.append(f"| `{key}` | `{_cell(shown)}` | {_cell(text)} |")
        for key, value in long:
            lines += ["", f"`{key}` defaults to:", "", "```python"]
            if isinstance(value, (tuple, list)):
                lines += ["("] + [f"    {item!r}," for item in value] + [")"]
            else:
                lines.append(repr(value))
            lines.append("```")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH.relative_to(ROOT)} is stale; regenerate it with `{REGENERATE}`.")
            return 1
        return 0
    DOC_PATH.parent.mkdir(exist_ok=True)
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
