"""Pure-PyTorch formulations of multi-scale deformable attention.

`ms_deform_attn_core_pytorch` is the grid_sample formulation of Deformable DETR and mmcv: the semantics oracle.
`ms_deform_attn_gather` computes the same thing with explicit corner gathers; it is the other baseline in the
benchmark and shows what a fused kernel saves over the best one can do with stock PyTorch ops.
`locations_from_offsets` is the location arithmetic of Deformable DETR's module, which `ms_deform_attn_offsets`
fuses into the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_core_pytorch(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Deformable DETR's reference implementation (models/ops/functions/ms_deform_attn_func.py), unchanged in
    substance. `value_spatial_shapes` may be a tensor or a list of (H, W) pairs."""
    N_, _, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(shapes):
        # N, H*W, M, D -> N*M, D, H, W
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        # N, Lq, M, P, 2 -> N*M, Lq, P, 2
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        # N*M, D, Lq, P
        sampling_value_l_ = F.grid_sample(
            value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampling_value_list.append(sampling_value_l_)
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return output.transpose(1, 2).contiguous()


def ms_deform_attn_gather(value, value_spatial_shapes, sampling_locations, attention_weights):
    """Bilinear sampling by gathering the four corners of every point as rows of a `[N*M*S, D]` table.

    Corners outside the map get weight zero and a clamped (valid) row, which is what zero padding means. The
    attention weight is folded into the corner weight, so each corner is one gather and one weighted sum.
    """
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = torch.as_tensor(value_spatial_shapes, device=value.device).long().reshape(L, 2)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    Hi, Wi = shapes[:, 0].view(1, 1, L, 1), shapes[:, 1].view(1, 1, L, 1)
    # N, Q, M, L, P -> N, M, Q, L, P -> N*M, Q, L, P (one row of the table per (n, m) head)
    loc = sampling_locations.transpose(1, 2).reshape(N * M, Q, L, P, 2)
    attn = attention_weights.transpose(1, 2).reshape(N * M, Q, L, P)
    x = loc[..., 0] * Wi.to(value.dtype) - 0.5
    y = loc[..., 1] * Hi.to(value.dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    table = value.transpose(1, 2).reshape(N * M * S, D)
    head_row = (torch.arange(N * M, device=value.device) * S).view(N * M, 1, 1, 1) + starts.view(1, 1, L, 1)
    out = value.new_zeros(N * M, Q, D)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * attn
        inside = (xi >= 0) & (xi < Wi) & (yi >= 0) & (yi < Hi)
        row = torch.where(inside, head_row + yi * Wi + xi, 0)
        weight = torch.where(inside, weight, 0)
        corner = table.index_select(0, row.reshape(-1)).view(N * M, Q, L * P, D)
        out = out + torch.einsum("bqkd,bqk->bqd", corner, weight.view(N * M, Q, L * P))
    return out.view(N, M, Q, D).transpose(1, 2).reshape(N, Q, M * D)


def offset_normalizer(spatial_shapes, dtype):
    """`[L, 2]` (W, H) of each level in `dtype`: Deformable DETR's `offset_normalizer`."""
    return torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(dtype)


def locations_from_offsets(reference_points, sampling_offsets, spatial_shapes):
    """Deformable DETR's `reference_points[:, :, None, :, None, :] + sampling_offsets / offset_normalizer[None, None,
    None, :, None, :]` in torch, with the same values bit for bit. The small operands are first expanded to a
    query-head's whole (L, P, 2) block: broadcasting inside that block left TensorIterator a 2-element inner loop
    (division 2.5x and addition 1.8x slower). The normalizer is made float first: dividing by the integer tensor
    takes a slow mixed-dtype path."""
    N, Q, _, L, P, _ = sampling_offsets.shape
    normalizer = offset_normalizer(spatial_shapes, sampling_offsets.dtype)[:, None, :].expand(L, P, 2).contiguous()
    reference_block = reference_points[:, :, None, :, None, :].expand(N, Q, 1, L, P, 2).contiguous()
    return reference_block + sampling_offsets / normalizer
