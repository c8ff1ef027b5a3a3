"""finetune.py — finetuning WaffleIron with 1 %, 10 % or 100 % of the labels (ScaLR, CVPR 2024, Supp. B.4).

The distilled model is loaded strictly with its pretraining head, then that head is replaced by the downstream head
BatchNorm1d(F) + zero-initialised Conv1d(F -> K) (as ScaLR finetune.py does), and the WHOLE network is trained on a
labelled subset of one dataset: CE + Lovász (ScaLR utils/metrics.py), the official desynchronised augmentations
(ScaLR utils/transforms.py), AdamW without weight decay, LR 0 -> 0.002 over the first tenth of the epochs then
cosine to 0 (Supp. B.4; stepped every iteration as in ScaLR utils/finetuner.py), stochastic depth 0.2 with the same
rate in every block (WaffleIron waffleiron/backbone.py), BEiT layer-wise LR decay (ScaLR finetune.py). `--scratch`
runs the same recipe from random weights (the paper's "no pretraining" rows). The mIoU is computed on every
original val point (1-NN upsampling, ScaLR utils/finetuner.py).

    python distill.py && python finetune.py --fraction 0.1          # toy: distil, then finetune on 10 % of the labels
    python finetune.py --fraction 0.1 --scratch                     # the same recipe from random weights
    (the toy has 48 train scans: 10 % = 5 scans is its smallest paper fraction, 1 % would be empty)
    torchrun --nproc_per_node 8 finetune.py --data nuscenes --root /data/nuscenes --version v1.0-trainval \\
        --ckpt runs/scalr/model.pth --fraction 0.01 --subset-file nuscenes-ratio_100-v_0.npy --amp fp16
    python finetune.py --eval-only --data nuscenes --root /data/nuscenes --ckpt ckpt_last.pth   # ours or released

Outputs in --out: results.json, per_class_iou.png, log.csv, loss.png, subset_<data>_<pct>.txt, config.json,
model.pth ({'net', 'config'}: official tensor names, readable by waffleiron.load_checkpoint and the official code),
ckpt_last.pth (everything --resume needs, written atomically after every epoch and when a run stops early).
"""
import argparse
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import data
import waffleiron as wi

FINETUNE_DATASETS = [n for n in data.DATASET_NAMES if n != "merged"]
TOY_ITERS = 48  # toy budget in iterations (chosen on cost, never tuned on val); see toy_epochs()


class HeadReinitialisedWarning(UserWarning):
    """The checkpoint's segmentation head has another class count than the dataset: it was re-initialised."""


# ----------------------------------------------------------------------------------------------------------------
# Command line: every default cites where it comes from.
# ----------------------------------------------------------------------------------------------------------------
def label_fraction(text):
    """argparse type of --fraction: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fraction must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < value <= 1.0) or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--fraction must be in (0, 1] (e.g. 0.01, 0.1, 1.0), got {value:g}")
    return value


def drop_rate(text):
    """argparse type of --drop-path: a probability in [0, 1)."""
    value = data.nonneg_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a drop probability in [0, 1) (Supp. B.4: 0.2)")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    a = p.add_argument
    a("--data", default="toy", choices=FINETUNE_DATASETS, help="downstream dataset (default: the toy world)")
    a("--root", default=None, help="dataset root (default: data.get_dataset's, data/toy for the toy)")
    a("--version", default=None,
      help="nuScenes version (default: the first of v1.0-trainval, v1.0-mini, v1.0-test found under "
           "--root; toy: v1.0-mini)")
    a("--ckpt", default=None, help="distilled checkpoint to finetune (default: newest runs/distill*/model.pth); "
                                   "with --eval-only: the finetuned checkpoint to evaluate (ours or released; "
                                   "required)")
    a("--scratch", action="store_true", help="no-pretraining baseline: same recipe, random init (architecture of "
                                             "--ckpt if given, else --width/--depth)")
    a("--width", type=data.positive_int, default=None,
      help="backbone width F for --scratch without checkpoint (ScaLR configs: 768; toy: "
           f"{wi.TOY_ARCH[0]} as distill.py's toy preset)")
    a("--depth", type=data.positive_int, default=None,
      help=f"backbone depth L, same rules as --width (ScaLR configs: 48; toy: {wi.TOY_ARCH[1]})")
    a("--fraction", type=label_fraction, default=None,
      help="fraction of the labelled train scans used (Supp. B.4: 0.01, 0.1, 1.0; any value in (0, 1]); default "
           "1.0, or with --subset-file the fraction that list holds")
    a("--subset-file", default=None, help="official 1 %%/10 %% list, e.g. nuscenes-ratio_100-v_0.npy (ScaLR "
                                          "release info_datasets.tar.gz): train on exactly these scans (the real "
                                          "fraction is printed and recorded); default: data.label_subset's "
                                          "documented rule")
    a("--out", default=None, help="output folder (default runs/finetune[_<data>][_<pct>pct][_scratch])")
    a("--batch-size", type=data.positive_int, default=8, help="global batch size (Supp. B.4: 8)")
    a("--lr", type=data.positive_float, default=0.002, help="peak learning rate of the head (Supp. B.4: 0.002)")
    a("--min-lr", type=data.nonneg_float, default=0.0, help="final learning rate of the cosine (Supp. B.4: 0)")
    a("--weight-decay", type=data.nonneg_float, default=0.0, help="AdamW weight decay (Supp. B.4: none)")
    a("--drop-path", type=drop_rate, default=0.2,
      help="stochastic depth, same rate in every block (Supp. B.4: 0.2; WaffleIron backbone.py: no linear ramp)")
    a("--layer-decay", type=data.positive_float, default=None,
      help="layer-wise LR decay (default, Supp. B.4: 0.95 for 1 %% / 10 %%, 0.99 for 100 %%; the toy world "
           "alike)")
    a("--epochs", type=data.positive_int, default=None,
      help="training epochs (default, Supp. B.4: 45 for 1 %% / 10 %%, 25 for 100 %%; toy world: as many as make "
           f"~{TOY_ITERS} iterations: 8 at 100 %% (6 it. per epoch), 48 at 10 %% (5 scans, 1 it. per epoch))")
    a("--official-kitti-epochs", action="store_true",
      help="SemanticKITTI 100 %%: the official config's 10 epochs / 1 warmup epoch instead of Supp. B.4's 25 "
           "(ScaLR configs/downstream/semantic_kitti/WI_768_finetune_100p.yaml; docs/official.md §1)")
    a("--warmup-epochs", type=data.nonneg_float, default=None,
      help="linear warmup from LR 0 (default, Supp. B.4: the first tenth of the epochs, rounded down as the "
           "official configs: 4 of 45, 2 of 25, 1 of 10; toy world: exactly a tenth, counted in iterations)")
    a("--max-iters", type=data.positive_int, default=None,
      help="stop after this many iterations in total (smoke tests; the LR schedule still spans --epochs; "
           "default: no limit)")
    a("--max-points", type=data.positive_int, default=None,
      help="LimitNumPoints of the training scans (default 20000 around a random centre, as ScaLR "
           "utils/transforms.py and configs); lower it to save memory or time")
    a("--val-scans", type=data.positive_int, default=None,
      help="evaluate on the first N val scans only (smoke tests; default and paper: the whole val split)")
    a("--knn", type=data.positive_int, default=None,
      help="neighbours k of the point embedding (Supp. B.2: 16; default: the k stored in --ckpt by distill.py, "
           "else 16; exercise c)")
    a("--cell", type=data.positive_float, default=None,
      help="grid cell size in metres over the same FOV (Supp. B.2: 0.5 m, toy 1 m; default: the cell stored in "
           "--ckpt by distill.py, else the official one; exercise d)")
    a("--amp", default="none", choices=["none", "fp16", "bf16"],
      help="autocast (official README runs --fp16 = fp16 + GradScaler; none = fp32)")
    a("--workers", type=data.nonneg_int, default=None, help="DataLoader workers (default 0 on the toy, else 4)")
    a("--device", default=None, help="torch device: cpu, cuda or cuda:N (default: cuda if available, else cpu; "
                                     "under torchrun each process takes its local GPU)")
    a("--seed", type=int, default=0, help="seed for init, shuffling and augmentations (official: none)")
    a("--unseen-as-zero", action="store_true", help=wi.UNSEEN_AS_ZERO_HELP)
    a("--eval-every", type=data.nonneg_int, default=0,
      help="validate every N epochs as well (official validates every epoch; 0 = only at the end)")
    a("--resume", action="store_true", help="continue bit-exactly from --out/ckpt_last.pth (same flags)")
    a("--overwrite", action="store_true", help="start over in an --out that already holds a run (its results, log "
                                               "and checkpoints are deleted first)")
    a("--eval-only", action="store_true", help="only evaluate --ckpt (a finetuned checkpoint) on the val split")
    return p.parse_args(argv)


def paper_recipe(data_name, fraction, official_kitti_epochs=False):
    """(epochs, warmup epochs, layer decay) of Supp. B.4 (ScaLR configs/downstream/*/WI_768_finetune_*.yaml)."""
    if fraction < 1.0:
        epochs, decay = 45, 0.95  # Supp. B.4: "45 epochs ... 0.95 when using 1% and 10% of available data"
    else:
        epochs, decay = 25, 0.99  # Supp. B.4: "25 epochs and a layer decay parameter of 0.99" for 100 %
        if official_kitti_epochs and data.label_space(data_name) == "semantic_kitti":
            # official KITTI 100 % config (ScaLR configs/downstream/semantic_kitti/WI_768_finetune_100p.yaml):
            epochs = 10  # 10 epochs, 1 warmup epoch
    # Supp. B.4: warmup "during the first tenth of epochs" (official configs: 45 -> 4, 25 -> 2, 10 -> 1)
    return epochs, epochs // 10, decay


def toy_epochs(iters_per_epoch):
    """Toy budget: ~TOY_ITERS iterations whatever the fraction (the toy world has 48 train scans: 10 % = 5 scans =
    1 iteration per epoch), i.e. a few minutes for the toy WI-6-64 on 2 CPU cores, where one iteration of 5 scans
    of ~13k points costs a few seconds. Pretrained and --scratch get the same number of updates. Chosen on cost,
    never on val."""
    return max(1, math.ceil(TOY_ITERS / max(1, iters_per_epoch)))


def pct(fraction):
    return f"{fraction * 100:g}%"


def is_toy(args):
    return data.is_toy(args.data, args.root)


def default_out(args):
    name = "runs/finetune" + ("" if args.data == "toy" else f"_{args.data}")
    if args.subset_file is not None:
        name += f"_{Path(args.subset_file).stem}"
    elif args.fraction is not None and args.fraction < 1.0:
        name += f"_{args.fraction * 100:g}pct"
    return name + ("_scratch" if args.scratch else "")


# ----------------------------------------------------------------------------------------------------------------
# Data: the labelled subset (1 % / 10 % / 100 %) and the val split.
# ----------------------------------------------------------------------------------------------------------------
def open_split(args, split):
    """One labelled split; says clearly when it has no labels or no scan."""
    return data.open_labelled_split(args.data, split, root=args.root, version=args.version, purpose="finetuning")


def check_subset_file(path):
    """--subset-file must exist: checked at start, before any dataset is read."""
    if path is not None and not Path(path).is_file():
        raise data.UserError(f"subset file {path} not found", "--subset-file",
                             "pass the path of a scan list (e.g. the official nuscenes-ratio_100-v_0.npy) or drop "
                             "the flag")


def subset_from_file(train_ds, subset_file, out_dir=None):
    """Sorted indices of the train scans named in `subset_file` (data.py matches entries to scan ids / lidar file
    names / tokens); the list is written to out_dir/subset_<dataset>_list.txt."""
    keep = sorted(data._indices_from_subset_file(train_ds, subset_file))
    if not keep:
        raise data.UserError(f"no entry of {subset_file} names a scan of the {train_ds.name} train split",
                             "--subset-file", "check that the list belongs to this dataset, split and --version")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / f"subset_{train_ds.name}_list.txt").write_text(
            "".join(train_ds.scan_id(i) + "\n" for i in keep))
    return keep


def training_subset(train_ds, fraction, subset_file=None, out_dir=None):
    """Indices of the labelled scans. With `subset_file`: exactly the scans of that list (the official 1 % / 10 %
    lists of the ScaLR release), whatever `fraction` says (a --fraction the list does not match is warned about).
    Otherwise data.label_subset (KITTI every 100th file / documented rule); refuses a fraction whose subset would
    hold less than one scan, saying how many scans it would take. fraction None = 1.0."""
    n = len(train_ds)
    if subset_file is not None:
        keep = subset_from_file(train_ds, subset_file, out_dir if wi.is_main() else None)
        if fraction is not None and abs(len(keep) - fraction * n) > max(1.0, 0.1 * fraction * n):
            data.warn(f"--subset-file {subset_file} holds {len(keep)} of {n} train scans ({len(keep) / n:.2%}), "
                      f"not the {pct(fraction)} of --fraction: training on the list, recording its real fraction")
        return keep
    fraction = 1.0 if fraction is None else fraction
    if fraction < 1.0 and n * fraction < 1.0:
        raise SystemExit(f"--fraction {fraction:g} of the {n} train scans of {train_ds.name} is {n * fraction:.2f} "
                         f"scans: the subset would be empty. A {pct(fraction)} subset needs at least "
                         f"{math.ceil(1 / fraction)} train scans; with {n} scans use --fraction >= {1 / n:.3g}.")
    try:
        return data.label_subset(train_ds, fraction, out_dir=out_dir if wi.is_main() else None)
    except ValueError as err:
        raise SystemExit(f"label subset: {err}") from None


def fit_batch_size(batch_size, num_scans, world):
    """Official drop_last=True (ScaLR finetune.py): a subset smaller than one global batch gives no step at all.
    Shrink the batch to the largest multiple of the number of processes that fits (printed), or explain what to do."""
    if num_scans >= batch_size:
        return batch_size
    fitted = num_scans - num_scans % world
    if fitted < world:
        raise SystemExit(f"the labelled subset has {num_scans} scans, fewer than the {world} processes: use a "
                         f"larger --fraction or fewer GPUs")
    wi.print0(f"NOTE: the labelled subset has {num_scans} scans < --batch-size {batch_size}; using batch {fitted}")
    return fitted


def segmentation_loader(ds, cfg, args, train, subset=None):
    """make_loader over SegmentationDataset: global batch split over ranks, shuffle + drop_last for training
    (as ScaLR finetune.py), every val scan exactly once (no DistributedSampler padding)."""
    seg = data.SegmentationDataset(ds, cfg, train=train, subset=subset, seed=args.seed)
    return data.make_loader(seg, args.batch_size, train=train, collate_fn=data.collate, seed=args.seed,
                          workers=args.workers)


# ----------------------------------------------------------------------------------------------------------------
# Model: strict load of the pretrain-shaped network, stochastic depth, downstream head (ScaLR finetune.py).
# ----------------------------------------------------------------------------------------------------------------
def segmentation_classes(head):
    """Number of classes of an official downstream head (BatchNorm1d + Conv1d), else None (a distillation head:
    Conv1d(F -> 1024) or the ScaLR+ MLP); waffleiron.head_kind is the one head detector."""
    kind, outputs = wi.head_kind(head)
    return outputs if kind == "seg" else None


def set_drop_path(model, rate):
    """Stochastic depth with the SAME rate in every block (WaffleIron backbone.py: no linear ramp over depth);
    returns the rates of the 2L residual branches, block by block (SpatialMix_i, ChannelMix_i)."""
    rates = []
    for spatial, channel in zip(model.waffleiron.spatial_mix, model.waffleiron.channel_mix):
        for mix in (spatial, channel):
            mix.drop_path.p = float(rate)  # waffleiron.DropPath: drops a whole scan's residual branch
            rates.append(mix.drop_path.p)
    model.config["drop_path"] = float(rate)
    return rates


def attach_segmentation_head(model, num_classes, ckpt):
    """As in ScaLR finetune.py, the pretraining head is replaced by BN + zero-init Conv1d(F -> K). A checkpoint
    that already has a K-class segmentation head (e.g. probe.py's or ours) keeps it; one with another class count
    is re-initialised with a WARNING, never silently kept."""
    have = segmentation_classes(model.classif)
    if have == num_classes:
        wi.print0(f"keeping the {have}-class segmentation head of {ckpt}")
        return model
    if have is not None:
        msg = (f"WARNING: the segmentation head of {ckpt} has {have} classes but the dataset has {num_classes}: "
               f"the head is RE-INITIALISED (BN + zero-init Conv1d, as in ScaLR); only the backbone is reused")
        warnings.warn(msg, HeadReinitialisedWarning, stacklevel=2)
        wi.print0(msg)
    else:
        wi.print0(f"as in ScaLR: pretraining head of {ckpt} discarded -> BatchNorm1d({wi.backbone_width(model)}) + "
                  f"zero-init Conv1d({wi.backbone_width(model)} -> {num_classes})")
    model.set_head(wi.seg_head(wi.backbone_width(model), num_classes))
    return model


def build_model(args, cfg, num_classes):
    """Pretrained (or, with --scratch, randomly initialised) WaffleIron with drop path and the downstream head.
    Returns (model, checkpoint whose weights are used or None, where the architecture came from)."""
    ckpt = wi.resolve_backbone_checkpoint(args.ckpt, "--scratch", args.scratch)
    if ckpt is not None and not args.scratch:
        # ScaLR finetune.py: strip 'module.', build the pretrain-shaped model, load_state_dict(strict=True)
        model = wi.load_checkpoint(ckpt, grids=cfg.grids)
        wi.check_backbone_shape(model, ckpt, args.width, args.depth)
        model = attach_segmentation_head(model, num_classes, ckpt)
        arch_from = ckpt
    else:
        if ckpt is not None:  # --scratch: the architecture of the checkpoint, none of its weights
            shape = wi.load_checkpoint(ckpt, grids=cfg.grids)
            width, depth = wi.backbone_width(shape), wi.backbone_depth(shape)
            arch_from = f"the architecture of {ckpt}"
        else:
            width, depth = wi.default_architecture(args.data)  # toy: WI-6-64; else WI-48-768
            width, depth = args.width or width, args.depth or depth
            arch_from = f"--width {width} --depth {depth}"
        torch.manual_seed(args.seed)
        model = wi.WaffleIron(input_channels=5, feat_channels=width, depth=depth, nb_class=num_classes,
                              grids=cfg.grids, layer_norm=True, drop_path=args.drop_path)
        model.set_head(wi.seg_head(width, num_classes))  # ScaLR finetune.py head, also for the baseline
    set_drop_path(model, args.drop_path)
    return model, (None if args.scratch else ckpt), arch_from


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and results (ScaLR utils/finetuner.py): a thin layer over waffleiron.evaluate.
# ----------------------------------------------------------------------------------------------------------------
def evaluate_split(model, ds, cfg, args, device):
    """((K, K) confusion matrix over every original point of the scorable scans of `ds`, number of scans skipped
    because they cannot be scored, both summed over DDP ranks; number of scans evaluated). Val preprocessing:
    deterministic voxel point, no point limit, 1-NN upsampling (ScaLR datasets/pc_dataset.py)."""
    subset = list(range(min(len(ds), args.val_scans))) if args.val_scans else None
    seg = data.ScorableScans(data.SegmentationDataset(ds, cfg, train=False, subset=subset))
    batches = data.ScoredBatches(data.make_loader(seg, args.batch_size, train=False,
                                                   collate_fn=data.collate_scorable, seed=args.seed,
                                                   workers=args.workers))
    cm = wi.evaluate(model, batches, len(ds.class_names), device, amp=args.amp)
    return cm, int(wi.all_reduce_sum(torch.tensor(len(batches.skipped))).item()), len(seg)


def report_skipped(skipped, scanned, extra):
    """Unscorable val scans: counted in results.json and printed next to the mIoU (the mIoU covers the others)."""
    extra.update(val_scans_skipped=skipped, val_scans_scored=scanned - skipped)
    if skipped:
        data.warn(f"{skipped} of {scanned} val scans could not be scored and were skipped: the mIoU below is over "
                  f"the other {scanned - skipped}")
    return extra


def eval_only(args, device):
    """--eval-only: a finetuned checkpoint (ours: {'net', 'config'}; released ScaLR: 'net' with 'module.') on val."""
    if args.ckpt is None or not Path(args.ckpt).is_file():
        raise SystemExit(f"--eval-only needs --ckpt PATH of a finetuned checkpoint; not found: {args.ckpt}")
    cfg, grid_text = wi.stage_grid(args.data, "finetune", args.cell, args.knn, args.ckpt)
    print(grid_text)
    val_ds = open_split(args, "val")
    names = list(val_ds.class_names)
    model = wi.load_checkpoint(args.ckpt, grids=cfg.grids)
    have = segmentation_classes(model.classif)
    if have is None:
        raise SystemExit(f"{args.ckpt} has no segmentation head (a pretraining checkpoint?): finetune it first "
                         f"(python finetune.py --ckpt {args.ckpt}) or probe it (probe.py).")
    if have != len(names):
        raise SystemExit(f"{args.ckpt} predicts {have} classes but {args.data} has {len(names)} "
                         f"({data.label_space(args.data)}): evaluate it on the dataset it was finetuned on.")
    t0 = time.time()
    cm, skipped, scanned = evaluate_split(model.to(device), val_ds, cfg, args, device)
    if wi.is_main():
        print(f"evaluated {scanned} val scans in {time.time() - t0:.0f}s")
        config = wi.checkpoint_config(args.ckpt)
        extra = report_skipped(skipped, scanned, {"ckpt": str(args.ckpt), "data": args.data,
                                                  "fraction": config.get("fraction"), "eval_only": True})
        # the classes its training never saw, if the checkpoint says (ours do; released ones: every class counts)
        counts = config.get("train_counts")
        wi.segmentation_report(cm, names, args.out, title=f"{args.data}: finetuned checkpoint", extra=extra,
                               train_counts=counts, unseen_as_nan=not args.unseen_as_zero)


# ----------------------------------------------------------------------------------------------------------------
# Training loop (Supp. B.4) with atomic checkpoints and bit-exact --resume.
# ----------------------------------------------------------------------------------------------------------------
# settings a --resume must share with the run it continues (wi.check_resume_config lists every one that differs)
RESUME_KEYS = ("data", "fraction", "subset_file", "ckpt", "scratch", "width", "depth", "k", "cell", "epochs",
               "warmup_epochs", "batch_size", "lr", "min_lr", "weight_decay", "layer_decay", "drop_path", "seed",
               "num_train_scans", "max_points", "amp")


def finetune_config(args, model, ckpt, class_names, num_train_scans, cfg):
    """config.json / the 'config' of every checkpoint. 'fraction' is the fraction of the train split REALLY
    trained on (len(subset) / train scans), 'fraction_requested' the flag; 'stage' lets other stages refuse it."""
    return {"stage": "finetune", "data": args.data, "fraction": args.fraction_used,
            "fraction_requested": args.fraction, "subset_file": args.subset_file, "ckpt": ckpt,
            "scratch": args.scratch, "k": cfg.k, "cell": data.cell_size(cfg), "grids": [list(g) for g in cfg.grids],
            "width": wi.backbone_width(model), "depth": wi.backbone_depth(model), "num_classes": len(class_names),
            "class_names": list(class_names), "num_train_scans": num_train_scans, "epochs": args.epochs,
            "warmup_epochs": args.warmup_epochs, "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.min_lr,
            "weight_decay": args.weight_decay, "layer_decay": args.layer_decay, "drop_path": args.drop_path,
            "seed": args.seed, "max_points": args.max_points, "amp": args.amp,
            "model": dict(model.config),  # WaffleIron constructor arguments (read back by load_checkpoint)
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


class Run(NamedTuple):
    """The fixed parts of a finetuning run, built once by setup_training()."""
    args: argparse.Namespace
    model: torch.nn.Module  # the network (official names), as saved
    net: torch.nn.Module    # the same, DDP-wrapped with several processes
    opt: torch.optim.Optimizer
    sched: object           # warmup + cosine LambdaLR, stepped every iteration (Supp. B.4)
    scaler: object          # GradScaler (--amp fp16) or a no-op
    loader: torch.utils.data.DataLoader
    log: "wi.CSVLog"
    val_ds: object
    cfg: "data.GridConfig"
    config: dict            # config.json, stored in every checkpoint
    device: torch.device
    out: Path
    per_epoch: int          # iterations per epoch
    stop: int               # iteration to stop at (the budget, or --max-iters)
    total: int              # iterations of the whole schedule


@dataclass
class Progress:
    """Where the loop is and what it has counted: saved in every ckpt_last.pth, restored by --resume."""
    it: int = 0                        # optimizer steps done (epoch and batch follow from it)
    counts: np.ndarray = None          # labelled training points seen per class (classes training never saw)


def train_step(run, batch, it):
    """One AdamW step on CE + Lovász; returns (loss, {'ce', 'lovasz'}, lr of the head group used)."""
    device, amp = run.device, run.args.amp
    inputs = [batch[k].to(device, non_blocking=True) for k in ("feat", "cells", "neighbors", "occupied")]
    labels = batch["labels"].to(device)  # (ΣM,) kept points of every scan, concatenated
    with wi.autocast_context(device, amp):
        out = run.net(*inputs)  # (B, K, Nmax)
    logits = wi.unpad_points(out, batch["num_points"])  # (ΣM, K), the order of `labels`
    # ScaLR utils/metrics.py: CE (ignore 255) + 1.0 * Lovász-softmax
    loss, parts = wi.seg_loss(logits, labels, return_parts=True)
    wi.check_finite(loss, it + 1)  # 1-based, as log.csv
    lr = run.opt.param_groups[-1]["lr"]  # the lr of this step, head group (layer id L + 1, scale 1); the first is 0
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.opt)
    run.scaler.update()
    run.sched.step()  # ScaLR utils/finetuner.py: stepped every iteration
    return loss, parts, lr


def train(run, p):
    """Supp. B.4 finetuning, distill.train's shape: epochs of AdamW steps until run.stop, data.set_epoch skipping
    the batches a resumed run already did, ckpt_last.pth after every epoch (and --eval-every validations)."""
    args = run.args
    bar = tqdm(total=run.stop, initial=p.it, desc="finetune", disable=not wi.is_main())
    while p.it < run.stop:
        epoch, done = divmod(p.it, run.per_epoch)
        data.set_epoch(run.loader, epoch, batches_done=done)  # mid-epoch resume skips the batches already seen
        run.net.train()
        for batch in run.loader:
            loss, parts, lr = train_step(run, batch, p.it)
            p.it += 1
            p.counts += wi.label_counts(batch["labels"], len(p.counts))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            loss = wi.all_reduce_mean(loss.detach())  # the loss of the global batch (rank 0 logs it)
            run.log.log(epoch=epoch, iteration=p.it, lr=lr, loss=loss.item(), **parts)
            if p.it >= run.stop:
                break
        save_state(run, p)  # after every epoch and when stopping early (--max-iters)
        if args.eval_every and p.it % run.per_epoch == 0 and (p.it // run.per_epoch) % args.eval_every == 0 \
                and p.it < run.total:
            miou = wi.summarise_confusion(evaluate_split(run.model, run.val_ds, run.cfg, args, run.device)[0],
                                          run.config["class_names"], p.counts, not args.unseen_as_zero)["miou"]
            run.log.log(epoch=epoch, iteration=p.it, val_miou=miou)
            wi.print0(f"epoch {epoch + 1}: val mIoU {miou:.1f}")
    bar.close()


def make_optimizer(model, args, iters_per_epoch):
    """AdamW over layer-decay groups (Supp. B.4, ScaLR finetune.py) + per-iteration warmup-cosine LambdaLR
    (ScaLR utils/scheduler.py)."""
    groups = wi.layer_decay_param_groups(model, args.lr, args.layer_decay, args.weight_decay)
    opt = wi.make_adamw(groups, lr=args.lr, weight_decay=args.weight_decay)
    # Supp. B.4: LR 0 -> lr during the first tenth of the epochs, then cosine to min_lr (= 0)
    sched = wi.make_scheduler(opt, warmup_iters=round(args.warmup_epochs * iters_per_epoch),
                              total_iters=args.epochs * iters_per_epoch, min_lr=args.min_lr, base_lr=args.lr)
    return opt, sched


def setup_training(args, model, train_loader, val_ds, cfg, config, device, out, st=None):
    """The Run of a finetuning (optimizer over layer-decay groups, schedule, scaler, log) and its Progress,
    continued from the training state `st` of --resume if given."""
    ipe = len(train_loader)
    opt, sched = make_optimizer(model, args, ipe)
    scaler = wi.make_grad_scaler(args.amp, device)
    total = args.epochs * ipe
    p = Progress(counts=np.zeros(len(config["class_names"]), dtype=np.int64))
    if st is not None:
        _, p.it = wi.restore_training_state(st, model, opt, sched, scaler, model_key="net")
        p.counts = np.asarray(st.get("train_counts", p.counts), dtype=np.int64)
        wi.print0(f"resumed from {out / 'ckpt_last.pth'} at iteration {p.it} (epoch {p.it // ipe}, batch "
                  f"{p.it % ipe})")
    log = wi.CSVLog(out / "log.csv", ["epoch", "iteration", "lr", "loss", "ce", "lovasz", "val_miou"],
                    resume_iteration=p.it if st is not None else None)
    run = Run(args=args, model=model, net=wi.wrap_ddp(model, device), opt=opt, sched=sched, scaler=scaler,
              loader=train_loader, log=log, val_ds=val_ds, cfg=cfg, config=config, device=device, out=out,
              per_epoch=ipe, stop=min(total, args.max_iters) if args.max_iters else total, total=total)
    return run, p


def save_state(run, p):
    """ckpt_last.pth (resume state, atomic); every rank calls it (RNG states are gathered), rank 0 writes."""
    state = wi.training_state(run.model, run.opt, run.sched, run.scaler, p.it // run.per_epoch, p.it,
                              model_key="net", config=run.config, extra={"train_counts": p.counts.tolist()})
    if wi.is_main():
        wi.save_checkpoint(run.out / "ckpt_last.pth", **state)


def resolve_budget(args, num_train_scans, world):
    """Supp. B.4 recipe (or the toy budget), printed in one line."""
    epochs, warmup, decay = paper_recipe(args.data, args.fraction_used, args.official_kitti_epochs)
    args.layer_decay = decay if args.layer_decay is None else args.layer_decay
    args.batch_size = fit_batch_size(args.batch_size, num_train_scans, world)
    ipe = num_train_scans // args.batch_size  # drop_last=True
    source = "Supp. B.4"
    if args.epochs is None:
        args.epochs = toy_epochs(ipe) if is_toy(args) else epochs
        source = f"toy budget ~{TOY_ITERS} iterations" if is_toy(args) else source
    if args.warmup_epochs is None:
        # Supp. B.4: "during the first tenth of epochs" (official configs round down: 4 of 45, 2 of 25, 1 of 10);
        # the toy's few epochs keep the exact tenth (a fraction of an epoch, counted in iterations)
        args.warmup_epochs = args.epochs / 10 if is_toy(args) else args.epochs // 10
    wi.print0(f"budget ({source}): {args.epochs} epochs x {ipe} it = {args.epochs * ipe} iterations, warmup "
              f"{args.warmup_epochs:g} epochs = {round(args.warmup_epochs * ipe)} it, batch {args.batch_size}, lr "
              f"{args.lr} -> {args.min_lr}, layer decay {args.layer_decay}, drop path {args.drop_path}, wd "
              f"{args.weight_decay}, amp {args.amp}"
              + (f"; stopping after {args.max_iters} iterations (--max-iters)" if args.max_iters else ""))


def finish(args, model, ckpt, class_names, val_ds, cfg, config, device, out, iters, t0, counts=None):
    """model.pth FIRST (a finished training is never lost to a late failure), then the val evaluation (scans
    that cannot be scored are skipped, counted and reported next to the mIoU), the plots and results.json."""
    if wi.is_main():
        saved = dict(config, train_counts=None if counts is None else np.asarray(counts).tolist())
        wi.save_checkpoint(out / "model.pth", net=wi.official_state_dict(model), config=saved)
    t1 = time.time()
    cm, skipped, scanned = evaluate_split(model, val_ds, cfg, args, device)
    t2 = time.time()
    if not wi.is_main():
        return
    wi.plot_log(out / "log.csv", out / "loss.png", ["loss", "ce", "lovasz", "lr"],
                title=f"finetuning, {args.data}, {pct(args.fraction_used)} labels")
    total = max(t2 - t0, 1e-9)
    print(f"finetuning took {total:.0f}s: training {t1 - t0:.0f}s ({100 * (t1 - t0) / total:.0f}%, {iters} "
          f"iterations, {1000 * (t1 - t0) / max(iters, 1):.0f} ms/it) + evaluation {t2 - t1:.0f}s "
          f"({100 * (t2 - t1) / total:.0f}%); outputs in {out}")
    title = f"{args.data}: finetuning on {pct(args.fraction_used)} labels ({'scratch' if args.scratch else ckpt})"
    extra = report_skipped(skipped, scanned, {
        "ckpt": None if ckpt is None else str(ckpt), "data": args.data, "fraction": args.fraction_used,
        "fraction_requested": args.fraction, "subset_file": args.subset_file, "scratch": args.scratch,
        "num_train_scans": config["num_train_scans"], "iterations": iters})
    wi.segmentation_report(cm, class_names, out, title=title, extra=extra, train_counts=counts,
                           unseen_as_nan=not args.unseen_as_zero)


def main(argv=None):
    args = parse_args(argv)
    check_subset_file(args.subset_file)
    if args.workers is None:
        args.workers = 0 if is_toy(args) else 4
    if args.out is None:
        args.out = default_out(args) if not args.eval_only else str(Path(args.ckpt or ".").parent / "eval")
    rank, world, device = wi.setup_device(args.device)
    out = Path(args.out)
    # before any data is read: an existing run is never overwritten by accident, --out must be writable
    wi.prepare_run_dir(out, args.resume and not args.eval_only, args.overwrite)
    if args.eval_only:
        eval_only(args, device)
        return wi.ddp_cleanup()
    # the grid (cell size, kNN k) the backbone was distilled with, unless --cell / --knn say otherwise
    cfg, grid_text = wi.stage_grid(args.data, "finetune", args.cell, args.knn,
                                   wi.resolve_backbone_checkpoint(args.ckpt, "--scratch", args.scratch))
    wi.print0(grid_text)
    if args.max_points is not None:
        cfg.max_points = args.max_points
    train_ds, val_ds = open_split(args, "train"), open_split(args, "val")
    class_names = list(val_ds.class_names)
    subset = training_subset(train_ds, args.fraction, args.subset_file, out)
    args.fraction_used = len(subset) / len(train_ds)  # what is really trained on, recorded everywhere
    wi.print0(f"label subset: {len(subset)} of {len(train_ds)} {args.data} train scans = {pct(args.fraction_used)}"
              + (f" (from {args.subset_file})" if args.subset_file else "")
              + (f", --fraction {args.fraction:g} requested" if args.fraction is not None else "")
              + f"; {len(val_ds)} val scans; {len(class_names)} classes")
    resolve_budget(args, len(subset), world)
    model, ckpt, arch_from = build_model(args, cfg, len(class_names))
    model = model.to(device)
    wi.seed_everything(args.seed + rank)  # after the init: ranks draw different augmentations (train RNG streams)
    wi.print0(f"WI-{wi.backbone_depth(model)}-{wi.backbone_width(model)} "
              f"({'random init, ' + arch_from if args.scratch else 'weights of ' + str(ckpt)})")
    config = finetune_config(args, model, ckpt, class_names, len(subset), cfg)
    st = wi.read_resume_checkpoint(out / "ckpt_last.pth", config, "finetune", RESUME_KEYS) if args.resume \
        else None  # before any training
    if wi.is_main():
        (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    t0 = time.time()
    train_loader = segmentation_loader(train_ds, cfg, args, train=True, subset=subset)
    run, p = setup_training(args, model, train_loader, val_ds, cfg, config, device, out, st)
    try:
        train(run, p)
    except FloatingPointError as err:  # as distill.py: one line, the last good ckpt_last.pth kept
        raise SystemExit(wi.diverged_message(err, out)) from None
    finish(args, model, ckpt, class_names, val_ds, cfg, config, device, out, p.it, t0, wi.all_reduce_sum(p.counts))
    wi.ddp_cleanup()


if __name__ == "__main__":
    data.run_main(main)
