"""Every malformed input is refused with an error that names the argument and the expected shape."""

from __future__ import annotations

import pytest
import torch

import xmsda

from .conftest import make_inputs


def call(**override):
    value, ss, lsi, loc, attn = make_inputs(N=2, shapes=((6, 7), (3, 4)), Q=5, M=2, D=4, P=3)
    args = {
        "value": value,
        "spatial_shapes": ss,
        "level_start_index": lsi,
        "sampling_locations": loc,
        "attention_weights": attn,
    }
    args.update(override)
    return xmsda.ms_deform_attn(**args)


def test_valid_inputs_pass():
    assert call().shape == (2, 5, 8)


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ({"value": torch.zeros(2, 54, 8)}, ValueError, r"value must have shape \[N, S, M, D\]"),
        ({"spatial_shapes": torch.tensor([6, 7, 3, 4])}, ValueError, r"spatial_shapes must have shape \[L, 2\]"),
        ({"spatial_shapes": torch.tensor([[6, 7, 1], [3, 4, 1]])}, ValueError, r"spatial_shapes must have shape"),
        ({"level_start_index": torch.tensor([0, 42, 54])}, ValueError, r"level_start_index must have shape \[L\]"),
        ({"sampling_locations": torch.rand(2, 5, 2, 2, 3)}, ValueError, r"sampling_locations must have shape"),
        # batch, heads, levels, coordinates that disagree with value / spatial_shapes
        ({"sampling_locations": torch.rand(3, 5, 2, 2, 3, 2)}, ValueError, r"\[N, Q, M, L, P, 2\] = \[2, 5, 2, 2, 3"),
        ({"sampling_locations": torch.rand(2, 5, 4, 2, 3, 2)}, ValueError, r"sampling_locations must have shape"),
        ({"sampling_locations": torch.rand(2, 5, 2, 3, 3, 2)}, ValueError, r"sampling_locations must have shape"),
        ({"sampling_locations": torch.rand(2, 5, 2, 2, 3, 3)}, ValueError, r"sampling_locations must have shape"),
        ({"attention_weights": torch.rand(2, 5, 2, 2, 4)}, ValueError, r"attention_weights must have shape"),
        ({"attention_weights": torch.rand(2, 5, 2, 6)}, ValueError, r"\[N, Q, M, L, P\] = \[2, 5, 2, 2, 3\]"),
        ({"value": torch.zeros(2, 54, 2, 4, dtype=torch.int64)}, TypeError, "value must be a floating-point"),
        ({"attention_weights": torch.rand(2, 5, 2, 2, 3, dtype=torch.float32)}, TypeError, "share one dtype"),
        ({"spatial_shapes": torch.tensor([[6.0, 7.0], [3.0, 4.0]])}, TypeError, "spatial_shapes must be an integer"),
        ({"level_start_index": torch.tensor([0.0, 42.0])}, TypeError, "level_start_index must be an integer"),
        ({"value": [[0.0]]}, TypeError, "value must be a torch.Tensor"),
        ({"value": torch.zeros(2, 54, 2, 4, dtype=torch.float64, device="meta")}, ValueError, "one device"),
        # values of the index tensors
        ({"spatial_shapes": torch.tensor([[6, 7], [3, 5]])}, ValueError, r"sum\(H\*W\) = 57 .* S = 54"),
        ({"spatial_shapes": torch.tensor([[-6, -7], [3, 4]])}, ValueError, "spatial_shapes must be positive"),
        ({"level_start_index": torch.tensor([0, 41])}, ValueError, r"level_start_index must be .*\[0, 42\]"),
        ({"level_start_index": torch.tensor([42, 0])}, ValueError, r"level_start_index must be"),
    ],
)
def test_invalid_inputs_raise(override, error, match):
    with pytest.raises(error, match=match):
        call(**override)


def test_too_many_channels():
    _, ss, lsi, loc, attn = make_inputs(N=1, shapes=((2, 2),), Q=1, M=1, D=4, P=1)
    with pytest.raises(ValueError, match=r"D <= 512"):
        xmsda.ms_deform_attn(torch.zeros(1, 4, 1, 513, dtype=torch.float64), ss, lsi, loc, attn)


def test_too_many_points_per_query():
    _, ss, lsi, _, _ = make_inputs(N=1, shapes=((2, 2),), Q=1, M=1, D=4, P=1)
    value = torch.zeros(1, 4, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"L\*P <= 256"):
        xmsda.ms_deform_attn(
            value,
            ss,
            lsi,
            torch.zeros(1, 1, 1, 1, 257, 2, dtype=torch.float64),
            torch.zeros(1, 1, 1, 1, 257, dtype=torch.float64),
        )


def test_the_registered_ops_check_their_inputs_too():
    value, ss, lsi, loc, attn = make_inputs(N=1, shapes=((2, 2),), Q=1, M=1, D=4, P=1)
    with pytest.raises(ValueError, match="sampling_locations must have shape"):
        torch.ops.xmsda.ms_deform_attn(value, ss, lsi, loc[..., :1], attn)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[N, Q, M\*D\]"):
        torch.ops.xmsda.ms_deform_attn_backward(torch.zeros(1, 1, 5, dtype=value.dtype), value, ss, lsi, loc, attn)
