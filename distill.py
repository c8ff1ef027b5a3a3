r"""distill.py -- ScaLR pretraining: distil 2D foundation-model features into a WaffleIron lidar backbone.

Paper: "Three Pillars improving Vision Foundation Model Distillation for Lidar" (ScaLR, CVPR 2024), Sec. 3 and
Supp. B.2; the official recipe (ScaLR datasets/im_pc_dataset.py for the sample, utils/distiller.py for the loss,
utils/scheduler.py for the schedule) is summarised in docs/official.md §2. No labels are used: for every lidar
scan ONE camera image is picked at random, the points visible in it are fed to the student (WaffleIron + head) and
its output at each point is pulled towards the frozen image teacher's feature at the point's pixel with Eq. (1).

    # toy world on CPU, ~4 min on 2 idle cores (tiny random-init DINOv2 teacher unless --teacher-weights is given)
    python distill.py
    # Supp. B.2 mono-dataset setting: WI-48-256 on nuScenes, 19 epochs, batch 16, DINOv2 ViT-L/14 (Meta .pth)
    python distill.py --data nuscenes --root /data/nuscenes --version v1.0-trainval --preset mono \
        --teacher-weights dinov2_vitl14_pretrain.pth --amp fp16 --out runs/mono
    # the released ScaLR model: WI-48-768, 4 datasets merged, 25 epochs, global batch 8 over 8 GPUs
    torchrun --nproc_per_node 8 distill.py --data merged --root /data --preset wi768 \
        --teacher-weights dinov2_vitl14_pretrain.pth --amp fp16 --out runs/scalr
    # multi-teacher (Supp. B.2): DINOv2 ViT-L/14 + DINO ViT-S/8 keys, MLP head
    python distill.py --teacher dinov2_vitl14,dino_vits8 --teacher-weights vitl14.pth,dino_deitsmall8_pretrain.pth
    # beyond the paper: DINOv3 ViT-L/16 (Meta's .pth), DINOv2 with registers, or any timm ViT
    python distill.py --data nuscenes --root /data/nuscenes --teacher dinov3_vitl16 \
        --teacher-weights dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth --out runs/dinov3_l16

Exercises (README "Classroom exercises"): --loss infonce (a), --cameras all (b, Supp. E), --knn K (c), --cell M (d),
--teacher dino_vits8 (e), --teacher dinov2_vitl14,dino_vits8 (f, Supp. B.2), --width 128 (g).
Add --resume to continue an interrupted run bit-exactly from OUT/ckpt_last.pth (--overwrite starts over in a used
--out); --max-iters N for smoke runs. --loss-mean scan (default) weighs every scan of the global batch alike, as the
released 8 GPUs x 1 scan recipe does; --loss-mean points is one mean over all paired points (Eq. (1) as written).
Outputs in --out: model.pth ({'model_point': state dict with the official names, 'config': {...}}, readable by
waffleiron.load_checkpoint), ckpt_last.pth (resume state), log.csv, loss.png, config.json.

Contents, top-down: Eq. (1) and its targets; the distillation sample (one camera per scan); the run and its loop
(train_step, train, main); the teachers (timm ViTs); presets and budget (Supp. B.2); plumbing: the command line,
building and resuming the run, the end-of-run report, teacher weight files (Meta / timm formats).
"""
import argparse
import json
import math
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import waffleiron as wi

# ----------------------------------------------------------------------------------------------------------------
# Eq. (1) and its targets (Supp. B.2; ScaLR utils/distiller.py)

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


def pair_loss(student, target, scan, args, it):
    """Per-point losses (n,) and the scan of each (n,) for --loss eq1 (all M points) | infonce (n sampled points).
    student, target (M, C); scan (M,) index of each point's scan in this rank's batch."""
    if args.loss == 'eq1':
        return distill_loss(student, target, reduction='none'), scan  # Eq. (1) at each of the M points
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + it)  # same draw after --resume
    if len(student) > args.infonce_pairs:  # the draw infonce_loss would make, kept to know each point's scan
        keep = torch.randperm(len(student), generator=g)[:args.infonce_pairs].to(student.device)  # (S,)
        student, target, scan = student[keep], target[keep], scan[keep]
    return infonce_loss(student, target, args.temperature, len(student), reduction='none'), scan


def loss_terms(per_point, scan, n_scans, mode):
    """This rank's share of the batch loss as (sum, count), summed over the ranks, so loss = sum / count.

    mode 'points': Eq. (1) as written, one mean over ALL paired points of the global batch: (sum_p d_p, M); scans
      with many visible points (KITTI, PandaSet: up to 20k) weigh more than small ones (~3k for a nuScenes camera).
    mode 'scan': the mean over the B scans of the global batch of each scan's own mean over its paired points:
      (sum_b mean_{p in b} d_p, B). The official code averages per GPU then DDP averages the GPUs (ScaLR
      utils/distiller.py), so in the released recipe (8 GPUs x 1 scan) every scan weighs the same: 'scan' equals it
      at any world size, and 1 process equals N. A scan without a term (InfoNCE's sampling missed it) is left out.
    per_point (n,) losses, scan (n,) int64 scan index in 0..n_scans-1 -> (scalar tensor, float)."""
    # Eq. (1) per scan: L_b = 1/M_b sum_{p in b} d_p; 'scan' returns sum_b L_b (divided by B over all ranks)
    if mode == 'points':
        return per_point.sum(), float(len(per_point))
    sums = torch.zeros(n_scans, device=per_point.device).index_add_(0, scan, per_point.float())  # (B,)
    counts = torch.zeros(n_scans, device=per_point.device).index_add_(0, scan, torch.ones_like(per_point.float()))
    has = counts > 0
    return (sums[has] / counts[has]).sum(), float(has.sum().item())


def reduce_loss(per_point, scan, n_scans, mode, device, n_points=None):
    """(loss to backpropagate on this rank, loss of the global batch, points M of the global batch).

    The loss of the global batch is S / K with S, K the sums over ranks of loss_terms. DDP AVERAGES the gradients
    over the `world` ranks, so each rank backpropagates its own sum times world / K: the average is then exactly
    the gradient of S / K, whatever the world size."""
    world = data.rank_world()[1]
    local_sum, local_count = loss_terms(per_point, scan, n_scans, mode)
    n_points = len(per_point) if n_points is None else n_points  # M (InfoNCE: all points, not the sampled ones)
    totals = wi.all_reduce_sum(torch.tensor([local_count, local_sum.item(), float(n_points)],
                                            device=device))  # [K, S, M] of the global batch
    return local_sum * (world / totals[0]), totals[1] / totals[0], int(totals[2].item())


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
    f = fmap.float().permute(0, 2, 3, 1).reshape(B * h * w, C)  # (B*h*w, C) rows of the patch map
    corners = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1]) + b * (h * w)  # (4, M) rows
    f00, f01, f10, f11 = f.index_select(0, corners.view(-1)).view(4, -1, C)  # one gather, (M, C) each
    top = f00 * (1 - wx) + f01 * wx
    bottom = f10 * (1 - wx) + f11 * wx
    return top * (1 - wy) + bottom * wy  # (M, C)


def teacher_targets(teachers, images, pairs, cache=None, keys=None):
    """Supp. B.2: l2-normalise each teacher's pixel features, concatenate. images (B, 3, h, w) -> (M, sum C_t)."""
    feats = []
    for t, fmap in zip(teachers, teacher_maps(teachers, images, cache, keys)):  # fmap (B, C_t, h/p, w/p)
        feats.append(F.normalize(pixel_features(fmap, pairs, t.patch), dim=1))  # (M, C_t)
    return torch.cat(feats, dim=1)


def teacher_maps(teachers, images, cache=None, keys=None):
    """Each teacher's patch features of the batch's images: [(B, C_t, h/p, w/p)], all images in one forward.
    With a cache (a dict, --cache-teacher), an image is run through the teachers once per run and looked up by
    its key (scan id, camera) afterwards. That is exact: the teachers are frozen (eval mode, no dropout) and the
    image of a (scan, camera) is the same at every epoch, since the pretraining augmentations move the points only
    (ScaLR datasets/im_pc_dataset.py: the image is loaded and resized, never augmented)."""
    if cache is None:
        return [t(images) for t in teachers]
    for b, key in enumerate(keys):
        if key not in cache:  # one image per forward: its features never depend on its batch (--resume is exact)
            cache[key] = [t(images[b:b + 1])[0] for t in teachers]  # (C_t, h/p, w/p) each
    return [torch.stack([cache[key][i] for key in keys]) for i in range(len(teachers))]


def student_outputs(model, batch, dims):
    """Head output at every real point, parts l2-normalised per teacher (Supp. B.2). -> (M, sum dims)"""
    out = model(batch['feat'], batch['cells'], batch['neighbors'], batch['occupied'])  # (B, C, Nmax)
    B, C, N = out.shape
    rows = batch['occupied'].reshape(-1).nonzero().squeeze(1)  # (M,) real points, scan-major like batch['pairs']
    # out.transpose(1, 2)[occupied] as a row gather: the same (M, C), its backward 3x faster on CPU than a mask's
    out = out.transpose(1, 2).reshape(B * N, C).index_select(0, rows)  # (M, C)
    return wi.normalize_parts(out, list(dims), dim=1) if len(dims) > 1 else out


# ----------------------------------------------------------------------------------------------------------------
# The distillation sample (ScaLR datasets/im_pc_dataset.py, docs/official.md §2) and its batching

def read_camera_image(sub, j, cam):
    """(H, W, 3) uint8, or (None, reason) for a missing / unreadable (truncated, corrupt) image: both are skipped
    and counted alike (an unreadable one also prints one warning naming the scan and the camera)."""
    from PIL import Image
    try:
        return sub.image(j, cam), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's decode errors
        unreadable = getattr(data, 'UnreadableImageError', ())
        if isinstance(err, FileNotFoundError) and not isinstance(err, unreadable):
            return None, 'missing image'
        if not isinstance(err, unreadable):  # data.py's reader warns itself for the errors it wraps
            data.warn(f'unreadable camera image of scan {sub.scan_id(j)} ({cam}): {str(err)[:200]}; skipped')
        return None, 'unreadable image'


def resize_images(img, image_size, antialias=False):
    """(V, 3, H, W) float -> (V, 3, h, w): torchvision.transforms.functional.resize on tensors = bilinear, no crop,
    aspect ratio not kept. antialias=False is torchvision < 0.17's default for tensors (0.12 ... 0.16),
    antialias=True torchvision >= 0.17's (--antialias)."""
    return F.interpolate(img, size=tuple(image_size), mode='bilinear', align_corners=False, antialias=antialias)


def distill_sample(ds, i, cfg, image_size, rng, cameras='one', antialias=False, preprocess_on='cpu', cached=()):
    """One scan -> (sample dict, None) or (None, reason to skip). Official order (ScaLR datasets/im_pc_dataset.py).

    cameras='one' (official): one camera uniformly at random; sample['image'] (3, h, w), sample['pairs'] (M, 2)
    [row', col']. cameras='all' (Supp. E, exercise b): every camera image of the scan is loaded, the student sees the
    points visible in ANY of them, each paired with one camera it lands in (uniformly at random if several);
    sample['images'] (V, 3, h, w), sample['pairs'] (M, 3) [image index in 0..V-1, row', col'].
    cached: keys (scan id, camera) whose teacher features are already cached (--cache-teacher): their image is not
    read, and its place in the sample holds zeros (the teacher never sees it)."""
    sub, j = ds.sub(i) if hasattr(ds, 'sub') else (ds, i)
    # one camera uniformly at random per scan and iteration (KITTI: its camera, PandaSet-GT: front_camera)
    cams = [sub.cameras[int(rng.integers(len(sub.cameras)))]] if cameras == 'one' else list(sub.cameras)
    images, views, reason = [], [], None
    for cam in cams:
        if (sub.scan_id(j), cam) in cached:  # read and checked when its features were computed
            images.append(None)
            views.append(cam)
            continue
        im, why = read_camera_image(sub, j, cam)  # (H, W, 3) uint8
        if im is None:
            reason = reason or why
            continue  # 'all': the scan keeps its other cameras
        images.append(im)
        views.append(cam)
    if not images:
        return None, reason
    pts = sub.points(j)  # (N, 4) x, y, z, raw intensity
    kept = data.voxelize(pts[:, :3], cfg.voxel, rng)  # (M,) one random point per 0.1 m voxel
    view, row, col = point_pixels(sub, j, views, len(pts), image_size, rng)  # (N,) each; view -1 = not visible
    sel = kept[view[kept] >= 0]  # the student sees ONLY the visible points (docs/official.md §2)
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
    img = torch.cat([torch.zeros(1, 3, *image_size) if im is None else  # cached: not needed
                     resize_images(torch.tensor(im).permute(2, 0, 1)[None].float() / 255.0, image_size, antialias)
                     for im in images])  # (V, 3, h, w), each resized as the official torchvision resize
    sample = dict(feat=data.input_features(xyz, intensity).T.copy(),  # (5, M) [int, x, y, z, radius]
                  xyz=xyz, scan_id=sub.scan_id(j), kept=sel)
    if preprocess_on == 'cpu':  # else: cells and kNN-16 of the whole batch on the training device (train_step)
        sample.update(cells=data.cell_indices(xyz, cfg), neighbors=data.knn_indices(xyz, cfg.k))  # (3, M), (k, M)
    if cameras == 'one':
        sample.update(pairs=np.stack([row[sel], col[sel]], 1), image=img[0], camera=views[0])
    else:
        sample.update(pairs=np.stack([view[sel], row[sel], col[sel]], 1), images=img, camera=views)
    return sample, None


def point_pixels(sub, j, views, n, image_size, rng):
    """For each of the n rows of the scan: index of the loaded camera it is paired with (-1: seen by none) and its
    (row', col') pixel in that camera's image resized to image_size. A point seen by several cameras takes one of
    them uniformly at random (reservoir draw; rng is used only then, so the official 1-camera stream is unchanged).
    Pairs floored twice (docs/official.md §2): (row, col) = (floor(v), floor(u)), then floor(row * h / H)."""
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

    def __init__(self, ds, cfg, image_size, seed=0, max_tries=32, cameras='one', antialias=False,
                 preprocess_on='cpu', teacher_cache=None):
        self.ds, self.cfg, self.image_size, self.seed, self.max_tries = ds, cfg, tuple(image_size), seed, max_tries
        self.cameras, self.antialias, self.preprocess_on = cameras, antialias, preprocess_on
        # --cache-teacher: the images whose features are cached are not read. Only in the training process
        # (--workers 0, the toy default): a loader worker copies the cache when it starts, empty, and so reads every
        # image (the same samples, just without this saving).
        self.cached = teacher_cache if teacher_cache is not None else ()

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        skipped = []
        for attempt in range(self.max_tries):
            j = (index + attempt) % len(self.ds)
            sample, reason = distill_sample(self.ds, j, self.cfg, self.image_size, rng, self.cameras,
                                            self.antialias, self.preprocess_on, self.cached)
            if sample is not None:
                sample['skipped'] = skipped
                return sample
            skipped.append((self.ds.scan_id(j), reason))
        raise data.UserError(f'{self.max_tries} consecutive scans from #{index} of {self.ds.name} were skipped '
                             f'(e.g. {skipped[:3]})', '--root', 'are the camera images present under the dataset '
                             'root, and readable?')

    def __getitems__(self, items):
        """The samples of one batch (the DataLoader's fetch). In the training process itself (--workers 0, the toy
        default) the cores wait for the sample anyway, so the batch's scans are prepared by one thread per torch
        thread: kNN (cKDTree), voxelisation and the image resize release the GIL (1.4-1.7x faster for a batch of 2
        on 2 cores). Each sample has its own seeded generator: the same samples as one after the other."""
        threads = min(len(items), torch.get_num_threads())
        if threads < 2 or torch.utils.data.get_worker_info() is not None:  # in a loader worker: one core each
            return [self[item] for item in items]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.__getitem__, items))


def distill_collate(samples):
    """data.collate + images (V, 3, h, w) and pairs (M, 3) [image index, row', col'] in the student's point order
    (scan-major, i.e. out.transpose(1, 2)[occupied]). One camera per scan (official): V = B and image index = scan
    index; --cameras all: the images of every scan one after the other, pairs re-indexed accordingly."""
    if 'neighbors' in samples[0]:  # --preprocess-on cpu: cells and kNN computed in the loader
        batch = data.collate([{k: s[k] for k in ('feat', 'cells', 'neighbors')} for s in samples])
    else:  # --preprocess-on device: train_step adds them (data.add_cells_neighbors_t)
        batch = data.collate_light([{k: s[k] for k in ('feat', 'xyz')} for s in samples])
    images, pairs, first = [], [], 0  # first: index of this scan's first image in the batch
    for s in samples:
        imgs = s['images'] if 'images' in s else s['image'][None]  # (V_b, 3, h, w)
        p = torch.as_tensor(s['pairs'], dtype=torch.long)
        if p.shape[1] == 2:  # one camera: [row', col'] -> [0, row', col']
            p = torch.cat([torch.zeros(len(p), 1, dtype=torch.long), p], 1)
        pairs.append(p + torch.tensor([first, 0, 0]))
        images.append(imgs)
        first += len(imgs)
    batch['images'] = torch.cat(images)  # (V, 3, h, w); zeros where the teacher features are cached (not read)
    batch['pairs'] = torch.cat(pairs)  # (M, 3)
    batch['scan_id'] = [s['scan_id'] for s in samples]
    batch['image_keys'] = [(s['scan_id'], cam) for s in samples  # one per image, in batch['images'] order
                           for cam in (s['camera'] if isinstance(s['camera'], list) else [s['camera']])]
    batch['skipped'] = [x for s in samples for x in s['skipped']]
    return batch


# ----------------------------------------------------------------------------------------------------------------
# The run: what it is built from (Run), where its loop is (Progress), and the loop itself (train)

class Run(NamedTuple):
    """The fixed parts of a run, built once by setup()."""
    args: argparse.Namespace
    out: Path
    device: torch.device
    world: int
    cfg: 'data.GridConfig'  # FOV, grids, kNN k of the student's input
    teachers: list          # frozen Teacher modules
    dims: list              # feature size of each teacher
    model: nn.Module        # student (WaffleIron + head), DDP-wrapped with several processes
    opt: torch.optim.Optimizer
    sched: object           # warmup + cosine, stepped every iteration (Supp. B.2)
    scaler: object          # GradScaler (--amp fp16) or a no-op
    loader: torch.utils.data.DataLoader
    teacher_cache: dict     # (scan id, camera) -> teacher features, --cache-teacher (None: off)
    log: 'wi.CSVLog'
    config: dict            # config.json, stored in every checkpoint
    per_epoch: int          # iterations per epoch
    stop: int               # iteration to stop at (the budget, or --max-iters)


@dataclass
class Progress:
    """Where the loop is and what it has counted: saved in every ckpt_last.pth, restored by --resume."""
    epoch: int = 0
    batches_done: int = 0   # batches of this epoch already trained (a mid-epoch resume skips them)
    it: int = 0             # optimizer steps done
    skips: dict = field(default_factory=dict)  # reason -> scans replaced by the next scan
    seconds: float = 0.0    # wall time of the steps, for the end-of-run throughput
    teacher_seconds: float = 0.0
    data_seconds: float = 0.0   # waiting for the loader's batch
    scans: int = 0
    updates: int = 0            # steps taken by this process (the time figures are this process's)


def train_step(run, batch, it):
    """One AdamW step on Eq. (1); returns (loss of the global batch, lr used, teacher seconds, points M)."""
    args, device = run.args, run.device
    if 'neighbors' not in batch:  # --preprocess-on device: cells (B, 3, N) and kNN (B, k, N) computed here
        batch = data.add_cells_neighbors_t(batch, run.cfg, device)
    batch = to_device(batch, device)
    t0 = time.perf_counter()
    with wi.autocast_context(device, args.amp):  # the teacher runs under autocast too (ScaLR utils/distiller.py)
        target = teacher_targets(run.teachers, batch['images'], batch['pairs'], run.teacher_cache,
                                 batch['image_keys'])  # (M, sum C_t)
    sync(device)
    t_teacher = time.perf_counter() - t0
    with wi.autocast_context(device, args.amp):
        student = student_outputs(run.model, batch, run.dims)  # (M, sum C_t)
    scan = batch['occupied'].nonzero()[:, 0]  # (M,) scan of each point, scan-major like student and target
    per_point, scan = pair_loss(student, target, scan, args, it)  # fp32; Eq. (1) (default) or --loss infonce
    # --loss-mean scan (default): mean over the scans of the global batch of each scan's mean; points: Eq. (1)'s
    # mean over all paired points of the global batch (see loss_terms)
    loss, global_loss, points = reduce_loss(per_point, scan, batch['occupied'].shape[0], args.loss_mean, device,
                                            n_points=len(student))
    global_loss = wi.check_finite(global_loss, it + 1)  # raises before the update; 1-based as log.csv
    lr = run.opt.param_groups[0]['lr']  # the lr of this step (the very first step uses lr = 0, as the official one)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return global_loss, lr, t_teacher, points


LOG_FIELDS = ['iteration', 'epoch', 'loss', 'lr', 'scans_per_s', 'teacher_share', 'points', 'skipped']


def train(run, p):
    """Supp. B.2 pretraining: epochs of AdamW steps on Eq. (1) until run.stop; ckpt_last.pth after every epoch."""
    from tqdm import tqdm
    args = run.args
    while p.it < run.stop:
        data.set_epoch(run.loader, p.epoch, p.batches_done)  # epoch e's order, without the batches already done
        bar = tqdm(total=run.per_epoch, initial=p.batches_done, desc=f'epoch {p.epoch}', dynamic_ncols=True,
                   disable=args.no_progress or not wi.is_main())
        tick = time.perf_counter()
        for batch in run.loader:
            t_data = time.perf_counter() - tick  # waiting for the sample (prepared here with --workers 0)
            loss, lr, t_teacher, points = train_step(run, batch, p.it)
            p.it, p.batches_done = p.it + 1, p.batches_done + 1
            for _, reason in batch['skipped']:  # scans replaced by the next one (missing image, ...)
                p.skips[reason] = p.skips.get(reason, 0) + 1
            now = time.perf_counter()
            dt, tick = now - tick, now
            p.seconds, p.teacher_seconds, p.scans = p.seconds + dt, p.teacher_seconds + t_teacher, \
                p.scans + args.batch_size
            p.data_seconds, p.updates = p.data_seconds + t_data, p.updates + 1
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.4f}', scans_s=f'{args.batch_size / dt:.1f}', lr=f'{lr:.2e}')
            if p.it % args.log_every == 0 or p.it == run.stop:
                run.log.log(iteration=p.it, epoch=p.epoch, loss=loss, lr=lr, scans_per_s=args.batch_size / dt,
                            teacher_share=t_teacher / dt, points=points, skipped=sum(p.skips.values()))
            if p.it >= run.stop:
                break
            if args.save_every and p.it % args.save_every == 0:
                save_state(run, p)
        bar.close()
        if p.batches_done >= run.per_epoch:  # the epoch is complete
            p.epoch, p.batches_done = p.epoch + 1, 0
            if p.it < run.stop:  # the final checkpoint is written by main()
                save_state(run, p)


def main(argv=None):
    args = parse_args(argv)
    run, p = setup(args)  # every flag checked before data is read; --resume restores p and the states
    try:
        train(run, p)
    except FloatingPointError as e:  # NaN/inf loss: one line naming the last good checkpoint
        raise SystemExit(wi.diverged_message(e, run.out)) from None
    save_state(run, p)  # model.pth BEFORE the plot and the report: a late failure loses nothing
    report(run, p)
    wi.ddp_cleanup()
    return run.out


# ----------------------------------------------------------------------------------------------------------------
# Teachers (Supp. B.2 "2D teacher"; beyond the paper: DINOv2 with registers, DINOv3 and any timm ViT)
#
# Every teacher is a timm model. What is distilled, and how positions are handled, per family:
#   dino        DINO ViT-S/8 (Supp. B.2): the keys of the last attention layer, CLS dropped. Learned position
#               table, resampled as DINOv2 (below).
#   dinov2      DINOv2, the paper's teacher (Supp. B.2): the patch tokens after the last block and BEFORE the final
#               LayerNorm ('x_prenorm' of Meta's dinov2 models/vision_transformer.py), CLS dropped. Patch 14. Learned
#               position table at 37 x 37 (518 px), resampled once to the input grid by Meta's rule: bicubic with
#               scale factor (n + 0.1) / 37, no antialias (dinov2 interpolate_pos_encoding, interpolate_offset=0.1).
#   dinov2_reg  DINOv2 with 4 registers (Darcet et al., "Vision Transformers Need Registers"): the same feature,
#               CLS AND the 4 registers dropped. Patch 14. Meta's hub builds these models with interpolate_offset=0
#               and interpolate_antialias=True (dinov2 hub/backbones.py), i.e. bicubic to the target size WITH
#               antialias: a different rule from the plain models, and exactly the one of timm's own resampling.
#   dinov3      DINOv3 (Simeoni et al. 2025): the same feature ('x_prenorm' of dinov3 models/vision_transformer.py),
#               CLS and the 4 storage tokens (registers) dropped. Patch 16. Rotary position embedding (RoPE) on a
#               [-1, 1] grid normalised per axis: no position table, nothing to resample at 224 x 448.
#   timm        'timm:<any timm ViT>': the last block's tokens before the final norm, prefix tokens dropped; the
#               positions are handled by the timm model itself (its own checkpoint filter resamples a table).
# Name -> (timm architecture, feature, family). DINOv3: timm's '_qkvb' variants, which keep the q and v biases of
# Meta's files (Meta builds every DINOv3 ViT but the 7B with qkv_bias=True, dinov3 hub/backbones.py).
TEACHERS = {
    'dinov2_vits14': ('vit_small_patch14_dinov2', 'x_pre_norm', 'dinov2'),
    'dinov2_vitb14': ('vit_base_patch14_dinov2', 'x_pre_norm', 'dinov2'),
    'dinov2_vitl14': ('vit_large_patch14_dinov2', 'x_pre_norm', 'dinov2'),  # the paper's / released teacher
    'dinov2_vitg14': ('vit_giant_patch14_dinov2', 'x_pre_norm', 'dinov2'),
    'dino_vits8': ('vit_small_patch8_224.dino', 'keys', 'dino'),  # keys of the last attention layer (Supp. B.2)
    'dinov2_vits14_reg': ('vit_small_patch14_reg4_dinov2', 'x_pre_norm', 'dinov2_reg'),
    'dinov2_vitb14_reg': ('vit_base_patch14_reg4_dinov2', 'x_pre_norm', 'dinov2_reg'),
    'dinov2_vitl14_reg': ('vit_large_patch14_reg4_dinov2', 'x_pre_norm', 'dinov2_reg'),
    'dinov2_vitg14_reg': ('vit_giant_patch14_reg4_dinov2', 'x_pre_norm', 'dinov2_reg'),
    'dinov3_vits16': ('vit_small_patch16_dinov3_qkvb', 'x_pre_norm', 'dinov3'),
    'dinov3_vits16plus': ('vit_small_plus_patch16_dinov3_qkvb', 'x_pre_norm', 'dinov3'),
    'dinov3_vitb16': ('vit_base_patch16_dinov3_qkvb', 'x_pre_norm', 'dinov3'),
    'dinov3_vitl16': ('vit_large_patch16_dinov3_qkvb', 'x_pre_norm', 'dinov3'),
    'dinov3_vith16plus': ('vit_huge_plus_patch16_dinov3_qkvb', 'x_pre_norm', 'dinov3'),
    'dinov3_vit7b16': ('vit_7b_patch16_dinov3', 'x_pre_norm', 'dinov3'),  # Meta: qkv_bias=False
}
TIMM_PREFIX = 'timm:'
TINY_TEACHER = dict(depth=2, embed_dim=96, num_heads=3)  # toy: same timm class, shrunk (random init)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # fallback only: the mean / std come from the timm pretrained config
IMAGENET_STD = (0.229, 0.224, 0.225)


def valid_teachers_text():
    return f'valid teachers: {", ".join(TEACHERS)}, or {TIMM_PREFIX}<any timm ViT name>'


class TeacherSpec(NamedTuple):
    name: str               # the --teacher entry
    arch: str               # timm architecture
    feature: str            # which tokens are the pixel features
    family: str             # weights format family (dinov2, dinov3, dino, timm)
    patch: Optional[int]    # patch size in pixels (None if not in the name)


def teacher_spec(name):
    """--teacher entry -> TeacherSpec."""
    if name in TEACHERS:
        arch, feature, family = TEACHERS[name]
    elif name.startswith(TIMM_PREFIX):
        import timm
        arch, feature, family = name[len(TIMM_PREFIX):], 'x_pre_norm', 'timm'
        if not timm.is_model(arch.split('.')[0]):
            raise data.UserError(f'{arch!r} is not a timm model', f'--teacher {name}',
                                 'list them with python -c "import timm; print(timm.list_models(\'vit_*\'))"')
    else:
        raise data.UserError(f'unknown teacher {name!r}', '--teacher', valid_teachers_text())
    patch = re.search(r'patch(\d+)', arch)
    return TeacherSpec(name=name, arch=arch, feature=feature, family=family,
                       patch=int(patch.group(1)) if patch else None)


class Teacher(nn.Module):
    """Frozen timm ViT returning dense patch features (B, C, h/p, w/p) for images in [0, 1].

    'x_pre_norm' (DINOv2, DINOv2-reg, DINOv3, timm:): tokens after the last block, before the final norm, with the
    vit.num_prefix_tokens prefix tokens (CLS, + registers / storage tokens) dropped.
    'keys' (DINO ViT-S/8): k = qkv(norm1(x))[C:2C] of the last block, i.e. the keys of the last attention layer,
    captured by a forward hook on the last block's `attn.qkv` Linear (heads concatenated, CLS dropped).
    Normalisation: (x - mean) / std with the mean / std of the timm pretrained config (ImageNet for the DINO family).
    """

    def __init__(self, name, vit, feature):
        super().__init__()
        self.name, self.vit, self.feature = name, vit, feature
        ph, pw = (int(v) for v in vit.patch_embed.patch_size)
        if ph != pw:
            raise data.UserError(f'teacher {name} has non-square patches {ph}x{pw}', '--teacher',
                                 'pick a ViT with square patches')
        self.patch = ph
        self.dim = int(vit.embed_dim)
        cfg = getattr(vit, 'pretrained_cfg', None) or {}
        mean, std = cfg.get('mean', IMAGENET_MEAN), cfg.get('std', IMAGENET_STD)
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
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
        # norm=False: before the final norm; timm drops the num_prefix_tokens (CLS + registers) tokens itself
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


def cached_timm_weights(arch):
    """Path of timm's pretrained file for `arch` in the local Hugging Face cache, or None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(arch)
        repo = getattr(cfg, 'hf_hub_id', None)
        for filename in ([cfg.hf_hub_filename] if getattr(cfg, 'hf_hub_filename', None) else []) + \
                ['model.safetensors', 'pytorch_model.bin']:
            found = try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    except Exception:  # no huggingface_hub, unknown tag, ...: simply not cached
        return None
    return None


def teacher_source(spec, weights, tiny, allow_download=True, allow_random=True):
    """Where the teacher's weights come from: ('file', path) | ('tiny', why) | ('cache', path) | ('download', None)
    | ('random', why). Refuses (data.UserError) a random full-size teacher unless allow_random."""
    if weights is not None:
        return 'file', Path(weights)
    if tiny:
        return 'tiny', 'tiny toy teacher'
    cached = cached_timm_weights(spec.arch)
    if cached is not None:
        return 'cache', cached
    if allow_download and _network_available():
        return 'download', None
    why = 'no --teacher-weights, no cached timm weights and no network for the timm download'
    if not allow_random:
        raise data.UserError(f'teacher {spec.name} has no weights ({why})', '--teacher-weights',
                             'give the weights file (Meta .pth or timm .safetensors), or pass --random-teacher to '
                             'distil a randomly initialised teacher on purpose')
    return 'random', why


def _random_teacher_banner(name, why):
    bar = '!' * 100
    print(f'{bar}\n!!! TEACHER {name} IS RANDOMLY INITIALISED ({why}).\n'
          f'!!! Distillation will run, but the student learns random image features, not DINO-family ones.\n'
          f'!!! Give --teacher-weights PATH (Meta .pth or timm .safetensors) for a real teacher.\n{bar}',
          flush=True)


def create_vit(spec, image_size, tiny=False, pretrained=False):
    """timm.create_model for a teacher spec at the input size (H, W); check the patch divides the size."""
    import timm
    kw = dict(img_size=tuple(image_size), num_classes=0, **(TINY_TEACHER if tiny else {}))
    if pretrained:  # timm's own file at its native size, then OUR refit (Meta's position rules) below
        kw = dict(num_classes=0)
    try:
        vit = timm.create_model(spec.arch, pretrained=pretrained, **kw)
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise data.UserError(f'timm cannot build {spec.arch} as a ViT teacher ({type(e).__name__}: '
                             f'{str(e)[:120]})', f'--teacher {spec.name}',
                             'pick a timm ViT (timm.list_models("vit_*")); a tiny one needs depth / embed_dim / '
                             'num_heads arguments, else use --teacher-arch full') from None
    if not all(hasattr(vit, a) for a in ('forward_intermediates', 'patch_embed', 'blocks', 'num_prefix_tokens')):
        raise data.UserError(f'timm {spec.arch} is not a ViT with patch tokens', f'--teacher {spec.name}',
                             'pick a timm ViT, e.g. timm:vit_base_patch16_clip_224.openai')
    patch = int(vit.patch_embed.patch_size[0])
    if image_size[0] % patch or image_size[1] % patch:
        raise data.UserError(f'--image-size {tuple(image_size)} is not divisible by the patch size {patch} of '
                             f'{spec.name}', '--image-size', f'use multiples of {patch}, e.g. 224,448')
    return vit


def build_teacher(name, image_size, weights=None, tiny=False, allow_download=True, verbose=True,
                  allow_random=True, source=None):
    """timm ViT for a teacher name, built at the teacher input size (H, W), frozen, eval."""
    spec = teacher_spec(name)
    if spec.patch and (image_size[0] % spec.patch or image_size[1] % spec.patch):
        raise data.UserError(f'--image-size {tuple(image_size)} is not divisible by the patch size {spec.patch} '
                             f'of {name}', '--image-size', f'use multiples of {spec.patch}, e.g. 224,448')
    kind, where = source or teacher_source(spec, weights, tiny, allow_download, allow_random)
    vit = create_vit(spec, image_size, tiny=kind == 'tiny')
    if kind in ('file', 'cache'):
        load_teacher_weights(vit, where, name, spec.family)
    elif kind == 'download':  # timm's copy of the weights at their native size, then our refit (as for a file)
        try:
            native = create_vit(spec, image_size, pretrained=True)
        except Exception as e:
            raise data.UserError(f'timm pretrained download of {spec.arch} failed ({type(e).__name__}: '
                                 f'{str(e)[:120]})', f'--teacher {name}', 'give --teacher-weights FILE') from None
        sd, extra, missing = fit_state_dict(native.state_dict(), vit, spec.family)
        load_state_dict_strict(vit, sd, extra, missing, f'timm pretrained {spec.arch}', name)
        round_dinov3_periods(vit, spec.family, extra)
    else:  # tiny / random
        round_dinov3_periods(vit, spec.family, {})
        if verbose:
            _random_teacher_banner(name, where)
    return Teacher(name, vit, spec.feature)


# ----------------------------------------------------------------------------------------------------------------
# Presets and budget (Supp. B.2; ScaLR configs/pretrain/WI_768_pretrain.yaml)

PRESETS = {
    # toy (ours, not a paper setting): 72 epochs of the 48 toy train scans at batch 2 = 1,728 updates, set by the
    # time of README line 1 (the most whole epochs that keep it 10 % under 4 minutes on 2 cores in the slower of two
    # fresh-clone runs), not by the val split; the effect on the toy linear probe and the time are in README ("What
    # line 1 gives")
    'toy': dict(width=wi.TOY_ARCH[0], depth=wi.TOY_ARCH[1], batch_size=2, epochs=72, warmup_epochs=1),
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
    return data.is_toy(args.data, args.root)


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


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: the command line (every default shown in --help is the one used)

def _add_data_and_teacher_flags(a):
    """--data ... --antialias: what is distilled from what."""
    a('--data', default='toy', choices=data.DATASET_NAMES, help='pretraining data (toy = embedded toy nuScenes)')
    a('--root', default=None, help='dataset root (toy: data/toy, generated if missing)')
    a('--version', default=None,
      help='nuScenes version (default: the first of v1.0-trainval, v1.0-mini, v1.0-test found under '
           '--root; toy: v1.0-mini)')
    a('--merged-sets', default=None,
      help='--data merged: comma-separated subset of nuscenes,semantic_kitti,pandaset64,pandasetgt (default: every '
           'dataset folder found under --root; Supp. B.2 multi-dataset: all four)')
    a('--split', default='train', help='split used for pretraining (the official code uses train splits only)')
    a('--teacher', default='dinov2_vitl14',
      help=f'2D teacher(s), comma-separated for multi-teacher, any mix (paper: dinov2_vitl14); '
           f'{valid_teachers_text()}. Feature: patch tokens before the last norm, CLS and registers dropped '
           '(dino_vits8: last-layer keys)')
    a('--teacher-weights', default=None,
      help='comma-separated local weights per teacher (Meta .pth or timm .safetensors), loaded strictly; default: '
           'timm\'s cached weights, else the timm download if online, else refused on real data (see '
           '--random-teacher); the toy world uses a random tiny teacher')
    a('--random-teacher', action='store_true',
      help='on real data, distil a randomly initialised teacher on purpose when it has no weights (a baseline)')
    a('--teacher-arch', default='auto', choices=['auto', 'full', 'tiny'],
      help='tiny = same timm class with depth 2, width 96 (auto: tiny on toy data without weights)')
    a('--image-size', type=data.image_size_type, default='224,448',
      help='teacher input H,W (ScaLR: 224,448; ScaLR+: 448,896); multiples of every patch size')
    a('--cache-teacher', default=None, action=argparse.BooleanOptionalAction,
      help='keep each image\'s teacher features in memory after its first forward and reuse them at later epochs, '
           'without reading the image again when the samples are prepared in the training process (--workers 0) '
           '(exact: the teacher is frozen and the images are never augmented). '
           'Default: on for the toy world '
           '(288 images x 96 x 16 x 32 floats = 57 MB; the teacher was 8 %% of a toy step), off on real data '
           '(ViT-L/14 at 224,448: 2 MB per image in fp32, 0.3 TB for nuScenes\' 28k scans x 6 cameras)')
    a('--antialias', default='off', choices=['on', 'off'],
      help='antialias of the bilinear image resize: off = the official resize under torchvision < 0.17 (0.12 ... '
           '0.16, whose tensor resize does not antialias), on = under torchvision >= 0.17')


def _add_model_schedule_loss_flags(a):
    """--head ... --cell: the student, the Supp. B.2 schedule, the loss and the exercises' knobs."""
    a('--head', default=None, choices=['linear', 'mlp'],
      help='3D head: linear Conv1d (released ScaLR; default with one teacher) or the Supp. B.2 MLP (default with '
           'several teachers)')
    a('--preset', default=None, choices=list(PRESETS),
      help=f'Supp. B.2 schedule: toy (default on the toy world: WI-{wi.TOY_ARCH[1]}-{wi.TOY_ARCH[0]}, batch 2, 60 '
           'epochs, warmup 1 epoch), mono '
           '(WI-48-256, batch 16, 19 epochs, warmup 2 epochs), multi (WI-48-256, batch 16, epochs per dataset, '
           'warmup 3500 it.), wi768 (default on real data = the released model: WI-48-768, batch 8, 49 epochs on '
           'nuScenes / 25 on all four, warmup 3500 it.); the flags below override it')
    a('--width', type=data.positive_int, default=None,
      help=f'WaffleIron width F (default: the preset\'s: toy {wi.TOY_ARCH[0]}, mono / multi 256, wi768 768)')
    a('--depth', type=data.positive_int, default=None,
      help=f'WaffleIron depth L (default: the preset\'s: toy {wi.TOY_ARCH[1]}, else 48 as the paper)')
    a('--epochs', type=data.positive_int, default=None,
      help='epochs (default: the preset\'s, Supp. B.2: toy 72, mono 19, multi 19 nuScenes / 28 '
           'SemanticKITTI / 136 PandaSet / 10 all four, wi768 49 nuScenes / 25 all four; other data: as many scan '
           'passes as the nuScenes setting)')
    a('--batch-size', type=data.positive_int, default=None,
      help='GLOBAL batch size, split over DDP processes (default: the preset\'s: toy 2, mono / multi 16, '
           'wi768 8)')
    a('--lr', type=data.positive_float, default=0.002, help='peak learning rate (Supp. B.2: 0.002)')
    a('--min-lr', type=data.nonneg_float, default=1e-5, help='final cosine learning rate (Supp. B.2: 1e-5)')
    a('--weight-decay', type=data.nonneg_float, default=3e-4,
      help='AdamW weight decay (Supp. B.2: 3e-4; ScaLR configs/pretrain/WI_768_pretrain.yaml uses 0.03, see '
           'docs/official.md §1)')
    a('--warmup-iters', type=data.nonneg_int, default=None,
      help='linear warmup iterations (default: the preset\'s: 3500 for multi / wi768, Supp. B.2; else from '
           '--warmup-epochs)')
    a('--warmup-epochs', type=data.nonneg_float, default=None,
      help='linear warmup in epochs, used when --warmup-iters is not given (default: the preset\'s: toy 1, '
           'mono 2, Supp. B.2)')
    a('--drop-path', type=data.nonneg_float, default=0.0,
      help='drop path during distillation (official: 0; ScaLR+ 0.2)')
    a('--max-points', type=data.nonneg_int, default=20000,
      help='LimitNumPoints after the visibility filter (official: 20000; 0 = no limit)')
    a('--loss', default='eq1', choices=['eq1', 'infonce'],
      help='eq1 = Eq. (1), the paper\'s l2 distance of normalised features; infonce = point-to-pixel contrastive '
           'loss of SLidR / PPKT (exercise a, not ScaLR)')
    a('--loss-mean', default='scan', choices=['scan', 'points'],
      help='scan = mean over the scans of the global batch of each scan\'s mean over its paired points (the '
           'official per-GPU mean + DDP average of the released 8 GPUs x 1 scan, at any world size); points = one '
           'mean over all paired points of the global batch (Eq. (1) as written; scans with more points weigh more)')
    a('--temperature', type=data.positive_float, default=0.07,
      help='InfoNCE temperature (exercise a; PPKT / SLidR: 0.07)')
    a('--infonce-pairs', type=data.positive_int, default=4096,
      help='InfoNCE: paired points sampled per batch and rank, the negatives of each other (exercise a; SLidR: 4096)')
    a('--cameras', default='one', choices=['one', 'all'],
      help='one = one random camera per scan and iteration (ScaLR datasets/im_pc_dataset.py); all = every image '
           'of the scan, as Supp. E suggests ("from 1 to 6"; exercise b)')
    a('--knn', type=data.positive_int, default=None,
      help='neighbours k of the point embedding (default 16, as ScaLR datasets/pc_dataset.py: 17 nearest, the point '
           'itself dropped; exercise c); stored in model.pth')
    a('--cell', type=data.positive_float, default=None,
      help='grid cell size in metres over the same FOV (default: 0.5 m as the official configs; toy world 1 m; '
           'exercise d); stored in model.pth, probe.py / finetune.py reuse it')


def _add_run_flags(a):
    """--amp ... --no-progress: how the run is executed and where it writes."""
    a('--amp', default='none', choices=['none', 'fp16', 'bf16'],
      help='autocast precision (official: fp16 + GradScaler; ScaLR+: bf16)')
    a('--workers', type=data.nonneg_int, default=None,
      help='DataLoader worker processes per rank (default: 2; 0 on the toy, whose samples take ~15 ms each)')
    a('--threads', type=data.nonneg_int, default=None,
      help='torch CPU threads (default: torch\'s own; on the toy on CPU, the cores idle at the start (waffleiron.'
           'idle_cores): 2 threads are 1.37x faster on an idle 2-core machine, but 2 OpenMP threads beside a busy '
           'process were measured up to 20x slower)')
    a('--seed', type=data.nonneg_int, default=0, help='seed of model init, scan order and per-scan randomness')
    a('--max-iters', type=data.nonneg_int, default=0,
      help='stop after this many iterations (smoke runs; 0 = full budget)')
    a('--save-every', type=data.nonneg_int, default=0,
      help='also write ckpt_last.pth every N iterations (0: each epoch)')
    a('--log-every', type=data.positive_int, default=1, help='log.csv row every N iterations')
    a('--out', default='runs/distill', help='output folder: model.pth, ckpt_last.pth, log.csv, loss.png')
    a('--resume', action='store_true', help='continue bit-exact from OUT/ckpt_last.pth')
    a('--overwrite', action='store_true', help='start over in an --out that already holds a run (deletes its '
      'model.pth, ckpt_last.pth, log.csv)')
    a('--device', default='auto', help='auto (cuda if available, else cpu), cpu, cuda or cuda:N (single process; '
      'torchrun uses cuda:LOCAL_RANK)')
    a('--compile', action='store_true', help='torch.compile the student (GPU speed-up; not in the official code)')
    a('--preprocess-on', default='cpu', choices=['cpu', 'device'],
      help='cpu (official, default): cells and kNN-16 in the DataLoader workers; device: computed in torch on the '
           'training device for the whole batch (same cells, same neighbour sets up to ties; for a GPU, whose '
           'loader would otherwise need many workers: on a CPU the brute-force kNN is far slower than cKDTree)')
    a('--no-progress', action='store_true', help='no tqdm bar')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    a = p.add_argument
    _add_data_and_teacher_flags(a)
    _add_model_schedule_loss_flags(a)
    _add_run_flags(a)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: building blocks of the run

def plan_teachers(args):
    """Check --teacher / --teacher-weights / --teacher-arch / --random-teacher BEFORE any data is read.
    Returns [(name, weights, tiny, source)], source as teacher_source (a real-data teacher without weights is
    refused here unless --random-teacher)."""
    names = [n.strip() for n in args.teacher.split(',') if n.strip()]
    if not names:
        raise data.UserError('no teacher given', '--teacher', valid_teachers_text())
    # an empty entry (e.g. "a.pth,") = no file for that teacher
    weights = [w.strip() or None for w in args.teacher_weights.split(',')] if args.teacher_weights else \
        [None] * len(names)
    if len(weights) != len(names):
        raise data.UserError(f'{len(names)} teachers ({", ".join(names)}) but {len(weights)} weights files',
                             '--teacher-weights', 'give one file per teacher, comma-separated, in the same order')
    if args.random_teacher and all(w is not None for w in weights):
        raise data.UserError('--random-teacher, but every teacher has --teacher-weights', '--random-teacher',
                             'pass one of them')
    toy = is_toy(args)
    plan = []
    for name, w in zip(names, weights):
        spec = teacher_spec(name)  # unknown names refused here
        tiny = args.teacher_arch == 'tiny' or (args.teacher_arch == 'auto' and toy and w is None)
        if tiny and w is not None:
            raise data.UserError('--teacher-arch tiny cannot load --teacher-weights (they are full-size)',
                                 '--teacher-arch', 'drop --teacher-arch tiny, or the weights')
        if w is not None and not Path(w).is_file():
            raise data.UserError(f'no such file: {w}', '--teacher-weights',
                                 f'give a Meta .pth or a timm .safetensors for {name}')
        # the toy world accepts a random full-size teacher (loudly); real data only with --random-teacher
        source = teacher_source(spec, w, tiny, allow_download=not args.random_teacher,
                                allow_random=toy or args.random_teacher)
        plan.append((name, w, tiny, source))
    return plan


def build_teachers(args, device, plan):
    """The frozen teachers of the plan, on `device` (random ones seeded by the caller)."""
    return [build_teacher(name, args.image_size, w, tiny=tiny, verbose=wi.is_main(), source=source).to(device)
            for name, w, tiny, source in plan]


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
                loss_mean=args.loss_mean, antialias=args.antialias,
                preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                weight_decay=args.weight_decay, warmup_iters=args.warmup_iters, total_iters=total,
                iters_per_epoch=per_epoch,
                drop_path=args.drop_path, amp=args.amp, seed=args.seed)


def to_device(batch, device):
    keys = ('feat', 'cells', 'neighbors', 'occupied', 'images', 'pairs')
    return {**batch, **{k: batch[k].to(device, non_blocking=True) for k in keys}}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: building the run, checkpoints, the end-of-run report

def load_data(args):
    """The pretraining dataset; a dataset error becomes one line naming --data / --root."""
    try:
        return data.get_dataset(args.data, root=args.root, split=args.split, version=args.version,
                                sets=args.merged_sets.split(',') if args.data == 'merged' and args.merged_sets
                                else None)
    except data.UserError:
        raise
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise data.UserError(f'cannot read the {args.data} data ({e})', f'--data {args.data} --root {args.root}',
                             'check --root / --version / --split') from None


def setup(args):
    """Flags, device, --out, teachers checked (in that order, before any data is read), then the data, the
    budget, teachers, student, optimizer, loader and log built; --resume restores them. -> (Run, Progress)"""
    if args.workers is None:
        args.workers = 0 if is_toy(args) else 2
    if args.cache_teacher is None:
        args.cache_teacher = is_toy(args)
    if args.threads is None and is_toy(args) and not torch.cuda.is_available():
        args.threads = wi.idle_cores()  # 2 on an idle 2-core machine, 1 beside another busy process
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = wi.setup_device(args.device)  # --device checked before any data is read
    out = Path(args.out)
    plan = plan_teachers(args)  # unknown teacher, missing file, no weights on real data: refused now
    if wi.is_main():  # writable, not a previous run unless --resume / --overwrite (before any data is read)
        wi.prepare_run_dir(out, resume=args.resume, overwrite=args.overwrite)
    ds = load_data(args)
    # merged without --root = toy nuScenes + toy KITTI (pillar 3 in miniature): the toy grid and budget
    grid_key = 'toy' if is_toy(args) else args.data
    cfg = data.with_cell(data.grid_config(grid_key, 'pretrain'), cell=args.cell, k=args.knn)  # exercises c, d
    cfg.max_points = args.max_points or None
    wi.print0(f'grid: FOV {tuple(cfg.fov_min)}..{tuple(cfg.fov_max)} m, cell {data.cell_size(cfg):g} m -> planes '
              f'{[list(g) for g in cfg.grids]}; kNN k = {cfg.k}; loss {args.loss} (mean over {args.loss_mean}); '
              f'cameras {args.cameras}')
    names = [d.name for d in ds.datasets] if hasattr(ds, 'datasets') else [ds.name]
    try:
        per_epoch, total, stop = resolve_budget(args, names, len(ds), world)
        teacher_cache = {} if args.cache_teacher else None  # (scan id, camera) -> features, filled by train_step
        dataset = DistillDataset(ds, cfg, args.image_size, seed=args.seed, cameras=args.cameras,
                                 antialias=args.antialias == 'on', preprocess_on=args.preprocess_on,
                                 teacher_cache=teacher_cache)
        loader = data.make_loader(dataset, args.batch_size, train=True, collate_fn=distill_collate, seed=args.seed,
                                  workers=args.workers, pin_memory=device.type == 'cuda')
    except ValueError as e:
        raise data.UserError(str(e), '--batch-size', 'lower --batch-size or use more scans') from None
    wi.seed_everything(args.seed)  # a random-init teacher must be the same on every rank and after --resume
    teachers = build_teachers(args, device, plan)
    dims = [t.dim for t in teachers]
    head = args.head or ('mlp' if len(dims) > 1 else 'linear')
    wi.seed_everything(args.seed)  # the student init does not depend on how the teachers were built
    model = build_student(args, cfg, dims, head).to(device)
    opt = wi.make_adamw(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)  # all params decayed
    sched = wi.make_scheduler(opt, args.warmup_iters, total, args.min_lr, args.lr)  # Supp. B.2
    scaler = wi.make_grad_scaler(args.amp, device)
    config = dict(run_config(args, cfg, dims, head, total, per_epoch), model=model.config)
    p = resume(out, config, model, opt, sched, scaler) if args.resume else Progress()
    if args.compile:
        model = torch.compile(model)
    if wi.is_main():
        (out / 'config.json').write_text(json.dumps(config, indent=1))
    log = wi.CSVLog(out / 'log.csv', LOG_FIELDS, resume_iteration=p.it if args.resume else None)
    run = Run(args=args, out=out, device=device, world=world, cfg=cfg, teachers=teachers, dims=dims,
              model=wi.wrap_ddp(model, device).train(), opt=opt, sched=sched, scaler=scaler, loader=loader,
              teacher_cache=teacher_cache, log=log, config=config, per_epoch=per_epoch,
              stop=stop)
    return run, p


def resume(out, config, model, opt, sched, scaler):
    """Model / optimizer / schedule / RNG states and the loop's Progress from OUT/ckpt_last.pth (checked first)."""
    path = out / 'ckpt_last.pth'
    # runs from before --loss-mean / --antialias existed used one mean over the points and no antialias;
    # 'model' (the network's own config) repeats width / depth / head ...: compared through those keys instead
    ckpt = wi.read_resume_checkpoint(path, config, 'distill', keys=[k for k in config if k != 'model'],
                                     defaults={'loss_mean': 'points', 'antialias': 'off'})
    epoch, it = wi.restore_training_state(ckpt, model, opt, sched, scaler)
    p = Progress(epoch=epoch, it=it, batches_done=int(ckpt['batches_done']), skips=dict(ckpt['skips']))
    wi.print0(f'resumed from {path} at iteration {p.it} (epoch {p.epoch}, batch {p.batches_done})')
    return p


def save_state(run, p):
    """ckpt_last.pth (resume) and model.pth (official names + config), both atomic. Every rank calls this
    (training_state gathers the RNG states of all ranks), rank 0 writes."""
    state = wi.training_state(run.model, run.opt, run.sched, run.scaler, epoch=p.epoch, iteration=p.it,
                              config=run.config, extra=dict(batches_done=p.batches_done, skips=dict(p.skips)))
    if wi.is_main():
        wi.save_checkpoint(run.out / 'ckpt_last.pth', **state)
        wi.save_checkpoint(run.out / 'model.pth', model_point=state['model_point'], config=run.config,
                           iteration=p.it)


def report(run, p):
    """Final summary: skipped scans (summed over ranks), throughput, teacher share; loss.png. Runs after the final
    model is saved: a failing plot only warns."""
    reasons = ('missing image', 'unreadable image', 'no point in image', 'no visible point in the FOV')
    counts = wi.all_reduce_sum(torch.tensor([float(p.skips.get(k, 0)) for k in reasons]))
    if not wi.is_main():
        return
    out = run.out
    try:
        wi.plot_log(out / 'log.csv', out / 'loss.png', ['loss', 'lr'], title=f'ScaLR distillation ({run.args.data})')
    except Exception as e:  # noqa: BLE001 - model.pth is already written; the plot is a convenience
        data.warn(f'could not draw {out / "loss.png"} ({type(e).__name__}: {e}); model.pth and log.csv are saved')
    skipped = ', '.join(f'{int(c)} {k}' for k, c in zip(reasons, counts.tolist()))
    rate, share = p.scans / max(p.seconds, 1e-9), p.teacher_seconds / max(p.seconds, 1e-9)
    print(f'done: {out / "model.pth"} | skipped scans: {skipped} | {rate:.2f} scans/s on {run.world} x '
          f'{run.device.type} (teacher forward {100 * share:.0f}% of the time) | {out / "log.csv"}, '
          f'{out / "loss.png"}', flush=True)
    print(step_time_table(p), flush=True)


def step_time_table(p):
    """Where an update's time went in this process, as a table: waiting for the sample, the teacher, the rest."""
    n = max(p.updates, 1)
    parts = [('sample (loader wait)', p.data_seconds), ('teacher forward', p.teacher_seconds),
             ('student forward + backward + AdamW', p.seconds - p.data_seconds - p.teacher_seconds)]
    head = f'{f"time per update ({p.updates} updates)":<36}{"ms":>9}{"share":>9}'
    rows = [f'{name:<36}{1000 * sec / n:>9.1f}{100 * sec / max(p.seconds, 1e-9):>7.0f} %' for name, sec in parts]
    return '\n'.join([head, *rows, f'{"total":<36}{1000 * p.seconds / n:>9.1f}{100:>7} %'])


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: teacher weight files (Meta's .pth and timm .safetensors, mapped to timm's names, loaded strictly)

def resample_pos_embed(pos, grid_hw, num_prefix):
    """(1, P + S*S, C) -> (1, P + h*w, C): bicubic with DINO's +0.1 offset trick (plain DINO / DINOv2 models)."""
    n = pos.shape[1] - num_prefix
    side = int(round(math.sqrt(n)))
    h, w = grid_hw
    if (side, side) == (h, w) or (n == h * w and side * side != n):  # already the model's grid
        return pos
    if side * side != n:
        raise data.UserError(f'pos_embed with {n} patch positions is not a square grid, cannot resample it to '
                             f'{h}x{w}', '--teacher-weights', 'is this the file of another model?')
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()  # (1, C, S, S)
    # dinov2 interpolate_pos_encoding: scale_factor = ((h + 0.1) / S, (w + 0.1) / S), bicubic, no antialias
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode='bicubic',
                         align_corners=False)  # (1, C, h, w)
    assert grid.shape[-2:] == (h, w), (grid.shape, h, w)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)], dim=1)


def clean_state_dict(state_dict):
    """Unwrap training-checkpoint wrappers ('teacher', 'model', ...), strip 'module.' / 'backbone.' and flatten
    Meta's block-chunked files (blocks.<chunk>.<N>.* -> blocks.<N>.*)."""
    for wrapper in ('teacher', 'model', 'state_dict', 'model_state'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix('module.').removeprefix('backbone.')
        out[re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k)] = v
    return out


def meta_to_timm(state_dict, vit):
    """Rename a Meta DINO/DINOv2 state dict to timm's VisionTransformer names and fit pos_embed to `vit`.

    Meta and timm share most names (patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,
    mlp.fc2,ls2.gamma}, norm). Differences: 'mask_token' (iBOT masking, unused) is dropped; block-chunked files
    are flattened; ViT-g's SwiGLU 'mlp.w12'/'mlp.w3' become timm's packed 'mlp.fc1'/'mlp.fc2'.
    timm-format files go through unchanged (apart from pos_embed)."""
    out = {}
    for k, v in clean_state_dict(state_dict).items():
        if k == 'mask_token' or k.startswith('head.') or k.startswith('fc_norm.'):
            continue
        out[k.replace('.mlp.w12.', '.mlp.fc1.').replace('.mlp.w3.', '.mlp.fc2.')] = v
    if 'pos_embed' in out:
        out['pos_embed'] = resample_pos_embed(out['pos_embed'], tuple(vit.patch_embed.grid_size),
                                              vit.num_prefix_tokens)
    return out


def dinov2_reg_to_timm(state_dict, vit):
    """Meta DINOv2-with-registers (or timm) state dict -> timm names, with timm's vision_transformer
    checkpoint_filter_fn: register_tokens -> reg_token; Meta adds pos_embed[0] to the CLS token and none to the
    registers (dinov2 prepare_tokens_with_masks), so timm folds pos_embed[0] into cls_token and keeps a patch-only
    table; w12/w3 -> fc1/fc2; then the table is resampled bicubic to the grid with antialias = Meta's rule for the
    register models (interpolate_offset=0, interpolate_antialias=True)."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    sd = {k: v for k, v in clean_state_dict(state_dict).items() if not k.startswith(('head.', 'fc_norm.'))}
    if 'register_tokens' in sd:
        sd.setdefault('mask_token', torch.zeros(1, sd['cls_token'].shape[-1]))  # timm keys its conversion on it
    return checkpoint_filter_fn(sd, vit)


def dinov3_to_timm(state_dict, vit):
    """Meta DINOv3 (or timm) state dict -> (timm Eva state dict, extra buffers {name: tensor}, missing Meta keys).

    timm's eva checkpoint_filter_fn renames (storage_tokens -> reg_token, ls1/ls2.gamma -> gamma_1/gamma_2,
    SwiGLU w1/w2/w3 -> fc1_g/fc1_x/fc2, qkv.bias -> q_bias + v_bias) but drops two buffers that Meta's model USES:
      * rope_embed.periods, the RoPE periods base^(2i / (D_head / 2)): Meta's files store them in bf16 and Meta's
        model computes its angles from these rounded values (dinov3 layers/rope_position_encoding.py), while timm
        recomputes them in fp32. We copy the file's values into timm's rope.periods.
      * blocks.N.attn.qkv.bias_mask: Meta's LinearKMaskedBias uses bias * bias_mask (dinov3 layers/attention.py;
        1 for q and v, 0 for k after init_weights, NaN before). We apply the file's mask, put the masked k bias
        in timm's k_bias buffer (timm assumes it is 0) and refuse a NaN mask.
    The pretraining-only entries (mask_token, local_cls_norm of the 7B / SAT ViT-L) are dropped as timm does."""
    from timm.models.eva import checkpoint_filter_fn
    sd = clean_state_dict(state_dict)
    extra, missing = {}, []
    if 'storage_tokens' in sd:  # Meta format
        if 'rope_embed.periods' in sd:
            extra['rope.periods'] = sd['rope_embed.periods'].float()  # bf16 -> fp32 as Meta's load_state_dict does
        else:
            missing.append('rope_embed.periods')
        has_bias = getattr(vit.blocks[0].attn, 'q_bias', None) is not None
        for key in [k for k in sd if re.fullmatch(r'blocks\.\d+\.attn\.qkv\.bias', k)]:
            mask = sd.get(key + '_mask')
            if mask is None:
                missing.append(key + '_mask')
                continue
            if not torch.isfinite(mask).all():
                raise data.UserError(f'{key}_mask holds NaN (saved from a model before init_weights)',
                                     '--teacher-weights', 'use a released DINOv3 checkpoint')
            bias = sd[key] * mask.to(sd[key].dtype)  # Meta LinearKMaskedBias.forward
            if not has_bias and bias.abs().max() > 0:
                raise data.UserError(f'the file has non-zero qkv biases but timm {type(vit).__name__} has none',
                                     '--teacher-weights', 'use the timm "_qkvb" variant of this model')
            sd[key] = bias
            extra[key.replace('qkv.bias', 'k_bias')] = bias.chunk(3)[1]
            if not has_bias:
                del sd[key]
    return checkpoint_filter_fn(sd, vit), extra, missing


def timm_family_to_timm(state_dict, vit):
    """timm: teachers: the checkpoint filter of the model's own timm module (as timm's pretrained loading does)."""
    import importlib
    sd = clean_state_dict(state_dict)
    module = importlib.import_module(type(vit).__module__)
    filt = getattr(module, 'checkpoint_filter_fn', None)
    return filt(sd, vit) if filt is not None else sd


def fit_state_dict(state_dict, vit, family):
    """Any supported file's state dict -> (timm state dict, extra buffers, missing Meta keys) for `vit`."""
    meta_dinov3 = 'storage_tokens' in clean_state_dict(state_dict) and hasattr(getattr(vit, 'rope', None), 'periods')
    if family == 'dinov3' or (family == 'timm' and meta_dinov3):  # a Meta DINOv3 file for a timm: DINOv3 name
        return dinov3_to_timm(state_dict, vit)
    if family == 'dinov2_reg':
        return dinov2_reg_to_timm(state_dict, vit), {}, []
    if family == 'timm':
        return timm_family_to_timm(state_dict, vit), {}, []
    return meta_to_timm(state_dict, vit), {}, []  # dino, dinov2


def read_weights_file(path, name):
    """torch.load (weights_only: no code runs) a .pth, or safetensors a .safetensors; one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise data.UserError(f'no such file: {path}', '--teacher-weights',
                             f'give a Meta .pth (e.g. dinov2_vitl14_pretrain.pth) or a timm .safetensors for {name}')
    try:
        if path.suffix == '.safetensors':
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise data.UserError(f'{path} is a .safetensors file but the safetensors package is not installed',
                                     '--teacher-weights', 'pip install safetensors (or give the Meta .pth)') from None
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location='cpu', weights_only=True)
    except data.UserError:
        raise
    except Exception as e:  # truncated zip, pickle with code, not a weights file at all, ...
        first = (str(e).splitlines() or [''])[0][:160]
        raise data.UserError(f'cannot read {path} ({type(e).__name__}: {first})', '--teacher-weights',
                             'is it a complete .pth / .safetensors weights file? re-download it') from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in clean_state_dict(sd).values()):
        raise data.UserError(f'{path} is not a state dict of tensors', '--teacher-weights',
                             'give the weights file of the teacher itself')
    return sd


def load_state_dict_strict(vit, sd, extra, missing_meta, where, name):
    """load_state_dict(strict=True) plus the extra buffers, after naming every missing / unexpected / misshaped
    key in ONE line (data.UserError)."""
    buffers = dict(vit.named_buffers())  # extra: buffers outside the state dict (e.g. DINOv3 RoPE periods)
    problems = wi.state_dict_mismatch({**vit.state_dict(), **{k: buffers[k] for k in extra}}, {**sd, **extra},
                                      limit=6, missing_extra=missing_meta)
    if problems:
        raise data.UserError(
            f'{where} does not match teacher {name} (timm {type(vit).__name__}, embed_dim {vit.embed_dim}, depth '
            f'{len(vit.blocks)}): {problems}', '--teacher-weights',
            'is this the file of another model? ' + valid_teachers_text())
    vit.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for k, v in extra.items():
            buffers[k].copy_(v)


def _family_of(name, vit):
    if name in TEACHERS:
        return TEACHERS[name][2]
    if name.startswith(TIMM_PREFIX):
        return 'timm'
    if hasattr(getattr(vit, 'rope', None), 'periods'):
        return 'dinov3'
    return 'dinov2_reg' if getattr(vit, 'reg_token', None) is not None else 'dinov2'


def load_teacher_weights(vit, path, name, family=None):
    """Load a Meta .pth or a timm .safetensors into `vit`, strictly (data.UserError naming the mismatching keys)."""
    family = family or _family_of(name, vit)
    sd, extra, missing = fit_state_dict(read_weights_file(path, name), vit, family)
    load_state_dict_strict(vit, sd, extra, missing, f'--teacher-weights {path}', name)
    round_dinov3_periods(vit, family, extra)


def round_dinov3_periods(vit, family, extra):
    """A DINOv3 teacher whose weights carried no RoPE periods (timm files, random init): use timm's fp32 periods
    rounded to bf16, the values every Meta DINOv3 release stores and Meta's model computes with."""
    if family == 'dinov3' and 'rope.periods' not in extra:
        with torch.no_grad():
            vit.rope.periods.copy_(vit.rope.periods.bfloat16().float())


if __name__ == '__main__':
    data.run_main(main)
