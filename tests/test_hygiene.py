"""Data hygiene (llmjax/data/hygiene): dedup and validation leaks on a generated corpus with
planted copies, PII placeholders (positives and negatives), quality flags, the report, parallel
== serial, and the local corpus build running it (report next to the dataset, copy in a workdir).
"""

import json
import random

import ml_collections
import pytest

from llmjax.data import corpus, hygiene
from llmjax.data.hygiene import pii, quality
from tests.helpers import tiny_config

CFG = hygiene.HygieneConfig()
WORDS = ("river stone garden window letter market silver winter morning doctor travel simple "
         "yellow number animal country history forest island mountain teacher village answer "
         "friend summer pocket bridge candle bottle orange school planet ticket button kitchen "
         "harbor meadow lantern cotton basket carpet needle thunder").split()


def _prose(seed: int, n: int = 200) -> str:
    """Ordinary text: real-looking words in random order, sentences of ten words."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(" ".join(words[i:i + 10]).capitalize() + "." for i in range(0, n, 10))


def _doc(rng: random.Random, vocab: list[str], n: int = 300) -> str:
    words = [rng.choice(vocab) for _ in range(n)]
    return "\n".join(" ".join(words[i:i + 12]) + "." for i in range(0, n, 12))


def _change_words(text: str, rng: random.Random, k: int) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), k):
        words[i] = "zzchanged" + str(i)
    return " ".join(words)


@pytest.fixture(scope="module")
def planted():
    """60 distinct train docs + 6 validation docs, and planted copies with their expected rule."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    train = [(f"train/{i}", "train", _doc(rng, vocab)) for i in range(60)]
    val = [(f"val/{i}", "validation", _doc(rng, vocab)) for i in range(6)]
    half = train[1][2][: len(train[1][2]) // 2] + _doc(rng, vocab, 150)  # shares half: distinct
    copies = [
        ("copy/exact0", "train", train[0][2].upper().replace("\n", "  \n ")),  # case, spacing
        ("copy/exact1", "train", train[2][2].replace(".", "!!")),  # punctuation runs
        ("copy/near0", "train", _change_words(train[3][2], rng, 2)),
        ("copy/near1", "train", _change_words(train[4][2], rng, 3)),
        ("copy/leak_exact", "train", val[0][2]),
        ("copy/leak_near", "train", _change_words(val[1][2], rng, 2)),
        ("copy/half", "train", half),
    ]
    expected = {"copy/exact0": "exact_duplicate", "copy/exact1": "exact_duplicate",
                "copy/near0": "near_duplicate", "copy/near1": "near_duplicate",
                "copy/leak_exact": "validation_leak_exact",
                "copy/leak_near": "validation_leak_near"}
    # Train first on purpose: clean() must still offer the validation documents first.
    return train[:30] + copies + train[30:] + val, expected


def test_planted_duplicates_and_leaks_are_found_and_nothing_else(planted):
    docs, expected = planted
    kept, report = hygiene.clean(docs, CFG)
    kept_ids = {d for d, _, _ in kept}
    assert kept_ids == {d for d, _, _ in docs} - set(expected)
    d = report.to_dict()
    assert d["removed"] == {"exact_duplicate": 2, "near_duplicate": 2,
                            "validation_leak_exact": 1, "validation_leak_near": 1}
    assert d["splits"]["validation"]["documents_out"] == 6  # no validation doc removed
    assert d["splits"]["train"] == {**d["splits"]["train"], "documents_in": 67,
                                    "documents_out": 61}
    assert [k for k, s, _ in kept[:6]] == [f"val/{i}" for i in range(6)]  # held out first
    leak = d["examples"]["validation_leak_near"][0]
    assert (leak["doc_id"], leak["duplicate_of"]) == ("copy/leak_near", "val/1")


def test_dedup_switches_and_threshold(planted):
    docs, expected = planted
    only_exact = hygiene.HygieneConfig(dedup_near=False)
    assert set(hygiene.clean(docs, only_exact)[1].removed) == {"exact_duplicate",
                                                                 "validation_leak_exact"}
    strict = hygiene.HygieneConfig(dedup_exact=False, near_threshold=0.97)
    # Exact copies are near copies at any threshold; the edited ones fall below 0.97.
    assert hygiene.clean(docs, strict)[1].removed == {"near_duplicate": 2,
                                                      "validation_leak_near": 1}
    off = hygiene.HygieneConfig(enabled=False)
    assert len(hygiene.clean(docs, off)[0]) == len(docs)


def test_parallel_equals_serial(planted):
    docs, _ = planted
    docs = docs + [("pii/0", "train", "write to jane@corp.org or 8.8.8.8 " * 30)]
    serial, serial_report = hygiene.clean(docs, CFG, processes=1)
    parallel, parallel_report = hygiene.clean(docs, CFG, processes=2)
    assert parallel == serial
    assert parallel_report.to_dict() == serial_report.to_dict()


POSITIVES = [
    ("mail john.doe+news@mail.example.co.uk now", "EMAIL"),
    ("call (415) 555-2671 today", "PHONE"),
    ("call 415-555-2671 today", "PHONE"),
    ("call +1 415 555 2671 today", "PHONE"),
    ("call +44 20 7946 0958 today", "PHONE"),
    ("host 8.8.8.8 answered", "IP_ADDRESS"),
    ("host 10.1.2.3 answered", "IP_ADDRESS"),
    ("host 2a00:1450:4001:81c::200e answered", "IP_ADDRESS"),
    ("card 4111 1111 1111 1111 ok", "CREDIT_CARD"),
    ("card 5500-0000-0000-0004 ok", "CREDIT_CARD"),
    ("amex 378282246310005 ok", "CREDIT_CARD"),
    ("ssn 123-45-6789 on file", "GOV_ID"),
    ("NI number AB 12 34 56 C on file", "GOV_ID"),
    ("key AKIAIOSFODNN7EXAMPLE used", "SECRET"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 used", "SECRET"),
    ("slack xoxb-1234567890-abcdefghij used", "SECRET"),
    ('api_key = "sk3cretvalue123"', "SECRET"),
    ("password: hunter2hunter2x", "SECRET"),
    ("token=abc123def456ghi789", "SECRET"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nxyz\n-----END RSA PRIVATE KEY-----",
     "SECRET"),
]


@pytest.mark.parametrize("text,kind", POSITIVES)
def test_pii_is_replaced_by_its_placeholder(text, kind):
    scrubbed, counts, examples = pii.scrub(text)
    assert counts == {kind: 1}, scrubbed
    assert pii.PLACEHOLDERS[kind] in scrubbed
    assert examples and examples[0][0] == kind and pii.PLACEHOLDERS[kind] in examples[0][1]


def test_url_password_keeps_user_and_host():
    scrubbed, counts, _ = pii.scrub("db postgres://alice:s3cr3tpw@db.host.com:5432/x")
    assert scrubbed == "db postgres://alice:<SECRET>@db.host.com:5432/x"
    assert counts == {"SECRET": 1}


def test_assigned_secret_keeps_the_name():
    assert pii.scrub('API_KEY = "sk3cretvalue123"')[0] == 'API_KEY = "<SECRET>"'


NEGATIVES = [
    "Python 3.11.2 and version 1.2.3.4 and v10.0.0.1 and __version__ = '0.5.1.2'",
    "released 2024-01-15 at 12:30:45 on 15/01/2024, ISO 2023-10-05T10:00:00",
    "slices a[1::2] and b[::2]; std::vector; hosts 127.0.0.1 0.0.0.0 ::1 and mask 255.255.255.0",
    "networks 10.0.0.0/8 and examples 192.0.2.1 and 2001:db8::1 (documentation ranges)",
    "pi 3.14159265358979 big 1234567890123456 count 12345678901 hex 0x7fffffff 1.5e-10",
    "card-like 4111 1111 1111 1112 (Luhn fails) and 4111111111111112",
    "token = self.next_token() password = getpass.getpass() pwd = os.getcwd() secret = None",
    "token == 'abcdefghijk' and password = self.distribution.password",
    "MAC 00:1A:2B:3C:4D:5E uuid 123e4567-e89b-12d3-a456-426614174000 ISBN 978-3-16-148410-0",
    "sha 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12 and x @ self.weight and @property",
    "ssn-like 000-12-3456 666-12-3456 900-12-3456 123-00-4567 and NI QQ123456C",
    "phone-like 1234-567-890 and +000000120 and Decimal('+35236450.6')",
    "see http://www.python.org/ and ftp://host/path and mailto: nobody",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_lookalikes_stay(text):
    scrubbed, counts, _ = pii.scrub(text)
    assert (scrubbed, counts) == (text, {})


def _flags(text, **overrides):
    return quality.flags(text, hygiene.HygieneConfig(**overrides))


def test_quality_flags_on_crafted_documents():
    prose = _prose(0)
    assert _flags(prose) == ()
    assert "too_few_words" in _flags("Too short to be a document.")
    assert "too_many_words" in _flags(prose, max_words=50)
    assert "symbol_word_ratio" in _flags(prose + " #" * 40)
    assert "bullet_lines" in _flags("\n".join(f"- item{i} is a thing here" for i in range(60)))
    assert "ellipsis_lines" in _flags("\n".join(f"and then item{i} went on..." for i in range(60)))
    assert "alpha_words" in _flags(prose + " 12 34 56 78 -- ++" * 30)
    assert "duplicate_lines" in _flags("\n".join(["the same line again and again"] * 40 + [prose]))
    assert {"top_2gram", "top_3gram", "top_4gram"} <= set(_flags("buy cheap pills now " * 50))
    assert "mean_word_length" in _flags("a b c d e f g h " * 20)
    assert "lorem_ipsum" in _flags(prose + " Lorem ipsum dolor sit amet.")


def test_quality_report_keeps_and_drop_removes():
    docs = [("a", "validation", "one two three " * 40), ("b", "train", "too short"),
            ("c", "train", _prose(1))]
    kept, report = hygiene.clean(docs, CFG)
    assert len(kept) == 3 and report.quality_flags["too_few_words"] == 1
    kept, report = hygiene.clean(docs, hygiene.HygieneConfig(quality_filter="drop"))
    assert [k for k, _, _ in kept] == ["c"]
    assert report.removed == {hygiene.QUALITY_RULE: 2}
    kept, report = hygiene.clean(docs, hygiene.HygieneConfig(quality_filter="off"))
    assert len(kept) == 3 and report.quality_flags == {}


def test_report_json_masks_pii_and_merges(tmp_path):
    secret_doc = ("Contact jane.roe@corp.org or 415-555-2671, card 4111 1111 1111 1111. "
                  + "filler words for the document body " * 20)
    docs = [("v", "validation", secret_doc), ("t", "train", secret_doc)]  # t leaks v
    for scrub in (True, False):
        cfg = hygiene.HygieneConfig(scrub_pii=scrub)
        _, report = hygiene.clean(docs, cfg)
        report.write(tmp_path / "r.json")
        text = (tmp_path / "r.json").read_text()
        d = json.loads(text)
        for raw in ("jane.roe@corp.org", "555-2671", "4111 1111"):
            assert raw not in text
        assert d["removed"] == {"validation_leak_exact": 1}
        assert "<EMAIL>" in d["examples"]["validation_leak_exact"][0]["text"]
        if scrub:
            assert d["pii"] == {"CREDIT_CARD": 2, "EMAIL": 2, "PHONE": 2}
            assert "<PHONE>" in d["examples"]["pii_PHONE"][0]["text"]
    merged = hygiene.Report().merge(report).merge(report).to_dict()
    assert merged["total"]["documents_in"] == 4 and merged["removed"] == {
        "validation_leak_exact": 2}
    assert len(merged["examples"]["validation_leak_exact"]) == 2
    assert any("removed validation_leak_exact 1" in line for line in report.summary_lines())


def test_bad_settings_are_one_sentence():
    with pytest.raises(ValueError, match=r"data.hygiene.dedup_exat .*did you mean 'dedup_exact'"):
        hygiene.HygieneConfig.from_config({"dedup_exat": True})
    with pytest.raises(ValueError, match=r"quality_filter='strict' is not one of"):
        hygiene.HygieneConfig.from_config({"quality_filter": "strict"})
    with pytest.raises(ValueError, match=r"near_threshold=1.5 must be in \(0, 1\]"):
        hygiene.HygieneConfig.from_config({"near_threshold": 1.5})
    with pytest.raises(ValueError, match=r"near_threshold=0.999 with num_perm=128 leaves"):
        hygiene.HygieneConfig.from_config({"near_threshold": 0.999})
    with pytest.raises(ValueError, match=r"scrub_pii='yes' must be true or false"):
        hygiene.HygieneConfig.from_config({"scrub_pii": "yes"})
    from llmjax.validate import validate_config
    config = tiny_config()
    config.data.hygiene.num_perm = 4
    with pytest.raises(ValueError, match=r"data.hygiene.num_perm=4 must be at least 16"):
        validate_config(config)
    cfg = hygiene.HygieneConfig.from_config(tiny_config().data.hygiene)
    assert cfg == hygiene.HygieneConfig()  # config.py's defaults are the dataclass's


def test_text_corpus_build_runs_hygiene(tmp_path):
    """Local corpus: the report sits next to the dataset, the built texts are scrubbed and
    deduplicated, the settings are part of the cache key, and a run gets a copy of the report."""
    files = tmp_path / "files"
    files.mkdir()
    rng = random.Random(1)
    vocab = [f"v{i}" for i in range(3000)]
    texts = [_doc(rng, vocab, 120) for _ in range(20)]
    texts[5] += "\nmail bob.smith@corp.org for access"
    for i, text in enumerate(texts):
        (files / f"doc{i:02d}.txt").write_text(text)
    (files / "copy.txt").write_text(texts[7])
    cfg = ml_collections.ConfigDict(dict(name="text", files=f"{files}/*.txt",
                                         data_dir=str(tmp_path / "tfds"),
                                         validation_fraction=0.2))
    builder = corpus.prepare(cfg)
    report = json.loads(open(corpus.hygiene_report_path(cfg)).read())
    assert report["total"] == {**report["total"], "documents_in": 21, "documents_out": 20}
    assert sum(report["removed"].values()) == 1 and report["pii"] == {"EMAIL": 1}
    built = [corpus.load_split(cfg, s) for s in ("train", "validation")]
    all_text = "".join(src[i] for src in built for i in range(len(src)))
    assert sum(len(src) for src in built) == 20
    assert "<EMAIL>" in all_text and "bob.smith" not in all_text
    workdir = tmp_path / "run"
    assert corpus.copy_hygiene_report(cfg, str(workdir)) == str(workdir / "data_hygiene.json")
    assert json.loads((workdir / "data_hygiene.json").read_text()) == report
    cfg.hygiene = {"scrub_pii": False}
    other = corpus.prepare(cfg)
    assert other.builder_config.name != builder.builder_config.name
    assert "bob.smith@corp.org" in "".join(
        corpus.load_split(cfg, s)[i] for s in ("train", "validation")
        for i in range(len(corpus.load_split(cfg, s))))


def test_stdlib_corpus_build_ran_hygiene():
    """The embedded corpus (in the shared cache dir; built there once) carries its report."""
    data = tiny_config().data
    report = json.loads(open(corpus.hygiene_report_path(data)).read())
    total = report["total"]
    assert total["documents_in"] > 500 and 0 < total["documents_in"] - total["documents_out"] < 100
    assert report["pii"].get("EMAIL", 0) > 50  # authors' addresses in module headers
    builder = corpus.prepare(data)
    assert builder.info.splits["train"].num_examples == report["splits"]["train"]["documents_out"]


def test_documents_without_words_are_never_duplicates():
    docs = [("v/__init__.py", "validation", ""), ("t/__init__.py", "train", "\n"),
            ("t/x.py", "train", "# -*- !!! -*-")]
    kept, report = hygiene.clean(docs, CFG)
    assert len(kept) == 3 and report.removed == {}


def test_top_ngram_ties_go_to_the_longest():
    """Two bigrams tie as most frequent; the longer one decides, whatever the (per-process
    salted) hash order, so workers and the serial pass flag alike."""
    text = "ab cd " * 10 + "abcdefgh ijklmnop " * 10 + _prose(2, 100)
    total = sum(len(w) for w in text.lower().split())
    share = 10 * len("abcdefghijklmnop") / total
    assert "top_2gram" in _flags(text, max_top_ngram_fraction=(share * 0.9, 1.0, 1.0))
    assert "top_2gram" not in _flags(text, max_top_ngram_fraction=(share * 1.1, 1.0, 1.0))
