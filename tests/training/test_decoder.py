"""The fused decoder (training/decoder.py) against Hugging Face's own forward pass: the same
logits for batched prefill, chunked prefill with decode steps, rows at different positions in one
call, grouped-query attention, Qwen2's biases; the pure pieces against their references; the
fused weights stay views of the model's parameters; unsupported models are named."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from training.decoder import (
    FusedDecoder,
    PackedLinear,
    Segment,
    apply_rotary,
    causal_bias,
    fused_attention,
    grouped_attention,
    rms_norm,
    unsupported_reason,
)

VOCAB = 97


def _llama(kv_heads: int = 2, **overrides: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, rope_theta=500.0, **overrides)
    return LlamaForCausalLM(config).eval()


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # Qwen2 initialises its q/k/v biases to zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _hf_logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _prefill(decoder: FusedDecoder, cache: Any, prompts: list[list[int]], first_slot: int = 0,
             start: int = 0) -> torch.Tensor:
    """Right-padded prefill of `prompts` from position `start`; hidden states (B, T, H)."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt)
    positions = start + torch.arange(width).expand(len(prompts), width)
    with torch.inference_mode():
        return decoder.forward(tokens, positions, cache, first_slot)


@pytest.mark.parametrize("build", [_llama, lambda: _llama(kv_heads=4), _qwen2],
                         ids=["llama-gqa", "llama-mha", "qwen2-bias"])
def test_batched_prefill_of_different_lengths_equals_hf_per_prompt(build: Any) -> None:
    model = build()
    decoder = FusedDecoder(model)
    cache = decoder.new_cache()
    cache.ensure(3, 64, keep_slots=0)
    prompts = [[5, 9, 13, 2, 7, 7, 40], [1, 2, 3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
    hidden = _prefill(decoder, cache, prompts)
    with torch.inference_mode():
        logits = decoder.logits(hidden)
    for row, prompt in enumerate(prompts):
        expected = _hf_logits(model, prompt)
        assert torch.allclose(logits[row, :len(prompt)], expected, atol=1e-4), row


def test_chunked_prefill_then_decode_steps_equal_hf_on_the_whole_sequence() -> None:
    model = _llama()
    decoder = FusedDecoder(model)
    cache = decoder.new_cache()
    cache.ensure(2, 64, keep_slots=0)
    sequence = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
    expected = _hf_logits(model, sequence)
    _prefill(decoder, cache, [sequence[:5]], first_slot=1)             # chunk 1 into slot 1
    hidden = _prefill(decoder, cache, [sequence[5:9]], first_slot=1, start=5)  # chunk 2
    with torch.inference_mode():
        got = [decoder.logits(hidden[0, -1])]
        for position in range(9, len(sequence)):                       # decode, one at a time
            hidden = decoder.forward(torch.tensor([[sequence[position]]]),
                                     torch.tensor([[position]]), cache, 1)
            got.append(decoder.logits(hidden[0, -1]))
    assert torch.allclose(torch.stack(got), expected[8:], atol=1e-4)


def test_rows_at_different_positions_decode_together() -> None:
    model = _llama()
    decoder = FusedDecoder(model)
    cache = decoder.new_cache()
    cache.ensure(3, 64, keep_slots=0)
    sequences = [[4, 8, 15, 16, 23, 42], [7, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    _prefill(decoder, cache, [s[:-1] for s in sequences])
    tokens = torch.tensor([[s[-1]] for s in sequences])
    positions = torch.tensor([[len(s) - 1] for s in sequences])
    with torch.inference_mode():
        logits = decoder.logits(decoder.forward(tokens, positions, cache, 0)[:, -1])
    for row, sequence in enumerate(sequences):
        assert torch.allclose(logits[row], _hf_logits(model, sequence)[-1], atol=1e-4)


def test_a_prefill_merged_into_a_decode_step_changes_neither() -> None:
    model = _llama()
    decoder = FusedDecoder(model)
    cache = decoder.new_cache()
    cache.ensure(4, 64, keep_slots=0)
    running = [[4, 8, 15, 16, 23, 42], [7, 7]]
    joining = [[9, 1, 2, 6], [30, 31, 32, 33, 34, 35, 36]]
    _prefill(decoder, cache, [s[:-1] for s in running])
    width = max(len(p) for p in joining)
    prefill_tokens = torch.tensor([p + [0] * (width - len(p)) for p in joining])
    with torch.inference_mode():
        decoded, prefilled = decoder.forward_segments(
            [Segment(torch.tensor([[s[-1]] for s in running]),
                     torch.tensor([[len(s) - 1] for s in running]), 0),
             Segment(prefill_tokens, torch.arange(width).expand(2, width), 2)], cache)
        decoded_logits = decoder.logits(decoded[:, -1])
        prefilled_logits = decoder.logits(prefilled)
    assert decoded.shape == (2, 1, 64) and prefilled.shape == (2, width, 64)
    for row, sequence in enumerate(running):
        assert torch.allclose(decoded_logits[row], _hf_logits(model, sequence)[-1], atol=1e-4)
    for row, prompt in enumerate(joining):
        assert torch.allclose(prefilled_logits[row, :len(prompt)], _hf_logits(model, prompt),
                              atol=1e-4)
    # The joining rows' keys/values landed in slots 2 and 3: they decode on from there.
    with torch.inference_mode():
        hidden = decoder.forward(torch.tensor([[50], [51]]),
                                 torch.tensor([[len(p)] for p in joining]), cache, 2)
        logits = decoder.logits(hidden[:, -1])
    for row, prompt in enumerate(joining):
        assert torch.allclose(logits[row], _hf_logits(model, [*prompt, 50 + row])[-1],
                              atol=1e-4)


def test_a_bf16_decoder_uses_fused_attention_and_tracks_hf() -> None:
    model = _llama().to(torch.bfloat16)
    decoder = FusedDecoder(model)
    assert decoder.fused_attention
    prompts = [[5, 9, 13, 2, 7, 7, 40], [1, 2, 3]]
    cache = decoder.new_cache()
    cache.ensure(2, 64, keep_slots=0)
    with torch.inference_mode():
        logits = decoder.logits(_prefill(decoder, cache, prompts)).float()
    for row, prompt in enumerate(prompts):
        expected = _hf_logits(model, prompt).float()
        # bf16 keeps 8 bits of mantissa: both sides round differently along 3 layers.
        assert torch.allclose(logits[row, :len(prompt)], expected, atol=0.05), row
        assert (logits[row, :len(prompt)].argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


def test_packed_linear_equals_f_linear_in_fp32_and_bf16() -> None:
    from torch.nn.functional import linear

    torch.manual_seed(2)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        weight, bias = torch.randn(48, 64, dtype=dtype), torch.randn(48, dtype=dtype)
        packed = PackedLinear(weight, bias, pack=True, batch_hint=8)
        if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            assert packed.packed is not None, dtype  # the oneDNN path, not the fallback
        x = torch.randn(2, 5, 64, dtype=dtype)
        with torch.inference_mode():
            got = packed(x)
        want = linear(x, weight, bias)
        assert got.dtype == dtype and got.shape == (2, 5, 48)
        assert torch.allclose(got.float(), want.float(), rtol=tolerance, atol=tolerance * 8)
        with torch.no_grad():
            weight.mul_(-1)  # weight sync changes the weights in place
        packed.refresh()
        with torch.inference_mode():
            assert torch.allclose(packed(x).float(), -(want - bias).float() + bias.float(),
                                  rtol=tolerance, atol=tolerance * 8)


def test_fused_weights_are_views_so_a_state_dict_copy_reaches_the_decoder() -> None:
    model = _llama()
    decoder = FusedDecoder(model)
    layer = model.model.layers[1]
    assert layer.self_attn.k_proj.weight.data_ptr() == (
        decoder.layers[1].qkv.weight.data_ptr() + 4 * 16 * 64 * 4)  # after q's 64 rows of 64
    other = _llama()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.3)
        model.load_state_dict(other.state_dict())
    decoder.refresh()
    cache = decoder.new_cache()
    cache.ensure(1, 16, keep_slots=0)
    with torch.inference_mode():
        logits = decoder.logits(_prefill(decoder, cache, [[1, 5, 9]]))[0]
    assert torch.allclose(logits, _hf_logits(other, [1, 5, 9]), atol=1e-4)


def test_unsupported_models_are_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in (unsupported_reason(gpt2) or "")
    with pytest.raises(ValueError, match="cannot run in prefloop's decoder: model type 'gpt2'"):
        FusedDecoder(gpt2)
    assert "gelu" in (unsupported_reason(_llama(hidden_act="gelu")) or "")
    assert unsupported_reason(_llama()) is None and unsupported_reason(_qwen2()) is None


# -- the pure pieces against their references ---------------------------------------------------


def test_rms_norm_equals_llamas() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    reference = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        reference.weight.normal_()
    x = torch.randn(3, 5, 64) * 4
    assert torch.allclose(rms_norm(x, reference.weight, 1e-5), reference(x), atol=1e-6)
    half = x.bfloat16()
    assert torch.equal(rms_norm(half, reference.weight.bfloat16(), 1e-5),
                       reference.bfloat16()(half))


def test_rotary_equals_llamas_apply_rotary_pos_emb() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = _llama()
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 2, 16)  # (B, T, heads, d)
    cos, sin = model.model.rotary_emb(q, position_ids=positions)
    # Hugging Face's layout is (B, heads, T, d).
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert torch.allclose(apply_rotary(q, cos, sin), want_q.transpose(1, 2), atol=1e-6)
    assert torch.allclose(apply_rotary(k, cos, sin), want_k.transpose(1, 2), atol=1e-6)


def _attention_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (3, 4, 6 heads, 8), keys and values (3, 2 kv heads, 12, 8), rows at other positions."""
    batch, steps, heads, kv_heads, dim, length = 3, 4, 6, 2, 8, 12
    q = torch.randn(batch, steps, heads, dim)
    keys, values = torch.randn(batch, kv_heads, length, dim), torch.randn(batch, kv_heads,
                                                                          length, dim)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [8, 9, 10, 11]])
    return q, keys, values, positions


def test_grouped_attention_equals_sdpa_with_gqa_and_a_causal_mask() -> None:
    from torch.nn.functional import scaled_dot_product_attention

    q, keys, values, positions = _attention_inputs()
    (batch, steps, heads, dim), length = q.shape, keys.shape[2]
    got = grouped_attention(q, keys, values, positions, dim ** -0.5)
    visible = torch.arange(length).view(1, 1, length) <= positions.unsqueeze(-1)
    want = scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                        attn_mask=visible.unsqueeze(1), enable_gqa=True)
    assert torch.allclose(got, want.transpose(1, 2).reshape(batch, steps, heads * dim),
                          atol=1e-5)


def test_fused_attention_equals_grouped_attention() -> None:
    q, keys, values, positions = _attention_inputs()
    (batch, steps, _, dim), length = q.shape, keys.shape[2]
    allowed = causal_bias(positions, length, torch.float32).view(batch, 1, steps, length) == 0
    want = grouped_attention(q, keys, values, positions, dim ** -0.5)
    assert torch.allclose(fused_attention(q, keys, values, allowed, dim ** -0.5), want,
                          atol=1e-5)
    half = fused_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), allowed,
                           dim ** -0.5)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), want, atol=0.05)
