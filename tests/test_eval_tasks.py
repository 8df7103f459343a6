"""Evaluation metrics against hand-computed examples, each task runner against a fake model with
known scores (so the arithmetic is checked exactly), the shipped specs, the spec errors, and the
`python -m llmjax.evaluate` command on a tiny trained run."""

import json
import math
import os
import subprocess
import sys

import pytest

from llmjax.evaluation import metrics as M
from llmjax.evaluation import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- Metrics --------------------------------------------------------------------------------

def test_exact_match_and_f1_follow_squad():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.exact_match("the Cat.", "cat") == 1.0
    assert M.exact_match("cats", ["dog", "cat"]) == 0.0
    assert M.exact_match("a dog", ["cat", "Dog!"]) == 1.0  # the best reference
    # pred tokens [cat, sat, on, mat], ref [cat, sat]: 2 common; P = 2/4, R = 2/2,
    # F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert M.f1("the cat sat on mat", "a cat sat") == pytest.approx(2 / 3)
    assert M.f1("dog", "cat") == 0.0
    assert M.f1("the", "a") == 1.0  # both empty after normalisation
    assert M.f1("cat", ["dog", "cat sat"]) == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_rouge_l_is_the_lcs_f_measure():
    # [the cat sat on the mat] vs [the cat lay on the mat]: LCS the,cat,on,the,mat = 5;
    # P = R = 5/6, F = 5/6.
    assert M.rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # [a b c d] vs [a c]: LCS 2; P = 2/4, R = 2/2; F = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert M.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert M.rouge_l("print(x)", "print x") == 1.0  # tokens are alphanumeric runs
    assert M.rouge_l("x", "y") == 0.0 and M.rouge_l("", "y") == 0.0


def test_bleu_and_chrf_by_hand():
    # "the cat sat on a mat" vs "the cat sat on the mat": matched 1..4-grams 5/6, 3/5, 2/4, 1/3,
    # equal lengths (no brevity penalty): BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4).
    assert M.bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(
        100 * (1 / 12) ** 0.25)
    assert M.bleu(["a b c d"], [["a b c d", "unused second reference"]]) == pytest.approx(100)
    # chrF "ab" vs "abc": character 1-grams P = 2/2, R = 2/3; 2-grams P = 1/1, R = 1/2 (longer
    # orders have no hypothesis n-grams). Means P = 1, R = 7/12; beta = 2:
    # 100 * (1 + 4) * P * R / (4 * P + R) = 100 * 35/55.
    assert M.chrf(["ab"], ["abc"]) == pytest.approx(100 * 35 / 55)


def test_accuracy_norm_divides_by_bytes():
    assert M.accuracy([[-1, -2, -3], [-5, -1, -2]], [0, 2]) == 0.5
    # raw: -2 beats -4 (wrong); per byte: -2/1 = -2 < -4/4 = -1 (right).
    assert M.accuracy([[-2, -4]], [1]) == 0.0
    assert M.accuracy_norm([[-2, -4]], [["x", "yyyy"]], [1]) == 1.0
    # é is 2 bytes: -2/2 = -1 ties -4/4 = -1, and ties go to the first choice.
    assert M.accuracy_norm([[-2, -4]], [["é", "yyyy"]], [1]) == 0.0
    assert M.accuracy([[-1, -1]], [0]) == 1.0


def test_macro_f1():
    # a: TP 1, FP 1, FN 0 -> 2/3; b: TP 2, FP 0, FN 1 -> 4/5; mean 11/15.
    assert M.macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(11 / 15)


def test_perplexities():
    got = M.perplexities(logprob=-10.0, tokens=5, words=2, num_bytes=20)
    assert got["token_perplexity"] == pytest.approx(math.e ** 2)
    assert got["word_perplexity"] == pytest.approx(math.e ** 5)
    assert got["byte_perplexity"] == pytest.approx(math.e ** 0.5)
    assert got["bits_per_byte"] == pytest.approx(10 / (20 * math.log(2)))
    assert M.count_words("a  b\nc") == 3 and M.count_bytes("é") == 2


# -- Runners with a fake model ---------------------------------------------------------------

class FakeLM:
    """Scores from tables (unknown requests fail the test), recording what it was asked."""

    def __init__(self, family="decoder", ll=None, rolling=None, generations=None, classes=None,
                 labels=None, masked=None):
        self.family, self.labels, self.step = family, labels, 7
        self.ll, self.rolling, self.generations = ll or {}, rolling or {}, generations or {}
        self.classes, self.masked, self.calls = classes or {}, masked, []
        if masked is not None:
            self.masked_logprob = lambda texts, batch_size=16: [masked[t] for t in texts]

    def loglikelihood(self, requests, batch_size=16):
        self.calls.append(("ll", requests))
        return [(self.ll[r], False) for r in requests]

    def loglikelihood_rolling(self, texts, batch_size=16):
        return [{"logprob": self.rolling[t], "tokens": len(t)} for t in texts]

    def generate_until(self, requests, batch_size=16):
        self.calls.append(("gen", requests))
        return [self.generations[c] for c, _ in requests]

    def classify(self, texts, batch_size=16):
        return [self.classes[t] for t in texts]


def write_spec(tmp_path, spec, rows=None, data_name="data.jsonl"):
    if rows is not None:
        with open(tmp_path / data_name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"name": "t", "data": data_name, **spec}))
    return tasks.get(str(path))


def test_perplexity_runner(tmp_path):
    task = write_spec(tmp_path, {"kind": "perplexity"}, [{"text": "ab cd"}, {"text": "éf"}])
    # logprob -3 - 4 = -7; tokens (the fake: characters) 5 + 2 = 7; words 2 + 1 = 3;
    # bytes 5 + 3 = 8 (é is two).
    got = tasks.run(task, FakeLM(rolling={"ab cd": -3.0, "éf": -4.0}))
    assert got == pytest.approx({"token_perplexity": math.e, "word_perplexity": math.exp(7 / 3),
                                 "byte_perplexity": math.exp(7 / 8),
                                 "bits_per_byte": 7 / (8 * math.log(2)), "n": 2})


def test_multiple_choice_runner(tmp_path):
    rows = [{"q": "2+2", "options": ["4", "five"], "gold": 0},
            {"q": "sky", "options": ["blue", "red"], "gold": "red"}]
    task = write_spec(tmp_path, {"kind": "multiple_choice", "prompt": "Q: {q}\nA:",
                                 "choices": "options", "answer": "gold"}, rows)
    ll = {("Q: 2+2\nA:", " 4"): -2.0, ("Q: 2+2\nA:", " five"): -3.0,
          ("Q: sky\nA:", " blue"): -4.0, ("Q: sky\nA:", " red"): -6.0}
    lm = FakeLM(ll=ll)
    # acc: argmax [0, 0] vs answers [0, 1] -> 1/2; acc_norm: per byte of the choice text
    # [-2/1, -3/4] -> 1 (wrong), [-4/4, -6/3] -> 0 (wrong) -> 0/2.
    assert tasks.run(task, lm) == {"accuracy": 0.5, "accuracy_norm": 0.0, "n": 2}
    assert tasks.run(task, lm, limit=1) == {"accuracy": 1.0, "accuracy_norm": 0.0, "n": 1}


def test_generation_runner_with_few_shot_file(tmp_path):
    (tmp_path / "shots.jsonl").write_text(json.dumps({"src": "one", "tgt": "uno"}) + "\n")
    rows = [{"src": "two", "tgt": "dos"}, {"src": "three", "tgt": "the tres"}]
    task = write_spec(tmp_path, {"kind": "generation", "prompt": "EN: {src}\nES:", "target": "tgt",
                                 "few_shot": {"k": 1, "data": "shots.jsonl"}, "until": ["\n"],
                                 "max_gen_toks": 5,
                                 "metrics": ["exact_match", "f1", "rouge_l", "chrf"]}, rows)
    shot = "EN: one\nES: uno\n\n"
    lm = FakeLM(generations={shot + "EN: two\nES:": " dos\nEN: x",  # cut at the stop string
                             shot + "EN: three\nES:": " tres cuatro"})
    got = tasks.run(task, lm)
    assert lm.calls[0][1][0][1] == {"until": ["\n"], "max_gen_toks": 5}
    # EM: "dos" = "dos"; "tres cuatro" vs "the tres" (normalised "tres") no -> 1/2.
    # F1: 1, and [tres, cuatro] vs [tres]: P 1/2, R 1, F1 2/3 -> (1 + 2/3) / 2.
    # ROUGE-L: 1, and [tres, cuatro] vs [the, tres]: LCS 1, P = R = 1/2 -> (1 + 1/2) / 2.
    assert got["exact_match"] == 0.5
    assert got["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["rouge_l"] == pytest.approx(0.75)
    assert got["chrf"] == pytest.approx(M.chrf(["dos", "tres cuatro"], ["dos", "the tres"]))
    assert got["n"] == 2 and "bleu" not in got


def test_few_shot_from_the_same_data_is_not_scored(tmp_path):
    rows = [{"src": str(i), "tgt": str(i)} for i in range(5)]
    task = write_spec(tmp_path, {"kind": "generation", "prompt": "{src}=", "target": "tgt",
                                 "few_shot": {"k": 2, "seed": 0}}, rows)
    shots, scored = tasks.prepare(task, FakeLM())
    assert len(shots) == 2 and len(scored) == 3
    assert not {s["src"] for s in shots} & {e["src"] for e in scored}
    lm = FakeLM(generations={"".join(f"{s['src']}= {s['tgt']}\n\n" for s in shots)
                             + f"{e['src']}=": e["tgt"] for e in scored})
    assert tasks.run(task, lm)["exact_match"] == 1.0


def test_classification_runner_decoder_and_encoder(tmp_path):
    rows = [{"text": "t1", "label": "pos"}, {"text": "t2", "label": "neg"},
            {"text": "t3", "label": "neg"}]
    task = write_spec(tmp_path, {"kind": "classification", "prompt": "{text} ->",
                                 "labels": ["neg", "pos"]}, rows)
    ll = {("t1 ->", " neg"): -2.0, ("t1 ->", " pos"): -1.0,   # pos (right)
          ("t2 ->", " neg"): -1.0, ("t2 ->", " pos"): -3.0,   # neg (right)
          ("t3 ->", " neg"): -5.0, ("t3 ->", " pos"): -4.0}   # pos (wrong)
    # preds [pos, neg, pos] vs [pos, neg, neg]: accuracy 2/3; neg: TP 1, FP 0, FN 1 -> 2/3;
    # pos: TP 1, FP 1, FN 0 -> 2/3; macro F1 2/3.
    want = {"accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx(2 / 3), "n": 3}
    assert tasks.run(task, FakeLM(ll=ll)) == want
    # The encoder's head has the labels in another order, plus one the task does not use.
    classes = {"t1": [-0.1, -3.0, -2.0], "t2": [-2.0, -3.0, -0.1], "t3": [-0.5, -3.0, -1.0]}
    encoder = FakeLM("encoder", classes=classes, labels=["pos", "other", "neg"])
    assert tasks.run(task, encoder) == want
    with pytest.raises(tasks.TaskNotApplicable, match="no classification head"):
        tasks.run(task, FakeLM("encoder"))
    with pytest.raises(tasks.TaskNotApplicable, match=r"label\(s\) \['neg'\]"):
        tasks.run(task, FakeLM("encoder", classes=classes, labels=["pos", "x"]))


def test_bias_pairs_runner(tmp_path):
    import csv
    rows = [("m1", "l1", "stereo", "age"), ("m2", "l2", "antistereo", "age"),
            ("m3", "l3", "stereo", "gender")]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", "sent_more", "sent_less", "stereo_antistereo", "bias_type"])
        writer.writerows([(i, *r) for i, r in enumerate(rows)])
    task = write_spec(tmp_path, {"kind": "bias_pairs"}, data_name="pairs.csv")
    scores = {"m1": -5.0, "l1": -7.0, "m2": -9.0, "l2": -8.0, "m3": -2.0, "l3": -6.0}
    # more > less in pairs 1 and 3: 2/3 overall, age 1/2, gender 1/1; |diff| 2, 1, 4 -> 7/3.
    want = {"pct_stereotype": pytest.approx(2 / 3), "likelihood_diff": pytest.approx(7 / 3),
            "pct_stereotype/age": 0.5, "pct_stereotype/gender": 1.0, "n": 3}
    assert tasks.run(task, FakeLM(rolling=scores)) == want
    assert tasks.run(task, FakeLM("encoder", masked=scores)) == want  # pseudo-log-likelihoods
    with pytest.raises(tasks.TaskNotApplicable, match="pseudo-log-likelihoods"):
        tasks.run(task, FakeLM("encoder"))


def test_kinds_an_encoder_cannot_score(tmp_path):
    task = write_spec(tmp_path, {"kind": "perplexity"}, [{"text": "x"}])
    with pytest.raises(tasks.TaskNotApplicable, match="needs a decoder or an encoder-decoder"):
        tasks.run(task, FakeLM("encoder", labels=["a"]))


# -- Specs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, rows, message", [
    ({"kind": "generation", "target": "a"}, None, "kind 'generation' needs 'prompt'"),
    ({"kind": "perplexity", "txt": "x"}, None, r"unknown key\(s\) \['txt'\]"),
    ({"kind": "ranking"}, None, "kind 'ranking'; the kinds are perplexity"),
    ({"kind": "perplexity", "metrics": ["bleu"]}, None, "do not apply to kind 'perplexity'"),
    ({"kind": "perplexity", "data": "stdlib:nope"}, None, "not a built-in source"),
    ({"kind": "generation", "prompt": "{q}", "target": "a", "few_shot": {"n": 3}}, None,
     "few_shot takes k"),
    ({"kind": "perplexity", "few_shot": {"k": 1}}, None, "takes no few_shot"),
    ({"kind": "perplexity", "metrics": "bits_per_byte"}, None, "'metrics' must be a list"),
    ({"kind": "generation", "prompt": "{q}", "max_gen_toks": "8"}, None, "'max_gen_toks' must"),
])
def test_bad_specs_are_one_sentence(tmp_path, spec, rows, message):
    with pytest.raises(ValueError, match=message):
        write_spec(tmp_path, spec, rows)


def test_bad_data_is_one_sentence(tmp_path):
    task = write_spec(tmp_path, {"kind": "multiple_choice", "prompt": "{question}"},
                      [{"question": "q", "choices": ["a"]}])
    with pytest.raises(ValueError, match=r"example 0 has no field\(s\) \['answer'\]"):
        tasks.run(task, FakeLM())
    task = write_spec(tmp_path, {"kind": "generation", "prompt": "{q}", "target": "a"},
                      [{"question": "q", "a": "x"}])
    with pytest.raises(ValueError, match=r"no field\(s\) \['q'\]"):
        tasks.run(task, FakeLM())
    task = write_spec(tmp_path, {"kind": "perplexity", "data": "missing.jsonl"})
    with pytest.raises(ValueError, match="missing.jsonl' does not exist"):
        task.examples()
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="cannot be parsed"):
        write_spec(tmp_path, {"kind": "perplexity", "data": "broken.jsonl"}).examples()
    with pytest.raises(ValueError, match="unknown task 'nope'; the shipped tasks are "
                                         "bias_pairs_probe, py2to3, "):
        tasks.get("nope")


def test_shipped_specs_load_and_parse():
    from llmjax.data import documents
    from llmjax.data import tasks as data_tasks
    kinds = {}
    for name in tasks.shipped():
        task = tasks.get(name)
        examples = task.examples()
        shots, scored = tasks.prepare(task, FakeLM())  # fields present in every example
        assert task.name == name and 10 <= len(examples) <= 300, name
        kinds[task.kind] = name
    assert set(kinds) == set(tasks.KINDS)
    assert tasks.get("stdlib_modules").labels == data_tasks.MODULES
    held_out = documents.held_out(documents.stdlib_documents(), data_tasks.HELD_OUT_FRACTION)
    assert {d["path"] for d in tasks.get("stdlib_docs_ppl").examples()} <= held_out
    for record in tasks.get("stdlib_names_mc").examples():
        assert record["path"] in held_out
        assert record["choices"][record["answer"]] == record["name"]
        assert len(set(record["choices"])) == 4


# -- The command line -----------------------------------------------------------------------

def evaluate_cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "llmjax.evaluate", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--workdir=/nonexistent/run", "--tasks=py2to3"], "--workdir=/nonexistent/run does not exist"),
    (["--workdir=/tmp", "--tasks=py2to3,nope"], "unknown task 'nope'"),
    (["--workdir=/tmp"], "--tasks is required"),
    (["--tasks=py2to3"], "--workdir is required"),
    (["--workdir=/tmp", "--tasks=py2to3", "--limit=0"], "--limit=0 must be at least 1"),
])
def test_bad_command_lines_are_one_line(args, message):
    result = evaluate_cli(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_bad_spec_on_the_command_line(tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\nkind: multiple_choice\ndata: d.jsonl\n")
    result = evaluate_cli("--workdir=/tmp", f"--tasks={tmp_path / 't.yaml'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: task spec {str(tmp_path / 't.yaml')!r}: kind 'multiple_choice' needs 'prompt' "
        "(a str.format template over the example's fields, e.g. 'Question: {question}\\nAnswer:').")


def test_list_tasks():
    result = evaluate_cli("--tasks=list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["task", "kind", "examples", "description"]
    assert len(lines) == 1 + len(tasks.shipped())
    assert any(line.split()[:3] == ["py2to3", "generation", "40"] for line in lines)


@pytest.mark.slow
def test_evaluate_a_trained_run(trained_workdir, tmp_path):  # the tiny run of conftest
    """Every kind a decoder can score, on a tiny trained run, through the command line."""
    out = tmp_path / "results.json"
    result = evaluate_cli(f"--workdir={trained_workdir}", "--limit=3", "--batch_size=4",
                          f"--output={out}",
                          "--tasks=stdlib_docs_ppl,stdlib_names_mc,py2to3,stdlib_modules,"
                          "bias_pairs_probe")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    records = [json.loads(x) for x in lines if x.startswith("{")]
    assert [r["task"] for r in records] == ["stdlib_docs_ppl", "stdlib_names_mc", "py2to3",
                                            "stdlib_modules", "bias_pairs_probe"]
    assert json.loads(out.read_text()) == records
    by_task = {r["task"]: r for r in records}
    assert by_task["stdlib_docs_ppl"]["n"] == 3 and by_task["stdlib_docs_ppl"]["step"] == 2
    ppl = by_task["stdlib_docs_ppl"]
    assert ppl["bits_per_byte"] > 0 and ppl["token_perplexity"] > 1
    assert 0 <= by_task["stdlib_names_mc"]["accuracy"] <= 1
    assert set(by_task["py2to3"]) >= {"exact_match", "f1", "rouge_l", "bleu", "chrf"}
    assert set(by_task["bias_pairs_probe"]) >= {"pct_stereotype", "likelihood_diff"}
    table = lines[:len(lines) - len(records)]
    assert table[0].split() == ["task", "metric", "value", "n"]
    assert any(row.split()[:2] == ["py2to3", "chrf"] for row in table)
