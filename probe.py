"""probe.py — linear probing of a frozen WaffleIron (ScaLR, CVPR 2024, Supp. B.3) and the feature pictures of
Appendix C (Fig. 2: PCA colours; Fig. 3: similarity to a class prototype).

Linear probing is the paper's main measure of feature quality. The pretrained backbone is frozen (eval mode, no
gradient, BatchNorm running statistics untouched); its distillation head is replaced by the downstream head
BatchNorm1d(F) + zero-initialised Conv1d(F -> K) (WaffleIron waffleiron/segmenter.py), trained with CE + Lovász
and the official desynchronised augmentations (ScaLR utils/transforms.py); the mIoU is computed on every original
point of the val split through 1-NN upsampling (docs/official.md §2).

    python distill.py && python probe.py                 # toy world: distil, then probe (minutes on 2 CPU cores)
    python probe.py --random-init                        # the no-pretraining baseline (same architecture)
    python probe.py --figures runs/figs --figures-only   # Supp. Fig. 2 and 3 for the newest distilled checkpoint
    python probe.py --data nuscenes --root /data/nuscenes --ckpt runs/distill/model.pth --amp fp16 --figures figs
    torchrun --nproc_per_node 4 probe.py --data semantic_kitti --root /data/semantic_kitti --ckpt model.pth

Outputs in --out: results.json, per_class_iou.png, log.csv, loss.png, model.pth ({'net', 'config'}: the whole
network with its probe head, official tensor names, readable by waffleiron.load_checkpoint), ckpt_last.pth
(everything --resume needs). The last line printed is `mIoU: X` (%, official nanmean over classes).

On the toy world, `python distill.py && python probe.py --compare-random` probes the distilled WI-6-64 and a
random-init one of the same shape and prints both mIoU; README ("What line 1 gives") has the measured figures and
times. The toy teacher is a RANDOMLY initialised tiny ViT (offline): the student inherits image appearance, not
DINOv2's semantics; real teacher weights (distill.py --teacher-weights) are what the paper measures.
"""
import argparse
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import waffleiron as wi

# Fig. 3 of the paper shows these four classes; the names they go by in each label space.
FIG3_CLASSES = {"car": ("car",), "pedestrian": ("pedestrian", "person"),
                "road": ("road", "driveable_surface"), "sidewalk": ("sidewalk",)}
PROBE_DATASETS = [n for n in data.DATASET_NAMES if n != "merged"]

# Toy recipe of the head (ours; Supp. B.3's recipe stays the default on real data), chosen WITHOUT the val split.
# The head is a linear map (BN + Conv1d, ~1k weights) on features that never change (cached), so one step on the
# whole train split (48 scans x TOY_POINTS random points) gives a nearly noiseless gradient and a few large steps
# replace the former 1,800 noisy steps of batch 8 (300 epochs x 6 steps at lr 1e-3, 2,048 points per scan). Adam
# moves each weight by about lr per step, so the distance a weight can travel from its zero init is ~ the summed
# learning rate (0.5 x steps x lr under warmup-cosine): the candidates were few steps with larger rates.
# Chosen on a held-out part of the TRAIN split (`--holdout 8`: the head trains on 40 train scans and is scored on
# the other 8), for both the random-init WI-6-64 and the distilled toy model, rule fixed beforehand: the fewest
# steps whose held-out mIoU is within 1 point of the best candidate's for both backbones. Held-out mIoU (random
# init / distilled): 60 steps at 0.06: 23.5 / 29.6; 120 at 0.015: 23.2 / -; 120 at 0.03: 27.3 / -; 120 at 0.06:
# 29.2 / 36.2; 240 at 0.0075: 25.2 / -; 2,048 instead of 512 points per scan (60 at 0.03): 21.8 vs
# 21.5, so 512 points per scan.
TOY_STEPS = 120
TOY_LR = 0.06
TOY_POINTS = 512
CKPT_EVERY_S = 30  # ckpt_last.pth is rewritten at most this often during the head training (see ResumeState)


# ----------------------------------------------------------------------------------------------------------------
# Command line: every default cites where it comes from.
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--data", default="toy", choices=PROBE_DATASETS,
                   help="downstream dataset (default: the toy world, as every stage)")
    p.add_argument("--root", default=None, help="dataset root (default: data.get_dataset's, data/toy for the toy)")
    p.add_argument("--version", default=None,
                   help="nuScenes version (default: the first of v1.0-trainval, v1.0-mini, v1.0-test found under "
                        "--root; toy: v1.0-mini)")
    p.add_argument("--ckpt", default=None,
                   help="distilled checkpoint (default: newest runs/distill*/model.pth written by distill.py)")
    p.add_argument("--compare-random", action="store_true",
                   help="probe the checkpoint, then --random-init with the same architecture, and print both mIoU "
                        "side by side (README line 1; single process; outputs in --out and --out + '_random')")
    p.add_argument("--random-init", action="store_true",
                   help="no-pretraining baseline: same architecture as --ckpt (or --width/--depth), fresh weights")
    p.add_argument("--width", type=data.positive_int, default=None,
                   help="backbone width F; checked against the checkpoint; for --random-init without a checkpoint "
                        f"(toy world: distill.py's toy preset, {wi.TOY_ARCH[0]}; real data: the paper's WI-768, 768)")
    p.add_argument("--depth", type=data.positive_int, default=None,
                   help=f"backbone depth L, same rules as --width (toy: {wi.TOY_ARCH[1]}; paper WI-48: 48)")
    p.add_argument("--out", default=None, help="output folder (default runs/probe_<data>[_random])")
    p.add_argument("--batch-size", type=data.positive_int, default=8,
                   help="global batch size (Supp. B.3: 8; unused with --full-batch)")
    p.add_argument("--full-batch", default=None, action=argparse.BooleanOptionalAction,
                   help="one head step per epoch on the WHOLE cached train split (needs cached features; ours, "
                        "default on the toy world, see resolve_defaults; off elsewhere = Supp. B.3's batch 8)")
    p.add_argument("--lr", type=data.positive_float, default=None,
                   help=f"peak learning rate (Supp. B.3: 0.001; toy full batch: {TOY_LR}, see resolve_defaults)")
    p.add_argument("--min-lr", type=data.nonneg_float, default=1e-5,
                   help="final learning rate of the cosine (Supp. B.3: 1e-5; ScaLR+ uses 0)")
    p.add_argument("--weight-decay", type=data.nonneg_float, default=3e-3,
                   help="AdamW weight decay, also on the head BN (Supp. B.3 and ScaLR configs/*/WI_768_linprob.yaml: "
                        "3e-3)")
    p.add_argument("--warmup-epochs", type=data.nonneg_float, default=2,
                   help="linear warmup from LR 0 (Supp. B.3: 2 epochs)")
    p.add_argument("--epochs", type=data.positive_int, default=None,
                   help=f"training epochs (default, Supp. B.3: 20 nuScenes/SemanticKITTI, 50 PandaSet; toy: "
                        f"{TOY_STEPS} full-batch steps, or 300 epochs with --no-full-batch; see resolve_defaults)")
    p.add_argument("--max-iters", type=data.positive_int, default=None,
                   help="stop after this many iterations (smoke tests; default: no limit)")
    p.add_argument("--head-points", type=data.positive_int, default=None,
                   help="train the head on this many random points per scan and step (ours, for CPU speed; "
                        f"default: all kept points as Supp. B.3; toy: {TOY_POINTS} with --full-batch, else 2048)")
    p.add_argument("--aug", default=None, action=argparse.BooleanOptionalAction,
                   help="official downstream augmentations, ScaLR utils/transforms.py (default on; off on the toy, "
                        "where "
                        "features are cached instead)")
    p.add_argument("--cache-features", default="auto", choices=["auto", "none", "memory", "disk"],
                   help="store the frozen trunk's features of every scan once (needs --no-aug) so later epochs only "
                        "train the head; auto = memory on the toy, none elsewhere. Size ~ points x F x 2 bytes: fine "
                        "for the toy or a small split, ~1 TB for all of nuScenes with WI-768 (ours, not official)")
    p.add_argument("--cache-dtype", default="float16", choices=["float16", "float32"],
                   help="dtype of cached features (float16 halves memory; ours, not in the paper)")
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"],
                   help="autocast for backbone and head (official README uses --fp16; none = fp32)")
    p.add_argument("--workers", type=data.nonneg_int, default=None,
                   help="DataLoader workers (default 0 on the toy, else 4)")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu; under torchrun "
                        "each process takes its local GPU)")
    p.add_argument("--threads", type=data.positive_int, default=None,
                   help="torch CPU threads (default: torch's own; on the toy on CPU, the cores idle at the start "
                        "(waffleiron.idle_cores): 2 threads are 1.3x faster on an idle 2-core machine, while the "
                        "small head steps run 5-8x slower with 2 threads beside a busy process, measured)")
    p.add_argument("--seed", type=int, default=0, help="seed for shuffling and augmentations (official: none)")
    p.add_argument("--eval-every", type=data.nonneg_int, default=0,
                   help="validate every N epochs as well (official validates every epoch; 0 = only at the end)")
    p.add_argument("--unseen-as-zero", action="store_true", help=wi.UNSEEN_AS_ZERO_HELP)
    p.add_argument("--knn", type=data.positive_int, default=None,
                   help="neighbours k of the point embedding (16 as ScaLR datasets/pc_dataset.py; default: the k "
                        "stored in --ckpt "
                        "by distill.py, else 16; exercise c)")
    p.add_argument("--cell", type=data.positive_float, default=None,
                   help="grid cell size in metres over the same FOV (official configs 0.5 m, toy 1 m; default: the "
                        "cell stored in --ckpt by distill.py, else the official one; exercise d)")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt_last.pth (same flags)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that already holds a run (its results, log and checkpoints are "
                        "deleted first)")
    p.add_argument("--holdout", type=data.nonneg_int, default=0,
                   help="train on all but the last N scans of the TRAIN split and evaluate on those N instead of "
                        "val: how the toy recipe was chosen without looking at val (ours)")
    p.add_argument("--figures", default=None,
                   help="write the Appendix C pictures (Fig. 2, Fig. 3) into this folder (default: none drawn)")
    p.add_argument("--figure-scans", type=data.positive_int, default=3,
                   help="number of val scans pictured (Supp. C shows a few)")
    p.add_argument("--figures-only", action="store_true", help="only draw --figures, no probing")
    p.add_argument("--figure-center", action="store_true",
                   help="Fig. 3: subtract each scan's mean feature before the cosine (ours; Supp. C does not)")
    return p.parse_args(argv)


def resolve_defaults(args):
    """Fill the dataset-dependent defaults (Supp. B.3 for real data; the toy recipe below for the toy worlds).

    Toy worlds (never tuned on the val split): the frozen trunk runs once per scan (--no-aug + --cache-features
    memory) and the head then trains on the cached tensors with one step per epoch over the WHOLE train split
    (--full-batch), on TOY_POINTS random points per scan and step, with Supp. B.3's loss (CE + Lovász),
    optimizer (AdamW, wd 3e-3), warmup (2 epochs) and cosine to 1e-5. See TOY_STEPS / TOY_LR for how the step
    count and the learning rate were chosen."""
    toy = data.is_toy(args.data, args.root)
    if args.threads is None and toy and not torch.cuda.is_available():
        args.threads = wi.idle_cores()  # 2 on an idle 2-core machine, 1 beside another busy process
    if args.aug is None:
        args.aug = not toy
    if args.cache_features == "auto":
        args.cache_features = "memory" if (toy and not args.aug) else "none"
    if args.cache_features != "none" and args.aug:
        raise SystemExit("--cache-features needs --no-aug: with augmentations every epoch sees different features.")
    if args.full_batch is None:
        args.full_batch = toy and args.cache_features != "none"
    if args.full_batch and args.cache_features == "none":
        raise data.UserError("--full-batch trains the head on cached features", "--full-batch",
                             "add --no-aug --cache-features memory (or disk), or drop --full-batch")
    if args.head_points is None and toy:
        args.head_points = TOY_POINTS if args.full_batch else 2048
    if args.epochs is None:
        args.epochs = (TOY_STEPS if args.full_batch else 300) if toy else \
            (50 if args.data.startswith("pandaset") else 20)
    if args.lr is None:
        args.lr = TOY_LR if (toy and args.full_batch) else 1e-3  # Supp. B.3: 0.001
    if args.workers is None:
        args.workers = 0 if toy else 4
    if args.out is None:
        args.out = f"runs/probe_{args.data}" + ("_random" if args.random_init else "")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: the two labelled splits.
# ----------------------------------------------------------------------------------------------------------------
def open_split(args, split):
    """One labelled split; says clearly when it has no labels or no scan."""
    return data.open_labelled_split(args.data, split, root=args.root, version=args.version, purpose="linear probing")


def ordered_loader(ds, cfg, batch_size, workers, indices):
    """DataLoader over scans `indices` in order, val-style preprocessing (deterministic voxel point, no point limit,
    no augmentation, 1-NN upsample index; docs/official.md §2)."""
    seg = data.ScorableScans(data.SegmentationDataset(ds, cfg, train=False, subset=indices))
    return data.ScoredBatches(DataLoader(seg, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=data.collate_scorable))


class PreprocessedScans:
    """ordered_loader's batches of each split, kept in memory while the first probe of a process reads them and
    handed again to the next one. --compare-random probes two backbones on the same grid and k, and val-style
    preprocessing is deterministic, so the second probe's trunk runs on the very same batches without voxelising,
    searching the kNN and computing the cells of every scan again (about a quarter of its trunk-feature time on
    the toy). Memory: every preprocessed scan of both splits at once (175 MiB on the toy)."""

    def __init__(self):
        self.store = {}

    def loader(self, ds, cfg, batch_size, workers, indices):
        """An iterable of the collated batches of scans `indices` with `.skipped`, as ordered_loader's."""
        key = (tuple(ds.scan_id(i) for i in indices), batch_size, repr(cfg))
        if key not in self.store:
            self.store[key] = KeptBatches(ordered_loader(ds, cfg, batch_size, workers, indices))
        return self.store[key]


class KeptBatches:
    """A loader's batches, recorded while they are read the first time and replayed afterwards; `.skipped`: the
    scans that could not be used, as data.ScoredBatches records them."""

    def __init__(self, loader):
        self.loader, self.batches = loader, None

    @property
    def skipped(self):
        return self.loader.skipped

    def __iter__(self):
        if self.batches is not None:
            yield from self.batches
            return
        batches = []
        for batch in self.loader:
            batches.append(batch)
            yield batch
        self.batches = batches  # only a complete pass is kept


# ----------------------------------------------------------------------------------------------------------------
# Model: frozen backbone + trainable segmentation head.
# ----------------------------------------------------------------------------------------------------------------
def reinitialise(model, seed):
    """Fresh default PyTorch init of every layer (WaffleIron waffleiron/backbone.py has no custom init), BN stats
    reset."""
    torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def build_model(args, cfg, num_classes):
    """Backbone from the checkpoint (or a random one) with the official probe head; returns (model, checkpoint
    whose weights are used or None, where the architecture came from)."""
    ckpt = wi.resolve_backbone_checkpoint(args.ckpt, "--random-init", args.random_init)
    if ckpt is not None:
        model = wi.load_checkpoint(ckpt, grids=cfg.grids)
        wi.check_backbone_shape(model, ckpt, args.width, args.depth)
        if args.random_init:
            model = reinitialise(model, args.seed)
    else:
        width, depth = wi.default_architecture(args.data)  # toy: WI-6-64; else the paper's WI-48-768
        width, depth = args.width or width, args.depth or depth
        torch.manual_seed(args.seed)
        model = wi.WaffleIron(input_channels=5, feat_channels=width, depth=depth, nb_class=num_classes,
                              grids=cfg.grids, layer_norm=True)
    # the pretrained head is discarded; BN(F) + zero-init Conv1d(F -> K) (docs/official.md §2)
    model.set_head(wi.seg_head(wi.backbone_width(model), num_classes))
    arch_from = ckpt if ckpt is not None else f"--width {wi.backbone_width(model)} --depth {wi.backbone_depth(model)}"
    return model, (None if args.random_init else ckpt), arch_from


def freeze_backbone(model):
    """Linear probing (docs/official.md §2): every parameter except `classif` frozen; whole net in eval mode but
    the head's BN."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classif."))
    model.eval()
    model.classif.train()
    return model


def batch_features(model, batch, device, amp):
    """Frozen trunk features of each scan of a collated batch: list of (F, M_b) float32 (padding dropped)."""
    with torch.no_grad(), wi.autocast_context(device, amp):
        feats = model.forward_features(batch["feat"].to(device), batch["cells"].to(device),
                                       batch["neighbors"].to(device), batch["occupied"].to(device))  # (B, F, Nmax)
    return [feats[b, :, :m].float() for b, m in enumerate(batch["num_points"].tolist())]


def scan_records(model, batch, device, amp):
    """Per scan: features (F, M), labels (M,) of the kept points, and (if present) the eval upsample index (N,) and
    the original labels (N,)."""
    feats = batch_features(model, batch, device, amp)
    sizes = batch["num_points"].tolist()
    labels = torch.split(batch["labels"], sizes) if "labels" in batch else [None] * len(sizes)
    recs = []
    for b, f in enumerate(feats):
        rec = {"feats": f, "labels": labels[b]}
        if "upsample" in batch:
            rec["upsample"] = batch["upsample"][b]
        if "orig_labels" in batch:
            rec["orig_labels"] = batch["orig_labels"][b]
        recs.append(rec)
    return recs


def head_logits(head, feats_list, device, amp):
    """Head on the real points of a batch: features concatenated to (1, F, ΣM) -> logits (ΣM, K) float32.
    (Official feeds the padded (B, F, Nmax) map, so padding enters the head BN statistics; we
    drop it so that cached and live features give the very same statistics.)"""
    x = torch.cat([f.to(device).float() for f in feats_list], dim=1)[None]  # (1, F, ΣM)
    with wi.autocast_context(device, amp):
        out = apply_head(head, x)  # (1, K, ΣM)
    return out[0].float().T  # (ΣM, K)


def apply_head(head, x):
    """head(x) for x (1, F, L). The probe head BatchNorm1d -> Conv1d(F -> K, 1) runs layer by layer, its
    convolution as a matmul (wi.apply_pointwise; measured bit-identical over a toy head training). Any other head
    is called whole: a DDP-wrapped one (its forward prepares the gradient all-reduce), a Sequential subclass with
    a forward of its own."""
    if type(head) is torch.nn.Sequential:
        for layer in head:
            x = wi.apply_pointwise(layer, x)
        return x
    return head(x)


# ----------------------------------------------------------------------------------------------------------------
# Feature cache (--cache-features): the frozen trunk gives the same features every epoch when augmentations are off.
# ----------------------------------------------------------------------------------------------------------------
class FeatureCache:
    """Scan records of one split kept in memory or as .npz files under `folder`: features (F, M) in `dtype`,
    labels as uint8 (0..K-1 and IGNORE = 255 fit), the upsample index as int64."""

    def __init__(self, mode, folder, dtype="float16", keep=("feats", "labels", "upsample", "orig_labels")):
        self.mode, self.folder, self.dtype, self.keep = mode, Path(folder), getattr(np, dtype), keep
        self.store = {}
        if mode == "disk":
            self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, key, rec):
        kinds = {"feats": self.dtype, "labels": np.uint8, "orig_labels": np.uint8, "upsample": np.int64}
        arrays = {k: np.asarray(rec[k].cpu().numpy(), dtype=kinds[k]) for k in self.keep}
        if self.mode == "memory":
            self.store[key] = arrays
        else:
            path = self.folder / f"{key}.npz"
            np.savez(str(path) + ".tmp.npz", **arrays)  # written aside, then renamed
            os.replace(str(path) + ".tmp.npz", path)
            self.store[key] = path

    def get(self, key):
        item = self.store[key]
        arrays = dict(np.load(item)) if self.mode == "disk" else item
        return {k: torch.from_numpy(v.astype(np.float32 if k == "feats" else np.int64)) for k, v in arrays.items()}

    def keys(self):
        return list(self.store)

    def nbytes(self):
        if self.mode == "disk":
            return sum(p.stat().st_size for p in self.store.values())
        return sum(a.nbytes for rec in self.store.values() for a in rec.values())


def fill_cache(cache, model, loader, device, amp, desc):
    """One pass of the frozen trunk over a split (an ordered_loader), each scan cached under its scan id."""
    for batch in tqdm(loader, desc=desc, disable=not wi.is_main()):
        for scan_id, rec in zip(batch["scan_id"], scan_records(model, batch, device, amp)):
            cache.put(scan_id, rec)
    return cache


def cached_epoch_batches(keys, batch_size, epoch, seed):
    """Shuffled batches of cache keys for one epoch (official drop_last)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(keys))
    n = len(keys) // batch_size
    return [[keys[j] for j in order[i * batch_size:(i + 1) * batch_size]] for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and results (ScaLR utils/metrics.py: confusion over the whole split, nanmean).
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def confusion_of_records(head, records, num_classes, device, amp):
    """Confusion matrix on ALL original points: logits of the kept points copied by the 1-NN upsample index."""
    head.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for rec in records:
        logits = head_logits(head, [rec["feats"]], device, amp)  # (M, K)
        pred = logits.argmax(1).cpu()[rec["upsample"]]  # (N,)
        cm += np.asarray(data.confusion_matrix(rec["orig_labels"].numpy(), pred.numpy(), num_classes))
    return cm


# ----------------------------------------------------------------------------------------------------------------
# Where the head's inputs come from: the frozen trunk on every batch (live) or the feature cache.
# ----------------------------------------------------------------------------------------------------------------
class LiveFeatures:
    """Runs the frozen trunk on every batch (needed with the augmentations of ScaLR utils/transforms.py). subset:
    dataset indices
    used (None: all)."""

    def __init__(self, model, ds, cfg, args, device, train, subset=None):
        self.model, self.device, self.amp = model, device, args.amp
        seg = data.SegmentationDataset(ds, cfg, train=train and args.aug, subset=subset, seed=args.seed)
        # global batch split over ranks, shuffle + drop_last for training; val: every scan once (data.EpochSampler)
        self.loader = data.make_loader(seg, args.batch_size, train=train, collate_fn=data.collate, seed=args.seed,
                                     workers=args.workers)

    @property
    def iters_per_epoch(self):
        return len(self.loader)

    def epoch(self, epoch):
        """Yields (list of (F, M_b) features, (ΣM,) labels) for one shuffled epoch."""
        data.set_epoch(self.loader, epoch)
        for batch in self.loader:
            yield batch_features(self.model, batch, self.device, self.amp), batch["labels"]

    def records(self):
        for batch in self.loader:
            yield from scan_records(self.model, batch, self.device, self.amp)


class CachedFeatures:
    """Trunk features computed once (--no-aug): later epochs cost only the head. With full_batch (train only),
    every epoch is ONE batch holding every cached scan of this rank. subset: dataset indices used (None: all).
    prepared: a PreprocessedScans shared with another probe of this process, or None."""

    def __init__(self, model, ds, cfg, args, device, train, folder, subset=None, prepared=None):
        rank, world = data.rank_world()
        scans = list(range(len(ds))) if subset is None else list(subset)
        self.full_batch = bool(train and getattr(args, "full_batch", False))
        # this rank's scans: train trimmed so that every rank does the same number of steps, val every scan once
        kept = len(scans) - (len(scans) % world if train else 0)
        indices = scans[:kept][rank::world]
        self.batch_size, self.seed = max(1, args.batch_size // world), args.seed
        if train and not self.full_batch and len(indices) < self.batch_size:
            raise SystemExit(f"the training split has {len(scans)} scans, fewer than one batch of {args.batch_size} "
                             f"(official drop_last): lower --batch-size or use more data")
        keep = ("feats", "labels") if train else ("feats", "upsample", "orig_labels")
        self.cache = FeatureCache(args.cache_features, Path(folder) / f"rank{rank}", args.cache_dtype, keep)
        t0 = time.time()
        self.skipped = []
        if indices:  # a rank may hold no val scan when there are fewer scans than ranks
            trunk_batch = trunk_batch_size(self.batch_size, device)
            loader = (prepared.loader if prepared is not None else ordered_loader)(ds, cfg, trunk_batch,
                                                                                  args.workers, indices)
            fill_cache(self.cache, model, loader, device, args.amp,
                       f"trunk features ({'train' if train else 'eval'}, cached)")
            self.skipped = loader.skipped  # scans that cannot be used (e.g. no point inside the FOV): warned
        if wi.is_main():
            print(f"cached {len(indices) - len(self.skipped)} scans ({self.cache.nbytes() / 2**20:.0f} MiB, "
                  f"{args.cache_features}) in {time.time() - t0:.0f}s", flush=True)

    @property
    def iters_per_epoch(self):
        return 1 if self.full_batch else len(self.cache.keys()) // self.batch_size

    def epoch(self, epoch):
        """Yields (list of (F, M_b) features, (ΣM,) labels) for one epoch: shuffled batches of scans, or the whole
        split as one batch (full_batch)."""
        if self.full_batch:
            yield self.whole_split()
            return
        for keys in cached_epoch_batches(self.cache.keys(), self.batch_size, epoch, self.seed):
            recs = [self.cache.get(k) for k in keys]
            yield [r["feats"] for r in recs], torch.cat([r["labels"] for r in recs])

    def whole_split(self):
        """(list of (F, M_b) views, (ΣM,) labels) of every cached scan, built once and kept in the cache dtype:
        a full-batch step then only gathers its --head-points points per scan and casts those to float32. The
        features are stored point-major, (ΣM, F), and each view is a transposed slice of it, so that gathering a
        point reads its F features at once (take_points)."""
        if getattr(self, "_whole", None) is None:
            arrays = [self.cache.store[k] if self.cache.mode == "memory" else dict(np.load(self.cache.store[k]))
                      for k in self.cache.keys()]
            sizes = [a["feats"].shape[1] for a in arrays]
            first = arrays[0]["feats"]
            rows = np.empty((sum(sizes), first.shape[0]), first.dtype)  # (ΣM, F), C order: a point per row
            np.concatenate([a["feats"].T for a in arrays], out=rows)
            labels = torch.from_numpy(np.concatenate([a["labels"] for a in arrays]).astype(np.int64))  # (ΣM,)
            self._whole = ([r.t() for r in torch.split(torch.from_numpy(rows), sizes)], labels)
        return self._whole

    def records(self):
        for k in self.cache.keys():
            yield self.cache.get(k)


def trunk_batch_size(batch_size, device):
    """Scans per trunk forward when caching features: one on CPU, where a single scan's activations stay in the
    processor caches (WI-6-64 on the toy, 1 thread: 1.4x faster than batches of 8, measured; the features agree
    to float rounding, ~1e-6), the training batch size on a GPU, which wants large kernels."""
    return 1 if torch.device(device).type == "cpu" else batch_size


def feature_source(model, ds, cfg, args, device, train, subset=None, prepared=None):
    """LiveFeatures or CachedFeatures as --cache-features says; prepared: see CachedFeatures."""
    if args.cache_features == "none":
        return LiveFeatures(model, ds, cfg, args, device, train, subset)
    folder = Path(args.out) / "feature_cache" / ("train" if train else "val")
    if args.cache_features == "disk" and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # features of another checkpoint must never be reused
    return CachedFeatures(model, ds, cfg, args, device, train, folder, subset, prepared)


# ----------------------------------------------------------------------------------------------------------------
# Training loop (Supp. B.3) with atomic checkpoints and --resume.
# ----------------------------------------------------------------------------------------------------------------
# settings a --resume must share with the run it continues (wi.check_resume_config lists every one that differs)
RECIPE_KEYS = ("epochs", "batch_size", "full_batch", "lr", "min_lr", "weight_decay", "warmup_epochs", "head_points",
               "aug", "seed", "holdout", "amp")  # flags, stored as given
RESUME_KEYS = ("data", "ckpt", "random_init", "width", "depth", "num_classes", "k", "cell") + RECIPE_KEYS


def probe_config(args, model, ckpt, class_names, cfg):
    """config.json / the 'config' of every checkpoint: 'stage' lets another stage refuse this run's files."""
    return {"stage": "probe", "data": args.data, "ckpt": ckpt, "random_init": args.random_init,
            "k": cfg.k, "cell": data.cell_size(cfg), "grids": [list(g) for g in cfg.grids],
            "width": wi.backbone_width(model), "depth": wi.backbone_depth(model), "num_classes": len(class_names),
            "class_names": list(class_names),
            **{k: getattr(args, k) for k in RECIPE_KEYS},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}





def resume_probe(path, model, opt, sched, scaler):
    """Head, optimiser, scheduler, scaler and RNG states of ckpt_last.pth; returns (epoch, iteration, train
    label counts)."""
    st = wi.load_training_checkpoint(path)
    epoch, it = wi.restore_training_state(st, model, opt, sched, scaler, model_key="net")
    return epoch, it, np.asarray(st["train_counts"], dtype=np.int64)


def subsample_points(feats_list, labels, n, rng):
    """Keep n random points of each scan for this step (--head-points): the same CE + Lovász objective in
    expectation at n/M of the cost. Ours, for the toy on a CPU; Supp. B.3 / official use every kept point."""
    sizes = [f.shape[1] for f in feats_list]
    keys = rng.random(sum(sizes))  # one uniform key per point: a scan's n smallest keys = a uniform n-subset
    kept_f, kept_l, start = [], [], 0
    for f, lab, m in zip(feats_list, torch.split(labels, sizes), sizes):  # f (F, M), lab (M,)
        if m > n:
            idx = torch.from_numpy(np.sort(np.argpartition(keys[start:start + m], n)[:n]))  # (n,) without repeats
            f, lab = take_points(f, idx), lab[idx]
        kept_f.append(f)
        kept_l.append(lab)
        start += m
    return kept_f, torch.cat(kept_l)


def take_points(f, idx):
    """Columns idx of f (F, M) as float32 (F, n), gathered as rows of f.T: on whole_split's point-major views
    that reads n rows of F values instead of F x n scattered ones (about 5x faster on CPU, and float16 gathers
    are slow there), and only the kept points are cast to float32."""
    return f.t().index_select(0, idx).float().t()


class Run(NamedTuple):
    """The fixed parts of a linear probe, built once by setup_head_training()."""
    args: argparse.Namespace
    model: torch.nn.Module       # frozen backbone + the head, as saved
    train_head: torch.nn.Module  # model.classif, DDP-wrapped with several processes (the only trained part)
    opt: torch.optim.Optimizer
    sched: object                # warmup + cosine LambdaLR, stepped every iteration (Supp. B.3)
    scaler: object               # GradScaler (--amp fp16) or a no-op
    train_src: object            # LiveFeatures / CachedFeatures: (features, labels) batches of an epoch
    val_src: object
    log: "wi.CSVLog"
    config: dict
    device: torch.device
    out: Path
    per_epoch: int
    stop: int                    # iteration to stop at (the budget, or --max-iters)


@dataclass
class Progress:
    """Where the loop is and what it has counted: saved in every ckpt_last.pth, restored by --resume."""
    epoch: int = 0               # epochs done (a resume restarts at an epoch boundary)
    it: int = 0                  # head steps done
    counts: np.ndarray = None    # labelled training points seen per class (classes training never saw)


def head_step(run, feats_list, labels, it):
    """One AdamW step of the head (Supp. B.3) on a batch of features; returns (loss, {'ce', 'lovasz'}, lr used).
    A NaN/inf loss raises FloatingPointError before the update (wi.check_finite)."""
    args = run.args
    if args.head_points:
        feats_list, labels = subsample_points(feats_list, labels, args.head_points,
                                              np.random.default_rng([args.seed, it]))
    logits = head_logits(run.train_head, feats_list, run.device, args.amp)  # (ΣM, K)
    loss, parts = wi.seg_loss(logits, labels.to(run.device), return_parts=True)  # CE + Lovász (docs/official.md §2)
    wi.check_finite(loss, it + 1)  # 1-based, as log.csv
    lr = run.opt.param_groups[0]["lr"]  # the lr of this step (the first one is 0, ScaLR utils/scheduler.py)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()
    return loss, parts, lr


def train(run, p):
    """Supp. B.3 linear probing, distill.train's shape: epochs of head steps until run.stop, the resume state
    after every epoch (ResumeState: ckpt_last.pth) and --eval-every validations."""
    resume_state = ResumeState(run)
    try:
        train_epochs(run, p, resume_state)
    except BaseException:  # a diverged step, Ctrl-C...: --resume continues from the last finished epoch
        resume_state.write()
        raise


def train_epochs(run, p, resume_state):
    args, num_classes = run.args, run.config["num_classes"]
    bar = tqdm(total=run.stop, initial=p.it, desc="head", disable=not wi.is_main())
    seen = (None, None)  # (labels, their counts): a full batch brings the same labels tensor every epoch
    while p.epoch < args.epochs and p.it < run.stop:
        run.model.eval()
        run.model.classif.train()  # only the head (its BN) in train mode (docs/official.md §2)
        for feats_list, labels in run.train_src.epoch(p.epoch):
            if labels is not seen[0]:
                seen = (labels, wi.label_counts(labels, num_classes))
            p.counts += seen[1]  # before any point subsampling
            loss, parts, lr = head_step(run, feats_list, labels, p.it)
            p.it += 1
            bar.update(1)
            bar.set_postfix(epoch=p.epoch + 1, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            run.log.log(epoch=p.epoch, iteration=p.it, lr=lr, loss=loss.item(), **parts)
            if p.it >= run.stop:
                break
        p.epoch += 1  # (a --max-iters stop in mid-epoch counts that epoch as done: smoke runs only)
        resume_state.epoch_done(p, last=p.epoch >= args.epochs or p.it >= run.stop)
        if args.eval_every and p.epoch % args.eval_every == 0 and p.epoch < args.epochs and p.it < run.stop:
            cm = wi.all_reduce_sum(confusion_of_records(run.model.classif, run.val_src.records(), num_classes,
                                                        run.device, args.amp))
            miou = wi.summarise_confusion(cm, run.config["class_names"], p.counts, not args.unseen_as_zero)["miou"]
            run.log.log(epoch=p.epoch - 1, iteration=p.it, val_miou=miou)
            wi.print0(f"epoch {p.epoch}: val mIoU {miou:.1f}")
    bar.close()


def train_probe(args, model, train_src, val_src, config, device, out):
    """Trains model.classif (the only trainable part) on the frozen trunk's features; returns (labelled training
    points seen per class summed over ranks, steps done by this run)."""
    run, p = setup_head_training(args, model, train_src, val_src, config, device, out)
    first = p.it
    train(run, p)
    return wi.all_reduce_sum(p.counts), p.it - first


def setup_head_training(args, model, train_src, val_src, config, device, out):
    """The Run of a linear probe (AdamW on the head, schedule, scaler, log) and its Progress, restored from
    OUT/ckpt_last.pth with --resume."""
    head = model.classif
    opt = wi.make_adamw(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)  # Supp. B.3
    ipe = train_src.iters_per_epoch
    # Supp. B.3: LR 0 -> lr over the warmup epochs, then cosine to min_lr, stepped every iteration
    # (ScaLR utils/scheduler.py)
    sched = wi.make_scheduler(opt, warmup_iters=round(args.warmup_epochs * ipe), total_iters=args.epochs * ipe,
                              min_lr=args.min_lr, base_lr=args.lr)
    scaler = wi.make_grad_scaler(args.amp, device)
    p = Progress(counts=np.zeros(config["num_classes"], dtype=np.int64))
    if args.resume:
        p.epoch, p.it, p.counts = resume_probe(out / "ckpt_last.pth", model, opt, sched, scaler)
        wi.print0(f"resumed from {out / 'ckpt_last.pth'} at epoch {p.epoch}, iteration {p.it}")
    log = wi.CSVLog(out / "log.csv", ["epoch", "iteration", "lr", "loss", "ce", "lovasz", "val_miou"],
                    resume_iteration=p.it if args.resume else None)
    stop = min(args.max_iters, args.epochs * ipe) if args.max_iters else args.epochs * ipe
    wi.print0(f"budget: {args.epochs} epochs x {ipe} it = {args.epochs * ipe} iterations (warmup "
              f"{round(args.warmup_epochs * ipe)}), batch {'all train scans' if args.full_batch else args.batch_size}"
              f", lr {args.lr} -> {args.min_lr}, wd {args.weight_decay}, aug {'on' if args.aug else 'off'}, "
              f"features {args.cache_features}, points per scan {args.head_points or 'all'}"
              + (f"; stopping after {stop} (--max-iters)" if stop < args.epochs * ipe else ""))
    run = Run(args=args, model=model, train_head=wi.wrap_ddp(head, device),  # DDP on the head only
              opt=opt, sched=sched, scaler=scaler, train_src=train_src, val_src=val_src, log=log, config=config,
              device=device, out=out, per_epoch=ipe, stop=stop)
    return run, p


class ResumeState:
    """ckpt_last.pth (everything --resume needs, written atomically) of the head training. The state is taken
    after every epoch, on every rank (it gathers the RNG states), and rank 0 writes it when the previous write is
    CKPT_EVERY_S old, after the last epoch, and when the loop stops on an exception: then the state of the last
    finished epoch, never a diverged step's. Why not every epoch: a toy epoch is one full-batch step of ~20 ms and
    a write (torch.save + fsync) 10-30 ms, a third of the head training over 120 epochs; a real-data epoch lasts
    minutes and is still written every time."""

    def __init__(self, run):
        self.run, self.pending, self.written_at = run, None, time.monotonic()

    def epoch_done(self, p, last):
        """After an epoch; last: no epoch follows (the budget or --max-iters is reached)."""
        run = self.run
        state = wi.training_state(run.model, run.opt, run.sched, run.scaler, p.epoch, p.it,
                                  extra={"train_counts": p.counts.tolist()}, model_key="net", config=run.config)
        self.pending = state
        if last or time.monotonic() - self.written_at >= CKPT_EVERY_S:
            self.write()
        else:  # kept for a later write: a copy that the next steps' in-place updates do not reach
            self.pending = copy.deepcopy(state)

    def write(self):
        pending, self.pending = self.pending, None  # a failed write is not tried again on the way out
        if pending is not None and wi.is_main():
            wi.save_checkpoint(self.run.out / "ckpt_last.pth", **pending)
        self.written_at = time.monotonic()


# ----------------------------------------------------------------------------------------------------------------
# Appendix C: Fig. 2 (PCA colours) and Fig. 3 (class-prototype similarity).
# ----------------------------------------------------------------------------------------------------------------
def pca_rgb(feats, q=0.01):
    """(N, F) features -> (N, 3) float32 colours in [0, 1]: each point's coordinates on this scan's first 3
    principal components (Supp. C, Fig. 2: PCA done independently per scan), each min-max scaled into [0, 1].
    q: the min and max are the q and 1-q quantiles (values beyond are clipped), so that a few outlying points do
    not squeeze every other colour into a narrow band; q=0 is the plain min-max."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pca_rgb expects (N, F) features, got shape {x.shape}")
    if len(x) == 0:
        return np.zeros((0, 3), np.float32)
    x = x - x.mean(0)
    cov = x.T @ x / max(len(x) - 1, 1)  # (F, F): cheaper than an SVD of (N, F) when N >> F
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    axes = vecs[:, ::-1][:, :3]  # (F, <=3) first principal axes
    axes = axes * np.sign(axes[np.abs(axes).argmax(0), range(axes.shape[1])])  # deterministic sign
    proj = x @ axes  # (N, <=3)
    proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.quantile(proj, q, axis=0), np.quantile(proj, 1 - q, axis=0)
    rgb = (proj - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return np.clip(rgb, 0.0, 1.0).astype(np.float32)


def prototype_similarity(feats, labels, cls, center=False):
    """Cosine similarity (N,) of every point's l2-normalised feature to the class prototype = mean of the
    l2-normalised features of the points labelled `cls` (Supp. C, Fig. 3). center=True first subtracts the scan's
    mean feature (ours, --figure-center: a weak student's features can share one dominant direction, making every
    cosine ~0.99)."""
    f = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    mask = torch.as_tensor(np.asarray(labels)) == cls
    if not bool(mask.any()):
        raise ValueError(f"class {cls} has no point in this scan: no prototype")
    if center:
        f = f - f.mean(0)
    f = torch.nn.functional.normalize(f, dim=1)  # (N, F) unit features
    proto = torch.nn.functional.normalize(f[mask].mean(0), dim=0)  # (F,) mean feature, then unit
    return (f @ proto).numpy()  # (N,) in [-1, 1]


def fig3_classes(class_names, labels):
    """[(display name, class index)] of the Fig. 3 classes present in the label space and in this scan."""
    present = set(np.unique(labels).tolist())
    found = []
    for shown, aliases in FIG3_CLASSES.items():
        for a in aliases:
            if a in class_names and class_names.index(a) in present:
                found.append((f"{shown} ({a})" if a != shown else shown, class_names.index(a)))
                break
    return found


def scan_point_features(model, seg, i, device, amp):
    """Trunk features of every ORIGINAL point of scan i (1-NN upsampled from the kept points, docs/official.md
    §2)."""
    batch = data.collate([seg[i]])
    f = batch_features(model, batch, device, amp)[0]  # (F, M)
    return f.T[batch["upsample"][0]].cpu().numpy()  # (N, F)


def _bev(ax, xy, colors, title, lim, **kw):
    order = np.argsort(np.abs(xy).sum(1))[::-1]  # far points first, near ones drawn on top
    sc = ax.scatter(xy[order, 0], xy[order, 1], c=colors[order], s=1.2, linewidths=0, **kw)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, xlabel="x (m)", ylabel="y (m)")
    ax.set_aspect("equal")
    return sc


def _camera(ax, ds, i, cam, point_colors, title, **kw):
    """Colours of the points seen by camera `cam` drawn over its image (ds.project, ds.image)."""
    try:
        proj, img = ds.project(i, cam), ds.image(i, cam)
    except (FileNotFoundError, KeyError, ValueError) as e:
        ax.text(0.5, 0.5, f"no camera image:\n{e}", ha="center", va="center", fontsize=7, wrap=True)
        ax.set_axis_off()
        return None
    ax.imshow(img, alpha=0.45)  # faded so that the point colours stand out
    order = np.argsort(-proj["depth"])  # far first
    idx, uv = proj["idx"][order], proj["uv"][order]
    size = 6.0 * img.shape[1] / 1600  # marker area scaled with the image width (nuScenes: 1600 px)
    sc = ax.scatter(uv[:, 0], uv[:, 1], c=point_colors[idx], s=max(size, 2.0), linewidths=0, **kw)
    ax.set(xlim=(0, img.shape[1]), ylim=(img.shape[0], 0))
    ax.set_title(title)
    ax.set_axis_off()
    return sc


def draw_figures(model, ds, cfg, folder, n_scans, device, amp, center=False):
    """Fig. 2 and Fig. 3 of the supplementary for `n_scans` evenly spread val scans; returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    seg = data.SegmentationDataset(ds, cfg, train=False)
    cam = next((c for c in ds.cameras if "FRONT" in c.upper() and "LEFT" not in c.upper()
                and "RIGHT" not in c.upper()), ds.cameras[0]) if ds.cameras else None
    names, paths = list(ds.class_names), []
    for i in np.unique(np.linspace(0, len(ds) - 1, n_scans).round().astype(int)).tolist():
        feats = scan_point_features(model, seg, i, device, amp)  # (N, F)
        xy, labels = ds.points(i)[:, :2], ds.labels(i)
        lim = float(min(np.percentile(np.abs(xy), 98), 64)) + 1
        sid = "".join(c if c.isalnum() or c in "-_" else "_" for c in ds.scan_id(i))
        gt_col = plt.get_cmap("tab20")(np.where(labels == data.IGNORE, 19, labels % 19) / 19.0)
        gt_col[labels == data.IGNORE] = (0.8, 0.8, 0.8, 1)
        # Fig. 2: first 3 principal components of this scan's features as RGB
        rgb = pca_rgb(feats)
        fig, axes = plt.subplots(1, 3 if cam else 2, figsize=(18 if cam else 12, 6))
        _bev(axes[0], xy, gt_col, "ground truth (class colours)", lim)
        _bev(axes[1], xy, rgb, "features: 3 principal components as RGB", lim)
        if cam:
            _camera(axes[2], ds, i, cam, rgb, f"PCA colours over {cam}")
        fig.suptitle(f"Supp. Fig. 2 — {ds.name} val scan {ds.scan_id(i)}")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        paths.append(folder / f"fig2_pca_{sid}.png")
        fig.savefig(paths[-1], dpi=90, bbox_inches="tight")
        plt.close(fig)
        # Fig. 3: cosine similarity to each class prototype (blue -> red), next to the ground truth
        classes = fig3_classes(names, labels)
        if not classes:
            continue
        ncol = 3 if cam else 2
        fig, axes = plt.subplots(len(classes), ncol, figsize=(6 * ncol, 5.5 * len(classes)), squeeze=False)
        for row, (shown, k) in enumerate(classes):
            sim = prototype_similarity(feats, labels, k, center=center)
            mask_col = np.where((labels == k)[:, None], [[0.85, 0.1, 0.1, 1]], [[0.75, 0.75, 0.75, 1]])
            _bev(axes[row, 0], xy, mask_col, f"ground truth: {shown} (red)", lim)
            lo, hi = np.quantile(sim, [0.01, 0.99])  # colour range robust to a few outliers
            kw = dict(cmap="jet", vmin=float(lo), vmax=float(hi))  # blue (dissimilar) -> red (similar)
            sc = _bev(axes[row, 1], xy, sim, f"cosine similarity to the {shown} prototype", lim, **kw)
            fig.colorbar(sc, ax=axes[row, 1], fraction=0.046)
            if cam:
                _camera(axes[row, 2], ds, i, cam, sim, f"similarity over {cam}", **kw)
        fig.suptitle(f"Supp. Fig. 3 — {ds.name} val scan {ds.scan_id(i)}: cosine similarity of l2-normalised "
                     f"features{' (centred per scan)' if center else ''} to each class prototype (mean feature of "
                     f"its ground-truth points)")
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.04 / len(classes)))
        paths.append(folder / f"fig3_prototypes_{sid}.png")
        fig.savefig(paths[-1], dpi=80, bbox_inches="tight")
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def evaluation_split(args, train_ds, val_ds):
    """(train scans used or None = all, dataset scored, its scans or None = all, its name): the val split, or with
    --holdout N the last N scans of the TRAIN split, left out of training (to choose a recipe without val)."""
    if not args.holdout:
        return None, val_ds, None, "val"
    n = len(train_ds)
    if args.holdout >= n:
        raise data.UserError(f"--holdout {args.holdout} leaves no training scan ({n} train scans)", "--holdout",
                             f"use at most {n - 1}")
    return list(range(n - args.holdout)), train_ds, list(range(n - args.holdout, n)), \
        f"train holdout (last {args.holdout} of {n} train scans)"


def timing_summary(t_feat, t_head, t_eval, steps, cached):
    """{'part': seconds} and the one line printed at the end of a run: where the time went."""
    times = {"trunk_features_s": t_feat, "head_training_s": t_head, "evaluation_s": t_eval,
             "head_steps": steps, "ms_per_step": 1000 * t_head / max(steps, 1)}
    total = max(t_feat + t_head + t_eval, 1e-9)
    line = (f"time: {total:.1f}s = trunk features {t_feat:.1f}s ({100 * t_feat / total:.0f}%, "
            f"{'cached once' if cached else 'loaders only: the trunk runs inside each step'}) + head training "
            f"{t_head:.1f}s ({100 * t_head / total:.0f}%: {steps} steps, {times['ms_per_step']:.1f} ms/step) + "
            f"evaluation {t_eval:.1f}s ({100 * t_eval / total:.0f}%)")
    return times, line


def run_probe(args, model, ckpt, class_names, cfg, device, datasets, out, prepared=None):
    """Features, head training, model.pth (written BEFORE the final evaluation), evaluation, report. prepared: a
    PreprocessedScans shared with another probe of this process (--compare-random), or None."""
    train_ds, val_ds = datasets
    train_idx, eval_ds, eval_idx, eval_name = evaluation_split(args, train_ds, val_ds)
    config = probe_config(args, model, ckpt, class_names, cfg)
    if args.resume:
        wi.read_resume_checkpoint(out / "ckpt_last.pth", config, "probe", RESUME_KEYS)  # before any feature
    if wi.is_main():
        (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    t0 = time.perf_counter()
    train_src = feature_source(model, train_ds, cfg, args, device, train=True, subset=train_idx,
                               prepared=prepared)
    val_src = feature_source(model, eval_ds, cfg, args, device, train=False, subset=eval_idx, prepared=prepared)
    t1 = time.perf_counter()
    try:
        counts, steps = train_probe(args, model, train_src, val_src, config, device, out)
    except FloatingPointError as err:  # as distill.py: one line, the last good ckpt_last.pth kept
        raise SystemExit(wi.diverged_message(err, out)) from None
    t2 = time.perf_counter()
    if wi.is_main():  # a finished training is never lost to a late failure
        wi.save_checkpoint(out / "model.pth", net=wi.official_state_dict(model), config=config)
    cm = wi.all_reduce_sum(confusion_of_records(model.classif, val_src.records(), len(class_names), device,
                                                args.amp))
    times, line = timing_summary(t1 - t0, t2 - t1, time.perf_counter() - t2, steps, args.cache_features != "none")
    if wi.is_main():
        wi.plot_log(out / "log.csv", out / "loss.png", ["loss", "ce", "lovasz"], title=f"linear probing, {args.data}")
        print(f"probing done; outputs in {out}\n{line}", flush=True)
        skipped = len(getattr(val_src, "skipped", []))  # (single process: a rank's own count)
        if skipped:
            data.warn(f"{skipped} {eval_name} scans could not be scored and were skipped: the mIoU below is over "
                      f"the others")
        wi.segmentation_report(cm, class_names, out, extra={"ckpt": ckpt, "data": args.data, "evaluated_on": eval_name,
                                                            "time": times, "eval_scans_skipped": skipped},
                               title=f"{args.data}: linear probing ({eval_name})\n{ckpt or 'random init'}",
                               train_counts=counts, unseen_as_nan=not args.unseen_as_zero)


def main(argv=None):
    args = resolve_defaults(parse_args(argv))
    return compare_with_random(args) if args.compare_random else probe(args)


def probe(args, prepared=None):
    """One linear probe (or --figures-only) with resolved arguments; prepared: see run_probe."""
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = wi.setup_device(args.device)
    out = Path(args.out)
    if not args.figures_only:  # before any data is read: an existing run is never overwritten by accident
        wi.prepare_run_dir(out, args.resume, args.overwrite)
    wi.seed_everything(args.seed + rank)  # ranks draw different augmentations
    # the grid (cell size, kNN k) the backbone was distilled with, unless --cell / --knn say otherwise
    cfg, grid_text = wi.stage_grid(args.data, "probe", args.cell, args.knn,
                                   wi.resolve_backbone_checkpoint(args.ckpt, "--random-init", args.random_init))
    wi.print0(grid_text)
    train_ds, val_ds = open_split(args, "train"), open_split(args, "val")
    class_names = list(val_ds.class_names)
    model, ckpt, arch_from = build_model(args, cfg, len(class_names))
    model = freeze_backbone(model.to(device))
    wi.print0(f"backbone WI-{wi.backbone_depth(model)}-{wi.backbone_width(model)} "
              f"({'random init, architecture of ' + arch_from if args.random_init else 'weights of ' + ckpt}); "
              f"{args.data}: {len(train_ds)} train / {len(val_ds)} val scans, {len(class_names)} classes")
    if args.figures and wi.is_main():
        for p in draw_figures(model, val_ds, cfg, args.figures, args.figure_scans, device, args.amp,
                              args.figure_center):
            print(f"figure: {p}", flush=True)
    if args.figures_only:
        return wi.ddp_cleanup()
    run_probe(args, model, ckpt, class_names, cfg, device, (train_ds, val_ds), out, prepared)
    wi.barrier()
    if args.cache_features == "disk" and wi.is_main():
        shutil.rmtree(out / "feature_cache", ignore_errors=True)  # only valid for this run's backbone
    wi.ddp_cleanup()


def compare_with_random(args):
    """README line 1, the main job's last step: probe the distilled backbone, then a randomly initialised backbone
    of the same architecture and grid with the same recipe, and print both mIoU side by side (Sec. 1 of the paper:
    distilled features must beat random ones under a linear probe). Single process only."""
    if args.random_init:
        raise data.UserError("--compare-random already runs the --random-init baseline", "--random-init",
                             "drop --random-init (or --compare-random)")
    ckpt = wi.resolve_backbone_checkpoint(args.ckpt, "--random-init")  # the distilled backbone, named once
    rows, prepared = [], PreprocessedScans()  # both probes read the same scans on the same grid: prepared once
    for name, change in (("distilled (ScaLR)", {}),
                         ("random init", dict(random_init=True, out=f"{args.out}_random"))):
        run = argparse.Namespace(**{**vars(args), "ckpt": ckpt, "compare_random": False, **change})
        probe(run, prepared)
        rows.append((name, json.loads((Path(run.out) / "results.json").read_text())["miou"], run.out))
    print("\nlinear probing on the same data, same head, same budget:")
    print(f"  {'backbone':<20} {'mIoU':>6}  outputs")
    for name, miou, out in rows:
        print(f"  {name:<20} {miou:6.1f}  {out}")
    print(f"  gain from distillation: {rows[0][1] - rows[1][1]:+.1f} mIoU points")


if __name__ == "__main__":
    data.run_main(main)
