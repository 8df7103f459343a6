"""The table a Hugging Face family is made of (see hf.py): `Tensor` rows and the `Family` that
holds them, with the one-line checks of config values each direction cannot represent."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from llmjax.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the parameter(s) of ours that hold its values.

    layout: 'copy' (same values, maybe reshaped), 'linear' (torch.nn.Linear, [out, in]: ours is its
    transpose), 'conv1d' (GPT-2's Conv1D, [in, out] like ours); a tensor split along its last axis
    into several of ours (GPT-2's fused c_attn) lists them all in `ours` with their `sizes`.
    """

    hf: str
    shape: tuple[int, ...]  # the Hugging Face shape (of one layer)
    ours: tuple[tuple[str, ...], ...]  # paths into our params dict (layered: under 'layers')
    layout: str = "copy"
    sizes: tuple[int, ...] = ()
    layers: int = 0  # layered rows: layers in this row's stack (0 = model.num_layers)
    factor: float = 1.0  # ours = factor * theirs (a constant Hugging Face applies that we fold in)

    @property
    def layered(self) -> bool:
        return "{i}" in self.hf

    def to_ours(self, a: np.ndarray, our_shapes) -> list[np.ndarray]:
        if self.factor != 1.0:
            a = a * np.float32(self.factor)
        if self.layout == "linear":
            a = a.T
        parts = np.split(a, np.cumsum(self.sizes)[:-1], axis=-1) if self.sizes else [a]
        return [p.reshape(s) for p, s in zip(parts, our_shapes)]

    def to_hf(self, ws: list[np.ndarray]) -> np.ndarray:
        if self.factor != 1.0:
            ws = [w / np.float32(self.factor) for w in ws]
        if self.layout == "linear":
            out, inp = self.shape
            return ws[0].reshape(inp, out).T
        if self.sizes:
            return np.concatenate([w.reshape(self.shape[:-1] + (-1,)) for w in ws], axis=-1)
        return ws[0].reshape(self.shape)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the *ForCausalLM / *ForMaskedLM / *ForConditionalGeneration class `save` names
    to_model: Callable[[dict], dict]  # HF config.json -> our `model` section
    to_hf_config: Callable[[ModelConfig], dict]  # ours -> HF config.json (without common keys)
    tensors: Callable[[ModelConfig], list[Tensor]]
    prefixes: tuple[str, ...]  # the base model's prefix in *ForCausalLM files ('' = bare base model)
    ignored: tuple[str, ...] = ()  # buffers some files carry that hold no parameters (suffixes)
    represents: Callable[[ModelConfig], bool] = lambda m: False
    heads: tuple[str, ...] = ("lm_head",)  # names that sit outside the base model's prefix
    tied_head: str = "lm_head.weight"  # the output head a tied model's file may still carry
    # (model section, tensor names in the files) -> model section: settings config.json does not
    # record, such as BERT's optional pooler or a T5 head untied under transformers 5.
    from_files: Callable[[dict, frozenset], dict] = lambda model, names: model
    data: dict = dataclasses.field(default_factory=dict)  # the pretraining objective's data keys
    tokenizer: str = ""  # a tokenizer that is not SentencePiece (one line: what it is)
    sentencepiece: str = "tokenizer.model"  # the SentencePiece file name this family uses


def _require(m: ModelConfig, architecture: str, **want):
    """Export check: our settings that the Hugging Face class cannot express, one line each."""
    for key, value in want.items():
        if getattr(m, key) != value:
            raise ValueError(f"model.{key}={getattr(m, key)!r} cannot be written as Hugging Face's "
                             f"{architecture}, which needs {value!r}; export a model trained with it.")


def _need(hf: dict, key: str, want, fix: str):
    value = hf.get(key, want)
    if value != want:
        raise ValueError(f"config.json has {key}={value!r}, which llmjax's {hf.get('model_type')} "
                         f"cannot represent (it needs {want!r}); {fix}.")
