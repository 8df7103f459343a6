"""Data for llmjax: corpora (TFDS), the SentencePiece tokenizer and the Grain pipeline.

Typical use in a trainer:

  tokenizer = load_or_train_tokenizer(config.data, config.model.vocab_size, workdir)
  check_vocab(tokenizer, config.model.vocab_size)
  train_iter = make_train_iterator(config.data, tokenizer, seq_len=..., batch_size=..., seed=...,
                                   workdir=workdir)
  eval_batches = make_eval_batches(config.data, tokenizer, seq_len=..., batch_size=...,
                                   num_batches=...)
  print(unigram_entropy(eval_batches))  # The loss a model must beat to have learned anything.

See pipeline.py for the batch format, readers.py for the file formats, and prepare.py for
preparing a corpus once into token shards (`python -m llmjax.data.prepare`).
"""

# (corpus.prepare builds a local corpus; the name `prepare` here is the prepare-once module.)
from llmjax.data.corpus import load_split, resolve_data_dir
from llmjax.data.pipeline import make_eval_batches, make_train_iterator
from llmjax.data.stats import unigram_entropy
from llmjax.data.tokenizer import Tokenizer, check_vocab, load_or_train_tokenizer, train_tokenizer

__all__ = [
    "Tokenizer",
    "check_vocab",
    "load_or_train_tokenizer",
    "load_split",
    "make_eval_batches",
    "make_train_iterator",
    "resolve_data_dir",
    "train_tokenizer",
    "unigram_entropy",
]
