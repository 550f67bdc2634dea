"""A batched decoder for Llama-family causal LMs: the forward pass the generation engine
(training/generation.py) runs for prefill and decode, over a slot KV cache.

Why not `model.generate` or transformers' continuous batching: on a 2-core CPU the first
re-pads and re-allocates its cache per call and cannot let requests join a running batch, and
transformers 5.25's `generate_batch` ran at 33 tok/s at batch 32 on SmolLM2 (fp32, 64 tokens;
the old HF loop: 59), with one temperature and no seed per request (BENCHMARKS.md, "Generation
engine"). This module keeps the model's own parameters (the q/k/v and gate/up projections are
fused into one matrix each, and the model's parameters become views of it, so weight sync by
Hugging Face names keeps working) and runs the forward pass as a few plain tensor ops per layer:

- the KV cache is a static tensor per layer, one row ("slot") per running sequence; a row's
  tokens sit at cache positions 0..n-1, so a decode step for B sequences reads the first B slots
  as a view, without gathering or padding them;
- queries of different rows may start at different positions (chunked prefill, shared-prefix
  prefill and decode are the same call), and `forward_segments` runs a decode step and a
  prefill in one pass over the weights;
- grouped-query attention without repeating K/V (PyTorch's fused SDPA kernel in bf16/fp16).

Supported: model types whose layers have the Llama layout (`llama`, `mistral`, `qwen2`) with a
SiLU MLP; `unsupported_reason(model)` says why another model is not.

    python -m pytest -q tests/training/test_decoder.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
KV_BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------------
# The math (pure functions on tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): x / sqrt(mean(x^2) + eps) * g, computed in fp32
    and cast back before the gain, as Llama's reference implementation does."""
    import torch

    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 if x.dtype == torch.float32 else x32.to(x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34) in the half-split layout
    Llama checkpoints use: the pairs are (x_i, x_{i+d/2}).

    Args:
        x: (B, T, heads, d).
        cos, sin: (B, T, d), from the model's rotary module for each query's position.
    """
    import torch

    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


def causal_bias(query_positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask of `grouped_attention`: 0 where key position <= the query's,
    -inf elsewhere, shaped (B, 1, T, 1, L) to broadcast over K/V heads and query groups.
    Computed once per forward pass and shared by every layer."""
    import torch

    key_positions = torch.arange(length, device=query_positions.device)
    hidden = key_positions.view(1, 1, length) > query_positions.unsqueeze(-1)  # (B, T, L)
    bias = torch.zeros(hidden.shape, dtype=dtype, device=query_positions.device)
    bias.masked_fill_(hidden, float("-inf"))
    return bias.unsqueeze(1).unsqueeze(3)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      query_positions: torch.Tensor, scale: float,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal scaled dot-product attention (Vaswani et al. 2017, eq. 1) with grouped-query
    heads (Ainslie et al. 2023): query head h reads key/value head h // (heads / kv_heads).

    Args:
        q: (B, T, heads, d) queries at positions `query_positions`.
        keys, values: (B, kv_heads, L, d) cache rows; key j of a row is the token at position j.
        query_positions: (B, T) absolute position of each query; a query attends to the keys
            at positions <= its own (so cache entries beyond a row's length, stale or padding,
            are never read).
        scale: the softmax temperature, usually d ** -0.5.
        bias: `causal_bias(query_positions, L)`, when the caller has it already.
    Returns:
        (B, T, heads * d).
    """
    import torch

    batch, steps, heads, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    # (B, T, kv, g, d) -> (B, kv, T*g, d): the g query heads of a K/V head share its matmul.
    grouped = q.view(batch, steps, kv_heads, group, dim).permute(0, 2, 1, 3, 4)
    grouped = grouped.reshape(batch, kv_heads, steps * group, dim)
    scores = torch.matmul(grouped * scale, keys.transpose(-1, -2))  # (B, kv, T*g, L)
    if bias is None:
        bias = causal_bias(query_positions, length, torch.float32)
    scores = scores.float().view(batch, kv_heads, steps, group, length) + bias
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, steps * group, length), values)
    out = out.view(batch, kv_heads, steps, group, dim).permute(0, 2, 1, 3, 4)
    return out.reshape(batch, steps, heads * dim)


def fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """`grouped_attention` through PyTorch's fused scaled_dot_product_attention kernel.

    Args:
        q, keys, values, scale: as in `grouped_attention`.
        allowed: (B, 1, T, L) bool, True where query t of row b may read key position l
            (`causal_bias(...) == 0`).
    Returns:
        (B, T, heads * d).
    """
    from torch.nn import functional

    batch, steps, heads, dim = q.shape
    out = functional.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                                  attn_mask=allowed, scale=scale,
                                                  enable_gqa=True)
    return out.transpose(1, 2).reshape(batch, steps, heads * dim)


# ---------------------------------------------------------------------------------------------
# The cache


class SlotCache:
    """Keys and values of every layer, (layers, slots, kv_heads, capacity, head_dim) each,
    allocated on demand and grown (never shrunk) to the slots and positions asked for."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        import torch

        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.keys = torch.empty((layers, 0, kv_heads, 0, head_dim), dtype=dtype, device=device)
        self.values = self.keys.clone()

    @property
    def slots(self) -> int:
        return int(self.keys.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[3])

    def bytes_per_position(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.keys.element_size()

    def ensure(self, slots: int, capacity: int, *, keep_slots: int,
               max_positions: int | None = None) -> None:
        """At least `slots` rows of at least `capacity` positions; the first `keep_slots` rows
        keep their contents (the others are scratch). With `max_positions` (slots x capacity,
        the KV budget), a cache grown for an earlier, longer request is cut back to `capacity`
        rather than keeping its length for the new slots too."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        # Positions grow to a multiple of 64, so a slightly longer request does not copy the
        # whole cache every time (the engine grows the slots in doublings).
        new_capacity = max(self.capacity, -(-capacity // 64) * 64)
        new_slots = max(self.slots, slots)
        if max_positions is not None and new_slots * new_capacity > max_positions:
            new_slots, new_capacity = slots, -(-capacity // 64) * 64
        self._reallocate(new_slots, new_capacity, keep_slots)

    def _reallocate(self, slots: int, capacity: int, keep_slots: int) -> None:
        import torch

        shape = (self.layers, slots, self.kv_heads, capacity, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        kept = min(self.capacity, capacity)
        if keep_slots and kept:
            keys[:, :keep_slots, :, :kept] = self.keys[:, :keep_slots, :, :kept]
            values[:, :keep_slots, :, :kept] = self.values[:, :keep_slots, :, :kept]
        self.keys, self.values = keys, values

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`."""
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the first `length` positions of one slot: (layers, kv, length, d) twice."""
        return (self.keys[:, slot, :, :length].clone(), self.values[:, slot, :, :length].clone())

    def write(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put what `read` returned at the start of `slot`."""
        length = keys.shape[2]
        self.keys[:, slot, :, :length] = keys
        self.values[:, slot, :, :length] = values


# ---------------------------------------------------------------------------------------------
# The model


class Segment(NamedTuple):
    """Rows of a forward pass that share a shape: B rows of T tokens at `positions` (B, T),
    row b in cache slot first_slot + b."""

    tokens: torch.Tensor
    positions: torch.Tensor
    first_slot: int = 0


class _SegmentPlan(NamedTuple):
    """What `forward_segments` works out once per segment for every layer."""

    rows_in_pass: slice  # the segment's rows of the flattened (1, N, hidden) pass
    batch: int
    steps: int
    length: int  # cache positions attention reads
    slots: slice  # the segment's cache slots
    rows: torch.Tensor  # (B, 1) row indices for the cache writes
    positions: torch.Tensor
    bias: torch.Tensor  # causal_bias of the segment
    allowed: torch.Tensor | None  # the same as a bool mask, for fused attention


def unsupported_reason(model: Any) -> str | None:
    """None if `FusedDecoder` can run this model, else why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(the Llama layer layout this decoder implements)")
    activation = getattr(config, "hidden_act", "silu")
    if activation != "silu":
        return f"hidden_act {activation!r} is not silu"
    window = getattr(config, "sliding_window", None)
    if window and (model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention is not implemented"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(model, "lm_head", None) is None:
        return "the model has no model.layers / lm_head"
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attention is None or mlp is None or not all(hasattr(attention, n) for n in names):
            return "a layer without the q/k/v/o attention projections"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without the gate/up/down MLP projections"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return "per-head q/k norms are not implemented"
    return None


def _fuse(linears: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear layers of the same input, whose parameters
    become views into it: a copy_ into a module's weight updates the fused matrix."""
    import torch

    weight = torch.cat([lin.weight.detach() for lin in linears]).contiguous()
    has_bias = any(lin.bias is not None for lin in linears)
    bias = torch.cat([lin.bias.detach() if lin.bias is not None else
                      torch.zeros(lin.weight.shape[0], dtype=weight.dtype, device=weight.device)
                      for lin in linears]).contiguous() if has_bias else None
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start:start + rows]
        if lin.bias is not None:
            assert bias is not None
            lin.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias


class PackedLinear:
    """y = x W^T + b, with W reordered once into oneDNN's blocked layout on CPUs.

    Why: a decode step multiplies a few dozen rows by every weight matrix once, so the GEMM's
    own per-call repacking of W is a large share of its time. Prepacked, the layer matmuls of
    SmolLM2 at batch 32 took 35 ms instead of 56 ms (30 layers' gate/up projections, fp32, 2
    cores; BENCHMARKS.md); in bf16 on AMX, 130 us instead of 189 us per gate/up matmul. fp32
    and bf16 weights are packed. `refresh()` repacks after the weights changed (weight sync);
    without oneDNN, on GPUs, or if the packed result disagrees with F.linear, it is plain
    F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool,
                 batch_hint: int):
        self.weight, self.bias = weight, bias
        self.batch_hint = batch_hint
        self.packed: torch.Tensor | None = None
        self.pack = pack
        self.refresh()

    def refresh(self) -> None:
        import torch
        from torch.nn import functional

        self.packed = None
        packable = (torch.float32, torch.bfloat16)
        if not self.pack or self.weight.device.type != "cpu" or self.weight.dtype not in packable:
            return
        try:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(),
                                                                 self.batch_hint)
                probe = torch.linspace(-1, 1, 3 * self.weight.shape[1],
                                       dtype=self.weight.dtype).view(3, -1)
                got = torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
                want = functional.linear(probe, self.weight, self.bias)
        except (RuntimeError, AttributeError):
            return  # this torch build has no oneDNN linear: F.linear
        # bf16 results are rounded to 8 bits of mantissa: allow a few of its ulps.
        tolerance = 1e-4 if self.weight.dtype == torch.float32 else 2e-2
        if torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance):
            self.packed = packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch
        from torch.nn import functional

        if self.packed is not None:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias,
                                                                   "none", [], "")
            return out
        return functional.linear(x, self.weight, self.bias)


class _Layer:
    def __init__(self, layer: Any, *, pack: bool, batch_hint: int):
        attention, mlp = layer.self_attn, layer.mlp
        qkv = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.qkv = PackedLinear(*qkv, pack=pack, batch_hint=batch_hint)
        self.gate_up = PackedLinear(*gate_up, pack=pack, batch_hint=batch_hint)
        self.o_proj = PackedLinear(attention.o_proj.weight, attention.o_proj.bias, pack=pack,
                                   batch_hint=batch_hint)
        self.down_proj = PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias, pack=pack,
                                      batch_hint=batch_hint)
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm

    def linears(self) -> list[PackedLinear]:
        return [self.qkv, self.gate_up, self.o_proj, self.down_proj]


class FusedDecoder:
    """The forward pass of a Llama-layout causal LM over a SlotCache.

    `forward(tokens, positions, first_slot)` runs B rows of T tokens each; row b writes its
    keys/values into slot first_slot + b at positions positions[b, :], attends causally to that
    slot's positions 0..positions[b, t], and returns the final hidden states (B, T, hidden).
    `logits(hidden)` applies the output layer.
    """

    def __init__(self, model: Any, *, pack: bool = True, batch_hint: int = 32):
        import torch

        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"this model cannot run in prefloop's decoder: {reason}")
        config = model.config
        self.model = model
        self.hidden_size = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or self.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        inner = model.model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.layers = [_Layer(layer, pack=pack, batch_hint=batch_hint) for layer in inner.layers]
        head = model.lm_head
        self.lm_head = PackedLinear(head.weight, head.bias, pack=pack, batch_hint=batch_hint)
        parameter = next(model.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        # bf16/fp16 attention through PyTorch's fused SDPA kernel: a decode step's attention
        # is many tiny batched matmuls (3 query rows per K/V head and sequence), which oneDNN
        # ran at ~8 GFLOP/s in bf16; fp32's go to MKL, where the plain ops are as fast.
        self.fused_attention = self.dtype in (torch.bfloat16, torch.float16)

    def refresh(self) -> None:
        """Repack the weights after they changed in place (weight sync)."""
        for layer in self.layers:
            for linear in layer.linears():
                linear.refresh()
        self.lm_head.refresh()

    def new_cache(self) -> SlotCache:
        return SlotCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: SlotCache,
                first_slot: int = 0) -> torch.Tensor:
        return self.forward_segments([Segment(tokens, positions, first_slot)], cache)[0]

    def forward_segments(self, segments: list[Segment], cache: SlotCache) -> list[torch.Tensor]:
        """Several `forward` calls in one pass: segment i's B_i rows of T_i tokens each (a
        decode step's rows of 1 token, a prefill's rows of a prompt's tokens) go through the
        linear layers together, as one matrix of sum(B_i x T_i) rows, and through attention
        apart. Returns each segment's final hidden states, (B_i, T_i, hidden).

        Why: on a CPU a forward pass of a few dozen tokens costs about what reading the weights
        does, so a prefill merged into the decode step it would otherwise precede saves one
        pass over the weights and the per-layer overhead."""
        import torch
        from torch.nn import functional

        flat_tokens = torch.cat([s.tokens.reshape(-1) for s in segments]).unsqueeze(0)
        flat_positions = torch.cat([s.positions.reshape(-1) for s in segments]).unsqueeze(0)
        x = self.embed(flat_tokens)  # (1, N, hidden)
        cos, sin = self.rotary(x, position_ids=flat_positions)
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        plans: list[_SegmentPlan] = []
        start = 0
        for segment in segments:
            batch, steps = segment.tokens.shape
            length = int(segment.positions.max()) + 1
            bias = causal_bias(segment.positions, length, torch.float32)
            plans.append(_SegmentPlan(
                slice(start, start + batch * steps), batch, steps, length,
                slice(segment.first_slot, segment.first_slot + batch),
                torch.arange(batch, device=x.device).unsqueeze(1), segment.positions, bias,
                bias.view(batch, 1, steps, length) == 0 if self.fused_attention else None))
            start += batch * steps
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm.weight, self.eps)
            qkv = layer.qkv(h)
            # q and k rotate in one call: their heads sit side by side in the fused output.
            qk = apply_rotary(qkv[..., :q_size + kv_size].view(
                1, start, self.heads + self.kv_heads, self.head_dim), cos, sin)
            v_all = qkv[..., q_size + kv_size:]
            outputs = []
            for plan in plans:
                shape = (plan.batch, plan.steps)
                q = qk[0, plan.rows_in_pass, :self.heads].view(*shape, self.heads, self.head_dim)
                k = qk[0, plan.rows_in_pass, self.heads:].view(*shape, self.kv_heads,
                                                               self.head_dim)
                v = v_all[0, plan.rows_in_pass].view(*shape, self.kv_heads, self.head_dim)
                keys, values = cache.keys[index, plan.slots], cache.values[index, plan.slots]
                # (B, T) advanced indices around the kv-head slice: the values are (B, T, kv, d).
                keys[plan.rows, :, plan.positions] = k
                values[plan.rows, :, plan.positions] = v
                keys, values = keys[:, :, :plan.length], values[:, :, :plan.length]
                if plan.allowed is not None:
                    attended = fused_attention(q, keys, values, plan.allowed, self.scale)
                else:
                    attended = grouped_attention(q, keys, values, plan.positions, self.scale,
                                                 plan.bias)
                outputs.append(attended.view(1, plan.batch * plan.steps, -1))
            attended = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            x = x + layer.o_proj(attended)
            h = rms_norm(x, layer.post_norm.weight, self.eps)
            gate, up = layer.gate_up(h).chunk(2, -1)
            x = x + layer.down_proj(functional.silu(gate) * up)
        hidden = rms_norm(x, self.norm.weight, self.eps)[0]
        return [hidden[plan.rows_in_pass].view(plan.batch, plan.steps, -1) for plan in plans]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


__all__ = ["SUPPORTED_MODEL_TYPES", "FusedDecoder", "Segment", "SlotCache", "apply_rotary",
           "causal_bias", "fused_attention", "grouped_attention", "rms_norm", "unsupported_reason"]
