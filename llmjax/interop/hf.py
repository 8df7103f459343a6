"""Hugging Face interop: load and save `transformers` model directories, safetensors only.

    model, config = hf.load("path/to/hf_dir")        # llmjax NNX model + full llmjax config
    out = hf.logits(model, input_ids, attention_mask)  # float32 numpy, Hugging Face conventions
    hf.save(model, config, "path/to/out_dir")          # config.json + model.safetensors

Each family is a `Family`: how its `config.json` maps to our `model` section (both ways) and one
table of `Tensor` rows, each naming a Hugging Face tensor, the parameter(s) of ours it holds and
how the layout differs. Layers are stacked on our leading `layers` axis (the scanned layout);
`{i}` in a name is the layer index. Encoder (bert, roberta) and encoder-decoder (t5, bart)
families map onto models/encoder.py and models/encoder_decoder.py the same way; their stacks'
layers sit under encoder/layers and decoder/layers.

Safety: weights are read from .safetensors files only (parsed by `safetensors_io`, never
unpickled), so loading a downloaded model cannot run code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd

from llmjax import sharding
from llmjax.interop import safetensors_io
from llmjax.interop.table import Family, Tensor, _need, _require  # noqa: F401 (hf.Tensor, ...)
from llmjax.models import ModelConfig

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_CONVERT_HINT = (
    "convert it once, in an environment you trust, with: python -c \"import transformers as t; "
    "t.{arch}.from_pretrained('{d}').save_pretrained('{d}_safetensors')\" and load "
    "that directory")


# ------------------------------------------------------------------------------------------------
# GPT-2: learned positions, LayerNorm, tanh-GELU MLP, biases everywhere, Conv1D weights [in, out].

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gpt2_to_model(hf: dict) -> dict:
    if hf.get("activation_function", "gelu_new") not in _GELU_TANH:
        raise ValueError(f"config.json has activation_function={hf['activation_function']!r}; llmjax's "
                         f"GPT-2 uses the tanh approximation of GELU ({' / '.join(_GELU_TANH)}), so "
                         "this model cannot be converted exactly.")
    _need(hf, "scale_attn_weights", True, "only standard 1/sqrt(head_dim) attention is supported")
    _need(hf, "scale_attn_by_inverse_layer_idx", False, "only standard attention scaling is supported")
    _need(hf, "add_cross_attention", False, "only decoder-only GPT-2 is supported")
    d = hf["n_embd"]
    return dict(family="decoder", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
                num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
                mlp_dim=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"], position="learned",
                norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                activation="gelu", use_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _gpt2_to_hf(m: ModelConfig) -> dict:
    return dict(vocab_size=m.vocab_size, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
                n_inner=m.mlp_dim, n_positions=m.max_len, layer_norm_epsilon=m.norm_eps,
                activation_function="gelu_new", tie_word_embeddings=m.tie_embeddings,
                attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, scale_attn_weights=True,
                initializer_range=m.init_std)


def _gpt2_tensors(m: ModelConfig) -> list[Tensor]:
    d, n, hd, f = m.d_model, m.num_heads, m.head_dim, m.mlp_dim
    h = "h.{i}."
    rows = [
        Tensor("wte.weight", (m.vocab_size, d), (("token_embed", "embedding"),)),
        Tensor("wpe.weight", (m.max_len, d), (("pos_embed", "embedding"),)),
        Tensor(h + "ln_1.weight", (d,), (("layers", "attn_norm", "scale"),)),
        Tensor(h + "ln_1.bias", (d,), (("layers", "attn_norm", "bias"),)),
        Tensor(h + "attn.c_attn.weight", (d, 3 * n * hd),
               tuple(("layers", "attn", p, "kernel") for p in ("query", "key", "value")),
               "conv1d", (n * hd,) * 3),
        Tensor(h + "attn.c_attn.bias", (3 * n * hd,),
               tuple(("layers", "attn", p, "bias") for p in ("query", "key", "value")),
               "conv1d", (n * hd,) * 3),
        Tensor(h + "attn.c_proj.weight", (n * hd, d), (("layers", "attn", "out", "kernel"),), "conv1d"),
        Tensor(h + "attn.c_proj.bias", (d,), (("layers", "attn", "out", "bias"),)),
        Tensor(h + "ln_2.weight", (d,), (("layers", "mlp_norm", "scale"),)),
        Tensor(h + "ln_2.bias", (d,), (("layers", "mlp_norm", "bias"),)),
        Tensor(h + "mlp.c_fc.weight", (d, f), (("layers", "mlp", "wi", "kernel"),), "conv1d"),
        Tensor(h + "mlp.c_fc.bias", (f,), (("layers", "mlp", "wi", "bias"),)),
        Tensor(h + "mlp.c_proj.weight", (f, d), (("layers", "mlp", "wo", "kernel"),), "conv1d"),
        Tensor(h + "mlp.c_proj.bias", (d,), (("layers", "mlp", "wo", "bias"),)),
        Tensor("ln_f.weight", (d,), (("final_norm", "scale"),)),
        Tensor("ln_f.bias", (d,), (("final_norm", "bias"),)),
    ]
    if not m.tie_embeddings:
        rows.append(Tensor("lm_head.weight", (m.vocab_size, d), (("lm_head", "kernel"),), "linear"))
    return rows


GPT2 = Family(
    model_type="gpt2", architecture="GPT2LMHeadModel", to_model=_gpt2_to_model,
    to_hf_config=_gpt2_to_hf, tensors=_gpt2_tensors, prefixes=("transformer.", ""),
    ignored=(".attn.bias", ".attn.masked_bias"),
    represents=lambda m: m.family == "decoder" and (
        m.position, m.norm, m.activation, m.use_bias, m.num_kv_heads) == (
        "learned", "layernorm", "gelu", True, m.num_heads))


# ------------------------------------------------------------------------------------------------
# LLaMA: RoPE (half-split, as ours), RMSNorm, SwiGLU, grouped-query attention, nn.Linear [out, in].

def _rope_theta(hf: dict) -> float:
    # transformers 5 keeps RoPE settings in `rope_parameters`; 4.x had rope_theta + rope_scaling.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"config.json asks for RoPE scaling rope_type={kind!r}; llmjax implements "
                         "plain RoPE only, so convert a model without rope scaling.")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_to_model(hf: dict) -> dict:
    _need(hf, "hidden_act", "silu", "llmjax's LLaMA MLP is SwiGLU")
    bias = bool(hf.get("attention_bias", False))
    _need(hf, "mlp_bias", bias, "llmjax uses one use_bias flag for attention and MLP")
    n = hf["num_attention_heads"]
    return dict(family="decoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=n,
                num_kv_heads=hf.get("num_key_value_heads") or n,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // n,
                mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 2048),
                position="rope", rope_theta=_rope_theta(hf), norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu", use_bias=bias,
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _llama_to_hf(m: ModelConfig) -> dict:
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                head_dim=m.head_dim, intermediate_size=m.mlp_dim, max_position_embeddings=m.max_len,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                rms_norm_eps=m.norm_eps, hidden_act="silu", attention_bias=m.use_bias,
                mlp_bias=m.use_bias, tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0,
                initializer_range=m.init_std)


def _llama_tensors(m: ModelConfig) -> list[Tensor]:
    d, n, kv, hd, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    a, p = "layers.{i}.self_attn.", "layers.{i}.mlp."
    proj = [(a + "q_proj", n * hd, d, ("attn", "query")), (a + "k_proj", kv * hd, d, ("attn", "key")),
            (a + "v_proj", kv * hd, d, ("attn", "value")), (a + "o_proj", d, n * hd, ("attn", "out")),
            (p + "gate_proj", f, d, ("mlp", "wi_gate")), (p + "up_proj", f, d, ("mlp", "wi")),
            (p + "down_proj", d, f, ("mlp", "wo"))]
    rows = [Tensor("embed_tokens.weight", (m.vocab_size, d), (("token_embed", "embedding"),)),
            Tensor("layers.{i}.input_layernorm.weight", (d,), (("layers", "attn_norm", "scale"),)),
            Tensor("layers.{i}.post_attention_layernorm.weight", (d,),
                   (("layers", "mlp_norm", "scale"),))]
    for name, out, inp, ours in proj:
        rows.append(Tensor(name + ".weight", (out, inp), (("layers",) + ours + ("kernel",),), "linear"))
        if m.use_bias:
            rows.append(Tensor(name + ".bias", (out,), (("layers",) + ours + ("bias",),)))
    rows.append(Tensor("norm.weight", (d,), (("final_norm", "scale"),)))
    if not m.tie_embeddings:
        rows.append(Tensor("lm_head.weight", (m.vocab_size, d), (("lm_head", "kernel"),), "linear"))
    return rows


LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM", to_model=_llama_to_model,
    to_hf_config=_llama_to_hf, tensors=_llama_tensors, prefixes=("model.", ""),
    ignored=("rotary_emb.inv_freq",),
    represents=lambda m: m.family == "decoder" and (m.position, m.norm, m.activation) == (
        "rope", "rmsnorm", "swiglu"))

# BERT, RoBERTa, T5 and BART live in hf_encoders.py.
from llmjax.interop.hf_encoders import BART, BERT, ROBERTA, T5  # noqa: E402

FAMILIES = {f.model_type: f for f in (GPT2, LLAMA, BERT, ROBERTA, T5, BART)}


# ------------------------------------------------------------------------------------------------
# Reading a directory.

def read_config(path: str) -> tuple[Family, dict]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; give a Hugging Face model directory "
                                f"(with {CONFIG_FILE} and {WEIGHTS_FILE}).")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; give a Hugging Face model directory "
                                "as saved by save_pretrained().")
    with open(cfg_path) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        arch = (hf.get("architectures") or ["?"])[0]
        raise ValueError(f"{cfg_path} describes model_type={model_type!r} ({arch}), which llmjax "
                         f"cannot convert; supported model types: {sorted(FAMILIES)}.")
    return FAMILIES[model_type], hf


def _weight_files(path: str, architecture: str = "AutoModel") -> dict[str, safetensors_io.File]:
    """tensor name -> the open safetensors file holding it (one file, or shards with an index)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: safetensors_io.File(os.path.join(path, name))
                 for name in sorted(set(weight_map.values()))}
        return {tensor: files[name] for tensor, name in weight_map.items()}
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        f = safetensors_io.File(single)
        return {name: f for name in f.names()}
    pickles = [n for n in os.listdir(path) if n in _PICKLE_FILES or n.endswith((".bin", ".pt", ".pth"))]
    if pickles:
        raise ValueError(f"{path} holds only PyTorch pickle weights ({pickles[0]}), which llmjax never "
                         "loads because unpickling can run arbitrary code; "
                         + _CONVERT_HINT.format(d=path.rstrip("/"), arch=architecture) + ".")
    raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE} or {INDEX_FILE}; save the model with "
                            "save_pretrained() (safetensors is its default).")


def model_config(family: Family, hf: dict, names=frozenset()) -> ModelConfig:
    return ModelConfig(**family.from_files(family.to_model(hf), frozenset(names)))


def full_config(model_cfg: ModelConfig, family: Family | None = None) -> ml_collections.ConfigDict:
    """A complete llmjax config (base schema) around a translated model section; the encoder
    families also get their pretraining objective, so the trainer continues it."""
    from llmjax.config import base_config
    c = base_config()
    c.model.update(dataclasses.asdict(model_cfg))
    if family is not None and family.data:
        from llmjax.models.presets import NO_DECAY
        c.data.update(family.data)
        c.optim.no_decay = NO_DECAY
        c.sample.max_new_tokens = 0  # sampling is for decoders
    # Derived values stay 0, as config files write them, so `init_from`'s model check matches a
    # config file of the same shape.
    if model_cfg.num_kv_heads == model_cfg.num_heads:
        c.model.num_kv_heads = 0
    if model_cfg.head_dim * model_cfg.num_heads == model_cfg.d_model:
        c.model.head_dim = 0
    # Learned positions cap the training length; RoPE models keep the base default.
    c.seq_len = min(c.seq_len, model_cfg.max_len)
    return c


def _current_mesh():
    mesh = jax.sharding.get_mesh()
    return None if mesh.empty else mesh


def load(path: str | os.PathLike):
    """Reads a Hugging Face model directory -> (llmjax NNX model, full llmjax ConfigDict).

    The parameters are float32, stacked over `layers`, and, inside `sharding.use_mesh(mesh, rules)`,
    placed with that mesh's shardings (each device receives only its shards)."""
    from llmjax.steps import abstract_model
    path = os.fspath(path)
    family, hf = read_config(path)
    files = _weight_files(path, family.architecture)
    model_cfg = model_config(family, hf, files)
    graphdef, abstract = abstract_model(model_cfg)
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(abstract))

    def lookup(name: str) -> str:
        for prefix in family.prefixes:
            for candidate in (name,) + _legacy_names(name):
                if prefix + candidate in files:
                    return prefix + candidate
        raise ValueError(f"tensor {_hf_name(family, name)!r} is missing from {path}; the "
                         f"checkpoint does not match its {CONFIG_FILE} ({family.model_type}, "
                         f"tie_word_embeddings={model_cfg.tie_embeddings}) or is not a "
                         f"{family.architecture}: re-save the model with "
                         "save_pretrained() or fix config.json.")

    params: dict = {}
    used = set()
    for row in family.tensors(model_cfg):
        our_shapes = [_at(shapes, p) for p in row.ours]
        if row.layered:
            our_shapes = [s[1:] for s in our_shapes]
        per_layer = []
        for i in range((row.layers or model_cfg.num_layers) if row.layered else 1):
            name = lookup(row.hf.format(i=i))
            used.add(name)
            f = files[name]
            if f.shape(name) != row.shape:
                raise ValueError(f"tensor {name!r} in {f.path} has shape {list(f.shape(name))} but "
                                 f"{CONFIG_FILE} implies {list(row.shape)}; fix config.json or "
                                 "re-save the model so they agree.")
            if f.dtype(name) not in _FLOATS:
                raise ValueError(f"tensor {name!r} in {f.path} has dtype {f.dtype(name)} (quantized "
                                 "or not a float), which llmjax cannot hold as a parameter; "
                                 "dequantize it and re-save in float32, bfloat16 or float16.")
            value = np.asarray(f.get(name), np.float32)
            per_layer.append(row.to_ours(value, our_shapes))
        for j, p in enumerate(row.ours):
            value = np.stack([x[j] for x in per_layer]) if row.layered else per_layer[0][j]
            _put(params, p, value)
    extra = sorted(n for n in files if n not in used and not n.endswith(family.ignored)
                   and not (model_cfg.tie_embeddings and n.endswith(family.tied_head)))
    if extra:
        raise ValueError(f"tensor {extra[0]!r} in {path} (and {len(extra) - 1} more) has no place in "
                         f"llmjax's {family.model_type} model; the checkpoint is a variant llmjax "
                         "does not support, or its config.json is wrong.")
    params = _place(params, abstract)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract), full_config(model_cfg, family)


def _legacy_names(name: str) -> tuple[str, ...]:
    """Older files (BERT's original conversion) name LayerNorm parameters gamma and beta;
    transformers renames them on load, and so do we."""
    if "LayerNorm." in name and name.endswith((".weight", ".bias")):
        return (name.rsplit(".", 1)[0] + (".gamma" if name.endswith(".weight") else ".beta"),)
    return ()


def _hf_name(family: Family, name: str) -> str:
    """The full name in a *ForCausalLM file: the head sits outside the base model's prefix."""
    return name if name.startswith(family.heads) else family.prefixes[0] + name


def _at(tree: dict, path):
    for k in path:
        tree = tree[k]
    return tree


def _put(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _place(params: dict, abstract) -> dict:
    """numpy -> jax arrays, sharded on the current mesh (if any) by our logical-axis rules."""
    mesh = _current_mesh()
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    rules = tuple(core_spmd.get_logical_axis_rules()) or sharding.DEFAULT_RULES
    shardings = sharding.param_shardings(abstract, mesh, sharding.rules_from_config(rules))
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, shardings)


# ------------------------------------------------------------------------------------------------
# Running a model with Hugging Face's conventions.

@functools.lru_cache(maxsize=8)
def _forward(graphdef):
    @jax.jit
    def run(state, args, kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs)
    return run


def _ids_and_mask(ids, mask, what: str):
    """Hugging Face ids and mask (1 = real, right padding) -> our tokens, segment ids, positions."""
    ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"{what}attention_mask has shape {mask.shape} but {what}input_ids "
                         f"{ids.shape}; give one mask entry per token.")
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def logits(model, input_ids, attention_mask=None, decoder_input_ids=None,
           decoder_attention_mask=None, token_type_ids=None) -> np.ndarray:
    """float32 [batch, length, vocab] logits for `input_ids`, as `transformers` would compute them.

    attention_mask: 1 = real token, 0 = padding, padding on the right (Hugging Face's convention);
    it becomes our segment ids (0 = padding) and positions count real tokens. Logits at padded
    positions are not meaningful. Decoders give next-token logits; encoders (BERT, RoBERTa) MLM
    logits at every input position (token_type_ids default to 0, as Hugging Face's); encoder-
    decoders (T5, BART) need decoder_input_ids (the targets shifted right, given explicitly as
    Hugging Face's forward takes them) and return logits at decoder positions [batch, dec_len, vocab].
    """
    family = model.cfg.family
    if family != "encoder_decoder" and (decoder_input_ids is not None
                                        or decoder_attention_mask is not None):
        raise ValueError(f"decoder_input_ids are for encoder-decoder models; this is a "
                         f"{'decoder-only' if family == 'decoder' else 'encoder-only'} model, so "
                         "pass only input_ids and attention_mask.")
    if family != "encoder" and token_type_ids is not None:
        raise ValueError("token_type_ids are for encoder models (BERT, RoBERTa); leave them out.")
    args = _ids_and_mask(input_ids, attention_mask, "")
    kwargs = {}
    if family == "encoder_decoder":
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (the targets shifted "
                             "right after the decoder start token); pass them as Hugging Face's "
                             "forward takes them.")
        tokens, segments, positions = _ids_and_mask(decoder_input_ids, decoder_attention_mask,
                                                    "decoder_")
        if len(tokens) != len(args[0]):
            raise ValueError(f"decoder_input_ids has {len(tokens)} rows but input_ids {len(args[0])}"
                             "; give one decoder row per input row.")
        kwargs = dict(decoder_tokens=tokens, decoder_segment_ids=segments,
                      decoder_positions=positions)
    elif family == "encoder" and token_type_ids is not None:
        kwargs = dict(token_types=np.asarray(token_type_ids, np.int32))
    graphdef, state = nnx.split(model)
    return np.asarray(jax.device_get(_forward(graphdef)(state, args, kwargs)), np.float32)


# ------------------------------------------------------------------------------------------------
# Writing a directory.

def family_of(model_cfg: ModelConfig) -> Family:
    for family in FAMILIES.values():
        if family.represents(model_cfg):
            return family
    raise ValueError(f"no Hugging Face architecture matches this model (family={model_cfg.family}, "
                     f"position={model_cfg.position}, norm={model_cfg.norm}, activation="
                     f"{model_cfg.activation}, use_bias={model_cfg.use_bias}); export GPT-2-style "
                     "(learned, layernorm, gelu, bias) or LLaMA-style (rope, rmsnorm, swiglu) "
                     "decoders, BERT/RoBERTa encoders or T5/BART encoder-decoders.")


def _model_config(config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    section = config["model"] if "model" in config else config
    return ModelConfig.from_config(dict(section))


def save(model, config, out_dir: str | os.PathLike, *, token_ids: dict | None = None) -> str:
    """Writes `model` (an llmjax NNX model or its params dict) as a Hugging Face directory:
    config.json + model.safetensors (float32), loadable offline by transformers' Auto classes.

    `config` is the llmjax config (or its model section / ModelConfig); `token_ids` may give
    bos_token_id / eos_token_id / pad_token_id (/ decoder_start_token_id) for config.json."""
    out_dir = os.fspath(out_dir)
    model_cfg = _model_config(config)
    family = family_of(model_cfg)
    hf = dict(architectures=[family.architecture], model_type=family.model_type, dtype="float32",
              use_cache=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf.update(family.to_hf_config(model_cfg))  # raises before any weight is gathered
    params = model if isinstance(model, dict) else nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = {}
    for row in family.tensors(model_cfg):
        ours = [_at(params, p) for p in row.ours]
        for i in range((row.layers or model_cfg.num_layers) if row.layered else 1):
            ws = [w[i] for w in ours] if row.layered else ours
            tensors[_hf_name(family, row.hf.format(i=i))] = row.to_hf(ws)
    hf.update(token_ids or {})
    os.makedirs(out_dir, exist_ok=True)
    safetensors_io.write(os.path.join(out_dir, WEIGHTS_FILE), tensors, {"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return out_dir
