"""Metrics of the evaluation tasks, each the standard definition (so numbers compare with papers
and with lm-evaluation-harness), pure Python on lists.

* Answers: `exact_match` and token `f1` after SQuAD's normalisation (lowercase, no punctuation,
  no articles a/an/the, single spaces); a list of references scores the best one.
* Overlap: `rouge_l`, the LCS F-measure (beta 1) on rouge-score's default tokens (lowercase
  alphanumeric runs, no stemming), written here from the definition; corpus `bleu` and `chrf` by
  sacrebleu with its defaults (13a tokenizer; chrF n=6, beta=2), on sacrebleu's 0-100 scale.
* Choices: `accuracy` (argmax of the scores) and `accuracy_norm` (argmax of score / length in
  UTF-8 bytes of the choice text: lm-eval's acc_norm, which counts characters, the same on ASCII).
* Labels: `macro_f1`, the mean F1 over the labels that occur as gold or prediction.
* Text likelihood (`perplexities`): token, word and byte perplexity and bits per byte from summed
  natural-log probabilities, words and bytes counted as lm-eval does (`count_words`, `count_bytes`).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation and articles, collapse spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(r)
                     for r in _references(reference)))


def f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD token F1 between the normalised answers (best reference); two empty answers score 1."""
    def one(ref: str) -> float:
        pred_tokens, ref_tokens = normalize_answer(prediction).split(), normalize_answer(ref).split()
        if not pred_tokens or not ref_tokens:
            return float(pred_tokens == ref_tokens)
        common = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred_tokens), common / len(ref_tokens)
        return 2 * precision * recall / (precision + recall)
    return max(one(r) for r in _references(reference))


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer without stemming: lowercase alphanumeric runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, 1):
            previous_diagonal, row[j] = row[j], (previous_diagonal + 1 if x == y
                                                 else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(prediction: str, reference: str | Sequence[str]) -> float:
    """ROUGE-L F-measure: LCS / len as precision (prediction) and recall (reference), their
    harmonic mean; the best reference; 0 when either side has no tokens."""
    def one(ref: str) -> float:
        pred, gold = rouge_tokens(prediction), rouge_tokens(ref)
        lcs = _lcs_length(pred, gold)
        if lcs == 0:
            return 0.0
        precision, recall = lcs / len(pred), lcs / len(gold)
        return 2 * precision * recall / (precision + recall)
    return max(one(r) for r in _references(reference))


def _first_references(references: Sequence[str | Sequence[str]]) -> list[str]:
    return [_references(r)[0] for r in references]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults, 0-100) against the first reference of each example."""
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(predictions), [_first_references(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2; 0-100), first reference."""
    import sacrebleu
    return float(sacrebleu.corpus_chrf(list(predictions), [_first_references(references)]).score)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the first


def accuracy(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of examples whose highest-scoring choice is the answer (ties go to the first)."""
    return sum(_argmax(s) == a for s, a in zip(scores, answers, strict=True)) / len(answers)


def accuracy_norm(scores: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                  answers: Sequence[int]) -> float:
    """Accuracy after dividing each choice's log-likelihood by its length in UTF-8 bytes."""
    normed = [[s / max(1, len(c.encode("utf-8"))) for s, c in zip(row, texts, strict=True)]
              for row, texts in zip(scores, choices, strict=True)]
    return accuracy(normed, answers)


def macro_f1(predictions: Sequence[str], golds: Sequence[str]) -> float:
    """Mean over labels (those seen as gold or prediction) of 2TP / (2TP + FP + FN)."""
    scores = []
    for label in sorted(set(predictions) | set(golds)):
        tp = sum(p == label and g == label for p, g in zip(predictions, golds, strict=True))
        fp = sum(p == label and g != label for p, g in zip(predictions, golds))
        fn = sum(p != label and g == label for p, g in zip(predictions, golds))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def count_words(text: str) -> int:
    """lm-eval's word count for word perplexity: pieces of the text split on whitespace runs."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexities(logprob: float, tokens: int, words: int, num_bytes: int) -> dict[str, float]:
    """From the summed natural-log probability of a corpus and its token, word and byte counts:
    exp(-logprob / count) per unit, and bits per byte = -logprob / (bytes * ln 2)."""
    return {"token_perplexity": math.exp(-logprob / tokens),
            "word_perplexity": math.exp(-logprob / words),
            "byte_perplexity": math.exp(-logprob / num_bytes),
            "bits_per_byte": -logprob / (num_bytes * math.log(2))}
