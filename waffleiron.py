"""waffleiron.py — the WaffleIron backbone of ScaLR, its heads, checkpoint I/O and the training helpers.

WaffleIron (Puy, Boulch, Marlet, ICCV 2023) turns a lidar scan into per-point features:
  1. point tokens: each point's 5 input features [intensity, x, y, z, radius] and its 16 nearest neighbours'
     go through a small PointNet-like embedding (WI paper, point tokens)                       -> (B, F, N)
  2. L blocks, each = spatial mixing + channel mixing (WI paper, the WaffleIron backbone):
     - spatial mixing: average the tokens into a 2D grid (projection along z, y, then x, cycling with the
       layer), two depthwise 3x3 convolutions there, copy each cell's value back to its points;
     - channel mixing: a per-point 2-layer MLP;
     both with a pre-norm (LayerNorm in ScaLR), LayerScale, stochastic depth and a residual connection.
  3. a head (`classif`): ScaLR distillation (Conv1d 768 -> 1024, or the Supp. B.2 MLP), or a segmentation head.
ScaLR (CVPR 2024) uses WI-48-768 (60.2 M parameters) and WI-48-256; official code: WaffleIron
waffleiron/{backbone,embedding,segmenter}.py, ScaLR finetune.py (checkpoints); see docs/official.md §2.

    python waffleiron.py features --ckpt runs/distill/model.pth --scan scan.npy --out feats.npy   # (N, F) features
    python waffleiron.py features --ckpt model.pth --scan 000000.bin --out f.npy --layer head     # KITTI .bin
    python waffleiron.py --bench                                  # ours vs official layout, 2-core CPU, ~1-3 min
    python waffleiron.py --bench --scan scan.npy --width 256 --depth 12    # on a real scan (mostly empty grids)
    python waffleiron.py --bench --device cuda --width 768 --depth 48 --batch 8 --amp bf16 --compile

In Python:  model = load_checkpoint('model.pth')  (released ScaLR / WaffleIron files or ours, strict)
            out = model(feat, cells, neighbors, occupied)   # inputs from data.prepare_scan + data.collate
Contents, top-down:
  [model] Backbone         Embedding, ChannelMix, SpatialMix (+ its sparse fast path), WaffleIronBackbone,
                           WaffleIron; naive_* = the official layout written directly (the reference the fast path
                           is tested on)
  [model] Heads            linear / MLP / ScaLR+ distillation heads, the segmentation head, head_kind
  [model] Checkpoint I/O   load_checkpoint (released and ours, strict), infer_config, read_torch_file
  [train] Training kit     schedules, layer decay, atomic save / resume, run folders, DDP, AMP, CE + Lovász,
                           evaluation, CSV log and plots, the segmentation report (one mIoU rule)
  CLI                      `features` and `--bench`
Imports stay light (stdlib, numpy, torch, and data.py for its error classes; no timm).
"""
import argparse
import contextlib
import csv
import dataclasses
import datetime
import inspect
import math
import os
import pickle
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import data

# ==== [model] Backbone ====
# WaffleIron (Puy, Boulch, Marlet, "Using a Waffle Iron for Automotive Point Cloud Semantic Segmentation",
# ICCV 2023; "WI paper" below, cited by part name) with the ScaLR settings (Supp. B.2 "shared setting";
# official code: WaffleIron waffleiron/backbone.py and waffleiron/embedding.py, "WaffleIron backbone.py" below).
#
# Shapes: B scans per batch, N points per scan (zero-padded to the largest scan), F = width, k = 16 neighbours.
# Interface: feat (B, 5, N), cells (B, 3, N), neighbors (B, k, N) without the point itself,
# occupied (B, N) bool; outputs and heads are channels-first (B, C, N) like the official code.
#
# Inside the trunk we keep the tokens TOKEN-MAJOR, (B, N, F) == (B*N, F) rows, instead of the official
# (B, F, N): LayerNorm is then over the contiguous last axis, the 1x1 Conv1d's are plain matmuls (F.linear on the
# same (F, F, 1) parameters), and the 2D "flatten"/"inflate" of the spatial mixing are row-wise `index_add_` /
# `index_select` with one index per point (instead of one index per point AND channel for `scatter`/`gather`).
# The per-plane cell index and the 1/count weights are computed once per batch, not once per layer.
# The embedding's neighbour branch runs its BatchNorm2d -> Conv2d -> BatchNorm2d as one affine map of the 5 input
# channels (Embedding.neighbour_affine): from the batch statistics in training (the official (B, C, k, N) layout,
# no BatchNorm over the F-channel neighbour tensor), from the running ones in eval (on rows, Embedding.forward_eval).
# The spatial mixing of a mostly empty grid (a lidar scan fills ~4 % of the 256 x 256 cells) is computed at the
# occupied cells only (sparse_plane, sparse_depthwise_conv3x3), with the same sums as the dense convolutions.
# `naive_forward_features` below is a direct implementation of the official layout and per-layer
# scatter/gather; tests check both give the same numbers, `python waffleiron.py --bench` times them.

DEFAULT_GRIDS = ((256, 256), (256, 32), (256, 32))  # Supp. B.2: ±64 m x ±64 m x ±8 m, 0.5 m cells
EMBED_CHUNK_ROWS = 1 << 18  # eval only: neighbour rows (B*k*n) per chunk of the embedding, bounds memory
PAPER_ARCH = (768, 48)  # WI-48-768, the paper's backbone (Supp. B.2): width, depth
TOY_ARCH = (64, 6)  # WI-6-64, the toy world's backbone (distill.py's toy preset): width, depth


def default_architecture(data_name):
    """(width, depth) of a backbone built without a checkpoint: on the toy worlds the toy backbone (so a baseline
    matches the distilled toy model, and does not build the paper's WI-48-768, an hour per toy probe on a CPU); on
    real data the paper's WI-48-768."""
    return TOY_ARCH if data.is_toy(data_name) else PAPER_ARCH


def make_norm(channels, layer_norm):
    """Token norm of the mixing blocks: LayerNorm over channels (ScaLR configs: `layernorm: True`,
    needed at F=768 where BatchNorm gives NaN under fp16) or BatchNorm1d (original WaffleIron)."""
    return nn.LayerNorm(channels) if layer_norm else nn.BatchNorm1d(channels)


def activation_(act, x):
    """act(x), in place for ReLU: x is a fresh conv/linear output whose backward does not need it. Every big
    tensor we do not allocate also saves its page faults, a large part of the CPU time at these sizes."""
    return x.relu_() if isinstance(act, nn.ReLU) else act(x)


def pointwise(weight, x, bias=None):
    """A 1x1 convolution of channels-first x (B, C, L) with weight (F, C, 1[, 1]) as a batched matmul
    -> (B, F, L) (the same numbers; on CPU conv1d/conv2d take a slow path for 1x1 kernels in training)."""
    w = weight.flatten(1)                                                          # (F, C)
    if bias is None:
        return torch.bmm(w.expand(x.shape[0], *w.shape), x)
    return torch.baddbmm(bias.view(1, -1, 1).expand(x.shape[0], -1, x.shape[2]), w.expand(x.shape[0], *w.shape), x)


def is_pointwise_conv(m):
    """A plain Conv1d with a 1-wide kernel (no stride, padding or groups): a per-point linear map of the channels."""
    return type(m) is nn.Conv1d and m.kernel_size == (1,) and m.stride == (1,) and m.padding == (0,) \
        and m.dilation == (1,) and m.groups == 1


def apply_pointwise(module, x):
    """module(x) for channels-first x (B, C, L), with a plain 1x1 Conv1d (the linear heads) run as pointwise(): the
    same numbers, 1.4-2x faster than conv1d's 1x1 path on CPU in training (measured). Other modules are called."""
    return pointwise(module.weight, x, module.bias) if is_pointwise_conv(module) else module(x)


def channels_first_norm(norm, x):
    """Official-layout norm of x (B, F, N): BatchNorm1d takes it as is, LayerNorm needs F last."""
    if isinstance(norm, nn.LayerNorm):
        return norm(x.transpose(1, 2)).transpose(1, 2)
    return norm(x)


class DropPath(nn.Module):
    """Stochastic depth (WaffleIron waffleiron/backbone.py): drop the whole residual branch of a scan
    with probability p, scale survivors by 1/(1-p); the same p in every block (no linear ramp). Identity in eval."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):  # x (B, ...) -> same
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


def _update_running_stats(bn, mean, var, count):
    """What nn.BatchNorm does to its running statistics in training, given the batch mean and biased variance of
    `count` values per channel: running = (1 - m) running + m batch, with the unbiased variance (m = momentum, or
    1 / batches seen when momentum is None)."""
    if not bn.training or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_(var.to(bn.running_var.dtype) * (count / max(count - 1, 1)), alpha=m)


class Embedding(nn.Module):
    """Point tokens (WI paper, "point tokens"; WaffleIron waffleiron/embedding.py): BatchNorm always, even in
    LayerNorm models.

    token(p) = final([conv1(x_p), max_j conv2(x_{n_j(p)} - x_p)]) where x = BatchNorm1d(feat) and n_j(p) are
    the k nearest neighbours of p (relative *normalised features*, not relative coordinates)."""

    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels_in)
        self.conv1 = nn.Conv1d(channels_in, channels_out, 1)  # point branch (bias)
        self.conv2 = nn.Sequential(  # neighbour branch, convs without bias
            nn.BatchNorm2d(channels_in),
            nn.Conv2d(channels_in, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 1, bias=False),
        )
        self.final = nn.Conv1d(2 * channels_out, channels_out, 1)

    def neighbour_max(self, x, neighbors, start=0):
        """x (B, C, N) normalised features; neighbors (B, k, n): neighbours of the points start..start+n-1.
        Returns max over the k neighbours of conv2(x_neighbour - x_centre): (B, F, n).
        conv2's first three layers (BatchNorm2d -> Conv2d C_in->F -> BatchNorm2d) are affine in rel, so they run as
        one map A rel + a (neighbour_affine), with the batch statistics of both BatchNorms in training: the same
        function as the layer-by-layer module, without a BatchNorm forward and backward over the (B, F, k, n)
        tensor (half the time of this branch on CPU). The 1x1 Conv2d's are matmuls on the same weights."""
        B, C, N = x.shape
        k, n = neighbors.shape[1:]
        nb = x.gather(2, neighbors.reshape(B, 1, k * n).expand(B, C, k * n)).view(B, C, k, n)  # (B, C, k, n)
        rel = (nb - x[:, :, start:start + n].unsqueeze(2)).view(B, C, k * n)                 # (B, C, k*n)
        A, a = self.neighbour_affine(rel)                                                    # (F, C), (F,)
        act, conv_b = self.conv2[3], self.conv2[4]
        h = activation_(act, pointwise(A, rel, a))                                           # (B, F, k*n)
        h = pointwise(conv_b.weight, h)                                                      # (B, F, k*n)
        return h.view(B, -1, k, n).max(dim=2).values  # (B, F, n); max, not amax: the gradient goes to one neighbour

    def neighbour_affine(self, rel=None):
        """(A, a), A (F, C_in) and a (F,), such that BN1(conv_a(BN0(rel))) = A rel + a for every column of rel
        (B, C_in, L). Each BatchNorm uses its batch statistics in training (and updates its running ones, as
        nn.BatchNorm2d does) and its running statistics in eval (then rel may be None).
        With BN(y) = d (y - m) + beta, d = gamma / sqrt(v + eps) and W = conv_a's weight:
          z = d0 (rel - m0) + beta0,  h = W z,  BN1(h) = d1 (h - m1) + beta1
          => A = diag(d1) W diag(d0),  a = d1 (W (beta0 - d0 m0) - m1) + beta1.
        In training m0, v0 are the mean and (biased) variance of rel over all B*L columns, padding included as in
        the layer-by-layer module, and since h is linear in rel, h's batch statistics follow from rel's C_in x C_in
        covariance S: m1 = W (d0 (mean(rel) - m0) + beta0), v1 = diag(W D0 S D0 W^T). Only C_in = 5 channels are
        reduced over the columns, never the F-channel tensor."""
        bn0, conv_a, bn1 = self.conv2[0], self.conv2[1], self.conv2[2]
        with torch.autocast(conv_a.weight.device.type, enabled=False):  # statistics and map in fp32, always
            W = conv_a.weight.float().flatten(1)                                             # (F, C_in)
            batch0, batch1 = (bn.training or bn.running_mean is None for bn in (bn0, bn1))  # as nn.BatchNorm does
            if batch0 or batch1:  # rel's mean and covariance over its B*L columns
                cols = rel.float().transpose(0, 1).reshape(rel.shape[1], -1)                 # (C_in, B*L)
                count = cols.shape[1]
                mean = cols.mean(dim=1)                                                      # (C_in,)
                centred = cols - mean[:, None]
                cov = centred @ centred.t() / count                                          # (C_in, C_in)
            if batch0:
                m0, v0 = mean, cov.diagonal()
                _update_running_stats(bn0, m0, v0, count)
            else:
                m0, v0 = bn0.running_mean, bn0.running_var
            d0 = bn0.weight / torch.sqrt(v0 + bn0.eps)                                       # (C_in,)
            Wd = W * d0                                                                      # W diag(d0)
            if batch1:
                m1 = W @ (d0 * (mean - m0) + bn0.bias)                                       # (F,)
                v1 = ((Wd @ cov) * Wd).sum(dim=1)                                            # diag(Wd S Wd^T)
                _update_running_stats(bn1, m1, v1, count)
            else:
                m1, v1 = bn1.running_mean, bn1.running_var
            d1 = bn1.weight / torch.sqrt(v1 + bn1.eps)                                       # (F,)
            A, a = d1[:, None] * Wd, d1 * (W @ (bn0.bias - d0 * m0) - m1) + bn1.bias
        return A.to(conv_a.weight.dtype), a.to(conv_a.weight.dtype)  # the model's dtype (autocast casts later)

    def forward(self, feat, neighbors):
        """feat (B, C_in, N), neighbors (B, k, N) -> tokens (B, N, F), token-major for the blocks."""
        if not self.training and not torch.is_grad_enabled():
            return self.forward_eval(feat, neighbors)
        B, C, N = feat.shape
        k = neighbors.shape[1]
        x = self.norm(feat)                                                        # (B, C_in, N)
        # Training: BatchNorm statistics need every neighbour at once. Eval (with autograd): BN uses running
        # stats, so chunking over points is exact and bounds memory.
        step = N if self.training else max(1, EMBED_CHUNK_ROWS // (B * k))
        neighbour = torch.cat([self.neighbour_max(x, neighbors[:, :, s:s + step], s)
                               for s in range(0, N, step)], dim=2)                # (B, F, N)
        point = pointwise(self.conv1.weight, x, self.conv1.bias)                   # (B, F, N) conv1
        # final([conv1(x), neighbour]), the Conv1d(2F -> F), computed straight into token-major rows
        both = torch.cat([point, neighbour], dim=1).transpose(1, 2)                # (B, N, 2F) strided view
        return F.linear(both, self.final.weight.flatten(1), self.final.bias)       # (B, N, F)

    def forward_eval(self, feat, neighbors):
        """Same numbers as forward() in eval mode (to float rounding), rearranged: token-major rows, the three
        affine layers of conv2 folded into one (neighbour_affine), so the only big product left is the
        k*N x F x F matmul of its last conv. Rows are chunked over points to bound memory (4 GB at N=90k,
        F=768); rel = x_j - x_i is formed on the C_in = 5 input channels, where it is exact."""
        B, C, N = feat.shape
        k = neighbors.shape[1]
        x = self.norm(feat).transpose(1, 2).contiguous()                           # (B, N, C_in)
        A, a = self.neighbour_affine()                                              # (F, C_in), (F,)
        w2 = self.conv2[4].weight.flatten(1)                                       # (F, F)
        rows = neighbors + torch.arange(B, device=feat.device).view(B, 1, 1) * N    # (B, k, N) rows of x
        x_rows = x.view(B * N, C)
        step = max(1, EMBED_CHUNK_ROWS // (B * k))
        parts = []
        for s in range(0, N, step):
            n = min(step, N - s)
            rel = x_rows.index_select(0, rows[:, :, s:s + n].reshape(-1)).view(B, k, n, C)  # (B, k, n, C_in)
            rel = rel - x[:, None, s:s + n]                                        # x_j - x_i
            h = F.linear(rel, A, a).relu_()                                        # (B, k, n, F)
            parts.append(F.linear(h, w2).amax(dim=1))                              # (B, n, F) max over k
        neighbour = torch.cat(parts, dim=1)                                        # (B, N, F)
        point = F.linear(x, self.conv1.weight.flatten(1), self.conv1.bias)         # (B, N, F)
        # final([conv1(x), neighbour]): the Conv1d(2F -> F) on the concatenated channels, as rows
        return F.linear(torch.cat([point, neighbour], dim=2), self.final.weight.flatten(1), self.final.bias)


class ChannelMix(nn.Module):
    """Channel mixing (WI paper, "channel mixing"; WaffleIron waffleiron/backbone.py):
    t <- t + DropPath(LayerScale(MLP(Norm(t)))), MLP = Conv1d(F,F,1) -> ReLU (GELU in ScaLR+) -> Conv1d(F,F,1),
    applied to every point independently."""

    def __init__(self, channels, drop_path=0.0, layer_norm=True, gelu=False):
        super().__init__()
        self.norm = make_norm(channels, layer_norm)
        self.mlp = nn.Sequential(nn.Conv1d(channels, channels, 1), nn.GELU() if gelu else nn.ReLU(),
                                 nn.Conv1d(channels, channels, 1))
        # LayerScale: per-channel gain as a depthwise 1x1 conv, PyTorch default init U(-1, 1) (WaffleIron
        # backbone.py; no 1e-5 init).
        self.scale = nn.Conv1d(channels, channels, 1, groups=channels, bias=False)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens):
        """tokens (B, N, F) -> (B, N, F)."""
        B, N, C = tokens.shape
        r = self.norm(tokens.reshape(B * N, C))                                             # (B*N, F)
        r = activation_(self.mlp[1], F.linear(r, self.mlp[0].weight.flatten(1), self.mlp[0].bias))  # (B*N, F)
        # LayerScale folded into the last conv: diag(s) (W r + b) = (diag(s) W) r + s*b (exact; gradients flow
        # to W, b and s through the products).
        s = self.scale.weight.view(C)
        w2, b2 = self.mlp[2].weight.flatten(1) * s[:, None], self.mlp[2].bias * s
        if r.dtype == tokens.dtype and not (self.training and self.drop_path.p > 0):
            # residual fused into the product: tokens + (r W2^T + b2) = addmm(tokens, r, W2^T) + b2 (one fresh
            # (B*N, F) tensor instead of two; not under autocast, where the residual stream stays fp32)
            return torch.addmm(tokens.reshape(B * N, C), r, w2.t()).add_(b2).view(B, N, C)
        r = F.linear(r, w2, b2)                                                             # (B*N, F)
        return tokens + self.drop_path(r.view(B, N, C))


class ProjectionIndex(NamedTuple):
    """One 2D plane of a batch (WI paper, spatial mixing), computed once per batch and reused by every layer using it.

    index: (B*N,) int64, row of point (b, i) in the flattened grid. Dense plane: b*H*W + cell[b, i], a row of the
    whole (B*H*W) grid. Sparse plane: a row of the list of the cells that hold at least one point.
    weight: (B*N,) float, occupied / (points in the cell + 1e-6), so that summing weight*token per cell is the
    masked mean of the official code (padding has weight 0). shape: (H, W).
    rows: number of rows of the flattened grid (B*H*W dense, the cells that hold points sparse).
    taps_a, taps_b: sparse planes only (None for dense ones), see sparse_plane(): the 3x3 neighbourhoods read by the
    two depthwise convolutions."""
    index: torch.Tensor
    weight: torch.Tensor
    shape: tuple
    rows: int = None  # rows of the flattened grid (None: the dense B*H*W)
    taps_a: torch.Tensor = None
    taps_b: torch.Tensor = None


# A lidar scan fills few cells of the 256 x 256 grid: 2,436 of 65,536 (3.7 %) for a 20k-point nuScenes scan,
# ~12 % of the 256 x 32 ones. The depthwise 3x3 convolutions of the spatial mixing are only ever read back at the
# cells that hold points (inflate), so we compute them there only (exact, the same sums): the first convolution on
# the cells within one step of a point's cell ("dilated" cells), the second on the cells of the points.
# A plane uses this sparse form when the dilated cells are under SPARSE_MAX_FILL of the grid, else the dense grid:
# a sparse row costs ~5-8x a dense cell on CPU (nine gathers per convolution against one pass of the dense
# kernel), measured with freed memory kept in the process (keep_freed_memory). On a real 34,688-point nuScenes
# sweep (dilated cells: 18 % of 256 x 256, 44 % of 256 x 32), training step of WI-12-64 at 1 thread 896 ms with a
# 50 % threshold, 738 ms with 8 %; WI-12-256 4,455 vs 4,495 ms; toy planes (3 % of 128 x 128 sparse, 10-13 % of
# 128 x 16 dense) 2.7 -> 2.0 ms per mixing layer on the 128 x 16 planes. Measured on CPU only: other devices keep
# the earlier 50 % (SPARSE_MAX_FILL_OTHER) until someone times them.
SPARSE_MAX_FILL = 0.08
SPARSE_MAX_FILL_OTHER = 0.5
_TAPS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))  # weight[:, 0, u+1, v+1]


def _tap_rows(keys, table, H, W):
    """For each cell key b*H*W + i*W + j of `keys` (n,) and each 3x3 tap (u, v): the row of cell (i+u, j+v) in the
    sorted key list `table`, or len(table) (the zero row: outside the grid, or a cell not in the table). (9, n)."""
    b, i, j = keys // (H * W), keys % (H * W) // W, keys % W
    u = torch.tensor([t[0] for t in _TAPS], device=keys.device).view(9, 1)
    v = torch.tensor([t[1] for t in _TAPS], device=keys.device).view(9, 1)
    ni, nj = i + u, j + v                                                          # (9, n)
    inside = (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)
    wanted = b * (H * W) + ni.clamp(0, H - 1) * W + nj.clamp(0, W - 1)           # (9, n)
    pos = torch.searchsorted(table, wanted).clamp(max=len(table) - 1)
    found = inside & (table[pos] == wanted)
    return torch.where(found, pos, torch.full_like(pos, len(table)))


def sparse_plane(index, weight, H, W, batch):
    """ProjectionIndex of a plane in sparse form, or None when the dense grid is cheaper.
    index: (B*N,) dense rows b*H*W + cell of every point (padding included: it reads cell 0 like the official
    code). occupied = the cells that some point maps to; dilated = the cells within one 3x3 step of them."""
    occupied = torch.unique(index)                                                 # (n_occ,) sorted keys
    b, i, j = occupied // (H * W), occupied % (H * W) // W, occupied % W
    around = torch.stack([b * (H * W) + (i + u).clamp(0, H - 1) * W + (j + v).clamp(0, W - 1) for u, v in _TAPS])
    dilated = torch.unique(around)                                                 # (n_dil,) sorted keys
    if len(dilated) > (SPARSE_MAX_FILL if index.device.type == 'cpu' else SPARSE_MAX_FILL_OTHER) * batch * H * W:
        return None
    rows = torch.searchsorted(occupied, index)                                     # (B*N,) row in `occupied`
    return ProjectionIndex(rows, weight, (int(H), int(W)), rows=len(occupied),
                           taps_a=_tap_rows(dilated, occupied, H, W),              # (9, n_dil) rows of occupied
                           taps_b=_tap_rows(occupied, dilated, H, W))              # (9, n_occ) rows of dilated


def projection_indices(cells, occupied, grids, sparse=True):
    """cells (B, 3, N) int64 flat cell ids q_a*W + q_b per plane, occupied (B, N) bool -> 3 ProjectionIndex
    (sparse where it pays, see SPARSE_MAX_FILL; sparse=False: always the dense grid)."""
    B, P, N = cells.shape
    if P != len(grids):
        raise ValueError(f"cells has {P} planes but the model has {len(grids)} grids {grids}")
    occ = occupied.reshape(-1).to(torch.float32)                                  # (B*N,)
    sparse = sparse and not torch.compiler.is_compiling()  # data-dependent sizes: torch.compile uses the grid
    planes = []
    for p, (H, W) in enumerate(grids):
        if not torch.compiler.is_compiling():
            lo, hi = int(cells[:, p].min()), int(cells[:, p].max())
            if lo < 0 or hi >= H * W:
                raise ValueError(f"cell ids of plane {p} span [{lo}, {hi}] but grid {H}x{W} has {H * W} cells: "
                                 "the model's grids must match the preprocessing (GridConfig.grids)")
        offset = torch.arange(B, device=cells.device).view(B, 1) * (H * W)
        index = (cells[:, p] + offset).reshape(-1)                                # (B*N,)
        count = torch.zeros(B * H * W, device=cells.device).index_add_(0, index, occ)  # points per cell
        # WaffleIron waffleiron/helper_projection.py: masked mean weight = occupied / (count + 1e-6), padding 0
        weight = occ / (count.index_select(0, index) + 1e-6)                      # (B*N,)
        plane = sparse_plane(index, weight, H, W, B) if sparse else None
        planes.append(plane or ProjectionIndex(index, weight, (int(H), int(W)), rows=B * H * W))
    return planes


def sparse_depthwise_conv3x3(x, taps, weight, bias):
    """Depthwise 3x3 convolution (padding 1) evaluated at selected cells of a grid stored as rows.
    x (n_in, C): the grid's values at its listed cells (all other cells are 0); taps (9, n_out): row of x under
    each tap of each output cell (n_in = a zero cell); weight (C, 1, 3, 3), bias (C,) -> (n_out, C).
    out[c] = bias[c] + sum over taps (u, v) of weight[c, 0, u+1, v+1] * x[cell + (u, v), c] (cross-correlation)."""
    C = x.shape[1]
    x = torch.cat([x, x.new_zeros(1, C)])                                          # (n_in + 1, C)
    w = weight.reshape(C, 9).t()                                                   # (9, C), tap order of _TAPS
    out = bias.expand(taps.shape[1], C)
    if torch.is_grad_enabled():
        for t in range(9):
            out = torch.addcmul(out, x.index_select(0, taps[t]), w[t])
        return out
    out = out.contiguous()
    for t in range(9):  # no autograd: accumulate in place
        out.addcmul_(x.index_select(0, taps[t]), w[t])
    return out


class SpatialMix(nn.Module):
    """Spatial mixing (WI paper, "spatial mixing": flatten / 2D FFN / inflate; WaffleIron backbone.py):
    t <- t + DropPath(inflate(LayerScale(FFN(flatten(Norm(t)))))) with
      flatten: each cell of the H x W grid = mean of the normed tokens of the real points in it (empty = 0),
      FFN: depthwise Conv2d 3x3 -> ReLU (GELU in ScaLR+) -> depthwise Conv2d 3x3,
      inflate: each point reads back the value of its cell."""

    def __init__(self, channels, drop_path=0.0, layer_norm=True, gelu=False):
        super().__init__()
        self.norm = make_norm(channels, layer_norm)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.GELU() if gelu else nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels))
        self.scale = nn.Conv1d(channels, channels, 1, groups=channels, bias=False)  # LayerScale, U(-1, 1) init
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens, plane):
        """tokens (B, N, F), plane: ProjectionIndex -> (B, N, F)."""
        B, N, C = tokens.shape
        H, W = plane.shape
        r = self.norm(tokens.reshape(B * N, C))                                            # (B*N, F)
        # flatten: grid[cell] = sum_{p in cell} occupied_p / count_cell * r_p  (masked mean)
        rows = plane.rows if plane.rows is not None else B * H * W
        grid = r.new_zeros(rows, C).index_add_(0, plane.index, r * plane.weight[:, None].to(r.dtype))
        conv_a, act, conv_b = self.ffn
        # LayerScale (a per-channel gain, applied on the grid before inflate in the official code) folded
        # into the second depthwise conv: s * (w * g + b) = (s w) * g + s b.
        s = self.scale.weight.view(C)
        if plane.taps_a is not None:  # sparse plane: the two convolutions at the cells that are read back
            grid = activation_(act, sparse_depthwise_conv3x3(grid, plane.taps_a, conv_a.weight, conv_a.bias))
            grid = sparse_depthwise_conv3x3(grid, plane.taps_b, conv_b.weight * s.view(C, 1, 1, 1), conv_b.bias * s)
        else:                         # dense plane: the whole (B, F, H, W) grid, channels_last strides
            grid = grid.view(B, H, W, C).permute(0, 3, 1, 2)                               # (B, F, H, W)
            grid = activation_(act, conv_a(grid))                                          # (B, F, H, W)
            grid = F.conv2d(grid, conv_b.weight * s.view(C, 1, 1, 1), conv_b.bias * s, padding=1, groups=C)
            grid = grid.permute(0, 2, 3, 1).reshape(B * H * W, C)                          # (B*H*W, F)
        # inflate: every point takes its cell's value
        out = grid.index_select(0, plane.index).view(B, N, C)                              # (B, N, F)
        if out.dtype == tokens.dtype and not (self.training and self.drop_path.p > 0):
            return out.add_(tokens)  # the residual, in the fresh tensor (index_select's backward does not need it)
        return tokens + self.drop_path(out).to(tokens.dtype)


class WaffleIronBackbone(nn.Module):
    """L blocks; block l = SpatialMix on plane l mod 3 (z, y, x, z, ...) then ChannelMix (WaffleIron
    backbone.py). No final norm after the last block. Optional activation checkpointing per mixing layer (ScaLR+
    waffleiron/backbone.py: torch.utils.checkpoint, use_reentrant=False). With BatchNorm, checkpointing recomputes
    the forward in backward and so updates running stats twice; ScaLR+ uses it only with LayerNorm."""

    def __init__(self, channels, depth, drop_path=0.0, layer_norm=True, gelu=False, checkpointing=False):
        super().__init__()
        self.channel_mix = nn.ModuleList([ChannelMix(channels, drop_path, layer_norm, gelu) for _ in range(depth)])
        self.spatial_mix = nn.ModuleList([SpatialMix(channels, drop_path, layer_norm, gelu) for _ in range(depth)])
        self.checkpointing = checkpointing

    def forward(self, tokens, planes):
        """tokens (B, N, F), planes: the 3 ProjectionIndex of the batch -> (B, N, F)."""
        use_ckpt = self.checkpointing and self.training and torch.is_grad_enabled()
        for l, (spatial, channel) in enumerate(zip(self.spatial_mix, self.channel_mix)):
            plane = planes[l % 3]  # WaffleIron backbone.py: layer l uses projection l mod 3
            if use_ckpt:
                tokens = activation_checkpoint(spatial, tokens, plane, use_reentrant=False)
                tokens = activation_checkpoint(channel, tokens, use_reentrant=False)
            else:
                tokens = channel(spatial(tokens, plane))
        return tokens


class WaffleIron(nn.Module):
    """WaffleIron + head, official tensor names: embed.*, waffleiron.{spatial,channel}_mix.{i}.*, classif.*.

    WI-48-768 (ScaLR): WaffleIron(5, 768, 48, 1024) = 60,222,996 parameters with the linear distillation head.
    head: 'linear' (Conv1d F->C, ScaLR distillation / original WaffleIron segmentation), 'mlp' (Supp. B.2
    multi-teacher MLP, needs teacher_dims), 'scalr_plus' (ScaLR+ Conv1d F->2048 -> ReLU -> Conv1d 2048->C),
    'seg' (BatchNorm1d + zero-init Conv1d, ScaLR finetune.py), None (no head: forward = forward_features),
    or an nn.Module."""

    def __init__(self, input_channels=5, feat_channels=768, depth=48, nb_class=1024, grids=DEFAULT_GRIDS,
                 layer_norm=True, drop_path=0.0, gelu=False, checkpointing=False, head="linear",
                 teacher_dims=None):
        super().__init__()
        self.embed = Embedding(input_channels, feat_channels)
        self.waffleiron = WaffleIronBackbone(feat_channels, depth, drop_path, layer_norm, gelu, checkpointing)
        self.grids = tuple((int(h), int(w)) for h, w in grids)  # no parameter depends on them (see SpatialMix)
        self.config = dict(input_channels=input_channels, feat_channels=feat_channels, depth=depth,
                           nb_class=nb_class, grids=[list(g) for g in self.grids], layer_norm=bool(layer_norm),
                           drop_path=float(drop_path), gelu=bool(gelu), checkpointing=bool(checkpointing),
                           head=head if isinstance(head, str) or head is None else "custom",
                           teacher_dims=list(teacher_dims) if teacher_dims else None)
        is_name = isinstance(head, str) or head is None
        self.classif = make_head(head, feat_channels, nb_class, teacher_dims) if is_name else head

    def set_head(self, module):
        """Replace the head (e.g. the pretraining head by seg_head(F, K) for probing/finetuning, as ScaLR
        finetune.py does)."""
        self.classif = module if module is not None else nn.Identity()
        kind, out = head_kind(self.classif)
        self.config.update(head=kind, nb_class=out if out is not None else self.config["nb_class"])
        return self.classif

    def forward_features(self, feat, cells, neighbors, occupied):
        """feat (B, C_in, N), cells (B, 3, N), neighbors (B, k, N), occupied (B, N) -> trunk output (B, F, N)."""
        tokens = self.embed(feat, neighbors)                                      # (B, N, F)
        planes = projection_indices(cells, occupied, self.grids)                  # 3 x ProjectionIndex
        tokens = self.waffleiron(tokens, planes)                                  # (B, N, F)
        return tokens.transpose(1, 2).contiguous()                                # (B, F, N)

    def forward(self, feat, cells, neighbors, occupied):
        """-> head output (B, C, N)."""
        tokens = self.forward_features(feat, cells, neighbors, occupied)          # (B, F, N)
        return apply_pointwise(self.classif, tokens)                               # (B, C, N)


# ---- Reference: a direct implementation of the official layout, for tests and `--bench` ----
# The paper's blocks written the way the official code lays them out ((B, F, N) tensors, scatter / gather per layer
# and channel). The classes above compute the same numbers (tests compare them to 1e-5); measured gain of the fast
# path on this project's 2-core CPU: training step (forward + backward + AdamW) of WI-12-64 on a real 34,688-point
# nuScenes scan, 1 thread, 1,230 ms vs 2,862 ms here (2.33x; `python waffleiron.py --bench --scan X.npy --width 64
# --depth 12 --threads 1 --repeats 2`), and 1.8-1.9x against the official WaffleIron code itself (README).

def naive_embedding(embed, feat, neighbors):
    """Official layout: feat (B, C_in, N) -> (B, F, N), gathering a (B, C, k, N) neighbour tensor."""
    x = embed.norm(feat)                                                            # (B, C, N)
    B, C, N = x.shape
    k = neighbors.shape[1]
    nb = x.gather(2, neighbors.reshape(B, 1, k * N).expand(B, C, k * N)).view(B, C, k, N)
    neighbour = embed.conv2(nb - x.unsqueeze(2)).max(dim=2).values                  # (B, F, N)
    return embed.final(torch.cat([embed.conv1(x), neighbour], dim=1))               # (B, F, N)


def naive_channel_mix(mix, tokens):
    """Official layout: tokens (B, F, N) -> (B, F, N)."""
    return tokens + mix.drop_path(mix.scale(mix.mlp(channels_first_norm(mix.norm, tokens))))


def naive_spatial_mix(mix, tokens, cell, occupied, grid_shape):
    """Official design, everything recomputed in every layer: tokens (B, F, N), cell (B, N) flat cell ids of
    this plane, occupied (B, N) bool -> (B, F, N). Masked mean by scatter_reduce, inflate by gather."""
    B, C, N = tokens.shape
    H, W = grid_shape
    r = channels_first_norm(mix.norm, tokens)                                       # (B, F, N)
    occ = occupied.to(r.dtype)                                                      # (B, N)
    count = torch.zeros(B, H * W, dtype=r.dtype, device=r.device).scatter_reduce(1, cell, occ, "sum")
    weight = occ / (count.gather(1, cell) + 1e-6)                                   # (B, N)
    index = cell.unsqueeze(1).expand(B, C, N)                                       # (B, F, N)
    grid = torch.zeros(B, C, H * W, dtype=r.dtype, device=r.device)
    grid = grid.scatter_reduce(2, index, r * weight.unsqueeze(1), "sum")            # (B, F, H*W)
    grid = mix.scale(mix.ffn(grid.view(B, C, H, W)).view(B, C, H * W))             # (B, F, H*W)
    return tokens + mix.drop_path(grid.gather(2, index))                            # (B, F, N)


def naive_forward_features(model, feat, cells, neighbors, occupied):
    """Same numbers as model.forward_features (to ~1e-5 in fp32), official layout and per-layer scatter."""
    tokens = naive_embedding(model.embed, feat, neighbors)                          # (B, F, N)
    trunk = model.waffleiron
    for l, (spatial, channel) in enumerate(zip(trunk.spatial_mix, trunk.channel_mix)):
        tokens = naive_spatial_mix(spatial, tokens, cells[:, l % 3], occupied, model.grids[l % 3])
        tokens = naive_channel_mix(channel, tokens)
    return tokens



# ==== [model] Heads ====
# Every head maps the trunk output (B, F, N) to (B, C, N) and is stored as `classif` (official names).

def normalize_parts(x, dims, dim=1):
    """Supp. B.2 (multi-teacher): split x along `dim` into parts of sizes `dims`, l2-normalise each part
    independently (F.normalize, eps 1e-12 as in ScaLR utils/distiller.py), re-concatenate.
    x (..., sum(dims), ...)."""
    dims = [int(d) for d in dims]
    if sum(dims) != x.shape[dim]:
        raise ValueError(f"normalize_parts: teacher dims {dims} sum to {sum(dims)} but x has {x.shape[dim]} "
                         f"channels on dim {dim}")
    return torch.cat([F.normalize(part, dim=dim) for part in torch.split(x, dims, dim=dim)], dim=dim)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first (B, C, N) tensor (per point)."""

    def forward(self, x):  # (B, C, N) -> (B, C, N)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class MLPDistillHead(nn.Sequential):
    """Supp. B.2 multi-teacher head psi_3D: Conv1d(F -> 2F) -> LayerNorm -> ReLU -> Conv1d(2F -> sum(dims)),
    then split per teacher, l2-normalise each part and re-concatenate (normalize_parts).
    Keys classif.0.*, classif.1.* (LayerNorm), classif.3.*. Not in the released code (docs/official.md §1)."""

    def __init__(self, channels, teacher_dims):
        dims = [int(d) for d in teacher_dims]
        super().__init__(nn.Conv1d(channels, 2 * channels, 1), ChannelLayerNorm(2 * channels), nn.ReLU(),
                         nn.Conv1d(2 * channels, sum(dims), 1))
        self.teacher_dims = dims

    def forward(self, x):  # (B, F, N) -> (B, sum(dims), N), each teacher part unit-norm
        return normalize_parts(super().forward(x), self.teacher_dims, dim=1)


def linear_head(channels, nb_class):
    """Per-point linear layer Conv1d(F -> C): ScaLR's distillation head (768 -> 1024, ScaLR distill.py) and the
    original WaffleIron segmentation head (e.g. WI-48-256 KITTI, 256 -> 19)."""
    return nn.Conv1d(channels, nb_class, 1)


def mlp_distill_head(channels, teacher_dims):
    """Supp. B.2 2-layer MLP head for one or several teachers (see MLPDistillHead)."""
    return MLPDistillHead(channels, teacher_dims)


def scalr_plus_head(channels, nb_class=1024, hidden=2048):
    """ScaLR+ distillation head (ScaLR+ waffleiron/segmenter.py, docs/official.md §3): Conv1d(F -> 2048) -> ReLU
    -> Conv1d(2048 -> 1024), no norm; keys classif.0.*, classif.2.*."""
    return nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, nb_class, 1))


def seg_head(channels, nb_class):
    """Downstream segmentation head (ScaLR finetune.py): BatchNorm1d(F) -> Conv1d(F -> K) with weight AND bias
    initialised to 0 (so training starts from uniform logits); keys classif.0.*, classif.1.*."""
    conv = nn.Conv1d(channels, nb_class, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.BatchNorm1d(channels), conv)


HEAD_KINDS = ("linear", "mlp", "scalr_plus", "seg", None)


def make_head(kind, channels, nb_class, teacher_dims=None):
    """Build a head by name (see WaffleIron): 'linear' | 'mlp' | 'scalr_plus' | 'seg' | None (identity)."""
    if kind == "linear":
        return linear_head(channels, nb_class)
    if kind == "mlp":
        return mlp_distill_head(channels, teacher_dims or [nb_class])
    if kind == "scalr_plus":
        return scalr_plus_head(channels, nb_class)
    if kind == "seg":
        return seg_head(channels, nb_class)
    if kind is None or kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown head {kind!r}; choose one of {HEAD_KINDS} or pass an nn.Module")


def head_of_state_dict(sd):
    """The one head detector: (kind, number of outputs) from the tensors of a head (names relative to `classif`,
    e.g. 'weight', '0.running_mean'); (None, None) for no head. ValueError for tensors of no known head."""
    if "weight" in sd:                    # Conv1d(F, C): ScaLR pretraining / original WaffleIron
        return "linear", int(sd["weight"].shape[0])
    if "0.running_mean" in sd:            # BatchNorm1d + Conv1d: ScaLR finetune.py head
        return "seg", int(sd["1.weight"].shape[0])
    if "3.weight" in sd:                  # Conv1d, LayerNorm, ReLU, Conv1d: Supp. B.2
        return "mlp", int(sd["3.weight"].shape[0])
    if "2.weight" in sd:                  # Conv1d, ReLU, Conv1d: ScaLR+
        return "scalr_plus", int(sd["2.weight"].shape[0])
    if sd:
        raise ValueError(f"unrecognised head tensors {['classif.' + k for k in sd]}")
    return None, None


def head_kind(module):
    """(kind, number of outputs) of a head module, for model.config ('custom' for a head of no known layout)."""
    try:
        return head_of_state_dict(module.state_dict())
    except (ValueError, KeyError):
        return "custom", None



# ==== [model] Checkpoint I/O ====
# Released files: {'model_point' | 'model_points': sd, 'optim', ...} for distillation (ScaLR utils/distiller.py;
# ScaLR finetune.py reads either key) and {'net': sd, ...} for probing/finetuning (ScaLR utils/finetuner.py),
# usually with DDP's 'module.' prefix. Ours: {'model_point' | 'net': sd, 'config': {...}} with the same tensor
# names, so the official code reads ours and load_checkpoint reads both.

STATE_DICT_KEYS = ("model_point", "model_points", "net", "state_dict", "model")
# constructor arguments the tensors cannot tell; read from our checkpoints' 'config' when present
NON_INFERABLE_KEYS = ("gelu", "teacher_dims", "grids", "drop_path", "checkpointing")


def extract_state_dict(obj, path="<checkpoint>"):
    """Return the model state dict inside a loaded checkpoint, without 'module.' / '_orig_mod.' prefixes."""
    if isinstance(obj, nn.Module):
        sd = obj.state_dict()
    elif isinstance(obj, dict):
        found = [k for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)]
        if found:
            sd = obj[found[0]]
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj  # a raw state dict
        else:
            raise ValueError(f"{path}: no model state dict found. Expected one of the keys {list(STATE_DICT_KEYS)} "
                             f"or a raw state dict; the file has keys {sorted(map(str, obj))[:20]}")
    else:
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return {_strip_wrappers(key): value for key, value in sd.items()}  # DDP and torch.compile wrappers


def infer_config(state_dict):
    """WaffleIron constructor arguments implied by a state dict's tensors (official names):
    input_channels, feat_channels, depth, nb_class, layer_norm (BatchNorm has running_mean), head."""
    sd = state_dict
    required = ["embed.conv1.weight", "waffleiron.channel_mix.0.mlp.0.weight"]
    if any(k not in sd for k in required):
        raise ValueError(f"not a WaffleIron state dict: missing {[k for k in required if k not in sd]}; "
                         f"it has {len(sd)} tensors, e.g. {list(sd)[:8]}")
    feat_channels, input_channels = sd["embed.conv1.weight"].shape[:2]   # (F, C_in, 1)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("waffleiron.channel_mix."))
    layer_norm = "waffleiron.channel_mix.0.norm.running_mean" not in sd
    head, nb_class = head_of_state_dict({k[len("classif."):]: v for k, v in sd.items() if k.startswith("classif.")})
    nb_class = feat_channels if head is None else nb_class
    return dict(input_channels=int(input_channels), feat_channels=int(feat_channels), depth=int(depth),
                nb_class=int(nb_class), layer_norm=bool(layer_norm), head=head)


def state_dict_mismatch(expected, state_dict, limit=12, missing_extra=()):
    """The one strict-load diff of the project (checkpoints, resume, teachers): missing / unexpected keys and shape
    mismatches of `state_dict` against `expected` (a module or a state dict) as one line, '' when it loads strictly.
    missing_extra: keys the caller already knows are missing (e.g. a Meta teacher file's)."""
    expected = expected.state_dict() if hasattr(expected, 'state_dict') else expected
    missing = [k for k in expected if k not in state_dict] + list(missing_extra)
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    lines = [f"{len(items)} {what}: {items[:limit]}{' ...' if len(items) > limit else ''}"
             for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if items]
    return "; ".join(lines)


def _saved_model_config(obj):
    """The non-inferable constructor arguments stored in one of our checkpoints ({'config': {...}})."""
    config = obj.get("config") if isinstance(obj, dict) else None
    if not isinstance(config, dict):
        return {}
    nested = config.get("model") if isinstance(config.get("model"), dict) else {}
    out = {k: v for source in (config, nested) for k, v in source.items() if k in NON_INFERABLE_KEYS}
    try:
        valid = len(out["grids"]) == 3 and all(len(g) == 2 and min(int(v) for v in g) > 0 for g in out["grids"])
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        out.pop("grids", None)  # absent, or not a model grid spec (e.g. another stage's own setting)
    return out


def read_torch_file(path, what="checkpoint", map_location="cpu", weights_only=True, trust_hint=None):
    """torch.load(path) where every way a file can fail to be a checkpoint ends in ONE data.UserError naming it:
    absent, truncated (an interrupted copy or download), not written by torch.save (a text file, a numpy file),
    or holding objects other than tensors and plain values (weights_only=True refuses a pickle that would run
    code). Raises data.MissingDataFileError (a FileNotFoundError) or data.DataFileError (a ValueError)."""
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise data.MissingDataFileError(f"{what} does not exist", path, "check the path")
    import warnings
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        text = str(err)
        # torch's weights-only unpickler puts the reason after "WeightsUnpickler error:"
        reason = " ".join(text.split("WeightsUnpickler error:")[-1].split()).split(" Check the doc")[0][:160]
        if "Unsupported global" in text:  # a torch.save'd pickle of custom objects: loading it could run code
            raise data.DataFileError(f"{what} holds objects other than tensors and plain values, refused by "
                                f"torch.load(weights_only=True) ({reason})", path,
                                trust_hint or "load it with weights_only=False only if you trust it") from None
        error = pickle.UnpicklingError(reason)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError, IndexError, TypeError) as err:
        error = err
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):  # torch.save's zip format, cut short
        raise data.DataFileError(f"{what} file is truncated ({path.stat().st_size:,} bytes: the end of the file is "
                            "missing)", path, "copy or download it again") from None
    detail = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
    raise data.DataFileError(f"not a checkpoint, or truncated: torch.load cannot read it ({detail})", path,
                        "pass a .pth file written by torch.save (our stages or a released ScaLR / WaffleIron "
                        "checkpoint); a truncated copy must be copied or downloaded again") from None


def load_checkpoint(path, grids=None, map_location="cpu", weights_only=True, **flags):
    """Read a released ScaLR / WaffleIron checkpoint or one of ours into WaffleIron, strictly, in eval mode.

    Width, depth, input channels, number of outputs, norm type and head come from the tensors; grids
    (default ScaLR's (256,256),(256,32),(256,32)), gelu (ScaLR+), teacher_dims, drop_path from the arguments,
    else our checkpoint's 'config', else defaults. Flags override everything (a flag that contradicts the
    tensors gives a shape-mismatch error)."""
    path = Path(path)
    obj = read_torch_file(path, "checkpoint", map_location, weights_only, trust_hint=(
        "if you trust it, call load_checkpoint(..., weights_only=False) (CLI: --trust-pickle)"))
    try:
        state_dict = extract_state_dict(obj, path)
        config = infer_config(state_dict)
    except ValueError as err:  # a valid torch file of another kind (an optimizer state, another network, ...)
        raise data.DataFileError(f"not a WaffleIron checkpoint: {str(err).removeprefix(f'{path}: ')}", path,
                            "pass a model.pth of our stages or a released ScaLR / WaffleIron checkpoint") from None
    config.update(_saved_model_config(obj))
    config.update(flags)
    if grids is not None:
        config["grids"] = grids
    known = set(inspect.signature(WaffleIron).parameters)
    if set(config) - known:
        raise ValueError(f"load_checkpoint: unknown flags {sorted(set(config) - known)}; known: {sorted(known)}")
    model = WaffleIron(**config)
    problems = state_dict_mismatch(model, state_dict)
    if problems:
        raise data.DataFileError(f"{path} does not match WaffleIron({', '.join(f'{k}={v}' for k, v in config.items())}): "
                         f"{problems}. Is it a ScaLR/WaffleIron checkpoint, and do the flags agree with it?")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()



# ==== [train] Training kit: schedules, layer decay, atomic save/resume, DDP, losses, evaluation, logging ====
# Everything the three training stages share: distill.py (Supp. B.2), probe.py (Supp. B.3), finetune.py (Supp. B.4).
# The official code is cited by repository and file ("ScaLR utils/scheduler.py" = github.com/valeoai/ScaLR, branch
# main; "ScaLR+" = its branch scalr_plus); docs/official.md lists the conventions. tqdm and matplotlib are
# imported inside the functions that need them.
#
# The training loop of every stage has the same skeleton (nanoGPT style):
#     rank, world, device = ddp_setup()
#     model = wrap_ddp(model.to(device), device)
#     opt = torch.optim.AdamW(layer_decay_param_groups(model, lr, decay, wd))   # or model.parameters()
#     sched = make_scheduler(opt, warmup_iters, total_iters, min_lr)              # stepped every iteration
#     scaler = make_grad_scaler(amp, device)
#     for it, batch in ...:
#         with autocast_context(device, amp): loss = seg_loss(unpad_points(model(...), n), labels)
#         check_finite(loss, it); opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt)
#         scaler.update(); sched.step()
#     state = training_state(model, opt, sched, scaler, epoch, it, model_key='net')     # on EVERY rank
#     if is_main(): save_checkpoint(out / 'ckpt_last.pth', **state)

IGNORE_INDEX = 255  # = data.IGNORE: unannotated points, skipped by the loss and the metric (ScaLR utils/metrics.py)


def seed_everything(seed):
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device).

    The official code seeds nothing unless `--seed` is given (e.g. ScaLR finetune.py); our stages always seed so
    that runs and tests are reproducible. Under DDP pass `seed + rank` if ranks must draw different augmentations
    (the model init does not matter: DDP broadcasts rank 0's weights when it wraps the model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules (Supp. B.2, B.3, B.4; ScaLR and ScaLR+ utils/scheduler.py), stepped once per ITERATION
# ---------------------------------------------------------------------------------------------------------------
def warmup_cosine(it, warmup, total, min_ratio=0.0):
    """LR factor at iteration `it` (0-based): linear warmup from 0, then cosine decay to `min_ratio` (WarmupCosine
    of ScaLR utils/scheduler.py).

    Supp. B.2: "linearly increasing from 0 to 0.002, then decreasing to 1e-5 following a cosine schedule";
    B.3: 0 -> 1e-3 over 2 epochs then cosine to 1e-5; B.4: 0 -> 2e-3 over the first tenth of the epochs, cosine to 0.
    After `total` the factor stays at `min_ratio` (the official code never runs past T, where cos would rise again)."""
    # ScaLR utils/scheduler.py:  it < W:  f = it / W
    if it < warmup:
        return it / warmup
    progress = min(1.0, (it - warmup) / max(1, total - warmup))
    # ScaLR utils/scheduler.py:  f = m + 0.5 (1 - m) (1 + cos(pi (it - W) / (T - W))),  m = min_lr / lr
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """Picklable LR factor for LambdaLR: an object (not a lambda) so LambdaLR.state_dict() stores its parameters."""

    def __init__(self, warmup, total, min_ratio=0.0):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, it):
        return warmup_cosine(it, self.warmup, self.total, self.min_ratio)


def make_adamw(params, **hyper):
    """torch.optim.AdamW(params, **hyper) with fused=True: one kernel updates every parameter instead of a dozen
    small ops per tensor (the optimizer of a toy distillation update: 3.4 -> 1.4 ms on 2 cores). The same AdamW;
    where this torch cannot fuse for these parameters (CPU before torch 2.4), the default implementation."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **hyper)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **hyper)


def make_scheduler(optimizer, warmup_iters, total_iters, min_lr=0.0, base_lr=None):
    """LambdaLR stepped once per iteration (ScaLR utils/finetuner.py); the first step is taken with lr = 0.

    Call `scheduler.step()` right after each `optimizer.step()`. The factor multiplies each group's own initial lr:
    linear warmup, then cosine to m = min_lr / base_lr with ONE global base_lr, as the official code (m = min_lr /
    lr, lr = the config lr). Under layer decay (Supp. B.4) group g starts at scale_g * lr and therefore ends at
    scale_g * min_lr; only the head (scale 1) ends exactly at min_lr. base_lr defaults to the largest group lr, i.e.
    the config lr (the head has scale 1). Finetuning uses min_lr = 0 (ScaLR configs/downstream/*/WI_768_finetune_*
    .yaml), where the choice does not matter."""
    if total_iters < 1 or warmup_iters < 0:
        raise ValueError(f"make_scheduler: need total_iters >= 1 and warmup_iters >= 0, "
                         f"got {total_iters}, {warmup_iters}")
    group_lrs = [g.get('initial_lr', g['lr']) for g in optimizer.param_groups]  # (fresh optimizer: its lr)
    base = max(group_lrs) if base_lr is None else base_lr
    factor = WarmupCosine(warmup_iters, total_iters, min_lr / base if base > 0 else 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (Supp. B.4; param_groups_lrd / get_layer_id_for_waffleiron of ScaLR finetune.py)
# ---------------------------------------------------------------------------------------------------------------
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DDP and torch.compile prefixes (ScaLR finetune.py strips 'module.')
_BLOCK_NAME = re.compile(r'^waffleiron\.(?:channel_mix|spatial_mix)\.(\d+)\.')


def _strip_wrappers(name):
    """'module._orig_mod.embed.norm.weight' -> 'embed.norm.weight' (official tensor names)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def layer_id(name, depth):
    """Layer id of a parameter for layer decay (get_layer_id_for_waffleiron of ScaLR finetune.py): `embed.*` -> 0,
    `waffleiron.{spatial,channel}_mix.i.*` -> i + 1 (a SpatialMix and its ChannelMix share the id), everything else
    (the head `classif.*`) -> depth + 1."""
    name = _strip_wrappers(name)
    if name.startswith('embed.'):
        return 0
    match = _BLOCK_NAME.match(name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def _infer_depth(names):
    """Number of WaffleIron blocks L from parameter names (largest block index + 1; 0 if there is none)."""
    ids = [int(m.group(1)) for m in (_BLOCK_NAME.match(_strip_wrappers(n)) for n in names) if m]
    return max(ids) + 1 if ids else 0


def layer_decay_param_groups(model, lr, decay, weight_decay=0.0, depth=None):
    """AdamW parameter groups with BEiT-style layer-wise lr decay, exactly as ScaLR finetune.py's param_groups_lrd.

    scale(id) = decay^(L + 1 - id): the head gets 1, the last block decay^1, block 0 decay^L, the embedding decay^(L+1)
    (L = 48: 49 "layers" + head). Supp. B.4 only says "layer-wise learning rate decay" (0.95 for 1 % / 10 %, 0.99 for
    100 %); the phrase "decay^(L - layer) with the embedding counted as layer 0" is the same rule when L
    counts the L + 1 = 49 layers below the head. Parameters with ndim == 1 (biases, norm weights) go to no-decay
    groups (wd 0); LayerScale weights are (F, 1, 1) and keep weight decay (as in ScaLR). Frozen params are skipped.
    Each group carries 'lr', 'lr_scale', 'layer_id', 'weight_decay' and 'param_names'."""
    net = unwrap(model)
    if depth is None:  # L = number of blocks, from the module list if there is one, else from the parameter names
        blocks = getattr(getattr(net, 'waffleiron', None), 'channel_mix', None)
        depth = len(blocks) if blocks is not None else _infer_depth([n for n, _ in net.named_parameters()])
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    groups = {}
    for name, param in named:
        lid = layer_id(name, depth)
        no_decay = param.ndim == 1  # ScaLR finetune.py: "no_decay" group for 1-D tensors
        if (lid, no_decay) not in groups:
            # Supp. B.4 / ScaLR finetune.py: lr scale = decay^(L + 1 - id)
            scale = decay ** (depth + 1 - lid)
            groups[(lid, no_decay)] = {'params': [], 'param_names': [], 'lr': lr * scale, 'lr_scale': scale,
                                       'layer_id': lid, 'weight_decay': 0.0 if no_decay else weight_decay}
        groups[(lid, no_decay)]['params'].append(param)
        groups[(lid, no_decay)]['param_names'].append(_strip_wrappers(name))
    return [groups[key] for key in sorted(groups)]


# ---------------------------------------------------------------------------------------------------------------
# Atomic checkpoints and bit-exact resume (official key names model_point / net, optim, scheduler, scaler: ScaLR
# utils/distiller.py and utils/finetuner.py)
# ---------------------------------------------------------------------------------------------------------------
def official_state_dict(model):
    """The model's state dict with official tensor names: no DDP 'module.' nor torch.compile '_orig_mod.' prefix
    (ScaLR finetune.py strips 'module.'), so the official code and load_checkpoint() read it."""
    state = unwrap(model).state_dict()
    if not any(k != _strip_wrappers(k) for k in state):
        return state
    return type(state)((_strip_wrappers(k), v) for k, v in state.items())


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX); harmless no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temp_files(path, keep):
    """Remove `.NAME.<pid>.tmp` files left next to `path` by a save that was killed (SIGKILL, power loss)."""
    import glob
    for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        if Path(stale) != keep:
            with contextlib.suppress(OSError):
                os.unlink(stale)


def save_checkpoint(path, **state):
    """torch.save(state, path) atomically: write a temp file in the same folder, flush + fsync, then os.replace.

    A crash or an exception mid-write (NaN check, Ctrl-C, full disk) leaves the previous `path` intact and removes
    the temp file, so `--resume` never meets a truncated checkpoint; temp files of an earlier killed save are
    removed here. A failed write (full disk, quota, read-only folder) raises one data.UserError naming `path`.
    Call it on rank 0 only (`if is_main()`)."""
    path = Path(path)
    if 'config' in state:  # Path objects, numpy scalars... -> plain types (loadable with weights_only=True)
        state['config'] = _plain(state['config'])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _checkpoint_write_error(f"cannot create the output folder ({err.strerror or err})", path.parent,
                                      "pass a writable --out") from None
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')  # same folder => os.replace is an atomic rename
    _remove_stale_temp_files(path, keep=tmp)
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as "unexpected pos ..."
        raise _checkpoint_write_error(f"cannot write the checkpoint: {_write_failure(err, path.parent)}", path,
                                      "free some disk space or pass another --out; the previous checkpoint, if "
                                      "any, is intact") from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # only exists if something failed before the rename
    _fsync_dir(path.parent)
    return path


_WRITE_ERROR_CLASS = []


def _checkpoint_write_error(what, where, todo):
    """A data.UserError that is also an OSError (callers that catch OSError for a failed write still do)."""
    if not _WRITE_ERROR_CLASS:

        class CheckpointWriteError(data.UserError, OSError):
            """A checkpoint could not be written (full disk, quota, read-only folder)."""
        _WRITE_ERROR_CLASS.append(CheckpointWriteError)
    return _WRITE_ERROR_CLASS[0](what, where, todo)


def _write_failure(err, folder):
    """Why a write failed, in words: the errno's text, else (torch's RuntimeError) the free space left."""
    import errno
    import shutil
    if isinstance(err, OSError) and err.errno is not None:
        return {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded'}.get(
            err.errno, err.strerror or str(err))
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(folder).free
        if free < 64 * 2**20:
            return f'the disk is full ({free / 2**20:.1f} MiB free)'
    return f'the write failed ({(str(err).splitlines() or [""])[0][:120]})'


def rng_state():
    """RNG states of python `random`, numpy's global RNG, torch CPU and every initialised CUDA device.

    Stored with plain types and tensors only, so the checkpoint loads with torch.load(weights_only=True)."""
    np_state = np.random.get_state()  # ('MT19937', uint32 (624,), pos, has_gauss, cached_gaussian)
    state = {'python': random.getstate(),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Inverse of rng_state()."""
    random.setstate(_as_tuple(state['python']))
    np_state = state['numpy']
    np.random.set_state(('MT19937', np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def _as_tuple(obj):
    """random.setstate needs tuples back (a checkpoint round trip may have turned them into lists)."""
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def _plain(obj):
    """Config/extra values made loadable with weights_only=True: Path -> str, numpy -> python/torch, set -> list,
    argparse.Namespace -> dict."""
    if hasattr(obj, '__dict__') and type(obj).__name__ == 'Namespace':
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, Path) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return [_plain(v) for v in sorted(obj, key=str)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def training_state(model, optimizer=None, scheduler=None, scaler=None, epoch=0, iteration=0, extra=None,
                   model_key='model_point', config=None):
    """Everything a bit-exact `--resume` needs, with the official key names (ScaLR utils/finetuner.py):
    {model_key: weights with official names, 'optim', 'scheduler', 'scaler', 'epoch', 'iteration', 'rng', 'config'}.

    model_key: 'model_point' (distill.py, read by the official LP/FT code) or 'net' (probe.py / finetune.py).
    Under DDP call it on EVERY rank (it gathers each rank's RNG state), then `if is_main(): save_checkpoint(...)`.
    Save right away: the optimizer state refers to live tensors."""
    state = {model_key: official_state_dict(model), 'epoch': int(epoch), 'iteration': int(iteration),
             'rng': rng_state(), 'config': _plain(config if config is not None else {})}
    if _world_size() > 1:
        per_rank = [None] * _world_size()
        dist.all_gather_object(per_rank, state['rng'])
        state['rng_per_rank'] = per_rank
    for key, obj in (('optim', optimizer), ('scheduler', scheduler), ('scaler', scaler)):
        if obj is not None:
            state[key] = obj.state_dict()
    for key, value in (extra or {}).items():
        if key in state:
            raise ValueError(f"training_state: extra key {key!r} would overwrite a standard checkpoint entry")
        state[key] = _plain(value)
    return state


def load_training_checkpoint(path, map_location='cpu'):
    """torch.load of one of our checkpoints (weights_only=True: no code runs); a missing, truncated or foreign file
    ends in one data.UserError naming it (read_torch_file)."""
    path = Path(path)
    if not path.is_file():
        raise data.MissingDataFileError("no checkpoint there", path, "run once without --resume, or point --out/"
                                   "--ckpt to the folder of a previous run")
    state = read_torch_file(path, "checkpoint", map_location, trust_hint=(
        "it was not written by training_state/save_checkpoint (or its config holds a custom object); inspect it "
        "with torch.load(weights_only=False) only if you trust it"))
    if not isinstance(state, dict):
        raise data.DataFileError(f"not a training checkpoint (it holds a {type(state).__name__})", path,
                            "pass the ckpt_last.pth of a previous run")
    return state


RUN_FILES = ('ckpt_last.pth', 'log.csv', 'model.pth', 'results.json')  # what makes a folder "a previous run"


def prepare_run_dir(out, resume=False, overwrite=False, flag='--out'):
    """Check the output folder at start, before any data is read (one shared rule for every stage):
    it must be writable; a folder that already holds a run (RUN_FILES) is refused unless --resume continues it or
    --overwrite starts over. Raises data.UserError (one line, exit 2)."""
    import tempfile
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise data.UserError(f'{out} exists and is not a folder', flag, 'pass a folder path')
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and not resume and not overwrite:
        raise data.UserError(f'{out} already holds a run ({", ".join(found)})', flag,
                        'continue it with --resume, start over with --overwrite, or pass another --out')
    if resume and not (out / 'ckpt_last.pth').is_file():
        raise data.UserError(f'nothing to resume: no ckpt_last.pth in {out}', '--resume',
                        'run once without --resume, or point --out to the folder of a previous run')
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix='.write_test_'):
            pass
    except OSError as err:
        raise data.UserError(f'output folder {out} is not writable ({err.strerror or err})', flag,
                        'pass a writable --out DIR') from None
    if overwrite and not resume:
        for n in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (out / n).unlink()
    return out


def check_resume_config(path, saved, current, keys=None):
    """--resume must continue the same run: refuse, listing every setting that differs between the checkpoint's
    config and this command line (keys: which settings count; default all keys of `current`)."""
    keys = list(current) if keys is None else keys
    diff = [f'{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now' for k in keys
            if k in saved and _plain(saved.get(k)) != _plain(current.get(k))]
    if diff:
        raise data.UserError(f'cannot --resume from {path}: settings differ ({"; ".join(diff)})', '--resume',
                        'resume with the same flags, or use another --out (or --overwrite) to start a new run')



def read_resume_checkpoint(path, config, stage, keys=None, defaults=None):
    """The one --resume check of every stage: OUT/ckpt_last.pth must be a training checkpoint written by a previous
    run of `stage` with the same settings (keys: which settings of `config` count; defaults: values assumed for
    settings that older runs did not record). Returns the checkpoint; anything else is one data.UserError line."""
    st = load_training_checkpoint(path)  # missing / truncated / foreign file: one line naming it
    saved = st.get('config') if isinstance(st.get('config'), dict) else None
    if saved is None or saved.get('stage') != stage or 'optim' not in st:
        written_by = (saved or {}).get('stage') or 'another program'
        raise data.UserError(f'{path} is not a checkpoint of this stage ({stage}; it was written by {written_by})',
                             '--resume', 'pass the --out of a previous run of this stage, or drop --resume')
    check_resume_config(path, {**(defaults or {}), **saved}, config, keys=keys)
    return st

def diverged_message(err, out):
    """The one line of a NaN/inf loss (wi.check_finite): what happened and which checkpoint is the last good one."""
    last = Path(out) / "ckpt_last.pth"
    where = f"last good checkpoint: {last}" if last.is_file() else f"no checkpoint was written yet in {out}"
    return f"error: {err} ({where})"


def _load_weights_strict(model, weights, where):
    """load_state_dict(strict=True) with a readable error (missing / unexpected keys, shape mismatches)."""
    weights = {_strip_wrappers(k): v for k, v in weights.items()}
    problems = state_dict_mismatch(model, weights, limit=5)
    if problems:
        raise ValueError(f"checkpoint {where} does not match the model (another --width/--depth/head?): {problems}")
    model.load_state_dict(weights, strict=True)


# Optimizer settings that choose how a step is computed, not what it computes: a checkpoint written by a plain AdamW
# resumes into a fused one (and back) without GradScaler or the optimizer being told the other implementation.
_STEP_IMPLEMENTATION = ('fused', 'foreach')


def restore_training_state(ckpt, model, optimizer=None, scheduler=None, scaler=None, model_key=None,
                           restore_rng=True):
    """Load a training_state() checkpoint (dict or path) into freshly built objects; returns (epoch, iteration).

    Build model/optimizer/scheduler/scaler exactly as for a fresh run, then call this: the next iteration is then
    bit-identical to the one the interrupted run would have done (same weights, Adam moments, lr factor, loss scale,
    and python/numpy/torch RNG streams; under DDP each rank gets its own RNG back when the world size matches)."""
    where = str(ckpt) if isinstance(ckpt, (str, Path)) else 'in memory'
    if isinstance(ckpt, (str, Path)):
        ckpt = load_training_checkpoint(ckpt)
    key = model_key or ('model_point' if 'model_point' in ckpt else 'net')
    if key not in ckpt:
        raise KeyError(f"checkpoint {where} has no weights under {key!r} (keys: {sorted(ckpt)})")
    _load_weights_strict(unwrap(model), ckpt[key], where)
    for name, obj in (('optim', optimizer), ('scheduler', scheduler), ('scaler', scaler)):
        if obj is not None:
            if name not in ckpt:
                raise KeyError(f"checkpoint {where} has no {name!r} state: it is not a training checkpoint "
                               f"(use it as --ckpt to initialise, not --resume)")
            state = ckpt[name]
            if name == 'optim':  # how the step runs is this optimizer's own (make_adamw), not the checkpoint's
                state = dict(state, param_groups=[dict(g, **{k: mine[k] for k in _STEP_IMPLEMENTATION if k in mine})
                                                  for g, mine in zip(state['param_groups'], obj.param_groups)])
            obj.load_state_dict(state)
    if restore_rng and 'rng' in ckpt:
        per_rank = ckpt.get('rng_per_rank')
        use_own = per_rank is not None and len(per_rank) == _world_size()
        set_rng_state(per_rank[_rank()] if use_own else ckpt['rng'])
    return ckpt.get('epoch', 0), ckpt.get('iteration', 0)


# ---------------------------------------------------------------------------------------------------------------
# Distributed data parallel (ScaLR finetune.py: the batch size is global and divided by the number of GPUs)
# ---------------------------------------------------------------------------------------------------------------
def resolve_device(name=None):
    """--device: None/'auto' = cuda if available else cpu; refuse cuda without a GPU (before data is read)."""
    if name in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise data.UserError(f'unknown device {name!r}', '--device', 'use cpu, cuda or cuda:N') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise data.UserError('CUDA was asked for but no GPU is visible to torch', '--device',
                        'pass --device cpu, or check the driver / CUDA_VISIBLE_DEVICES')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise data.UserError(f'{name}: only {torch.cuda.device_count()} GPU(s) visible', '--device', 'pick another index')
    return dev


def setup_device(name=None):
    """--device checked before any data is read (resolve_device: cuda without a GPU is refused), then DDP when
    launched by torchrun (each process its local GPU). Returns (rank, world size, device)."""
    want = resolve_device(name)
    rank, world, device = ddp_setup(device=want.type)
    tune_process(want)
    return rank, world, (want if world == 1 else device)


def tune_process(device):
    """Process-wide settings for computing on `device` (every stage through setup_device, and the bench): numpy's
    BLAS on one thread (its products here are small; its threads would only compete with torch's) and, on CPU,
    freed memory kept in the process (the activations live in this process's heap only when training on CPU)."""
    data.one_blas_thread()
    if torch.device(device).type == 'cpu':
        keep_freed_memory()


def keep_freed_memory(mmap_max=32 << 20, trim=(1 << 31) - 1):
    """glibc's malloc: blocks up to `mmap_max` bytes come from the heap, and freed heap memory stays in the process
    (until more than `trim` bytes are free at its top). By default glibc maps big blocks afresh and hands freed
    memory back to the system, so every training step page-faults its large activations in again (a toy
    distillation update, whose neighbour tensors are 19 MB each: 96 -> 86 ms on 2 cores). The process keeps its
    peak memory instead of returning it between steps. Called on CPU only (tune_process). Returns True
    when both settings took, False where mallopt is missing (not glibc: macOS, musl, Windows) or refuses a value."""
    import ctypes
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' ctypes has no CDLL(None)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_max))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim)))


def idle_cores(window_s=0.3, stat='/proc/stat'):
    """CPU threads a toy run on CPU takes when --threads is not given: the cores idle right now, at least 1.
    Measured as the idle share of all cores over `window_s` seconds (Linux /proc/stat; elsewhere 1). Why: on the
    2-core machine of README, 2 threads run the toy distillation 1.37x and the toy probe 1.3x faster when the machine
    is otherwise idle, but 2 OpenMP threads beside another busy process were measured many times slower (each
    parallel region waits for the thread that lost its core). An OMP_NUM_THREADS set in the environment wins."""
    env = os.environ.get('OMP_NUM_THREADS', '')
    if env.isdigit() and int(env) > 0:
        return int(env)

    def idle_and_total():
        with open(stat) as f:
            ticks = [int(v) for v in f.readline().split()[1:]]  # cpu user nice system idle iowait irq softirq ...
        return ticks[3] + ticks[4], sum(ticks[:8])
    try:
        idle0, total0 = idle_and_total()
        time.sleep(window_s)
        idle1, total1 = idle_and_total()
    except (OSError, ValueError, IndexError):
        return 1
    cores = os.cpu_count() or 1
    idle_share = (idle1 - idle0) / max(1, total1 - total0)  # 0..1 over all cores
    return max(1, min(cores, int(idle_share * cores + 0.25)))  # a core 75 % idle counts as idle


def _world_size():
    return data.rank_world()[1]


def _rank():
    return data.rank_world()[0]


def is_main():
    """True on rank 0 (and in a single-process run): the only process that prints, logs and saves."""
    return _rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only, flushed (tqdm and torchrun interleave output otherwise)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def ddp_setup(backend=None, device=None, timeout_s=1800):
    """Start DDP when launched by `torchrun --nproc_per_node N` (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    otherwise a single process. Returns (rank, world_size, device).

    device: None = cuda:LOCAL_RANK if CUDA is available, else cpu; 'cpu' forces CPU. backend: None = nccl on CUDA,
    gloo on CPU."""
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == 'cuda'
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if not dist.is_available() or (world <= 1 and not dist.is_initialized()):
        return 0, 1, torch.device('cuda' if want_cuda else 'cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', '0')))
    dev = torch.device('cuda', local_rank) if want_cuda else torch.device('cpu')
    if want_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        for var in ('RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun --nproc_per_node N")
        dist.init_process_group(backend=backend or ('nccl' if want_cuda else 'gloo'), init_method='env://',
                                rank=int(os.environ['RANK']), world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), dev


def ddp_cleanup():
    """Tear the process group down (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every rank (no-op in a single process)."""
    if _world_size() > 1:
        dist.barrier()


def unwrap(model):
    """The plain nn.Module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or (
                isinstance(model, nn.DataParallel)):
            model = model.module
        elif hasattr(model, '_orig_mod') and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def wrap_ddp(model, device, find_unused_parameters=False):
    """DistributedDataParallel around `model` when world_size > 1 (unchanged otherwise).

    On CUDA, BatchNorm becomes SyncBatchNorm first (as in ScaLR finetune.py);
    on CPU/gloo BatchNorm stays local (SyncBatchNorm needs CUDA). Parameters are kept, so an optimizer built before
    or after wrapping sees the same tensors. Parameters without requires_grad (linear probing) are ignored by DDP."""
    if _world_size() <= 1:
        return model
    device = torch.device(device)
    if device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index], output_device=device.index,
                                                   find_unused_parameters=find_unused_parameters)
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def all_reduce_sum(value):
    """Sum a tensor or numpy array (e.g. a (K, K) confusion matrix, as ScaLR utils/finetuner.py sums it) over
    ranks; returns the same type. In a single process the input is returned unchanged."""
    if _world_size() <= 1:
        return value
    is_numpy = isinstance(value, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if is_numpy else value
    nccl = dist.get_backend() == 'nccl'  # nccl reduces CUDA tensors only
    comm_device = torch.device('cuda', torch.cuda.current_device()) if nccl else torch.device('cpu')
    buf = tensor.to(comm_device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu().numpy() if is_numpy else buf.to(tensor.device)


def all_reduce_mean(value):
    """Mean of a float tensor over ranks (for logging the loss of the global batch)."""
    return all_reduce_sum(value) / _world_size() if _world_size() > 1 else value


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision (ScaLR utils/finetuner.py: --fp16 = autocast fp16 + GradScaler; ScaLR+: bf16 autocast,
# docs/official.md §3)
# ---------------------------------------------------------------------------------------------------------------
_AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def autocast_context(device, amp='none'):
    """`with autocast_context(device, amp):` around the forward and the loss; amp in {'none', 'fp16', 'bf16'}."""
    if amp not in ('none', 'fp16', 'bf16'):
        raise ValueError(f"--amp must be one of none, fp16, bf16 (got {amp!r})")
    if amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_AMP_DTYPES[amp])


def make_grad_scaler(amp, device=None):
    """GradScaler, enabled only for fp16 (fp16's narrow exponent range underflows small gradients; bf16 has fp32's
    range and needs no scaling). A disabled scaler's scale/step/update are plain backward/step, so the loop is the
    same for every --amp."""
    device_type = torch.device(device).type if device is not None else ('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.amp.GradScaler(device_type, enabled=(amp == 'fp16'))


def check_finite(loss, iteration, what='loss'):
    """Raise FloatingPointError naming the iteration if `loss` is NaN/inf (stop, save nothing corrupt);
    returns the loss as a python float for logging."""
    value = loss.detach().float() if torch.is_tensor(loss) else torch.tensor(float(loss))
    if not bool(torch.isfinite(value).all()):
        shown = value.item() if value.numel() == 1 else value.flatten()[:5].tolist()
        raise FloatingPointError(
            f"{what} is {shown} at iteration {iteration}: training diverged. This step was not applied and nothing "
            f"was saved for it (the last checkpoint on disk is intact). Lower --lr, try --amp bf16 or none, or check "
            f"the input data; then --resume from the last checkpoint.")
    return value.item() if value.numel() == 1 else value


# ---------------------------------------------------------------------------------------------------------------
# Downstream loss (ScaLR utils/metrics.py): cross-entropy + Lovász-softmax, for linear probing AND finetuning
# ---------------------------------------------------------------------------------------------------------------
def unpad_points(x, num_points):
    """(B, C, Nmax) padded network output -> (sum_b n_b, C) rows of the real points, scan after scan: the order of
    data.collate's concatenated 'labels' (ScaLR Collate: labels concatenated with no padding)."""
    B, C, N = x.shape
    real = torch.arange(N, device=x.device)[None, :] < num_points.to(x.device)[:, None]  # (B, N) bool
    return x.transpose(1, 2)[real]  # (sum n_b, C)


def lovasz_softmax(probs, labels, classes='present'):
    """Lovász-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018), written from the paper's definition.

    probs (M, K) class probabilities of valid points; labels (M,) in 0..K-1.
    For class c: errors m_i = |1[y_i = c] - p_i(c)|. The Jaccard loss of a set S of mispredicted points,
        Delta_J(S) = |S| / |{y = c} u S| = 1 - |{y = c} \\ S| / |{y = c} u S|,
    is submodular; its Lovász extension at m (Berman et al., Eq. 8-9) is
        loss_c(m) = sum_i m_(i) g_i,  g_i = Delta_J({pi_1..pi_i}) - Delta_J({pi_1..pi_(i-1)}),
    with pi sorting m in decreasing order. At one-hot probabilities this equals 1 - IoU_c.
    classes: 'present' = mean over classes present in `labels` (ScaLR utils/lovasz.py), 'all', or a list of
    class ids."""
    probs = probs.float()
    M, K = probs.shape
    if M == 0:
        return probs.sum()  # 0.0, no valid point
    # only the classes averaged are computed: with 'present', a class absent from `labels` would be dropped anyway
    if classes == 'present':
        rows = torch.unique(labels)  # (C,) sorted class ids
    elif classes == 'all':
        rows = torch.arange(K, device=probs.device)
    else:
        rows = torch.as_tensor(list(classes), device=probs.device, dtype=torch.long)
    # class-major (C, M): each class's errors are one contiguous row, so the sort runs along the last axis
    fg = (labels[None, :] == rows[:, None]).to(probs.dtype)  # (C, M) 1[y_i = c]
    errors = (fg - probs.t()[rows]).abs()  # (C, M) m_i(c)
    # each class sorted independently, in decreasing order (the loss does not depend on the order of equal errors);
    # the gradient flows through the gathers of the sorted values. On CPU numpy's sort is 4-10x faster than torch.sort
    key = -errors.detach()
    perm = torch.from_numpy(np.argsort(key.numpy(), axis=1)) if key.device.type == 'cpu' else key.argsort(dim=1)
    errors_sorted, fg_sorted = errors.gather(1, perm), fg.gather(1, perm)  # (C, M)
    gts = fg.sum(1, keepdim=True)  # (C, 1) |{y = c}|
    # with S_i = the i largest errors: |{y=c} \ S_i| = gts - cumsum(fg), |{y=c} u S_i| = gts + cumsum(1 - fg)
    intersection = gts - fg_sorted.cumsum(1)  # (C, M)
    union = gts + (1.0 - fg_sorted).cumsum(1)  # (C, M), always >= 1
    jaccard = 1.0 - intersection / union  # (C, M) Delta_J(S_i)
    grad = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)  # (C, M) g_i, Delta_J(empty) = 0
    return (errors_sorted * grad).sum(1).mean()  # mean over the classes of the Lovász extension per class


def seg_loss(logits, labels, lovasz_weight=1.0, ignore_index=IGNORE_INDEX, return_parts=False):
    """Downstream loss of LP and FT (SemSegLoss of ScaLR utils/metrics.py): CE(ignore 255, mean over valid points)
    + 1.0 * Lovász-softmax(softmax(logits) of the valid points, classes='present'). No class weights, no smoothing.

    logits (M, K) of all points of the batch concatenated (unpad_points), labels (M,) with 255 = ignore.
    No valid point: a finite 0 with zero gradient (ScaLR utils/metrics.py skips Lovász without valid labels).
    return_parts=True also returns {'ce': float, 'lovasz': float} for the log."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"seg_loss expects logits (M, K) and labels (M,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)} (use unpad_points on the (B, K, N) output)")
    logits = logits.float()  # losses in fp32, also under autocast
    valid = labels != ignore_index  # (M,)
    if bool(valid.all()):  # the same rows without the masked copy and its backward (a scatter into zeros)
        logits_v, labels_v = logits.contiguous(), labels
    else:
        logits_v, labels_v = logits[valid], labels[valid]  # (M', K), (M',)
    if labels_v.numel() == 0:
        zero = logits_v.sum()  # empty sum: exactly 0, still attached to the graph
        return (zero, {'ce': 0.0, 'lovasz': 0.0}) if return_parts else zero
    K = logits.shape[1]
    lo, hi = int(labels_v.min()), int(labels_v.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"labels must be in 0..{K - 1} or {ignore_index}, found {lo}..{hi}: "
                         f"class map / head size mismatch")
    ce = F.cross_entropy(logits_v, labels_v)  # == CE(ignore_index=255) over all points (mean over valid ones)
    lovasz = lovasz_softmax(F.softmax(logits_v, dim=1), labels_v, classes='present')
    # ScaLR utils/metrics.py: loss = CE + 1.0 * Lovász
    loss = ce + lovasz_weight * lovasz
    return (loss, {'ce': ce.item(), 'lovasz': lovasz.item()}) if return_parts else loss


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on all original points (ScaLR utils/finetuner.py, datasets/pc_dataset.py)
# ---------------------------------------------------------------------------------------------------------------
def _as_numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def evaluate(model, loader, num_classes, device, amp='none', progress=True):
    """(K, K) int64 confusion matrix (rows GT, cols prediction) over ALL original points of the loader's scans,
    summed over DDP ranks (as ScaLR utils/finetuner.py). Batches come from data.collate: feat, cells, neighbors,
    occupied, num_points, upsample (list of (N_b,) indices into the kept points), orig_labels (list of (N_b,) labels).

    Runs the unwrapped module in eval mode without grad (no DDP collectives per batch: ranks may hold different
    numbers of val scans); each module's train/eval flag is restored afterwards (probe.py keeps the backbone in
    eval and the head in train)."""
    from tqdm import tqdm
    net = unwrap(model)
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc='eval', leave=False, disable=not (progress and is_main())):
                if 'orig_labels' not in batch:
                    raise KeyError("evaluate needs batches with 'orig_labels' (a labelled split; see data.collate)")
                inputs = [batch[k].to(device, non_blocking=True) for k in ('feat', 'cells', 'neighbors', 'occupied')]
                with autocast_context(device, amp):
                    out = net(*inputs)  # (B, K, Nmax)
                if out.shape[1] != num_classes:
                    raise ValueError(f"model outputs {out.shape[1]} classes, evaluate was asked for {num_classes}")
                for b, (upsample, gt) in enumerate(zip(batch['upsample'], batch['orig_labels'])):
                    n_b = int(batch['num_points'][b])
                    # ScaLR utils/finetuner.py: every original point takes the logits of its nearest kept point,
                    # out[b, :, up]; argmax first then gather gives the same labels for less work
                    pred = out[b, :, :n_b].argmax(0)[torch.as_tensor(upsample, device=out.device)]  # (N_b,)
                    cm += data.confusion_matrix(_as_numpy(gt), _as_numpy(pred), num_classes)
    finally:
        for module, mode in modes:
            module.training = mode
    return all_reduce_sum(cm)


# ---------------------------------------------------------------------------------------------------------------
# CSV log and plots (rank 0 only)
# ---------------------------------------------------------------------------------------------------------------
def _csv_value(value):
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float):
        return f'{value:.7g}'
    return value


class CSVLog:
    """log.csv with fixed columns, one row per call, flushed immediately (a crash loses nothing already logged).
    Rank 0 only (no-op elsewhere). A new run overwrites the file; `resume_iteration=it` keeps the existing file
    (same columns required) and drops rows with `key` > it, i.e. rows logged after the checkpoint we resume from."""

    def __init__(self, path, fields, resume_iteration=None, key='iteration'):
        self.path, self.fields, self.enabled = Path(path), list(fields), is_main()
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is not None and self.path.is_file():
            with open(self.path, newline='') as f:
                rows = list(csv.reader(f))
            if not rows or rows[0] != self.fields:
                raise ValueError(f"{self.path} has columns {rows[0] if rows else []}, this run logs {self.fields}: "
                                 f"resume with the same stage, or use another --out")
            col = self.fields.index(key)
            kept = [r for r in rows[1:] if r[col] == '' or float(r[col]) <= resume_iteration]
            self._rewrite([self.fields] + kept)
        else:
            self._rewrite([self.fields])

    def _rewrite(self, rows):
        tmp = self.path.with_name(f'.{self.path.name}.tmp')
        with open(tmp, 'w', newline='') as f:
            csv.writer(f).writerows(rows)
        os.replace(tmp, self.path)

    def log(self, **row):
        """Append one row; unknown columns are an error, missing ones stay empty."""
        if not self.enabled:
            return
        unknown = sorted(set(row) - set(self.fields))
        if unknown:
            raise KeyError(f"CSVLog {self.path}: unknown columns {unknown} (columns: {self.fields})")
        with open(self.path, 'a', newline='') as f:
            csv.DictWriter(f, self.fields).writerow({k: _csv_value(v) for k, v in row.items()})
            f.flush()


def plot_log(csv_path, png_path, y_keys, title=None, x_key='iteration'):
    """One panel per column of `y_keys` against `x_key`, saved as a PNG (matplotlib Agg, imported lazily).
    Rank 0 only; returns the PNG path (None on other ranks)."""
    if not is_main():
        return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    with open(csv_path, newline='') as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    missing = [k for k in [x_key, *y_keys] if rows and k not in columns]
    if missing:
        raise KeyError(f"plot_log: {csv_path} has no column(s) {missing} (columns: {columns})")
    fig, axes = plt.subplots(len(y_keys), 1, figsize=(7, 2.6 * len(y_keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], y_keys):
        pts = [(float(r[x_key]), float(r[key])) for r in rows if r.get(key, '') != '' and r.get(x_key, '') != '']
        if pts:
            ax.plot(*zip(*pts), marker='.' if len(pts) < 50 else None, linewidth=1)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x_key)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f'.{png_path.name}.tmp')
    fig.savefig(tmp, dpi=100, format='png')  # written aside then renamed: a reader never sees half a PNG
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


# ---------------------------------------------------------------------------------------------------------------
# What the downstream stages share: which checkpoint, which grid, the results report (probe.py, finetune.py)
# ---------------------------------------------------------------------------------------------------------------
def latest_checkpoint(pattern='distill*/model.pth', runs='runs'):
    """Newest file matching runs/<pattern> (default: distill.py's model.pth), None if there is none."""
    found = sorted(Path(runs).glob(pattern), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else None


def resolve_backbone_checkpoint(ckpt, baseline_flag, baseline=False):
    """`ckpt` (--ckpt), else (pretrained runs only) the newest distill.py output under ./runs; SystemExit saying what
    to do when it is missing. The no-pretraining baseline (`baseline`, flag '--random-init' / '--scratch') never
    looks one up: without --ckpt it is built from --width / --depth (None returned), whatever ./runs holds."""
    if ckpt is None and not baseline:
        ckpt = latest_checkpoint()
    if ckpt is not None and not Path(ckpt).is_file():
        raise SystemExit(f"Checkpoint not found: {ckpt}. Run `python distill.py` first, pass --ckpt PATH, or use "
                         f"{baseline_flag} for the no-pretraining baseline.")
    if ckpt is None and not baseline:
        raise SystemExit("No checkpoint: none given with --ckpt and no runs/distill*/model.pth found. Run "
                         f"`python distill.py` first, pass --ckpt PATH, or use {baseline_flag}.")
    return ckpt


def check_backbone_shape(model, ckpt, width=None, depth=None):
    """SystemExit if --width / --depth were given and differ from the checkpoint's backbone."""
    for flag, want, have in (('width', width, backbone_width(model)), ('depth', depth, backbone_depth(model))):
        if want is not None and want != have:
            raise SystemExit(f"Checkpoint {ckpt} has {flag} {have} but --{flag} {want} was asked: drop "
                             f"--{flag} or pass a checkpoint of {flag} {want}.")


def backbone_width(model):
    """F, the backbone's output channels (the embedding's final 1x1 conv, official names)."""
    return int(unwrap(model).embed.final.weight.shape[0])


def backbone_depth(model):
    """L, the number of WaffleIron blocks."""
    return len(unwrap(model).waffleiron.channel_mix)


def checkpoint_config(path):
    """The 'config' entry of one of our checkpoints ({} for a released one or an unreadable config)."""
    try:
        return dict(torch.load(path, map_location='cpu', weights_only=True).get('config', {}) or {})
    except Exception:  # released checkpoints may hold objects weights_only refuses: no config then
        return {}


def stage_grid(dataset, stage, cell=None, k=None, ckpt=None):
    """Grid of a stage: the stage's official FOV (data.grid_config, ScaLR configs/) with the cell size and the
    kNN k given by the flags, else those stored in `ckpt`'s config by distill.py (so a backbone is probed/finetuned
    with the grid it was distilled with), else the official ones. Returns (GridConfig, one-line description)."""
    cfg = data.grid_config(dataset, stage)
    stored = checkpoint_config(ckpt) if ckpt else {}
    if 'cell' not in stored and stored.get('grids') and stored.get('fov_min') and stored.get('fov_max'):
        stored['cell'] = (stored['fov_max'][0] - stored['fov_min'][0]) / stored['grids'][0][0]
    used = {}
    for name, flag in (('cell', cell), ('k', k)):
        if flag is not None:
            used[name] = (flag, 'flag')
        elif stored.get(name) is not None:
            used[name] = (stored[name], f'stored in {ckpt}')
        else:
            used[name] = (data.cell_size(cfg) if name == 'cell' else cfg.k, f'official {dataset} {stage} grid')
    cfg = data.with_cell(cfg, cell=float(used['cell'][0]), k=int(used['k'][0]))
    text = (f"grid: FOV {tuple(cfg.fov_min)}..{tuple(cfg.fov_max)} m, cell {used['cell'][0]:g} m "
            f"({used['cell'][1]}) -> planes {[list(g) for g in cfg.grids]}; kNN k = {cfg.k} ({used['k'][1]})")
    return cfg, text


UNSEEN_AS_ZERO_HELP = ("the official metric (ScaLR utils/metrics.py): a class with val points that was never seen in "
                       "training counts in the mIoU (usually with IoU 0); default: such a class is reported as NaN, "
                       "marked '(never in train)' and left out of the mIoU (docs/official.md §1)")


def label_counts(labels, num_classes):
    """Labelled points per class in a batch of labels (IGNORE_INDEX left out) -> (num_classes,) int64: probe.py
    and finetune.py sum it over training to know which classes training never saw (summarise_confusion)."""
    lab = np.asarray(labels.cpu() if hasattr(labels, 'cpu') else labels).ravel()
    return np.bincount(lab[lab != IGNORE_INDEX].astype(np.int64), minlength=num_classes)[:num_classes]


def summarise_confusion(cm, class_names, train_counts=None, unseen_as_nan=True):
    """Per-class IoU (%) with NaN for classes absent from GT and predictions (ScaLR utils/metrics.py), the mIoU
    (nanmean, %), oAcc and mAcc (%). With `train_counts` (labelled training points per class), classes never seen in
    training are listed in 'unseen_in_train' and, if unseen_as_nan, reported as NaN and left out of the mIoU
    (docs/official.md §1; the official metric counts them, usually as IoU 0)."""
    cm = np.asarray(cm, dtype=np.int64)
    iou = np.asarray(data.per_class_iou(cm), dtype=np.float64) * 100
    unseen = [] if train_counts is None else [n for n, c in zip(class_names, train_counts) if c == 0]
    if unseen_as_nan and train_counts is not None:
        iou[np.asarray(train_counts) == 0] = np.nan
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float('nan')
    total, gt = cm.sum(), cm.sum(1)
    with np.errstate(invalid='ignore', divide='ignore'):
        macc = float(np.nanmean(np.where(gt > 0, np.diag(cm) / gt, np.nan)) * 100) if (gt > 0).any() else float('nan')
    oacc = float(np.trace(cm) / total * 100) if total else float('nan')
    per_class = {n: (float(v) if np.isfinite(v) else None) for n, v in zip(class_names, iou)}
    return {'miou': miou, 'per_class': per_class, 'oacc': oacc, 'macc': macc, 'unseen_in_train': unseen}


def segmentation_report(cm, class_names, out_dir, extra=None, title='segmentation', train_counts=None,
                        unseen_as_nan=True):
    """Prints the per-class IoU table and the final line `mIoU: X`; writes out_dir/results.json ({'miou',
    'per_class', 'oacc', 'macc', 'unseen_in_train', **extra, 'confusion_matrix'}, NaN -> null, atomic) and the
    bar chart out_dir/per_class_iou.png. Returns the results dict (NaN kept as float)."""
    import json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = summarise_confusion(cm, class_names, train_counts, unseen_as_nan)
    res.update({**(extra or {}), 'confusion_matrix': np.asarray(cm).tolist()})
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in res.items()}
    tmp = out / '.results.json.tmp'
    tmp.write_text(json.dumps(clean, indent=1, default=str))
    os.replace(tmp, out / 'results.json')
    plot_per_class(res['per_class'], out / 'per_class_iou.png', f"{title}, mIoU {res['miou']:.1f}%")
    print(f"{'class':<22}{'IoU %':>8}")
    for name, v in res['per_class'].items():
        note = '  (never in train)' if name in res['unseen_in_train'] else ''
        print(f"{name:<22}{'nan' if v is None else f'{v:.1f}':>8}{note}")
    print(f"oAcc: {res['oacc']:.1f}  mAcc: {res['macc']:.1f}")
    print(f"mIoU: {res['miou']:.1f}", flush=True)
    return res


def plot_per_class(per_class, path, title):
    """Per-class IoU bar chart (%), one bar per class ('n/a' = NaN: absent from GT and predictions)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(per_class)
    vals = [np.nan if v is None else v for v in per_class.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    bars = ax.bar(range(len(names)), np.nan_to_num(vals), color='tab:blue')
    for bar, v in zip(bars, vals):
        ax.text(bar.get_x() + bar.get_width() / 2, (0 if np.isnan(v) else v) + 1,
                'n/a' if np.isnan(v) else f'{v:.0f}', ha='center', va='bottom', fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=60, ha='right')
    ax.set(ylabel='IoU (%)', ylim=(0, 100))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    fig.savefig(tmp, dpi=100, format='png')
    plt.close(fig)
    os.replace(tmp, path)
    return path

# ==== CLI: features and bench ====


def read_scan_file(path, dataset=None):
    """Read a scan -> (points (N, 4) float32 x, y, z, intensity in native units, dataset name for intensity stats).

    .npy: (N, 4) array (default dataset nuscenes, the ScaLR pretraining setting); .pcd.bin: nuScenes, 5 float32
    columns (x, y, z, intensity, ring); other .bin: KITTI, 4 float32 columns (dataset semantic_kitti).
    Every unreadable file ends in one data.UserError naming it (a FileNotFoundError / ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise data.MissingDataFileError(f"scan {path} does not exist", "--scan", "check the path")
    name = path.name.lower()
    if name.endswith(".npy"):
        try:
            points = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:  # truncated, a pickled object array, not a .npy at all
            raise data.DataFileError(f"scan {path} is not a readable .npy array ({str(err).splitlines()[0][:120]})",
                                "--scan", "save the scan with np.save(path, points.astype(np.float32))") from None
        if points.ndim != 2 or points.shape[1] != 4:
            raise data.DataFileError(f"scan {path}: expected an (N, 4) array [x, y, z, intensity], got shape "
                                f"{points.shape}", "--scan", "slice your array to these 4 columns first")
        dataset = dataset or "nuscenes"
    elif name.endswith(".bin"):
        nuscenes = name.endswith(".pcd.bin") if dataset is None else dataset == "nuscenes"
        columns = 5 if nuscenes else 4
        size = path.stat().st_size
        if size % (4 * columns):  # a cut-off download or another format: refuse rather than misalign columns
            raise data.DataFileError(f"scan {path} is truncated or not a {'nuScenes .pcd.bin' if nuscenes else 'KITTI .bin'}"
                                f": {size} bytes is not a multiple of {columns} float32 values ({4 * columns}-byte "
                                "records)", "--scan", "copy the file again, or pass --dataset to say which format")
        points = np.fromfile(path, dtype=np.float32).reshape(-1, columns)[:, :4]
        dataset = dataset or ("nuscenes" if nuscenes else "semantic_kitti")
    else:
        raise data.DataFileError(f"unsupported scan file {path}", "--scan",
                            "use .npy (N, 4), nuScenes .pcd.bin or KITTI .bin")
    if len(points) == 0:
        raise data.DataFileError(f"scan {path} is empty (0 points)", "--scan", "pass a scan with points")
    return np.ascontiguousarray(points, dtype=np.float32), dataset


def parse_grids(text):
    """'256x256,256x32,256x32' -> ((256, 256), (256, 32), (256, 32))."""
    try:
        grids = tuple(tuple(int(v) for v in g.split("x")) for g in text.split(","))
        assert len(grids) == 3 and all(len(g) == 2 for g in grids)
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"grids must look like 256x256,256x32,256x32, got {text!r}")
    return grids


@torch.no_grad()
def scan_features(model, points, dataset, cfg, layer="backbone", source=None):
    """Per-point features of one scan, one row per input row, in input order: (N, C) float32 numpy.

    Rows with NaN/inf are dropped before preprocessing (with a warning; `source`, the file, given: the one-line
    warning of data.drop_nonfinite naming it) and, like the points outside the FOV or merged by voxelisation, get
    the feature of their nearest kept point (NaN coordinates read as 0)."""
    finite = np.isfinite(points[:, :4]).all(axis=1)
    if not finite.all():
        if source is not None:
            data.drop_nonfinite(points, source)
        else:
            warnings.warn(f"{(~finite).sum()} of {len(points)} points have NaN/inf values: dropped from the input, "
                          "they get their nearest kept point's feature")
    if not finite.any():
        raise data.DataFileError(f"every point of the scan {source or ''} has NaN/inf values", source,
                                 "check the file")
    try:
        sample = data.prepare_scan(points[finite], dataset, cfg, train=False)
    except ValueError as err:  # e.g. no point inside the FOV
        raise data.DataFileError(f"{str(err).splitlines()[0]}", source or "scan",
                                 "check the scan's units (metres) and --fov-min / --fov-max") from None
    if len(sample["kept"]) == 0:
        raise data.DataFileError(f"no point of the scan lies inside the field of view {cfg.fov_min} .. "
                                 f"{cfg.fov_max}", source or "scan", "check --fov-min / --fov-max")
    batch = data.collate([sample])
    model.eval()
    device = next(model.parameters()).device
    args = [batch[k].to(device) for k in ("feat", "cells", "neighbors", "occupied")]
    out = model.forward_features(*args) if layer == "backbone" else model(*args)   # (1, C, M)
    kept_features = out[0].T.float().cpu().numpy()                                   # (M, C)
    features = np.empty((len(points), kept_features.shape[1]), dtype=np.float32)
    features[finite] = kept_features[np.asarray(sample["upsample"])]
    if not finite.all():
        query = np.nan_to_num(points[~finite, :3], nan=0.0, posinf=0.0, neginf=0.0)
        features[~finite] = kept_features[data.nearest_indices(query, sample["xyz"])]
    return features


def features_main(argv):
    p = argparse.ArgumentParser(prog="waffleiron.py features", description="Per-point features of one scan with "
                                "a ScaLR/WaffleIron checkpoint (eval mode, fp32), one row per input row, in order.")
    p.add_argument("--ckpt", required=True, help="checkpoint (released ScaLR/WaffleIron file or ours)")
    p.add_argument("--scan", required=True, help="(N, 4) .npy [x, y, z, intensity], nuScenes .pcd.bin or KITTI .bin")
    p.add_argument("--out", required=True, help="output .npy, float32 (N, C)")
    p.add_argument("--layer", choices=["backbone", "head"], default="backbone",
                   help="backbone = trunk output (F channels); head = after the final layer (classif)")
    p.add_argument("--dataset", default=None, help="intensity statistics (data.INTENSITY_STATS); default nuscenes, "
                   "or semantic_kitti for a KITTI .bin")
    p.add_argument("--stage", default="pretrain", choices=["pretrain", "probe", "finetune"],
                   help="grid/FOV preset of data.grid_config(dataset, stage) (ScaLR configs; default: "
                   "pretraining)")
    p.add_argument("--fov-min", type=float, nargs=3, default=None, help="FOV lower corner, m (ScaLR: -64 -64 -8)")
    p.add_argument("--fov-max", type=float, nargs=3, default=None, help="FOV upper corner, m (ScaLR: 64 64 8)")
    p.add_argument("--grids", type=parse_grids, default=None,
                   help="2D grids for projections along z, y, x (ScaLR: 256x256,256x32,256x32)")
    p.add_argument("--voxel", type=float, default=None, help="voxel size, m (ScaLR configs: 0.1)")
    p.add_argument("--gelu", action="store_true", help="ScaLR+ backbone (GELU); not visible in the tensors")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (computation stays fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: PyTorch's, one per core)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="torch.load(weights_only=False): only for checkpoint files you trust")
    args = p.parse_args(argv)
    device = resolve_device(args.device)  # before any file is read: --device cuda without a GPU is refused here
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    toy_formats = {"toy": "nuscenes", "toy_kitti": "semantic_kitti"}  # the toy worlds use their format's stats
    if args.dataset is not None and toy_formats.get(args.dataset, args.dataset) not in data.INTENSITY_STATS:
        p.error(f"--dataset {args.dataset!r} has no intensity statistics; choose one of {list(data.INTENSITY_STATS)}")
    points, dataset = read_scan_file(args.scan, args.dataset)
    cfg = data.grid_config(dataset, args.stage)
    overrides = {k: v for k, v in (("fov_min", args.fov_min), ("fov_max", args.fov_max), ("grids", args.grids),
                                   ("voxel", args.voxel)) if v is not None}
    overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in overrides.items()}
    cfg = dataclasses.replace(cfg, max_points=None, **overrides)
    flags = {"gelu": True} if args.gelu else {}
    model = load_checkpoint(args.ckpt, grids=cfg.grids, weights_only=not args.trust_pickle, **flags)
    model = model.to(device)
    features = scan_features(model, points, dataset, cfg, args.layer, source=args.scan)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, features)
    except OSError as err:
        raise data.UserError(f"cannot write {args.out} ({err.strerror or err})", "--out",
                             "pass a writable path with free space") from None
    print(f"wrote {args.out}: {features.shape[0]} points x {features.shape[1]} {args.layer} features")


# ---- benchmark ----

def synthetic_batch(batch, points, k, grids, input_channels=5, device="cpu", seed=0):
    """Random inputs shaped like collate()'s output; scan b has points - b*points//10 real points, the rest is
    padding as in ScaLR datasets/pc_dataset.py (features 0, neighbours N-1, cell 0, occupied False)."""
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, input_channels, points, generator=g)
    cells = torch.stack([torch.randint(0, h * w, (batch, points), generator=g) for h, w in grids], dim=1)
    neighbors = torch.randint(0, points, (batch, k, points), generator=g)
    occupied = torch.ones(batch, points, dtype=torch.bool)
    for b in range(batch):
        n = points - b * (points // 10)
        feat[b, :, n:], cells[b, :, n:], neighbors[b, :, n:], occupied[b, n:] = 0, 0, points - 1, False
        neighbors[b, :, :n] %= n
    return [t.to(device) for t in (feat, cells, neighbors, occupied)]


def _timed_ms(fn, device):
    """(wall, process CPU) time of one call in ms (synchronising CUDA around it). On a shared CPU the CPU time
    is the steadier figure: other processes lengthen the wall time, not the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def _memory_mib(forward_backward, device):
    """Memory of one forward+backward (MiB): torch.cuda.max_memory_allocated on GPU; on CPU (no allocator
    statistics) the tensors autograd saves for backward, i.e. the activation memory of training."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    forward_backward(context=lambda: torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    return sum(saved.values()) / 2**20


def bench_variants(model, inputs, impls, compiled, amp):
    """{(impl, compiled): (forward fn, forward+backward fn)} sharing the model's parameters."""
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    device_type = inputs[0].device.type
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
    variants = {}
    for impl in impls:
        eager = model.forward_features if impl == "ours" else (lambda *x: naive_forward_features(model, *x))
        for use_compile in ([False, True] if compiled else [False]):
            features = torch.compile(eager) if use_compile else eager

            def forward(features=features):
                model.eval()
                with torch.no_grad(), autocast():
                    features(*inputs)

            def forward_backward(features=features, context=contextlib.nullcontext):
                model.train()
                with context(), autocast():
                    loss = features(*inputs).float().square().mean()
                loss.backward()

            variants[(impl, use_compile)] = (forward, forward_backward)
    return variants


def scan_batch(path, batch, device="cpu"):
    """`batch` copies of one real scan, preprocessed as the `features` job does (ScaLR pretraining grid, eval)."""
    points, dataset = read_scan_file(path)
    cfg = dataclasses.replace(data.grid_config(dataset, "pretrain"), max_points=None)
    sample = data.prepare_scan(points[np.isfinite(points).all(1)], dataset, cfg, train=False)
    b = data.collate([sample] * batch)
    return [b[k].to(device) for k in ("feat", "cells", "neighbors", "occupied")]


def forward_parts_ms(model, inputs, device):
    """Eval forward of our implementation split into its parts: {part: ms} (embedding, the per-batch plane
    indices, the L spatial mixings, the L channel mixings)."""
    feat, cells, neighbors, occupied = inputs
    parts = dict.fromkeys(("embedding", "plane indices", "spatial mixing", "channel mixing"), 0.0)
    model.eval()
    with torch.no_grad():
        box = {}
        parts["embedding"] = _timed_ms(lambda: box.update(t=model.embed(feat, neighbors)), device)[0]
        parts["plane indices"] = _timed_ms(
            lambda: box.update(p=projection_indices(cells, occupied, model.grids)), device)[0]
        trunk = model.waffleiron
        for l, (spatial, channel) in enumerate(zip(trunk.spatial_mix, trunk.channel_mix)):
            parts["spatial mixing"] += _timed_ms(lambda: box.update(t=spatial(box["t"], box["p"][l % 3])), device)[0]
            parts["channel mixing"] += _timed_ms(lambda: box.update(t=channel(box["t"])), device)[0]
    return parts


def run_bench(opts, extras=None):
    """Time every variant, interleaved (ours, naive, ours, ...) so that load from other processes hits all of
    them alike; report the fastest of `repeats` runs after one warm-up (which also compiles).
    Per variant: forward (eval), forward+backward, and a training step = forward+backward+AdamW step.
    extras (a dict, optional) receives 'parts' (forward_parts_ms of ours) and 'points' (real points per scan)."""
    torch.manual_seed(0)
    device = torch.device(opts["device"])
    model = WaffleIron(5, opts["width"], opts["depth"], head=None, checkpointing=opts["checkpointing"]).to(device)
    inputs = (scan_batch(opts["scan"], opts["batch"], device) if opts.get("scan") else
              synthetic_batch(opts["batch"], opts["points"], opts["k"], model.grids, device=device))
    variants = bench_variants(model, inputs, opts["impls"], opts["compile"], opts["amp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step(forward_backward):
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    results = {}
    for key, (forward, forward_backward) in list(variants.items()):  # warm-up; drop what fails to compile
        try:
            forward(), train_step(forward_backward)
            results[key] = dict(fwd=[], fwd_bwd=[], fwd_bwd_cpu=[], step=[], step_cpu=[],
                                peak=_memory_mib(forward_backward, device))
        except Exception as err:  # torch.compile may be unavailable (no C++ compiler, unsupported op, ...)
            print(f"[bench] {key[0]} compile={key[1]} failed, skipped: {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:200]}", file=sys.stderr)
            variants.pop(key)
    for _ in range(opts["repeats"]):
        for key, (forward, forward_backward) in variants.items():
            r = results[key]
            r["fwd"].append(_timed_ms(forward, device)[0])
            wall, cpu = _timed_ms(forward_backward, device)
            r["fwd_bwd"].append(wall), r["fwd_bwd_cpu"].append(cpu)
            wall, cpu = _timed_ms(lambda: train_step(forward_backward), device)
            r["step"].append(wall), r["step_cpu"].append(cpu)
    if extras is not None:
        extras["points"] = int(inputs[3].sum()) // inputs[3].shape[0]
        if "ours" in opts["impls"]:
            extras["parts"] = forward_parts_ms(model, inputs, device)
    if opts["amp"] == "none" and "naive" in opts["impls"]:
        model.eval()
        with torch.no_grad():  # the numbers must not depend on the implementation
            diff = (naive_forward_features(model, *inputs) - model.forward_features(*inputs)).abs().max()
        results["max_abs_diff"] = float(diff)
    return results


def print_bench(args, results, extras):
    """The bench's tables (markdown)."""
    print(f"\nWaffleIron F={args.width} L={args.depth}, batch {args.batch} x {extras['points']} points "
          f"({args.scan or 'synthetic, uniform random cells'}), k={args.k}, device {args.device} "
          f"({torch.get_num_threads()} threads), amp {args.amp}, checkpointing {args.checkpointing}; "
          f"fastest of {args.repeats} runs\n")
    print("| impl | torch.compile | fwd ms | fwd+bwd ms | train step ms | train step CPU ms | train scans/s | memory MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (impl, compiled), r in ((k, v) for k, v in results.items() if isinstance(k, tuple)):
        step = min(r["step"])
        print(f"| {impl} | {'yes' if compiled else 'no'} | {min(r['fwd']):.1f} | {min(r['fwd_bwd']):.1f} | "
              f"{step:.1f} | {min(r['step_cpu']):.1f} | {args.batch / step * 1e3:.2f} | {r['peak']:.0f} |")
    if ("ours", False) in results and ("naive", False) in results:
        ours, naive = results[("ours", False)], results[("naive", False)]
        print(f"\nspeed-up ours vs naive (eager): forward {min(naive['fwd']) / min(ours['fwd']):.2f}x, "
              f"train step {min(naive['step']) / min(ours['step']):.2f}x "
              f"(CPU time {min(naive['step_cpu']) / min(ours['step_cpu']):.2f}x)")
    if "parts" in extras:
        total = sum(extras["parts"].values())
        print("\n| part of our eval forward | ms | share |\n|---|---:|---:|")
        for part, ms in extras["parts"].items():
            print(f"| {part} | {ms:.1f} | {100 * ms / total:.0f} % |")
    if "max_abs_diff" in results:
        print(f"\nmax |ours - naive| (fp32 eval forward) = {results['max_abs_diff']:.2e}")
    what = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "tensors saved for backward"
    print(f"memory MiB = {what} in one forward+backward; train step = forward + backward (loss: mean of squared "
          f"features) + AdamW step; train scans/s = batch / train step")


def bench_main(argv):
    p = argparse.ArgumentParser(prog="waffleiron.py --bench", description="Forward, forward+backward and training "
                                "step time and peak memory of our WaffleIron vs a direct implementation of the "
                                "official layout, and the share of each part of our forward.")
    p.add_argument("--bench", action="store_true", help="run the benchmark")
    p.add_argument("--width", type=data_positive_int(), default=64,
                   help="F (paper: 256 or 768; small default for a 2-core CPU)")
    p.add_argument("--depth", type=data_positive_int(), default=48, help="L (paper: WI-48-256 and WI-48-768)")
    p.add_argument("--points", type=data_positive_int(), default=20000,
                   help="points per synthetic scan (official LimitNumPoints: 20000)")
    p.add_argument("--scan", default=None, help="time on this real scan (.npy / .pcd.bin / .bin, preprocessed as "
                   "`features` does) instead of synthetic inputs; the grids of a real scan are mostly empty")
    p.add_argument("--batch", type=data_positive_int(), default=1, help="scans per batch (ScaLR WI-768 "
                   "pretraining: 8)")
    p.add_argument("--k", type=data_positive_int(), default=16, help="neighbours of the embedding (official: 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast dtype (ScaLR: fp16, ScaLR+: bf16)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd versions (skipped on failure)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of our implementation (ScaLR+)")
    p.add_argument("--impl", choices=["both", "ours", "naive"], default="both", help="implementations to time")
    p.add_argument("--repeats", type=data_positive_int(), default=2,
                   help="timed runs per variant after one warm-up (fastest kept)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: PyTorch default; 1 gives steadier figures on a shared machine)")
    args = p.parse_args(argv)
    args.device = str(resolve_device(args.device))
    tune_process(args.device)  # as the stages run (setup_device), for both implementations
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = dict(vars(args), impls=["ours", "naive"] if args.impl == "both" else [args.impl])
    extras = {}
    results = run_bench(opts, extras)
    print_bench(args, results, extras)


def data_positive_int():
    """data.positive_int (argparse type), imported when the parser is built."""
    return data.positive_int


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["features"]:
        return features_main(argv[1:])
    if "--bench" in argv:
        return bench_main(argv)
    print(__doc__)
    print("usage: python waffleiron.py features --ckpt P --scan X.npy --out F.npy [--layer backbone|head]\n"
          "       python waffleiron.py --bench [--width F --depth L --points N --batch B --device cpu|cuda "
          "--amp none|bf16|fp16 --compile]")
    return None


if __name__ == "__main__":
    data.run_main(main)
    # The command is done and its output file closed: skip the interpreter's teardown of torch (finalising its
    # thousands of modules and objects takes ~1.2 s on a 2-core CPU, a sixth of a whole `features` job).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
