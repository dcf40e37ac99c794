"""bfloat16 training: the known-risky paths, each forward + backward with finite gradients.

The GPU sweep diverged to NaN with a bf16 LLM on CUDA only. The likely cause, pinned down here: a left-padded merged
sequence holds query rows that attend to no key (causal mask and padding mask together); transformers 5 passes them
to the kernel unpatched, CPU kernels return 0 for them, but CUDA kernels recompute softmax from a -inf logsumexp in
backward (cuDNN SDPA, default for bf16/fp16 on H100/H200: NaN grad_q whenever the width is 64 mod 128). A loss pass
now pads on the right, so no such row exists. `emulated_kernel` below reproduces that backward on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from speechlm.alignment import CTCAlignmentHead
from speechlm.configuration import IGNORE_INDEX
from tests.conftest import make_clips

TEXTS = ["call mom", "set an alarm for seven thirty please", "hi"]


def _bf16_model(build, encoder="whisper", decoder="qwen2", attn="sdpa", layout="prefix"):
    processor, model = build(encoder, decoder, dtype=torch.float32, attn_implementation=attn, layout=layout)
    model.language_model.to(torch.bfloat16)  # the GPU sweep's set-up: frozen bf16 LLM, fp32 projector, LoRA
    model.freeze_encoder()
    model.freeze_decoder()
    model.add_lora(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return processor, model.train()


def _batch(processor):
    return processor(make_clips((0.3, 1.2, 0.5)), text=TEXTS)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _empty_rows(attention_mask: torch.Tensor) -> int:
    """Query rows that attend to no key under causal + padding masks: nothing attended at or before them."""
    return int((attention_mask.long().cumsum(-1) == 0).sum())


@pytest.mark.parametrize("layout", ["prefix", "placeholder"])
def test_loss_pass_has_no_query_row_that_attends_to_nothing(build, layout):
    processor, model = build("whisper", "qwen2", layout=layout)
    batch = _batch(processor)
    with torch.no_grad():
        training = model.prepare_inputs(**batch)
        generation = model.prepare_inputs(**{k: v for k, v in batch.items() if k != "labels"})
    widths = training.attention_mask.sum(1)
    assert int(widths.min()) < training.attention_mask.shape[1]  # the batch really is padded
    assert _empty_rows(training.attention_mask) == 0
    assert bool(training.attention_mask[:, 0].all())  # right padding: every row starts with a real token
    # Generation keeps left padding (new tokens are appended on the right) with the same tokens in each row.
    assert bool(generation.attention_mask[:, -1].all()) and _empty_rows(generation.attention_mask) > 0
    for row in range(len(widths)):
        left = generation.inputs_embeds[row][generation.attention_mask[row].bool()]
        right = training.inputs_embeds[row][training.attention_mask[row].bool()]
        torch.testing.assert_close(left, right, atol=0, rtol=0)
    with pytest.raises(ValueError, match="padding_side"):
        embeds, lengths = model.get_audio_features(batch["input_features"], batch["attention_mask"])
        model.merge_audio_and_text(embeds, lengths, batch["input_ids"], batch["decoder_attention_mask"],
                                   padding_side="middle")


def test_right_padded_loss_equals_the_mean_of_single_losses(build):
    processor, model = build("whisper", "llama")
    clips = make_clips((0.3, 1.2, 0.5))
    batch = processor(clips, text=TEXTS)
    with torch.no_grad():
        batched = model(**batch).loss
        total, count = 0.0, 0
        for clip, text in zip(clips, TEXTS):
            single = processor([clip], text=[text])
            tokens = int((single["labels"] != IGNORE_INDEX).sum())
            total += model(**single).loss * tokens
            count += tokens
    torch.testing.assert_close(batched, total / count, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------- kernel emulation
class _FlashStyleAttention(torch.autograd.Function):
    """SDPA whose forward guards empty rows (output 0, as every kernel does) but whose backward recomputes the
    probabilities as exp(scores - logsumexp) without a guard, the way flash-style CUDA kernels (cuDNN's among them)
    do: an empty row has logsumexp -inf, so exp(-inf + inf) = NaN reaches dQ, dK and dV."""

    @staticmethod
    def forward(ctx, query, key, value, allowed, scale):
        scores = (query.float() @ key.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.nan_to_num(torch.exp(scores - lse), nan=0.0)
        out = probs @ value.float()
        ctx.save_for_backward(query, key, value, allowed, lse, out)
        ctx.scale = scale
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, allowed, lse, out = ctx.saved_tensors
        grad_out = grad_out.float()
        scores = (query.float() @ key.float().transpose(-1, -2)) * ctx.scale
        probs = torch.exp(scores.masked_fill(~allowed, float("-inf")) - lse)  # no guard, like the kernels
        grad_value = probs.transpose(-1, -2) @ grad_out
        grad_probs = grad_out @ value.float().transpose(-1, -2)
        delta = (grad_out * out).sum(-1, keepdim=True)
        grad_scores = probs * (grad_probs - delta) * ctx.scale
        grad_query = grad_scores @ key.float()
        grad_key = grad_scores.transpose(-1, -2) @ query.float()
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


def emulated_kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """Drop-in `scaled_dot_product_attention` with the flash-style backward above."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    q_len, k_len = query.shape[-2], key.shape[-2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = allowed.tril(k_len - q_len)
    if attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf"))
    allowed = allowed.expand(*query.shape[:-1], k_len)
    scale = scale if scale is not None else 1 / math.sqrt(query.shape[-1])
    return _FlashStyleAttention.apply(query, key, value, allowed, scale)


def test_bf16_training_step_is_finite_under_a_flash_style_backward(build, monkeypatch):
    processor, model = _bf16_model(build)
    batch = _batch(processor)
    real = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        reference = model(**batch).loss
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", emulated_kernel)

    # The cause, reproduced: the same batch merged with left padding gives finite loss but NaN gradients.
    merged = model.prepare_inputs(**batch, padding_side="left")
    assert _empty_rows(merged.attention_mask) > 0
    out = model.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                               position_ids=merged.position_ids, labels=merged.labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(not bool(torch.isfinite(g).all()) for g in _grads(model).values())
    model.zero_grad(set_to_none=True)

    # The fix: the loss pass pads on the right, so the kernel never sees an empty row.
    loss = model(**batch).loss
    loss.backward()
    grads = _grads(model)
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert any(n.startswith("multi_modal_projector") for n in grads) and any("lora_" in n for n in grads)
    torch.testing.assert_close(loss.detach(), reference, atol=0.05, rtol=0.01)  # bf16 kernels differ slightly
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_bf16_forward_backward_is_finite_on_cpu_kernels(build, attn, padding_side):
    """Ruled out on CPU: its SDPA and eager kernels give finite gradients even with empty rows (left padding)."""
    processor, model = _bf16_model(build, attn=attn)
    merged = model.prepare_inputs(**_batch(processor), padding_side=padding_side)
    out = model.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                               position_ids=merged.position_ids, labels=merged.labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float32  # transformers' loss upcasts the bf16 logits
    grads = _grads(model)
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads.values())


def test_bf16_flex_attention_forward_is_finite_on_cpu(build):
    """flex_attention: forward only, torch refuses its backward on CPU ("FlexAttention does not support backward
    on CPU"); the GPU check script covers the backward. Only the LLM uses it here: the Whisper encoder under
    flex_attention aborts the process on this CPU build (compiled kernel)."""
    processor, model = build("whisper", "qwen2", dtype=torch.bfloat16,
                             decoder_kwargs={"attn_implementation": "flex_attention"})
    batch = _batch(processor)
    with torch.no_grad():
        for side in ("left", "right"):
            merged = model.prepare_inputs(**batch, padding_side=side)
            logits = model.language_model(inputs_embeds=merged.inputs_embeds, attention_mask=merged.attention_mask,
                                          position_ids=merged.position_ids).logits
            assert bool(torch.isfinite(logits).all()), side


# ------------------------------------------------------------------------------------------ the other suspects
def test_ctc_loss_in_a_bf16_model_is_float32_and_finite(build):
    """The CTC head scores in float32 (log-softmax included) whatever the model's dtype; an alignment that cannot
    exist (more labels than audio tokens) costs 0 instead of inf (zero_infinity)."""
    processor, model = _bf16_model(build)
    model.multi_modal_projector.to(torch.bfloat16)
    head = CTCAlignmentHead(model.config.text_config.hidden_size, processor.tokenizer.all_special_ids)
    head.to(torch.bfloat16)
    batch = processor(make_clips((0.2, 1.0)), text=["one two three four five six seven eight nine " * 3, "hi"])
    logits, lengths = head.logits(model, batch)
    assert logits.dtype == torch.float32
    targets, target_lengths = head.targets(batch["labels"])
    assert int(target_lengths[0]) > int(lengths[0])  # the first clip is too short for its transcript
    loss = head(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in [*model.multi_modal_projector.parameters(), *head.parameters()] if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_projector_output_cannot_overflow_a_bf16_llm():
    """bf16 shares float32's exponent range: the fp32 projector output, cast for the LLM, cannot overflow (fp16
    could: its largest value is 65504)."""
    assert torch.finfo(torch.bfloat16).max > 3e38
    big = torch.tensor([1e30, -1e30, 3e38])
    assert bool(torch.isfinite(big.to(torch.bfloat16)).all())
    assert not bool(torch.isfinite(big.to(torch.float16)).all())


def test_adamw_on_bf16_lora_weights_stays_finite():
    """AdamW with bf16 parameters and states: eps=1e-8 is a normal bf16 number, and squared tiny gradients that
    underflow to 0 leave the step bounded by lr (m / (sqrt(v) + eps) with |m| <= |g|)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 32, dtype=torch.bfloat16) * 0.01)
    optimizer = torch.optim.AdamW([weight], lr=3e-3, eps=1e-8)
    assert torch.tensor(1e-8, dtype=torch.bfloat16).item() > 0
    for scale in (1e-30, 1e-20, 1.0, 1e3, 1e-38):
        weight.grad = (torch.randn_like(weight) * scale).to(torch.bfloat16)
        before = weight.detach().clone()
        optimizer.step()
        assert bool(torch.isfinite(weight).all())
        assert float((weight.detach() - before).abs().max()) < 0.1
    assert all(bool(torch.isfinite(v).all()) for v in optimizer.state[weight].values() if torch.is_tensor(v))
