"""Evaluation of trained models: `lm.LM` scores and generates text for any family (an llmjax run
or a Hugging Face directory); task kinds and metrics build on it, and `harness` plugs it into
EleutherAI's lm-evaluation-harness."""
