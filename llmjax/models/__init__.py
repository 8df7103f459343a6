"""Model families and the typed view of a config's `model` section."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

FAMILIES = ("decoder", "encoder", "encoder_decoder", "multimodal")
ATTENTIONS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` section, frozen and typed (NNX keeps it in the static graph definition)."""

    family: str = "decoder"  # decoder | encoder (BERT, RoBERTa) | encoder_decoder (T5, BART)
    vocab_size: int = 50257  # rows of the token embedding (at least the tokenizer's pieces)
    d_model: int = 768  # width of the residual stream
    num_layers: int = 12  # transformer blocks (encoder_decoder: the encoder's)
    num_heads: int = 12  # attention (query) heads
    num_kv_heads: int = 0  # 0: same as num_heads (multi-head attention)
    head_dim: int = 0  # 0: d_model // num_heads
    mlp_dim: int = 3072  # hidden width of the MLP
    max_len: int = 1024  # longest sequence (rows of learned position embeddings)
    position: str = "learned"  # learned | rope | relative (T5 buckets)
    rope_theta: float = 10000.0  # position='rope': base of the rotary frequencies
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon of the norm's variance
    activation: str = "gelu"  # gelu (tanh) | swiglu | gelu_exact (erf) | relu | gated_gelu
    use_bias: bool = True  # biases in the dense layers and norms
    tie_embeddings: bool = True  # the output head reuses the token embedding
    dropout_rate: float = 0.0  # dropout rate while training (0: none)
    init_std: float = 0.02  # standard deviation of the normal initialiser
    # normal: every weight N(0, init_std), residual writers / sqrt(2 layers) (GPT-2, BERT);
    # t5: T5X's fan-in variance scaling, embeddings N(0, 1) (encoder_decoder only; see layers.init_std)
    init: str = "normal"
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    param_dtype: str = "float32"  # dtype the parameters are stored in
    # What the backward pass keeps (decoder.REMAT_POLICIES), from most memory to least: none |
    # minimal | save_dot_except_mlpwi | save_dot_except_mlp | save_qkv_proj | save_out_proj |
    # full; also JAX's dots | dots_no_batch
    remat_policy: str = "none"
    # auto: resolved per platform by resolve_attention (splash on TPU, cudnn on GPU where it
    # applies, else xla) | xla (portable) | cudnn (fused kernel, NVIDIA GPUs, bf16/fp16) |
    # splash (Pallas TPU flash kernel, decoder; Pallas interpret mode elsewhere, for tests)
    attention: str = "auto"
    # Decoders under attention 'xla': causal self-attention takes the queries this many rows at a
    # time, each block reading only the keys up to its last row, which skips the masked upper
    # triangle (up to half the attention work); 0: the whole [length, length] logits at once
    causal_block: int = 128
    # Encoder and encoder-decoder families (models/encoder.py, models/encoder_decoder.py).

    num_decoder_layers: int = 0  # encoder_decoder: 0 = same as num_layers (the encoder's)
    relative_attention_num_buckets: int = 32  # position='relative' (T5): buckets per stack
    relative_attention_max_distance: int = 128  # position='relative': distance of the last bucket
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings; BERT 2, RoBERTa 1, else 0
    position_offset: int = 0  # learned positions start at this row (RoBERTa, BART: 2)
    post_norm: bool = False  # post-LN blocks x = norm(x + f(x)) and a norm on the embeddings
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model)
    scale_attention: bool = True  # queries * head_dim**-0.5 (T5 folds it into the init: False)
    pooler: bool = False  # encoder: BERT's tanh pooler over the first token
    num_labels: int = 0  # encoder: > 0 adds a sequence-classification head (and drops the MLM head)
    final_logits_bias: bool = False  # encoder_decoder: BART's bias on the output logits
    scale_decoder_output: bool = False  # encoder_decoder, tied head: x * d_model**-0.5 (T5)
    # Multimodal family (models/vision.py, models/multimodal.py): a ViT encodes each image into
    # (image_size / patch_size)**2 tokens that prefix the text (PaliGemma's prefix-LM).
    image_size: int = 224  # images are image_size x image_size x 3, in [-1, 1]
    patch_size: int = 16  # ViT patches are patch_size x patch_size pixels (one token each)
    vision_layers: int = 12  # ViT blocks (pre-LN, scanned like the text stack)
    vision_d_model: int = 768  # ViT width (projected to d_model for the decoder)
    vision_heads: int = 12  # ViT attention heads
    vision_mlp_dim: int = 3072  # ViT MLP hidden width
    vision_position: str = "learned"  # ViT patch positions: learned | sincos2d (fixed 2-D sin-cos)
    max_images: int = 1  # image slots per packed row (batch key `images` [B, max_images, H, W, 3])

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
        for key, choices in (("position", ("learned", "rope", "relative")),
                             ("norm", ("layernorm", "rmsnorm")),
                             ("activation", ("gelu", "swiglu", "gelu_exact", "relu", "gated_gelu")),
                             ("dtype", ("float32", "bfloat16", "float16")),
                             ("param_dtype", ("float32", "bfloat16")),
                             ("attention", ATTENTIONS),
                             ("init", ("normal", "t5")),
                             ("vision_position", ("learned", "sincos2d"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {choices}.")
        if self.attention == "cudnn" and (self.dropout_rate > 0 or self.dtype == "float32"):
            raise ValueError("model.attention='cudnn' needs model.dtype bfloat16 or float16 and "
                             "model.dropout_rate=0; use model.attention='xla' otherwise.")
        if self.causal_block < 0:
            raise ValueError(f"model.causal_block={self.causal_block} must be >= 0 (0: whole "
                             "sequences at once).")
        if self.attention == "splash" and self.dropout_rate > 0:
            from llmjax.models.splash import unsupported_reason
            raise ValueError(unsupported_reason(dropout_rate=self.dropout_rate))
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not one of {FAMILIES}.")
        self._validate_family()

    def _validate_family(self):
        """A key that only another family uses is a mistake (e.g. a T5 key on a decoder)."""
        fam = self.family
        own = {  # key: the families that may set it away from its default
            "num_decoder_layers": ("encoder_decoder",), "type_vocab_size": ("encoder",),
            "pooler": ("encoder",), "num_labels": ("encoder",), "final_logits_bias": ("encoder_decoder",),
            "scale_decoder_output": ("encoder_decoder",), "init": ("encoder_decoder",),
            "post_norm": ("encoder", "encoder_decoder"), "position_offset": ("encoder", "encoder_decoder"),
            "scale_attention": ("encoder", "encoder_decoder"),
            "causal_block": ("decoder", "multimodal"),
            "scale_embeddings": ("encoder", "encoder_decoder"),
            **{k: ("multimodal",) for k in ("image_size", "patch_size", "vision_layers",
                                            "vision_d_model", "vision_heads", "vision_mlp_dim",
                                            "vision_position", "max_images")},
        }
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, families in own.items():
            if fam not in families and getattr(self, key) != defaults[key]:
                raise ValueError(f"model.{key}={getattr(self, key)!r} belongs to the {' and '.join(families)} "
                                 f"famil{'ies' if len(families) > 1 else 'y'}, not model.family={fam!r}; "
                                 f"remove it or set model.family.")
        if fam == "multimodal":
            self._validate_multimodal()
        if fam in ("decoder", "multimodal"):
            if self.position == "relative" or self.activation not in ("gelu", "swiglu"):
                raise ValueError(f"model.family={fam!r} supports position learned|rope and activation "
                                 f"gelu|swiglu (got {self.position!r}, {self.activation!r}); use "
                                 f"family 'encoder' or 'encoder_decoder' for the others.")
            return
        if self.num_labels < 0:
            raise ValueError(f"model.num_labels={self.num_labels} must be >= 0 (0: no "
                             "classification head).")
        if self.position == "rope":
            raise ValueError(f"model.family={fam!r} takes position 'learned' or 'relative', not 'rope'.")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"model.family={fam!r} uses multi-head attention: set model.num_kv_heads "
                             f"to 0 or {self.num_heads}.")
        if self.attention not in ("xla", "auto"):
            raise ValueError(f"model.family={fam!r} supports model.attention='xla' (or 'auto') only; "
                             f"{self.attention!r} is for the causal decoder.")
        if self.post_norm and self.norm != "layernorm":
            raise ValueError("model.post_norm=True (BERT, BART) needs model.norm='layernorm'.")
        if self.position == "relative" and self.relative_attention_num_buckets < 2:
            raise ValueError("model.relative_attention_num_buckets must be at least 2.")

    def _validate_multimodal(self):
        if self.image_size % self.patch_size or self.patch_size < 1:
            raise ValueError(f"model.image_size={self.image_size} is not a multiple of "
                             f"model.patch_size={self.patch_size}; ViT patches must tile the image.")
        if self.vision_d_model % self.vision_heads:
            raise ValueError(f"model.vision_d_model={self.vision_d_model} is not divisible by "
                             f"model.vision_heads={self.vision_heads}.")
        if self.vision_position == "sincos2d" and self.vision_d_model % 4:
            raise ValueError(f"model.vision_position='sincos2d' needs model.vision_d_model "
                             f"divisible by 4 (got {self.vision_d_model}).")
        if min(self.vision_layers, self.max_images) < 1:
            raise ValueError("model.vision_layers and model.max_images must be at least 1 for "
                             "model.family='multimodal'.")
        if self.attention not in ("xla", "auto"):
            raise ValueError(f"model.family='multimodal' supports model.attention='xla' (or "
                             f"'auto') only: its prefix-LM mask is not causal ({self.attention!r}).")
        if self.position == "learned" and self.max_len < self.image_tokens + 1:
            raise ValueError(f"model.max_len={self.max_len} leaves no room for text after "
                             f"{self.image_tokens} image tokens (max_images x patches); raise it.")

    @property
    def num_patches(self) -> int:
        """ViT tokens per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        """Image tokens of a row: every slot's patches (the prefix of the decoder's sequence)."""
        return self.max_images * self.num_patches if self.family == "multimodal" else 0

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers


def resolve_attention(cfg: ModelConfig, platform: str, seq_len: int | None = None) -> ModelConfig:
    """`cfg` with model.attention='auto' replaced by the implementation for `platform` (the
    platform of the devices the model will run on, e.g. `mesh.devices.flat[0].platform`: a TPU
    compiled ahead of time from a CPU host is 'tpu'). A decoder without dropout gets 'splash' on
    TPU (when `seq_len`, if given, is a multiple of 128) and 'cudnn' on NVIDIA GPUs in bfloat16 or
    float16 with a head_dim cuDNN's flash kernel takes (a multiple of 8, at most 128); everything
    else 'xla'. An explicit choice is returned as it is (validated when the config was made; an
    explicit 'splash' also against `seq_len`)."""
    if cfg.attention == "splash" and seq_len is not None:
        from llmjax.models.splash import unsupported_reason
        reason = unsupported_reason(seq_len)
        if reason:
            raise ValueError(reason)
    if cfg.attention != "auto":
        return cfg
    choice = "xla"
    if cfg.family == "decoder" and cfg.dropout_rate == 0:
        if platform == "tpu" and (seq_len is None or seq_len % 128 == 0):
            choice = "splash"
        elif (platform in ("gpu", "cuda") and cfg.dtype in ("bfloat16", "float16")
              and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128):
            choice = "cudnn"
    return dataclasses.replace(cfg, attention=choice)


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.family == "decoder":
        from llmjax.models.decoder import Decoder
        return Decoder(cfg, rngs=rngs)
    if cfg.family == "encoder":
        from llmjax.models.encoder import Encoder
        return Encoder(cfg, rngs=rngs)
    if cfg.family == "encoder_decoder":
        from llmjax.models.encoder_decoder import EncoderDecoder
        return EncoderDecoder(cfg, rngs=rngs)
    if cfg.family == "multimodal":
        from llmjax.models.multimodal import MultimodalDecoder
        return MultimodalDecoder(cfg, rngs=rngs)
    raise ValueError(f"model.family={cfg.family!r} is not one of {FAMILIES}.")
