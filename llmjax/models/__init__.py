"""Model families and the typed view of a config's `model` section."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` section, frozen and typed (NNX keeps it in the static graph definition)."""

    family: str = "decoder"
    vocab_size: int = 50257
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 0  # 0: same as num_heads (multi-head attention)
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 3072
    max_len: int = 1024
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "gelu"  # gelu | swiglu
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # none | full | dots | dots_no_batch
    attention: str = "xla"  # xla (portable) | cudnn (fused kernel, NVIDIA GPUs, bf16/fp16)

    @classmethod
    def from_config(cls, section: Any) -> "ModelConfig":
        values = dict(section)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model section has unknown keys {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)

    def __post_init__(self):
        # Derived defaults are filled here so a ModelConfig built in code behaves like one from a file.
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not self.head_dim:
            if self.d_model % self.num_heads:
                raise ValueError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                                 f"{self.num_heads}; set model.head_dim explicitly or change one of them.")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        self.validate()

    def validate(self):
        from llmjax.models.decoder import REMAT_POLICIES
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads="
                             f"{self.num_kv_heads}; grouped-query attention needs whole groups.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r} is not one of "
                             f"{sorted(REMAT_POLICIES)}.")
        for key, choices in (("position", ("learned", "rope")), ("norm", ("layernorm", "rmsnorm")),
                             ("activation", ("gelu", "swiglu")),
                             ("dtype", ("float32", "bfloat16", "float16")),
                             ("param_dtype", ("float32", "bfloat16")),
                             ("attention", ("xla", "cudnn"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {choices}.")
        if self.attention == "cudnn" and (self.dropout_rate > 0 or self.dtype == "float32"):
            raise ValueError("model.attention='cudnn' needs model.dtype bfloat16 or float16 and "
                             "model.dropout_rate=0; use model.attention='xla' otherwise.")
        if self.family != "decoder":
            raise ValueError(f"model.family={self.family!r} is not supported; use 'decoder'.")


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.family == "decoder":
        from llmjax.models.decoder import Decoder
        return Decoder(cfg, rngs=rngs)
    raise ValueError(f"model.family={cfg.family!r} is not supported; use 'decoder'.")
