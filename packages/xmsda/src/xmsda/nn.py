"""`MSDeformAttn`: Deformable DETR's multi-scale deformable attention module on top of the xmsda op.

Same constructor, parameter names, initialisation and forward as `models/ops/modules/ms_deform_attn.py` in
Deformable DETR, so its checkpoints load unchanged. With point reference points (the encoder, and the decoder without
boxes) the sampling locations are computed inside the kernels (`ms_deform_attn_offsets`), with the same values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import ms_deform_attn, ms_deform_attn_offsets

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        self.im2col_step = 64  # kept for checkpoint and API compatibility; the CPU kernels do not need it
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h starts looking along direction 2*pi*h/M, point p at distance p+1 (in pixels of each level).
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query,
        reference_points,
        input_flatten,
        input_spatial_shapes,
        input_level_start_index,
        input_padding_mask=None,
    ):
        """
        query: `[N, Len_q, C]`; reference_points: `[N, Len_q, n_levels, 2]` in [0, 1] (top-left (0, 0)), or
        `[N, Len_q, n_levels, 4]` with box (x, y, w, h); input_flatten: `[N, sum(H*W), C]`;
        input_spatial_shapes: `[n_levels, 2]` (H, W); input_level_start_index: `[n_levels]`;
        input_padding_mask: `[N, sum(H*W)]`, True for padding. Returns `[N, Len_q, C]`.
        """
        N, Len_q, _ = query.shape
        _, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            output = self.attend_offsets(
                value,
                input_spatial_shapes,
                input_level_start_index,
                reference_points,
                sampling_offsets,
                attention_weights,
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
            output = self.attend(
                value, input_spatial_shapes, input_level_start_index, sampling_locations, attention_weights
            )
        else:
            raise ValueError(
                f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead."
            )
        return self.output_proj(output)

    def attend(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        """The sampling core: the xmsda op (a subclass may substitute another formulation, e.g. to compare)."""
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    def attend_offsets(
        self, value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
    ):
        """The sampling core at the locations `reference_points + sampling_offsets / (W, H)`, computed inside the op.
        A subclass that substitutes `attend` overrides this too (`ops.locations_from_offsets` makes the locations)."""
        return ms_deform_attn_offsets(
            value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_weights
        )
