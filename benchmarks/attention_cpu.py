"""Attention forward + backward on this machine: torch's sdpa against eager (matmul + softmax).

    python benchmarks/attention_cpu.py
    python benchmarks/attention_cpu.py --heads 9 --head-dim 64 --repeats 7

Why: `TrainConfig.attention = "auto"` picks eager attention on CPU for short sequences
(training.runtime.EAGER_ATTENTION_MAX_LENGTH). This prints, for a range of sequence lengths, the
best-of-N time of one causal, padded attention call plus its backward under bf16 autocast (fp32
where the CPU has no bf16 matmuls) for both kernels, the ratio, and the memory eager keeps for
the backward (its (B, heads, T, T) probabilities), so the threshold can be re-checked on other
hardware. The shapes follow SmolLM2-135M (9 query heads of 64); the (8, 12, 112) row is the
completion pass of a shared-prompt DPO batch (training.logprobs.shared_prompt_pair_logps).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(4, 100, 100), (8, 12, 112), (4, 256, 256), (4, 512, 512), (4, 1024, 1024)]


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """What Hugging Face's eager attention computes: softmax in fp32, matmuls in q's dtype."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def causal_padded_mask(batch: int, queries: int, keys: int) -> torch.Tensor:
    """Additive mask: the queries are the last `queries` positions; row 0 has 10 left pads."""
    mask = torch.zeros(batch, 1, queries, keys)
    mask[..., keys - queries:] = torch.triu(torch.full((queries, queries), float("-inf")), 1)
    mask[0, ..., :10] = float("-inf")
    return mask


def time_call(kind: str, batch: int, heads: int, queries: int, keys: int, head_dim: int,
              dtype: torch.dtype, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=generator, requires_grad=True)
               for n in (queries, keys, keys))
    mask = causal_padded_mask(batch, queries, keys)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if kind == "eager":
                out = eager_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)
                                                     if dtype == torch.float32 else
                                                     mask.to(dtype))
        out.float().sum().backward()
        best = min(best, time.perf_counter() - started)
        q.grad = k.grad = v.grad = None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if bf16 else 'fp32 (no bf16 matmuls on this CPU)'}, "
          f"{args.heads} heads of {args.head_dim}, best of {args.repeats}")
    print(f"{'batch':>5} {'queries':>7} {'keys':>5} {'sdpa ms':>8} {'eager ms':>9} "
          f"{'sdpa/eager':>10} {'eager probs MB':>14}")
    for batch, queries, keys in SHAPES:
        sdpa = time_call("sdpa", batch, args.heads, queries, keys, args.head_dim, dtype,
                         args.repeats)
        eager = time_call("eager", batch, args.heads, queries, keys, args.head_dim, dtype,
                          args.repeats)
        # fp32 softmax output + its cast, kept for the backward, per layer
        probs_mb = batch * args.heads * queries * keys * (4 + dtype.itemsize) / 2**20
        print(f"{batch:5d} {queries:7d} {keys:5d} {1e3 * sdpa:8.1f} {1e3 * eager:9.1f} "
              f"{sdpa / eager:10.2f} {probs_mb:14.1f}")


if __name__ == "__main__":
    main()
