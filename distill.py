r"""distill.py -- ScaLR pretraining: distil 2D foundation-model features into a WaffleIron lidar backbone.

Paper: "Three Pillars improving Vision Foundation Model Distillation for Lidar" (ScaLR, CVPR 2024), Sec. 3 and
Supp. B.2; official recipe in shared/spec/official.md Sec. 2 (projection, teacher, pixel lookup), Sec. 5.1 (loss),
Sec. 6.1-6.2 (schedules). No labels are used: for every lidar scan ONE camera image is picked at random, the points
visible in it are fed to the student (WaffleIron + head) and its output at each point is pulled towards the frozen
image teacher's feature at the point's pixel with Eq. (1).

    # toy world on CPU, a few minutes (tiny random-init DINOv2 teacher unless --teacher-weights is given)
    python distill.py
    # Supp. B.2 mono-dataset setting: WI-48-256 on nuScenes, 19 epochs, batch 16, DINOv2 ViT-L/14 (Meta .pth)
    python distill.py --data nuscenes --root /data/nuscenes --version v1.0-trainval --preset mono \
        --teacher-weights dinov2_vitl14_pretrain.pth --amp fp16 --out runs/mono
    # the released ScaLR model: WI-48-768, 4 datasets merged, 25 epochs, global batch 8 over 8 GPUs
    torchrun --nproc_per_node 8 distill.py --data merged --root /data --preset wi768 \
        --teacher-weights dinov2_vitl14_pretrain.pth --amp fp16 --out runs/scalr
    # multi-teacher (Supp. B.2): DINOv2 ViT-L/14 + DINO ViT-S/8 keys, MLP head
    python distill.py --teacher dinov2_vitl14,dino_vits8 --teacher-weights vitl14.pth,dino_deitsmall8_pretrain.pth

Exercises (README "Classroom exercises"): --loss infonce (a), --cameras all (b, Supp. E), --knn K (c), --cell M (d),
--teacher dino_vits8 (e), --teacher dinov2_vitl14,dino_vits8 (f, Supp. B.2), --width 128 (g).
Add --resume to continue an interrupted run bit-exactly from OUT/ckpt_last.pth; --max-iters N for smoke runs.
Outputs in --out: model.pth ({'model_point': state dict with the official names, 'config': {...}}, readable by
waffleiron.load_checkpoint), ckpt_last.pth (resume state), log.csv, loss.png, config.json.
"""
import argparse
import json
import math
import re
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import waffleiron as wi

# ----------------------------------------------------------------------------------------------------------------
# Teachers (official.md Sec. 2.5; Supp. B.2 "2D teacher")

# Meta hub name -> (timm architecture, which feature is distilled)
TEACHERS = {
    'dinov2_vits14': ('vit_small_patch14_dinov2', 'x_pre_norm'),
    'dinov2_vitb14': ('vit_base_patch14_dinov2', 'x_pre_norm'),
    'dinov2_vitl14': ('vit_large_patch14_dinov2', 'x_pre_norm'),  # the paper's / released teacher
    'dinov2_vitg14': ('vit_giant_patch14_dinov2', 'x_pre_norm'),
    'dino_vits8': ('vit_small_patch8_224.dino', 'keys'),  # keys of the last attention layer (Supp. B.2)
}
TINY_TEACHER = dict(depth=2, embed_dim=96, num_heads=3)  # toy: same timm class, shrunk (random init)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # official.md Sec. 2.5
IMAGENET_STD = (0.229, 0.224, 0.225)


class Teacher(nn.Module):
    """Frozen timm ViT returning dense patch features (B, C, h/p, w/p) for images in [0, 1].

    'x_pre_norm' (DINOv2): tokens after the last block, before the final LayerNorm, CLS dropped.
    'keys' (DINO ViT-S/8): k = qkv(norm1(x))[C:2C] of the last block, i.e. the keys of the last attention layer,
    captured by a forward hook on the last block's `attn.qkv` Linear (heads concatenated, CLS dropped).
    """

    def __init__(self, name, vit, feature):
        super().__init__()
        self.name, self.vit, self.feature = name, vit, feature
        self.patch = int(vit.patch_embed.patch_size[0])
        self.dim = int(vit.embed_dim)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self._qkv = None
        if feature == 'keys':
            vit.blocks[-1].attn.qkv.register_forward_hook(self._keep_qkv)
        self.eval()

    def _keep_qkv(self, module, inputs, output):
        self._qkv = output  # (B, T, 3C), T = prefix tokens + patches

    def train(self, mode=True):  # the teacher stays in eval mode whatever the caller does
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):  # images (B, 3, H, W) float in [0, 1]
        x = (images - self.mean) / self.std
        last = len(self.vit.blocks) - 1
        out = self.vit.forward_intermediates(x, indices=[last], norm=False, stop_early=True,
                                             intermediates_only=True, output_fmt='NCHW')[0]  # (B, C, h, w)
        if self.feature == 'x_pre_norm':
            return out
        B, C, h, w = out.shape
        attn = self.vit.blocks[-1].attn
        k = self._qkv[:, self.vit.num_prefix_tokens:, C:2 * C]  # (B, h*w, C) keys, heads concatenated
        k = attn.k_norm(k.reshape(B, h * w, attn.num_heads, C // attn.num_heads)).reshape(B, h * w, C)
        self._qkv = None
        return k.transpose(1, 2).reshape(B, C, h, w)


def resample_pos_embed(pos, grid_hw, num_prefix):
    """(1, P + S*S, C) -> (1, P + h*w, C): bicubic with DINO's +0.1 offset trick (official.md Sec. 2.5)."""
    n = pos.shape[1] - num_prefix
    side = int(round(math.sqrt(n)))
    h, w = grid_hw
    if (side, side) == (h, w) or (n == h * w and side * side != n):  # already the model's grid
        return pos
    if side * side != n:
        raise ValueError(f'pos_embed with {n} patch positions is not a square grid; cannot resample to {h}x{w}')
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, C, S, S)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode='bicubic',
                         align_corners=False)  # (1, C, h, w)
    assert grid.shape[-2:] == (h, w), (grid.shape, h, w)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)], dim=1)


def meta_to_timm(state_dict, vit):
    """Rename a Meta DINO/DINOv2 state dict to timm's VisionTransformer names and fit pos_embed to `vit`.

    Meta and timm share most names (patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,
    mlp.fc2,ls2.gamma}, norm). Differences: 'mask_token' (iBOT masking, unused) is dropped; block-chunked files
    (blocks.<chunk>.<N>.*) are flattened; ViT-g's SwiGLU 'mlp.w12'/'mlp.w3' become timm's packed 'mlp.fc1'/'mlp.fc2'.
    timm-format files go through unchanged (apart from pos_embed)."""
    for wrapper in ('teacher', 'model', 'state_dict', 'model_state'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix('module.').removeprefix('backbone.')
        if k == 'mask_token' or k.startswith('head.') or k.startswith('fc_norm.'):
            continue
        k = re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k)
        k = k.replace('.mlp.w12.', '.mlp.fc1.').replace('.mlp.w3.', '.mlp.fc2.')
        out[k] = v
    if 'pos_embed' in out:
        out['pos_embed'] = resample_pos_embed(out['pos_embed'], tuple(vit.patch_embed.grid_size),
                                              vit.num_prefix_tokens)
    return out


def timm_to_meta(state_dict):
    """Inverse naming (used by the tests to build a Meta-style file): fc1/fc2 of SwiGLU -> w12/w3, + mask_token."""
    out = {}
    swiglu = any(k.endswith('mlp.fc1.weight') and v.shape[0] == 2 * state_dict[k.replace('fc1', 'fc2')].shape[1]
                 for k, v in state_dict.items())
    for k, v in state_dict.items():
        if swiglu:
            k = k.replace('.mlp.fc1.', '.mlp.w12.').replace('.mlp.fc2.', '.mlp.w3.')
        out[k] = v.clone()
    out['mask_token'] = torch.zeros(1, state_dict['cls_token'].shape[-1])
    return out


def load_teacher_weights(vit, path, name):
    """Load a Meta .pth or a timm .safetensors into `vit`; raise naming the mismatching keys otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'--teacher-weights {path}: no such file. Give a Meta .pth (e.g. '
                                f'dinov2_vitl14_pretrain.pth) or a timm .safetensors for {name}.')
    if path.suffix == '.safetensors':
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f'{path} is a .safetensors file but the safetensors package is not installed: '
                              f'pip install safetensors (or give the Meta .pth instead).') from e
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location='cpu', weights_only=True)
    sd = meta_to_timm(sd, vit)
    ref = vit.state_dict()
    missing = sorted(set(ref) - set(sd))
    unexpected = sorted(set(sd) - set(ref))
    shapes = [f'{k}: file {tuple(sd[k].shape)} vs model {tuple(ref[k].shape)}'
              for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f'--teacher-weights {path} does not match teacher {name} (timm {type(vit).__name__}, '
            f'embed_dim {vit.embed_dim}, depth {len(vit.blocks)}):\n'
            f'  missing keys ({len(missing)}): {missing[:8]}\n  unexpected keys ({len(unexpected)}): '
            f'{unexpected[:8]}\n  shape mismatches ({len(shapes)}): {shapes[:8]}\n'
            f'Is this the file of another model? Valid teachers: {", ".join(TEACHERS)}.')
    vit.load_state_dict(sd, strict=True)


def _network_available(host='huggingface.co', port=443, timeout=3.0):
    """True if a TCP connection opens within `timeout` s (run in a thread: DNS must not hang us)."""
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def _random_teacher_banner(name, why):
    bar = '!' * 100
    print(f'{bar}\n!!! TEACHER {name} IS RANDOMLY INITIALISED ({why}).\n'
          f'!!! Distillation will run, but the student learns random image features, not DINOv2/DINO ones.\n'
          f'!!! Give --teacher-weights PATH (Meta .pth or timm .safetensors) for a real teacher.\n{bar}',
          flush=True)


def build_teacher(name, image_size, weights=None, tiny=False, allow_download=True, verbose=True):
    """timm ViT for a Meta hub name, built at the teacher input size (H, W), frozen, eval."""
    import timm  # only the distillation stage needs timm
    if name not in TEACHERS:
        raise ValueError(f'unknown teacher {name!r}; valid teachers: {", ".join(TEACHERS)}')
    arch, feature = TEACHERS[name]
    kw = dict(img_size=tuple(image_size), num_classes=0, **(TINY_TEACHER if tiny else {}))
    patch = 8 if 'patch8' in arch else 14
    if image_size[0] % patch or image_size[1] % patch:
        raise ValueError(f'--image-size {image_size} must be divisible by the patch size {patch} of {name}')
    vit = timm.create_model(arch, pretrained=False, **kw)
    if weights is not None:
        load_teacher_weights(vit, weights, name)
        return Teacher(name, vit, feature)
    why = 'tiny toy teacher' if tiny else 'download disabled'
    if not tiny and allow_download:
        why = 'no --teacher-weights and no network for the timm download'
        if _network_available():
            try:  # timm's copy of Meta's weights at their native 518 px, then OUR pos_embed resampling (+0.1 trick)
                native = timm.create_model(arch, pretrained=True, num_classes=0)
                vit.load_state_dict(meta_to_timm(native.state_dict(), vit), strict=True)
                return Teacher(name, vit, feature)
            except Exception as e:  # no hub access, proxy, ...: fall back to the random teacher, loudly
                why = f'timm pretrained download failed: {type(e).__name__}: {str(e)[:120]}'
    if verbose:
        _random_teacher_banner(name, why)
    return Teacher(name, vit, feature)


def pixel_features(fmap, pairs, patch):
    """Teacher feature at each paired pixel, as official: nn.Upsample(x patch, bilinear, align_corners=True) on
    the patch map, then indexing at (row', col'). Evaluated only at the pairs (never builds the (B, C, H, W) map).

    fmap (B, C, h, w); pairs (M, 3) int64 [image index, row', col'] in the (h*patch, w*patch) image -> (M, C)."""
    B, C, h, w = fmap.shape
    H, W = h * patch, w * patch
    b = pairs[:, 0]
    # align_corners=True: output pixel r sits at source coordinate r * (h - 1) / (H - 1)
    y = pairs[:, 1].float() * ((h - 1) / (H - 1))
    x = pairs[:, 2].float() * ((w - 1) / (W - 1))
    y0 = y.floor().long().clamp(max=h - 1)
    x0 = x.floor().long().clamp(max=w - 1)
    y1, x1 = (y0 + 1).clamp(max=h - 1), (x0 + 1).clamp(max=w - 1)
    wy, wx = (y - y0).unsqueeze(1), (x - x0).unsqueeze(1)  # (M, 1)
    f = fmap.float().permute(0, 2, 3, 1)  # (B, h, w, C)
    top = f[b, y0, x0] * (1 - wx) + f[b, y0, x1] * wx
    bottom = f[b, y1, x0] * (1 - wx) + f[b, y1, x1] * wx
    return top * (1 - wy) + bottom * wy  # (M, C)


# ----------------------------------------------------------------------------------------------------------------
# The distillation sample (official.md Sec. 2.6) and its batching

def distill_sample(ds, i, cfg, image_size, rng, cameras='one'):
    """One scan -> (sample dict, None) or (None, reason to skip). Official order, official.md Sec. 2.6.

    cameras='one' (official): one camera uniformly at random; sample['image'] (3, h, w), sample['pairs'] (M, 2)
    [row', col']. cameras='all' (Supp. E, exercise b): every camera image of the scan is loaded, the student sees the
    points visible in ANY of them, each paired with one camera it lands in (uniformly at random if several);
    sample['images'] (V, 3, h, w), sample['pairs'] (M, 3) [image index in 0..V-1, row', col']."""
    sub, j = ds.sub(i) if hasattr(ds, 'sub') else (ds, i)
    # one camera uniformly at random per scan and iteration (KITTI: its camera, PandaSet-GT: front_camera)
    cams = [sub.cameras[int(rng.integers(len(sub.cameras)))]] if cameras == 'one' else list(sub.cameras)
    images, views = [], []
    for cam in cams:
        try:
            images.append(sub.image(j, cam))  # (H, W, 3) uint8
        except FileNotFoundError:
            continue  # 'all': the scan keeps its other cameras
        views.append(cam)
    if not images:
        return None, 'missing image'
    pts = sub.points(j)  # (N, 4) x, y, z, raw intensity
    kept = data.voxelize(pts[:, :3], cfg.voxel, rng)  # (M,) one random point per 0.1 m voxel
    view, row, col = point_pixels(sub, j, views, len(pts), image_size, rng)  # (N,) each; view -1 = not visible
    sel = kept[view[kept] >= 0]  # the student sees ONLY the visible points (official.md Sec. 2.1)
    if len(sel) == 0:
        return None, 'no point in image'
    if cfg.max_points:
        sel = sel[data.limit_points(pts[sel, :3], cfg.max_points, rng)]  # 20k nearest to a random centre
    xyz = data.augment_pretrain(pts[sel, :3].astype(np.float32), rng)  # rot z, flip, scale; image not augmented
    inside = data.fov_mask(xyz, cfg)  # crop to the FOV, the pairs follow
    if not inside.any():
        return None, 'no visible point in the FOV'
    xyz, sel = xyz[inside], sel[inside]
    intensity = sub.normalize_intensity(pts[sel, 3])
    img = torch.stack([torch.tensor(im).permute(2, 0, 1).float() / 255.0 for im in images])  # (V, 3, H, W)
    # torchvision.transforms.functional.resize on tensors = bilinear, no antialias (official.md Sec. 2.5)
    img = F.interpolate(img, size=tuple(image_size), mode='bilinear', align_corners=False, antialias=False)
    sample = dict(feat=data.input_features(xyz, intensity).T.copy(),  # (5, M) [int, x, y, z, radius]
                  xyz=xyz, cells=data.cell_indices(xyz, cfg), neighbors=data.knn_indices(xyz, cfg.k),
                  scan_id=sub.scan_id(j), kept=sel)
    if cameras == 'one':
        sample.update(pairs=np.stack([row[sel], col[sel]], 1), image=img[0], camera=views[0])
    else:
        sample.update(pairs=np.stack([view[sel], row[sel], col[sel]], 1), images=img, camera=views)
    return sample, None


def point_pixels(sub, j, views, n, image_size, rng):
    """For each of the n rows of the scan: index of the loaded camera it is paired with (-1: seen by none) and its
    (row', col') pixel in that camera's image resized to image_size. A point seen by several cameras takes one of
    them uniformly at random (reservoir draw; rng is used only then, so the official 1-camera stream is unchanged).
    Pairs floored twice (official.md Sec. 11.6): (row, col) = (floor(v), floor(u)), then floor(row * h / H)."""
    view, row, col = np.full(n, -1), np.zeros(n, np.int64), np.zeros(n, np.int64)
    seen = np.zeros(n, np.int64)  # how many cameras see each row so far
    h, w = image_size
    for v, cam in enumerate(views):
        proj = sub.project(j, cam)  # visible rows of the scan, uv at the original resolution
        idx, (H, W) = proj['idx'], proj['hw']
        seen[idx] += 1
        take = seen[idx] == 1
        if (~take).any():  # already paired with another camera: keep this one with probability 1 / (#cameras)
            take[~take] = rng.random(int((~take).sum())) < 1.0 / seen[idx[~take]]
        idx, uv = idx[take], proj['uv'][take]
        view[idx] = v
        row[idx] = np.floor(uv[:, 1]).astype(np.int64) * h // H
        col[idx] = np.floor(uv[:, 0]).astype(np.int64) * w // W
    return view, row, col


class DistillDataset(torch.utils.data.Dataset):
    """Items are (scan index, epoch) pairs from EpochSampler: the sample's randomness (camera, voxel point, centre,
    augmentation) is seeded by (seed, epoch, index), so runs, resumes and DDP layouts see identical samples.
    A scan that must be skipped (missing image, no visible point) is replaced by the next scan; the skip is
    recorded in sample['skipped'] and counted by the training loop."""

    def __init__(self, ds, cfg, image_size, seed=0, max_tries=32, cameras='one'):
        self.ds, self.cfg, self.image_size, self.seed, self.max_tries = ds, cfg, tuple(image_size), seed, max_tries
        self.cameras = cameras

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        skipped = []
        for attempt in range(self.max_tries):
            j = (index + attempt) % len(self.ds)
            sample, reason = distill_sample(self.ds, j, self.cfg, self.image_size, rng, self.cameras)
            if sample is not None:
                sample['skipped'] = skipped
                return sample
            skipped.append((self.ds.scan_id(j), reason))
        raise RuntimeError(f'{self.max_tries} consecutive scans from #{index} of {self.ds.name} were skipped '
                           f'(e.g. {skipped[:3]}): are the camera images present under the dataset root?')


def distill_collate(samples):
    """data.collate + images (V, 3, h, w) and pairs (M, 3) [image index, row', col'] in the student's point order
    (scan-major, i.e. out.transpose(1, 2)[occupied]). One camera per scan (official): V = B and image index = scan
    index; --cameras all: the images of every scan one after the other, pairs re-indexed accordingly."""
    batch = data.collate([{k: s[k] for k in ('feat', 'cells', 'neighbors')} for s in samples])
    images, pairs, first = [], [], 0  # first: index of this scan's first image in the batch
    for s in samples:
        imgs = s['images'] if 'images' in s else s['image'][None]  # (V_b, 3, h, w)
        p = torch.as_tensor(s['pairs'], dtype=torch.long)
        if p.shape[1] == 2:  # one camera: [row', col'] -> [0, row', col']
            p = torch.cat([torch.zeros(len(p), 1, dtype=torch.long), p], 1)
        pairs.append(p + torch.tensor([first, 0, 0]))
        images.append(imgs)
        first += len(imgs)
    batch['images'] = torch.cat(images)  # (V, 3, h, w)
    batch['pairs'] = torch.cat(pairs)  # (M, 3)
    batch['scan_id'] = [s['scan_id'] for s in samples]
    batch['skipped'] = [x for s in samples for x in s['skipped']]
    return batch


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler-like: one shuffled order per epoch (seed + epoch), drop_last over the GLOBAL batch; rank r
    takes slice r of every global batch, so 1 process x B scans and N processes x B/N scans see the same batches.
    `set_epoch(e, skip_batches)` resumes mid-epoch. Yields (index, epoch)."""

    def __init__(self, n, global_batch, seed=0, rank=0, world=1):
        if n < global_batch:
            raise ValueError(f'the dataset has {n} scans, fewer than the batch size {global_batch}: '
                             f'lower --batch-size')
        if global_batch % world:
            raise ValueError(f'--batch-size {global_batch} (global) is not divisible by {world} processes')
        self.n, self.gb, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def batches_per_epoch(self):
        return self.n // self.gb

    def __len__(self):
        return (self.batches_per_epoch() - self.skip) * (self.gb // self.world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        b = self.gb // self.world
        for k in range(self.skip, self.batches_per_epoch()):
            for idx in perm[k * self.gb + self.rank * b: k * self.gb + (self.rank + 1) * b]:
                yield (idx, self.epoch)


# ----------------------------------------------------------------------------------------------------------------
# Loss (official.md Sec. 5.1) and targets (Supp. B.2)

def distill_loss(student, target, reduction='mean'):
    """Eq. (1) on M paired points: student (M, C) head outputs, target (M, C) pixel features."""
    # Eq. (1): L = 1/M sum_p || f3D(p)/||f3D(p)||_2 - f2D(u(p))/||f2D(u(p))||_2 ||_2   (NOT squared, not cosine)
    dist = (F.normalize(student.float(), dim=1) - F.normalize(target.float(), dim=1)).norm(dim=1)  # (M,)
    if reduction == 'none':
        return dist
    return dist.sum() if reduction == 'sum' else dist.mean()


def infonce_loss(student, target, temperature=0.07, max_pairs=4096, generator=None, reduction='mean'):
    """Point-to-pixel contrastive loss (exercise a; SLidR / PPKT-style InfoNCE, NOT ScaLR's Eq. (1)).

    Up to `max_pairs` paired points of the batch are drawn at random (without replacement); the other sampled
    pixels are the negatives of each point. student, target (M, C) -> scalar (reduction 'mean' or 'sum' over the
    S sampled points)."""
    if len(student) > max_pairs:
        keep = torch.randperm(len(student), generator=generator)[:max_pairs].to(student.device)  # (S,)
        student, target = student[keep], target[keep]
    s, t = F.normalize(student.float(), dim=1), F.normalize(target.float(), dim=1)  # (S, C) unit vectors
    # InfoNCE: L = -1/S sum_i log( exp(s_i . t_i / tau) / sum_j exp(s_i . t_j / tau) ), i, j over the S pairs
    logits = s @ t.T / temperature  # (S, S): point i vs pixel j; the positive pixel is the diagonal
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device), reduction=reduction)


def pair_loss(student, target, args, it):
    """(sum of the per-point losses, number of points it sums over) for --loss eq1 | infonce."""
    if args.loss == 'eq1':
        return distill_loss(student, target, reduction='sum'), len(student)  # Eq. (1) summed over the M points
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # same draw after --resume
    n = min(len(student), args.infonce_pairs)
    return infonce_loss(student, target, args.temperature, args.infonce_pairs, g, reduction='sum'), n


def teacher_targets(teachers, images, pairs):
    """Supp. B.2: l2-normalise each teacher's pixel features, concatenate. images (B, 3, h, w) -> (M, sum C_t)."""
    feats = []
    for t in teachers:
        fmap = t(images)  # (B, C_t, h/p, w/p), all images of the batch in one forward
        feats.append(F.normalize(pixel_features(fmap, pairs, t.patch), dim=1))  # (M, C_t)
    return torch.cat(feats, dim=1)


def student_outputs(model, batch, dims):
    """Head output at every real point, parts l2-normalised per teacher (Supp. B.2). -> (M, sum dims)"""
    out = model(batch['feat'], batch['cells'], batch['neighbors'], batch['occupied'])  # (B, C, Nmax)
    out = out.transpose(1, 2)[batch['occupied']]  # (M, C), scan-major like batch['pairs']
    return wi.normalize_parts(out, list(dims), dim=1) if len(dims) > 1 else out


# ----------------------------------------------------------------------------------------------------------------
# Presets and budget (Supp. B.2; official.md Sec. 6.2)

PRESETS = {
    # toy: 288 scan passes (~6 CPU-minutes: a few minutes on 2 cores), not a paper setting. Batch 2 rather than 4
    # for the same compute: 144 updates lift the toy linear probe from 9.3 to 25.9 mIoU (random init: 10.3)
    'toy': dict(width=64, depth=6, batch_size=2, epochs=60, warmup_epochs=1),
    # Supp. B.2 mono-dataset: WI-256, 19 epochs, batch 16, peak lr after 2 epochs
    'mono': dict(width=256, depth=48, batch_size=16, epochs=19, warmup_epochs=2),
    # Supp. B.2 multi-dataset: WI-256, batch 16, epochs per dataset below, peak lr after 3500 iterations
    'multi': dict(width=256, depth=48, batch_size=16, epochs=None, warmup_iters=3500),
    # Supp. B.2 WI-768: batch 8, 49 epochs (nuScenes) / 25 (all four), peak after 3500 it. (= the released model)
    'wi768': dict(width=768, depth=48, batch_size=8, epochs=None, warmup_iters=3500),
}
MULTI_EPOCHS = {'nuscenes': 19, 'semantic_kitti': 28, 'pandaset64': 136, 'pandasetgt': 136,
                ('nuscenes', 'semantic_kitti'): 11, ('nuscenes', 'pandaset64', 'pandasetgt', 'semantic_kitti'): 10}
WI768_EPOCHS = {'nuscenes': 49, ('nuscenes', 'pandaset64', 'pandasetgt', 'semantic_kitti'): 25}
NUSCENES_TRAIN_SCANS = 28130  # Supp. B.2


def preset_epochs(preset, data_key, n_scans):
    """Supp. B.2 epochs for this data; other combinations: the same number of scan passes as nuScenes."""
    table = MULTI_EPOCHS if preset == 'multi' else WI768_EPOCHS
    if data_key in table:
        return table[data_key], 'Supp. B.2'
    epochs = max(1, round(table['nuscenes'] * NUSCENES_TRAIN_SCANS / n_scans))
    return epochs, f'{table["nuscenes"]} nuScenes epochs rescaled to {n_scans} scans'


def is_toy(args):
    """The embedded toy world: --data toy / toy_kitti, or merged without --root (toy nuScenes + toy KITTI)."""
    return args.data in ('toy', 'toy_kitti') or (args.data == 'merged' and args.root is None)


def resolve_budget(args, names, n_scans, world=1):
    """Fill unset flags from the preset; return (iters_per_epoch, total_iters, stop_iter) and print them.
    names: the dataset(s) pretrained on (toy data counts as the format it mimics), n_scans: their scan count."""
    args.preset = args.preset or ('toy' if is_toy(args) else 'wi768')
    p = PRESETS[args.preset]
    for key in ('width', 'depth', 'batch_size'):
        if getattr(args, key) is None:
            setattr(args, key, p[key])
    source = f'preset {args.preset}'
    if args.epochs is None:
        if p['epochs'] is not None:
            args.epochs = p['epochs']
        else:
            names = tuple(sorted(names))
            args.epochs, source = preset_epochs(args.preset, names[0] if len(names) == 1 else names, n_scans)
    per_epoch = n_scans // args.batch_size
    if args.warmup_iters is None:
        args.warmup_iters = (round(args.warmup_epochs * per_epoch) if args.warmup_epochs is not None
                             else p.get('warmup_iters', round(p.get('warmup_epochs', 0) * per_epoch)))
    total = args.epochs * per_epoch
    stop = min(total, args.max_iters) if args.max_iters else total
    wi.print0(f'budget ({source}): WI-{args.depth}-{args.width}, {n_scans} scans, global batch {args.batch_size} '
              f'on {world} process(es), {args.epochs} epochs x {per_epoch} it = {total} iterations '
              f'(warmup {args.warmup_iters}, lr {args.lr} -> {args.min_lr}, wd {args.weight_decay})'
              + (f'; stopping after {stop} (--max-iters)' if stop < total else ''))
    return per_epoch, total, stop


def parse_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    a = p.add_argument
    a('--data', default='toy', choices=data.DATASET_NAMES, help='pretraining data (toy = embedded toy nuScenes)')
    a('--root', default=None, help='dataset root (toy: data/toy, generated if missing)')
    a('--version', default=None, help='nuScenes version, e.g. v1.0-trainval (data.py default if unset)')
    a('--merged-sets', default=None,
      help='--data merged: comma-separated subset of nuscenes,semantic_kitti,pandaset64,pandasetgt (default: every '
           'dataset folder found under --root; Supp. B.2 multi-dataset: all four)')
    a('--split', default='train', help='split used for pretraining (official: train splits only, Sec. 1.5)')
    a('--teacher', default='dinov2_vitl14',
      help=f'2D teacher(s), comma-separated for multi-teacher (paper: dinov2_vitl14); one of {", ".join(TEACHERS)}')
    a('--teacher-weights', default=None,
      help='comma-separated local weights per teacher (Meta .pth or timm .safetensors); default: timm download '
           'if online, else a LOUDLY random teacher')
    a('--teacher-arch', default='auto', choices=['auto', 'full', 'tiny'],
      help='tiny = same timm class with depth 2, width 96 (auto: tiny on toy data without weights)')
    a('--image-size', default='224,448', help='teacher input H,W (official.md Sec. 2.5: 224,448; ScaLR+ 448,896)')
    a('--head', default=None, choices=['linear', 'mlp'],
      help='3D head: linear Conv1d (released ScaLR, one teacher) or Supp. B.2 MLP (default with several teachers)')
    a('--preset', default=None, choices=list(PRESETS),
      help='Supp. B.2 schedule (default: toy on toy data, else wi768 = the released model); flags below override')
    a('--width', type=int, default=None, help='WaffleIron width F (preset; WI-256 / WI-768)')
    a('--depth', type=int, default=None, help='WaffleIron depth L (preset; paper 48)')
    a('--epochs', type=int, default=None, help='epochs (Supp. B.2 via preset)')
    a('--batch-size', type=int, default=None, help='GLOBAL batch size, split over DDP processes (preset: 16 or 8)')
    a('--lr', type=float, default=0.002, help='peak learning rate (Supp. B.2: 0.002)')
    a('--min-lr', type=float, default=1e-5, help='final cosine learning rate (Supp. B.2: 1e-5)')
    a('--weight-decay', type=float, default=3e-4,
      help='AdamW weight decay (Supp. B.2: 3e-4; the official config uses 0.03, official.md Sec. 6.2)')
    a('--warmup-iters', type=int, default=None, help='linear warmup iterations (Supp. B.2 multi: 3500)')
    a('--warmup-epochs', type=float, default=None, help='linear warmup in epochs (Supp. B.2 mono: 2)')
    a('--drop-path', type=float, default=0.0, help='drop path during distillation (official: 0; ScaLR+ 0.2)')
    a('--max-points', type=int, default=20000, help='LimitNumPoints after the visibility filter (official: 20000)')
    a('--loss', default='eq1', choices=['eq1', 'infonce'],
      help='eq1 = Eq. (1), the paper\'s l2 distance of normalised features; infonce = point-to-pixel contrastive '
           'loss of SLidR / PPKT (exercise a, not ScaLR)')
    a('--temperature', type=float, default=0.07, help='InfoNCE temperature (exercise a; PPKT / SLidR: 0.07)')
    a('--infonce-pairs', type=int, default=4096,
      help='InfoNCE: paired points sampled per batch and rank, the negatives of each other (exercise a; SLidR: 4096)')
    a('--cameras', default='one', choices=['one', 'all'],
      help='one = one random camera per scan and iteration (official.md Sec. 2.6); all = every image of the scan, '
           'as Supp. E suggests ("from 1 to 6"; exercise b)')
    a('--knn', type=int, default=None,
      help='neighbours k of the point embedding (official.md Sec. 3.6: 16; exercise c); stored in model.pth')
    a('--cell', type=float, default=None,
      help='grid cell size in metres over the same FOV (official.md Sec. 3.4: 0.5 m; toy: 1 m; exercise d); '
           'stored in model.pth, probe.py / finetune.py reuse it')
    a('--amp', default='none', choices=['none', 'fp16', 'bf16'],
      help='autocast precision (official: fp16 + GradScaler; ScaLR+: bf16)')
    a('--workers', type=int, default=None, help='DataLoader worker processes per rank (default: 2; 0 on the toy, '
      'whose samples take ~15 ms each)')
    a('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s own; 1 on the toy: on a '
      'busy 2-core machine, 2 OpenMP threads plus loader workers were measured up to 20x slower)')
    a('--seed', type=int, default=0, help='seed of model init, scan order and per-scan randomness')
    a('--max-iters', type=int, default=0, help='stop after this many iterations (smoke runs; 0 = full budget)')
    a('--save-every', type=int, default=0, help='also write ckpt_last.pth every N iterations (0: each epoch)')
    a('--log-every', type=int, default=1, help='log.csv row every N iterations')
    a('--out', default='runs/distill', help='output folder: model.pth, ckpt_last.pth, log.csv, loss.png')
    a('--resume', action='store_true', help='continue bit-exact from OUT/ckpt_last.pth')
    a('--compile', action='store_true', help='torch.compile the student (GPU speed-up; not in the official code)')
    a('--no-progress', action='store_true', help='no tqdm bar')
    args = p.parse_args(argv)
    args.image_size = tuple(int(v) for v in args.image_size.split(','))
    return args


# ----------------------------------------------------------------------------------------------------------------
# Building blocks of the run

def check_output_dir(out):
    """Fail at start (not after hours of training) if --out cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix='.write_test_'):
            pass
    except OSError as e:
        raise SystemExit(f'error: output folder {out} is not writable ({e.strerror}); pass a writable --out DIR')


def build_teachers(args, device):
    names = [n.strip() for n in args.teacher.split(',') if n.strip()]
    weights = args.teacher_weights.split(',') if args.teacher_weights else [None] * len(names)
    if len(weights) != len(names):
        raise SystemExit(f'error: {len(names)} teachers ({names}) but {len(weights)} --teacher-weights files')
    unknown = [n for n in names if n not in TEACHERS]
    if unknown:
        raise SystemExit(f'error: unknown teacher(s) {unknown}; valid teachers: {", ".join(TEACHERS)}')
    toy = is_toy(args)
    teachers = []
    for name, w in zip(names, weights):
        tiny = args.teacher_arch == 'tiny' or (args.teacher_arch == 'auto' and toy and w is None)
        if tiny and w is not None:
            raise SystemExit('error: --teacher-arch tiny cannot load --teacher-weights (they are full-size)')
        try:
            teachers.append(build_teacher(name, args.image_size, w, tiny=tiny, verbose=wi.is_main()).to(device))
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise SystemExit(f'error: {e}')
    return teachers


def build_student(args, cfg, dims, head):
    """WaffleIron + distillation head: linear Conv1d(F, C) (released ScaLR) or the Supp. B.2 MLP."""
    # head 'mlp' (Supp. B.2): Conv1d(F, 2F) -> LayerNorm -> ReLU -> Conv1d(2F, F1 + F2), parts l2-normalised
    return wi.WaffleIron(input_channels=5, feat_channels=args.width, depth=args.depth, nb_class=sum(dims),
                         grids=cfg.grids, layer_norm=True, drop_path=args.drop_path, head=head,
                         teacher_dims=list(dims))


def run_config(args, cfg, dims, head, total, per_epoch):
    """Everything needed to rebuild the run (config.json and the 'config' entry of every checkpoint)."""
    return dict(stage='distill', data=args.data, root=args.root, merged_sets=args.merged_sets, split=args.split,
                teacher=args.teacher, teacher_dims=list(dims), teacher_weights=args.teacher_weights,
                teacher_arch=args.teacher_arch, image_size=list(args.image_size), head=head, width=args.width,
                depth=args.depth, input_channels=5, nb_class=sum(dims), layer_norm=True, grids=[list(g) for g in
                cfg.grids], fov_min=list(cfg.fov_min), fov_max=list(cfg.fov_max), dim_proj=list(cfg.dim_proj),
                voxel=cfg.voxel, k=cfg.k, cell=data.cell_size(cfg), max_points=cfg.max_points, loss=args.loss,
                temperature=args.temperature, infonce_pairs=args.infonce_pairs, cameras=args.cameras,
                preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, total_iters=total, iters_per_epoch=per_epoch,
                drop_path=args.drop_path, amp=args.amp, seed=args.seed)


def check_resume_compatible(ckpt_path, ckpt, config):
    keys = ('width', 'depth', 'head', 'teacher', 'teacher_dims', 'batch_size', 'total_iters', 'data', 'seed', 'loss',
            'cameras', 'k', 'grids')
    diff = [f'{k}: checkpoint {ckpt["config"].get(k)!r} vs now {config[k]!r}' for k in keys
            if ckpt['config'].get(k, config[k]) != config[k]]
    if diff:
        raise SystemExit(f'error: cannot --resume from {ckpt_path}, it was trained with other settings:\n  '
                         + '\n  '.join(diff) + '\nUse the same flags, or another --out to start a new run.')


def to_device(batch, device):
    keys = ('feat', 'cells', 'neighbors', 'occupied', 'images', 'pairs')
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def train_step(model, teachers, batch, dims, opt, sched, scaler, args, device, it):
    """One iteration; returns (loss of the global batch, lr used, teacher seconds, points M of the global batch)."""
    batch = to_device(batch, device)
    t0 = time.perf_counter()
    with wi.autocast_context(device, args.amp):  # the teacher runs under autocast too (official.md Sec. 2.5)
        target = teacher_targets(teachers, batch['images'], batch['pairs'])  # (M, sum C_t)
    sync(device)
    t_teacher = time.perf_counter() - t0
    with wi.autocast_context(device, args.amp):
        student = student_outputs(model, batch, dims)  # (M, sum C_t)
    dist_sum, n_terms = pair_loss(student, target, args, it)  # fp32; Eq. (1) (default) or --loss infonce
    # Eq. (1) averages over ALL paired points of the GLOBAL batch: M_global points over the ranks. DDP averages the
    # gradients over ranks, hence the factor world / M_global (the official code averages per-GPU means instead).
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    counts = wi.all_reduce_sum(torch.tensor([float(n_terms), dist_sum.item(), float(len(student))], device=device))
    loss = dist_sum * (world / counts[0])
    global_loss = wi.check_finite(counts[1] / counts[0], it + 1)  # raises before the update; 1-based as log.csv
    lr = opt.param_groups[0]['lr']  # the lr of this step (the very first step uses lr = 0, official.md Sec. 6.1)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return global_loss, lr, t_teacher, int(counts[2].item())


# ----------------------------------------------------------------------------------------------------------------
# Main loop

LOG_FIELDS = ['iteration', 'epoch', 'loss', 'lr', 'scans_per_s', 'teacher_share', 'points', 'skipped']


def make_loader(args, ds, cfg, rank, world, device):
    dataset = DistillDataset(ds, cfg, args.image_size, seed=args.seed, cameras=args.cameras)
    sampler = EpochSampler(len(ds), args.batch_size, seed=args.seed, rank=rank, world=world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler,
                                         collate_fn=distill_collate, num_workers=args.workers, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed),
                                         pin_memory=device.type == 'cuda')
    return loader, sampler


def main(argv=None):
    args = parse_args(argv)
    if args.workers is None:
        args.workers = 0 if is_toy(args) else 2
    if args.threads is None and is_toy(args) and not torch.cuda.is_available():
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = wi.ddp_setup()
    out = Path(args.out)
    if wi.is_main():
        check_output_dir(out)
    try:
        ds = data.get_dataset(args.data, root=args.root, split=args.split, version=args.version,
                              sets=args.merged_sets.split(',') if args.data == 'merged' and args.merged_sets else None)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: --data {args.data}: {e}')
    # merged without --root = toy nuScenes + toy KITTI (pillar 3 in miniature): the toy grid and budget
    grid_key = 'toy' if is_toy(args) else args.data
    cfg = data.with_cell(data.grid_config(grid_key, 'pretrain'), cell=args.cell, k=args.knn)  # exercises c, d
    cfg.max_points = args.max_points or None
    wi.print0(f'grid: FOV {tuple(cfg.fov_min)}..{tuple(cfg.fov_max)} m, cell {data.cell_size(cfg):g} m -> planes '
              f'{[list(g) for g in cfg.grids]}; kNN k = {cfg.k}; loss {args.loss}; cameras {args.cameras}')
    names = [d.name for d in ds.datasets] if hasattr(ds, 'datasets') else [ds.name]
    per_epoch, total, stop = resolve_budget(args, names, len(ds), world)
    wi.seed_everything(args.seed)  # a random-init teacher must be the same on every rank and after --resume
    teachers = build_teachers(args, device)
    dims = [t.dim for t in teachers]
    head = args.head or ('mlp' if len(dims) > 1 else 'linear')
    wi.seed_everything(args.seed)  # the student init does not depend on how the teachers were built
    model = build_student(args, cfg, dims, head).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)  # all params decayed
    r = SimpleNamespace(args=args, out=out, device=device, teachers=teachers, dims=dims, opt=opt,
                        sched=wi.make_scheduler(opt, args.warmup_iters, total, args.min_lr, args.lr),  # Supp. B.2
                        scaler=wi.make_grad_scaler(args.amp, device), per_epoch=per_epoch, stop=stop,
                        config=dict(run_config(args, cfg, dims, head, total, per_epoch), model=model.config),
                        epoch=0, batches_done=0, it=0, skips={}, t_total=0.0, t_teacher=0.0, scans=0)
    if args.resume:
        path = out / 'ckpt_last.pth'
        try:
            ckpt = wi.load_training_checkpoint(path)
        except FileNotFoundError as e:
            raise SystemExit(f'error: --resume: {e}')
        check_resume_compatible(path, ckpt, r.config)
        r.epoch, r.it = wi.restore_training_state(ckpt, model, r.opt, r.sched, r.scaler)
        r.batches_done, r.skips = int(ckpt['batches_done']), dict(ckpt['skips'])
        wi.print0(f'resumed from {path} at iteration {r.it} (epoch {r.epoch}, batch {r.batches_done})')
    if args.compile:
        model = torch.compile(model)
    r.model = wi.wrap_ddp(model, device).train()
    if wi.is_main():
        (out / 'config.json').write_text(json.dumps(r.config, indent=1))
    r.log = wi.CSVLog(out / 'log.csv', LOG_FIELDS, resume_iteration=r.it if args.resume else None)
    r.loader, r.sampler = make_loader(args, ds, cfg, rank, world, device)
    try:
        train_loop(r)
    except FloatingPointError as e:
        raise SystemExit(f'error: {e}')
    save_state(r)
    report(r, world)
    wi.ddp_cleanup()
    return out


def train_loop(r):
    """Epochs of iterations until r.stop; ckpt_last.pth after every epoch (official.md Sec. 6.1)."""
    from tqdm import tqdm
    args = r.args
    while r.it < r.stop:
        r.sampler.set_epoch(r.epoch, r.batches_done)
        bar = tqdm(total=r.per_epoch, initial=r.batches_done, desc=f'epoch {r.epoch}', dynamic_ncols=True,
                   disable=args.no_progress or not wi.is_main())
        t_prev = time.perf_counter()
        for batch in r.loader:
            loss, lr, t_teacher, points = train_step(r.model, r.teachers, batch, r.dims, r.opt, r.sched, r.scaler,
                                                     args, r.device, r.it)
            r.it, r.batches_done = r.it + 1, r.batches_done + 1
            for _, reason in batch['skipped']:
                r.skips[reason] = r.skips.get(reason, 0) + 1
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            r.t_total, r.t_teacher, r.scans = r.t_total + dt, r.t_teacher + t_teacher, r.scans + args.batch_size
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.4f}', scans_s=f'{args.batch_size / dt:.1f}', lr=f'{lr:.2e}')
            if r.it % args.log_every == 0 or r.it == r.stop:
                r.log.log(iteration=r.it, epoch=r.epoch, loss=loss, lr=lr, scans_per_s=args.batch_size / dt,
                          teacher_share=t_teacher / dt, points=points, skipped=sum(r.skips.values()))
            if r.it >= r.stop:
                break
            if args.save_every and r.it % args.save_every == 0:
                save_state(r)
        bar.close()
        if r.batches_done >= r.per_epoch:
            r.epoch, r.batches_done = r.epoch + 1, 0
            if r.it < r.stop:  # the final checkpoint is written by main()
                save_state(r)


def save_state(r):
    """ckpt_last.pth (resume) and model.pth (official names + config), both atomic. Every rank calls this
    (training_state gathers the RNG states of all ranks), rank 0 writes."""
    state = wi.training_state(r.model, r.opt, r.sched, r.scaler, epoch=r.epoch, iteration=r.it, config=r.config,
                              extra=dict(batches_done=r.batches_done, skips=dict(r.skips)))
    if wi.is_main():
        wi.save_checkpoint(r.out / 'ckpt_last.pth', **state)
        wi.save_checkpoint(r.out / 'model.pth', model_point=state['model_point'], config=r.config, iteration=r.it)


def report(r, world):
    """Final summary: skipped scans (summed over ranks), throughput, teacher share; loss.png."""
    reasons = ('missing image', 'no point in image', 'no visible point in the FOV')
    counts = wi.all_reduce_sum(torch.tensor([float(r.skips.get(k, 0)) for k in reasons]))
    if not wi.is_main():
        return
    wi.plot_log(r.out / 'log.csv', r.out / 'loss.png', ['loss', 'lr'], title=f'ScaLR distillation ({r.args.data})')
    skipped = ', '.join(f'{int(c)} {k}' for k, c in zip(reasons, counts.tolist()))
    rate, share = r.scans / max(r.t_total, 1e-9), r.t_teacher / max(r.t_total, 1e-9)
    print(f'done: {r.out / "model.pth"} | skipped scans: {skipped} | {rate:.2f} scans/s on {world} x '
          f'{r.device.type} (teacher forward {100 * share:.0f}% of the time) | {r.out / "log.csv"}, '
          f'{r.out / "loss.png"}', flush=True)


if __name__ == '__main__':
    main()
