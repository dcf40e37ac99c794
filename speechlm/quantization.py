"""Int8 decoding on a CPU: the LLM's linear layers read int8 weights, each token's activations get their own scale.

Decoding a small LLM on a CPU is bound by reading its weights once per token, and int8 weights are a quarter of the
bytes. Torch's dynamic int8 linear (fbgemm / onednn) is the fast kernel here, but it quantises its whole input with
one scale: a token then shared its scale with its batch-mates and with the loudest audio token of the prompt. On the
demo model that cost accuracy (held-out synthetic WER 18.2 % in float32, 24.1 % at batch 1 and 32.3 % at batch 8).
`PerTokenInt8Linear` divides each row by its own absolute maximum and quantises the result with fixed parameters
(torch's int8 linear with given input quantisation, the one its x86 inductor path uses), so each row is quantised
as it would be alone (benchmarks/results/int8_wer.md). A call with one row (decoding at batch 1) takes the kernel's
own range, which is then that row's (asymmetric: a slightly finer step; 0.03 ms less per layer call). Rows of
multi-row calls are exact whatever their batch-mates; the model is not bit-exact across batch sizes anyway, because
rounding to int8 turns float noise from elsewhere (padded attention) into whole quantisation steps.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZATION_SCHEMES = ("int8",)
# With one of these, the int8 kernels multiply-accumulate straight into int32 and activations may use all 8 bits;
# without (plain AVX2), u8 x s8 pairs are summed in saturating int16, so activations keep 7 bits (torch's default).
VNNI_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def full_range_activations(flags: set[str] | None = None) -> bool:
    """Whether activations may use all 8 bits here. Measured on the session-8 demo model's 200 held-out synthetic
    clips at batch 8: 19.0 % WER with 8 bits, 20.2 % with 7, 18.2 % in float32 (benchmarks/results/int8_wer.md)."""
    from .hardware import cpu_flags

    return bool(set(VNNI_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


class PerTokenInt8Linear(nn.Module):
    """A float linear layer computed with int8 weights (one scale per output channel) and int8 activations (one
    scale per token). In a multi-row call, a row's output does not depend on the other rows (batch-mates, padding)."""

    def __init__(self, linear: nn.Linear, reduce_range: bool = True):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        self.reduce_range = reduce_range  # 7-bit activations (see full_range_activations)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        unbiased = nn.Linear(self.in_features, self.out_features, bias=False)  # the bias is added after rescaling
        unbiased.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        unbiased.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():  # torch deprecates eager-mode quantisation in favour of torchao
            warnings.simplefilter("ignore")
            self.int8 = DynamicInt8Linear.from_float(unbiased)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        # Fixed activation quantisation of a row divided by its absolute maximum: [-1, 1] -> [1, 255] (or [1, 127]).
        levels = 63 if reduce_range else 127
        self.step, self.zero_point = 1.0 / levels, levels + 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, self.in_features).float()
        packed = self.int8._packed_params._packed_params
        if rows.shape[0] == 1:  # one token (decoding at batch 1): the kernel's own range is already that token's
            out = torch.ops.quantized.linear_dynamic(rows, packed, reduce_range=self.reduce_range)
        else:
            scale = rows.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                rows / scale, self.step, self.zero_point, packed) * scale
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*hidden.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activation_bits={7 if self.reduce_range else 8}")


def quantize_linear_layers(module: nn.Module) -> int:
    """Replace every `nn.Linear` inside `module` by a `PerTokenInt8Linear`, in place; returns how many."""
    reduce_range = not full_range_activations()
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, nn.Linear)]
    for name, linear in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, PerTokenInt8Linear(linear, reduce_range))
    return len(targets)
