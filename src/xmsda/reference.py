"""Pure-PyTorch formulations of multi-scale deformable attention.

`ms_deform_attn_core_pytorch` is the grid_sample formulation of Deformable DETR and mmcv: the semantics oracle.
`ms_deform_attn_gather` computes the same thing with explicit corner gathers; it is the other baseline in the
benchmark and shows what a fused kernel saves over the best one can do with stock PyTorch ops.
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
    """Bilinear sampling by gathering the four corners of every point from a head-major copy of `value`.

    Corners outside the map get weight zero and a clamped (valid) index, which is what zero padding means.
    """
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = torch.as_tensor(value_spatial_shapes, device=value.device).long().reshape(L, 2)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    H = shapes[:, 0].to(value.dtype).view(L, 1)
    W = shapes[:, 1].to(value.dtype).view(L, 1)
    # N, Q, M, L, P -> N, M, L, Q*P
    x = sampling_locations[..., 0].permute(0, 2, 3, 1, 4).reshape(N, M, L, Q * P) * W - 0.5
    y = sampling_locations[..., 1].permute(0, 2, 3, 1, 4).reshape(N, M, L, Q * P) * H - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    Hi, Wi = shapes[:, 0].view(L, 1), shapes[:, 1].view(L, 1)
    heads = value.permute(0, 2, 1, 3).reshape(N * M, S, D)
    sampled = value.new_zeros(N * M, L * Q * P, D)
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        inside = (xi >= 0) & (xi < Wi) & (yi >= 0) & (yi < Hi)
        index = starts.view(L, 1) + yi.clamp(min=0) * Wi + xi.clamp(min=0)
        index = torch.where(inside, index, 0).reshape(N * M, L * Q * P, 1).expand(-1, -1, D)
        weight = torch.where(inside, weight, 0).reshape(N * M, L * Q * P, 1)
        sampled = sampled + weight * heads.gather(1, index)
    # N*M, L, Q, P, D weighted by attention and summed over levels and points -> N, Q, M*D
    attn = attention_weights.permute(0, 2, 3, 1, 4).reshape(N * M, L, Q, P, 1)
    out = (sampled.view(N * M, L, Q, P, D) * attn).sum(dim=(1, 3))
    return out.view(N, M, Q, D).permute(0, 2, 1, 3).reshape(N, Q, M * D)
