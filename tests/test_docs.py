"""The docs cannot drift: docs/config.md is what `python -m llmjax.config_reference` writes from
`base_config()`, every key is in it with a description, and every relative link in README.md and
docs/*.md points at a file (and a heading, for `file.md#anchor`) that exists."""

import pathlib
import re

from llmjax import config_reference
from llmjax.config import base_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_config_reference_is_current():
    text = config_reference.render()
    on_disk = config_reference.DOC_PATH.read_text() if config_reference.DOC_PATH.exists() else ""
    assert on_disk == text, (f"docs/config.md is stale; regenerate it with "
                             f"`{config_reference.REGENERATE}`.")


def test_config_reference_has_every_key_with_a_description():
    keys = config_reference.flatten(base_config())
    entries = {key: text for key, _, text in config_reference.entries()}
    assert set(entries) == set(keys)
    undescribed = sorted(k for k, text in entries.items() if not text)
    assert not undescribed, (f"config keys without a comment in llmjax/config.py (or ModelConfig): "
                             f"{undescribed}; add one, then run `{config_reference.REGENERATE}`.")
    page = config_reference.DOC_PATH.read_text()
    missing = sorted(k for k in keys if f"| `{k}` |" not in page)
    assert not missing, f"docs/config.md lacks {missing}; run `{config_reference.REGENERATE}`."


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slug_matches_github():
    assert _slug("Plan before paying: `describe --topology`") == "plan-before-paying-describe---topology"
    assert _slug("BERT, RoBERTa, T5 and BART") == "bert-roberta-t5-and-bart"
