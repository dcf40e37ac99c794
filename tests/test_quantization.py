"""Int8 linear layers for CPU decoding (`speechlm.quantization`): per-token activation scales, so a token's output
does not depend on the other rows of the call, and a loud row does not crush a quiet one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechlm.quantization import PerTokenInt8Linear, full_range_activations, quantize_linear_layers

# 8-bit activations are exact only where int8 products accumulate in int32 (VNNI / AMX); on a plain AVX2 CPU their
# u8 x s8 pair sums saturate in int16 (20-38 % error on these rows, seen on an AVX2-only EPYC), and the library uses 7
# bits there (`quantize_linear_layers`; the last test here checks what it picks on this CPU).
EIGHT_BITS = pytest.param(False, id="8-bit", marks=pytest.mark.skipif(
    not full_range_activations(), reason="this CPU has no VNNI / AMX: 8-bit activations saturate, the library uses 7"))


@pytest.fixture(params=[pytest.param(True, id="7-bit"), EIGHT_BITS])
def layer(request):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    return linear, PerTokenInt8Linear(linear, reduce_range=request.param)


def rows_of_mixed_loudness() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.1, 5.0]).unsqueeze(1)


def worst_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


def test_a_rows_output_does_not_depend_on_the_other_rows(layer):
    _, int8 = layer
    rows = rows_of_mixed_loudness()
    together = int8(rows)
    for index in range(len(rows)):  # the same row beside one other batch-mate (one-row calls take another path)
        pair = torch.stack([rows[index], rows[(index + 1) % len(rows)]])
        assert torch.equal(int8(pair)[0], together[index])


@pytest.mark.parametrize("one_by_one", [False, True], ids=["together", "one row per call"])
def test_a_loud_row_does_not_crush_a_quiet_one(layer, one_by_one):
    # One scale per call would give the 1e-3 row a quantisation step ~1e6 times its size: all zeros.
    linear, int8 = layer
    rows = rows_of_mixed_loudness()
    with torch.no_grad():
        expected = linear(rows) - linear.bias
        got = (torch.cat([int8(row[None]) for row in rows]) if one_by_one else int8(rows)) - linear.bias
    assert worst_relative_error(got, expected) < 0.05


def test_leading_dimensions_and_the_bias_are_kept(layer):
    linear, int8 = layer
    hidden = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(int8(hidden), linear(hidden), atol=0.05, rtol=0.05)


def test_an_all_zero_row_gives_the_bias():
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        torch.testing.assert_close(PerTokenInt8Linear(linear)(torch.zeros(1, 8)), linear.bias.unsqueeze(0))


def test_every_linear_layer_is_replaced():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    assert quantize_linear_layers(model) == 3
    assert [type(m) for m in model.modules() if isinstance(m, (nn.Linear, PerTokenInt8Linear))] == [
        PerTokenInt8Linear] * 3


def test_activations_use_8_bits_only_where_the_cpu_accumulates_int8_in_int32():
    assert full_range_activations({"avx2", "avx512_vnni"})
    assert full_range_activations({"avx2", "avx_vnni"})
    assert not full_range_activations({"avx2", "fma"})  # saturating 16-bit pair sums: 7 bits
    assert not full_range_activations(set())  # unknown CPU: the safe choice


def test_the_layers_it_builds_are_accurate_on_this_cpu():
    """Whatever this CPU's int8 kernels are, the layers `quantize_linear_layers` builds keep every row of mixed
    loudness within 5 % of float32 (on AVX2 without VNNI, 8-bit activations would not)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    model = nn.Sequential(linear)
    rows = rows_of_mixed_loudness()
    with torch.no_grad():
        expected = linear(rows) - linear.bias
        quantize_linear_layers(model)
        got = model(rows) - linear.bias
    assert worst_relative_error(got, expected) < 0.05
