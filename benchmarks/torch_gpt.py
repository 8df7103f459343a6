"""The PyTorch reference that `python -m llmjax.benchmark --compare=torch` times llmjax against.

A plain GPT-2 train step, written to be the same workload as llmjax's GPT-2-style decoder
(llmjax/config.py GPT2_STYLE, llmjax/models/decoder.py, llmjax/optim.py):

- pre-LayerNorm blocks (eps 1e-5, with bias), learned positions, tanh-GELU MLP, biases on every
  projection, a final LayerNorm and the output head tied to the token embedding;
- causal multi-head attention through F.scaled_dot_product_attention (PyTorch picks its fused
  kernel); query, key and value come from one fused projection, which is the usual PyTorch
  layout and holds exactly llmjax's query/key/value parameters;
- llmjax's init: N(0, 0.02) weights, residual writers (attention out, MLP out) N(0, 0.02 /
  sqrt(2 layers)), positions N(0, 0.01), zero biases;
- mean token cross-entropy (float32 logits), gradients clipped to global norm 1.0, then AdamW
  (b1 0.9, b2 0.95, eps 1e-8, decoupled weight decay 0.1 on every weight except biases, LayerNorm
  scales and the embeddings) with llmjax's schedule (linear warmup, then cosine to 0.1 x peak).

It has the same parameter count as llmjax's model of the same shape, and `load_llmjax_params`
copies llmjax's parameters in, so tests/test_torch_reference.py checks that the first steps'
loss and gradient norm agree.

dtype float32 trains in float32; bfloat16 runs the forward under torch.autocast(bfloat16) with
float32 parameters and optimizer state, which is what llmjax's `--config.model.dtype=bfloat16`
does (bfloat16 compute, float32 parameters). On CUDA, float32 matmuls use TF32
(`torch.set_float32_matmul_precision('high')`), as XLA does by default on GPUs that have it;
pass `matmul_precision='highest'` for strict float32. mode='compile' wraps the forward and loss in
`torch.compile` (Inductor; the backward is compiled with it, the optimizer step stays eager, with
PyTorch's fused AdamW on CUDA and its multi-tensor one on CPU). The first compiled step takes
long (tens of seconds on a CPU); warm-up steps absorb it.

Threads: PyTorch's own default (`torch.get_num_threads()`, the physical cores) is kept; set
OMP_NUM_THREADS or --threads to change it. The batch is fixed synthetic random tokens (inputs and
targets), as llmjax.benchmark's, so neither side depends on a data pipeline.

    python benchmarks/torch_gpt.py --workload=tiny --mode=compile --dtype=bfloat16 --steps=10

prints a readable line and one JSON line (tokens/s, step time, compile time, peak memory).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# The two workloads docs/performance.md compares (GPT-2 style, AdamW).
WORKLOADS = {
    "tiny": dict(d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, vocab_size=8192,
                 seq_len=256, batch_size=8),
    "gpt2_small": dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, vocab_size=50257,
                       seq_len=1024, batch_size=4),
}
MODES = ("eager", "compile")
DTYPES = ("float32", "bfloat16")


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.qkv = nn.Linear(d_model, 3 * d_model)  # query, key, value stacked along the output
        self.out = nn.Linear(d_model, d_model)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.wi = nn.Linear(d_model, mlp_dim)
        self.wo = nn.Linear(mlp_dim, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
        # [b, t, heads * head_dim] -> [b, heads, t, head_dim]; scaled by head_dim ** -0.5.
        q, k, v = (z.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)
                   for z in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(h.transpose(1, 2).reshape(b, t, d))
        return x + self.wo(F.gelu(self.wi(self.mlp_norm(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, d_model: int, num_layers: int, num_heads: int, mlp_dim: int,
                 vocab_size: int, max_len: int, eps: float = 1e-5, init_std: float = 0.02):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}.")
        self.token_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(Block(d_model, num_heads, mlp_dim, eps)
                                    for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model, eps=eps)
        out_std = init_std / math.sqrt(2 * num_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                elif name.startswith("pos_embed"):
                    p.normal_(0.0, init_std / 2)
                elif name.endswith(("out.weight", "wo.weight")):
                    p.normal_(0.0, out_std)
                else:
                    p.normal_(0.0, init_std)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embed(tokens) + self.pos_embed(positions)
        for layer in self.layers:
            x = layer(x)
        # The tied head: logits against the token table.
        return F.linear(self.final_norm(x), self.token_embed.weight)


def _loss(model, inputs, targets, autocast_dtype):
    with torch.autocast(inputs.device.type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def lr_at(count: int, peak: float, warmup_steps: int, total_steps: int,
          min_lr_ratio: float) -> float:
    """llmjax's default schedule (optim.make_schedule, 'cosine'): linear warmup from 0, then
    cosine decay to min_lr_ratio x peak at total_steps; `count` is the number of updates so far."""
    if count < warmup_steps:
        return peak * count / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    frac = min(count - warmup_steps, decay) / decay
    return peak * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class TorchGPT:
    """One GPT-2 model, its AdamW and a fixed synthetic batch; `step()` is one train step."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, mlp_dim: int,
                 vocab_size: int, seq_len: int, batch_size: int, *, mode: str = "eager",
                 dtype: str = "float32", max_len: int | None = None, device: str | None = None,
                 learning_rate: float = 6e-4, warmup_steps: int = 0, total_steps: int = 100_000,
                 min_lr_ratio: float = 0.1, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float = 0.1, grad_clip_norm: float = 1.0, norm_eps: float = 1e-5,
                 init_std: float = 0.02, matmul_precision: str = "high", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}.")
        max_len = max_len or seq_len
        if seq_len > max_len:
            raise ValueError(f"seq_len={seq_len} exceeds max_len={max_len}.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision(matmul_precision)
        self.mode, self.dtype = mode, dtype
        self.batch_size, self.seq_len = batch_size, seq_len
        self.schedule = dict(peak=learning_rate, warmup_steps=warmup_steps,
                             total_steps=total_steps, min_lr_ratio=min_lr_ratio)
        self.grad_clip_norm = grad_clip_norm
        torch.manual_seed(seed)
        self.model = GPT(d_model, num_layers, num_heads, mlp_dim, vocab_size, max_len,
                         eps=norm_eps, init_std=init_std).to(self.device)
        # llmjax's no_decay regex (bias|scale|embedding): only the projection weights decay.
        decay = [p for n, p in self.model.named_parameters()
                 if n.endswith("weight") and "norm" not in n and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters()
                    if not (n.endswith("weight") and "norm" not in n and "embed" not in n)]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=lr_at(0, **self.schedule), betas=(b1, b2), eps=eps, fused=fused or None,
            foreach=None if fused else True)
        self.updates = 0
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
        loss = lambda inputs, targets: _loss(self.model, inputs, targets, autocast)
        self.loss_fn = torch.compile(loss) if mode == "compile" else loss
        g = torch.Generator().manual_seed(seed)
        self.set_batch(torch.randint(0, vocab_size, (batch_size, seq_len), generator=g),
                       torch.randint(0, vocab_size, (batch_size, seq_len), generator=g))

    def set_batch(self, inputs, targets):
        """Use these int [batch, seq_len] tokens (numpy or torch) from now on."""
        self.inputs = torch.as_tensor(inputs, dtype=torch.long).to(self.device)
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self):
        """One train step; returns (loss, pre-clip gradient norm) as 0-d tensors (no sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.updates, **self.schedule)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.inputs, self.targets)
        loss.backward()
        if self.grad_clip_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters()])
        self.optimizer.step()
        self.updates += 1
        return loss.detach(), grad_norm.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_steps(self, n: int) -> list[float]:
        """Seconds of each of `n` steps, each waited for."""
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - t)
        return times

    def peak_memory_bytes(self) -> int:
        """Peak device memory (CUDA) or the process's peak RSS (CPU)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    @torch.no_grad()
    def load_llmjax_params(self, params: dict):
        """Copy llmjax's decoder parameters (the nested dict of `steps.build(...).init()`'s
        "params", as numpy arrays; layers stacked along the first axis) into this model."""
        import numpy as np

        t = lambda x: torch.from_numpy(np.array(x, np.float32))  # a copy
        m, L = self.model, params["layers"]
        m.token_embed.weight.copy_(t(params["token_embed"]["embedding"]))
        m.pos_embed.weight.copy_(t(params["pos_embed"]["embedding"]))
        m.final_norm.weight.copy_(t(params["final_norm"]["scale"]))
        m.final_norm.bias.copy_(t(params["final_norm"]["bias"]))
        for i, block in enumerate(m.layers):
            at = lambda *path: t(_get(L, path)[i])
            for norm, name in ((block.attn_norm, "attn_norm"), (block.mlp_norm, "mlp_norm")):
                norm.weight.copy_(at(name, "scale"))
                norm.bias.copy_(at(name, "bias"))
            # llmjax kernels are [in, ...out]; torch Linear weights are [out, in].
            qkv = [at("attn", p, "kernel").flatten(1) for p in ("query", "key", "value")]
            block.qkv.weight.copy_(torch.cat(qkv, 1).T)
            block.qkv.bias.copy_(torch.cat([at("attn", p, "bias").flatten()
                                            for p in ("query", "key", "value")]))
            block.out.weight.copy_(at("attn", "out", "kernel").flatten(0, 1).T)
            block.out.bias.copy_(at("attn", "out", "bias"))
            block.wi.weight.copy_(at("mlp", "wi", "kernel").T)
            block.wi.bias.copy_(at("mlp", "wi", "bias"))
            block.wo.weight.copy_(at("mlp", "wo", "kernel").T)
            block.wo.bias.copy_(at("mlp", "wo", "bias"))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--mode", choices=MODES, default="eager")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation)")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the workload's")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--matmul_precision", default="high", choices=("highest", "high", "medium"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(WORKLOADS[args.workload])
    if args.batch_size:
        shape["batch_size"] = args.batch_size
    engine = TorchGPT(**shape, mode=args.mode, dtype=args.dtype, device=args.device,
                      matmul_precision=args.matmul_precision)
    t0 = time.perf_counter()
    engine.time_steps(max(args.warmup, 1))
    warmup_s = time.perf_counter() - t0
    times = sorted(engine.time_steps(args.steps))
    step_s = times[len(times) // 2]
    tokens = shape["batch_size"] * shape["seq_len"]
    r = {"engine": f"torch {args.mode}", "torch": torch.__version__, "device": str(engine.device),
         "threads": torch.get_num_threads(), "workload": args.workload,
         "params": engine.num_params(),
         "batch_size": shape["batch_size"], "seq_len": shape["seq_len"], "dtype": args.dtype,
         "warmup_s": round(warmup_s, 2), "step_time_ms": round(1e3 * step_s, 2),
         "step_time_ms_min": round(1e3 * times[0], 2),
         "tokens_per_sec": round(tokens / step_s, 1), "peak_rss_bytes": peak_rss_bytes(),
         "peak_memory_bytes": engine.peak_memory_bytes()}
    print(f"torch {torch.__version__} {args.mode} on {engine.device} ({r['threads']} threads): "
          f"{args.workload} {r['params']:,} params, batch {shape['batch_size']}x{shape['seq_len']} "
          f"{args.dtype}\n  warm-up {warmup_s:.1f} s | step {1e3 * step_s:.1f} ms | "
          f"{r['tokens_per_sec']:,.0f} tokens/s | peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
