"""data.py — every dataset, camera projection, point preprocessing and metric of ScaLR.

ScaLR (CVPR 2024) distils image features (DINOv2) into a lidar backbone (WaffleIron) on four lidar datasets.
This file is the ground every stage stands on; its sections, in order:
  [data] Bad input                        UserError and run_main: one `error:` line and exit status 2 for every
                                          script; the argparse value types; HelpFormatter (first: every reader
                                          below raises these errors)
  [data] Constants, class maps, splits    class names and raw->K maps (ScaLR datasets/*_for_scalr.py, Supp. B.1),
                                          intensity stats, splits, GridConfig / grid_config (ScaLR configs/)
  [data] Readers of the native layouts    nuScenes (JSON tables, lidarseg), SemanticKITTI, PandaSet (pkl.gz,
                                          poses, GPS split), merged (Supp. B.2); 1 %/10 % subsets
  [data] Camera projections               lidar -> pixel (u = column, v = row) + depth (ScaLR datasets/*_for_scalr.py)
  [data] Point preprocessing              voxelize, crop, features, cells, kNN, augmentations, prepare_scan
                                          (ScaLR datasets/pc_dataset.py, utils/transforms.py)
  [data] Torch datasets and collate       SegmentationDataset, collate with padding (ScaLR datasets/pc_dataset.py)
  [data] Loaders                          EpochSampler, make_loader, set_epoch: one sampler for every stage
  [data] Metrics                          confusion matrix, per-class IoU, mIoU (ScaLR utils/metrics.py)
  [data] Preprocessing on the device      the same voxelisation, crop, cells and kNN in torch, for a whole batch
  [data] Benchmark and CLI                --bench, --make-toy, inspect / splits / subset commands
  Appendix [toy]: the embedded toy world  procedural streets written as nuScenes / SemanticKITTI files (used only
                                          through get_dataset('toy') and the CLI)

Commands:
  python data.py --make-toy data/toy                       # toy world (nuscenes/ + semantic_kitti/)
  python data.py --toy-preview docs/toy_scan.png            # README's picture of a toy scan
  python data.py --bench                                    # ms per preprocessing step, 20k / 35k points
  python data.py inspect --data nuscenes --root R --version v1.0-mini --sample TOKEN --out DIR
  python data.py inspect --data pandaset64 --root R --index 0 --out DIR --colour label
  python data.py splits --data pandaset64 --root R --split train --out DIR   # print + save a split's scan list
  python data.py subset --data semantic_kitti --root R --split train --fraction 0.01 --out DIR   # 1 % labels
"""
import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ==== [data] Bad input: one line, exit status 2 ====
# Every stage runs its main() through `run_main`: a bad input (a missing / truncated / corrupt file, a wrong flag)
# ends the process with ONE line on stderr, `error: <what is wrong> (<which file / flag>): <what to do>`, exit
# status 2, and no traceback. SCALR_DEBUG=1 in the environment shows the traceback instead (for developers).
class UserError(Exception):
    """A bad input the user can fix. str(e) = '<what> (<where>): <todo>'."""

    def __init__(self, what, where=None, todo=None):
        self.what, self.where, self.todo = what, where, todo
        super().__init__(what + (f" ({where})" if where else "") + (f": {todo}" if todo else ""))


def warn(message):
    """One `warning: ...` line on stderr (data problems that were handled: dropped points, skipped files)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def describe_error(err):
    """The one line printed for an exception escaping a stage's main() (always a single line: an error re-raised
    from a DataLoader worker carries the worker's whole traceback in its message; its last line is the error)."""
    text = _describe_error(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _describe_error(err):
    import errno
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return (f"no space left on the device ({err.filename or 'while writing'}): free some space or pass another "
                f"--out; the previous checkpoint, if any, is intact")
    if isinstance(err, OSError) and (err.filename or err.strerror):
        return f"{err.strerror or err} ({err.filename}): check the path and its permissions"
    if isinstance(err, KeyError):
        return (f"missing entry {err.args[0] if err.args else ''!r} (an input file is incomplete or of another "
                f"format): check the dataset files; SCALR_DEBUG=1 shows where it was read")
    if isinstance(err, (ValueError, EOFError)):
        return str(err) or type(err).__name__
    return (f"unexpected {type(err).__name__}: {err} (internal): rerun with SCALR_DEBUG=1 to see the traceback and "
            f"report it")


def run_main(main, *args, **kwargs):
    """Call a stage's main(); turn any escaping error into one `error:` line and exit status 2."""
    if not os.environ.get("SCALR_DEBUG"):  # a warning is one `warning: ...` line too (no file:line, no source)
        warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    try:
        return main(*args, **kwargs)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C): rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
    except SystemExit as err:
        if os.environ.get("SCALR_DEBUG") and isinstance(err.code, str):
            raise
        if isinstance(err.code, str):  # raise SystemExit("...") anywhere: still one line, status 2
            text = err.code.strip()
            print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise
    except Exception as err:  # noqa: BLE001 - the point of this function
        if os.environ.get("SCALR_DEBUG"):
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr, flush=True)
        sys.exit(2)


# argparse `type=` checks: a bad value is refused by argparse itself (usage line + `error:`, exit 2) before any
# data is read.
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help of every script: the module docstring as written, and "(default: X)" after each flag whose help
    does not already say its default. A flag whose default is decided after parsing (None here: it depends on the
    dataset or the preset) spells out its values in its help text; on/off switches show nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def _number_type(cast, low, strict, what):
    def check(text):
        import argparse
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value
    check.__name__ = what
    return check


positive_int = _number_type(int, 0, True, "a positive integer")
nonneg_int = _number_type(int, 0, False, "a non-negative integer (0 or more)")
positive_float = _number_type(float, 0.0, True, "a positive number")
nonneg_float = _number_type(float, 0.0, False, "a non-negative number")


def image_size_type(text):
    """'H,W' (e.g. 224,448) -> (H, W), both positive multiples of nothing in particular; argparse type."""
    import argparse
    try:
        h, w = (int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not H,W (two positive integers, e.g. 224,448)") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: H and W must be positive (e.g. 224,448)")
    return h, w


# ==== [data] Constants, class maps, splits ====
IGNORE = 255  # ScaLR datasets/*_for_scalr.py: raw labels -> 0..K (0 = ignore), then -1, and -1 becomes 255

# --- Final class names, in index order (CLASS_NAME of ScaLR datasets/*_for_scalr.py; Supp. B.1 for PandaSet) ---
CLASS_NAMES = {
    "nuscenes": ["barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
                 "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
                 "manmade", "vegetation"],
    "semantic_kitti": ["car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
                       "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
                       "vegetation", "trunk", "terrain", "pole", "traffic-sign"],
    "pandaset": ["road", "traffic sign", "barrier", "pedestrian", "vegetation", "road marking", "sidewalk",
                 "manmade", "traffic cone", "car", "motorcycle", "truck", "bus", "bicycle", "other vehicle",
                 "ground", "driveway"],
}

# nuScenes-lidarseg: 32 raw category indices -> 0..16 (0 = ignore), ScaLR datasets/nuscenes_for_scalr.py
# (the standard devkit lidarseg-challenge mapping; the official .npy is not in git).
NUSCENES_RAW_TO_17 = [0, 0, 7, 7, 7, 0, 7, 0, 0, 1, 0, 0, 8, 0, 2, 3, 3, 4, 5, 0, 0, 6, 9, 10, 11, 12, 13, 14,
                      15, 0, 16, 0]

# SemanticKITTI learning_map (semantic-kitti.yaml), raw id -> 0..19 (0 = ignore),
# ScaLR datasets/semantic_kitti_for_scalr.py
SEMANTIC_KITTI_LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11,
    49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7,
    254: 6, 255: 8, 256: 5, 257: 5, 258: 4, 259: 5}

# PandaSet 43 raw classes (0..42) -> 0..17 (0 = ignore), MAPPING_CLASS of ScaLR datasets/pandaset_for_scalr.py
PANDASET_RAW_TO_18 = [0, 0, 0, 0, 0, 5, 16, 1, 6, 6, 6, 7, 17, 10, 12, 12, 12, 15, 11, 15, 15, 15, 0, 13, 0,
                      0, 14, 15, 15, 15, 4, 4, 0, 0, 9, 3, 2, 9, 2, 3, 0, 8, 8]


def _shifted_lut(raw_to_k, size, unknown):
    """Lookup table raw id -> final index (k-1, IGNORE for 0) of length `size`; ids absent -> `unknown`."""
    lut = np.full(size, unknown, dtype=np.int64)
    items = raw_to_k.items() if isinstance(raw_to_k, dict) else enumerate(raw_to_k)
    for raw, k in items:
        lut[raw] = IGNORE if k == 0 else k - 1  # ScaLR datasets/*_for_scalr.py: "-1 -> 255"
    return lut


# nuScenes: any raw index >= 32 maps to ignore (official: "any index >= len(table) maps to 0")
NUSCENES_LUT = _shifted_lut(NUSCENES_RAW_TO_17, 256, IGNORE)
# SemanticKITTI / PandaSet: an id outside the official table is a data error (-1 marks it; readers raise)
SEMANTIC_KITTI_LUT = _shifted_lut(SEMANTIC_KITTI_LEARNING_MAP, 1 << 16, -1)
PANDASET_LUT = _shifted_lut(PANDASET_RAW_TO_18, 43, -1)

# Intensity standardisation (i - MEAN) / STD, MEAN_INT / STD_INT of ScaLR datasets/*_for_scalr.py
INTENSITY_STATS = {
    "nuscenes": (18.742355, 22.04632),
    "semantic_kitti": (0.28613698, 0.14090556),
    "pandaset64": (18.23640649, 25.86983417),
    "pandasetgt": (23.06113565, 16.76273235),
}

DATASET_NAMES = ["toy", "toy_kitti", "nuscenes", "semantic_kitti", "pandaset64", "pandasetgt", "merged"]
SPLIT_NAMES = ("train", "val", "test", "all")  # get_dataset's splits (a nuScenes --split-file may name others)
_LABEL_SPACE = {"toy": "nuscenes", "nuscenes": "nuscenes", "toy_kitti": "semantic_kitti",
                "semantic_kitti": "semantic_kitti", "pandaset64": "pandaset", "pandasetgt": "pandaset",
                "pandaset": "pandaset"}


def label_space(name):
    """Key of CLASS_NAMES for a dataset name ('toy' -> 'nuscenes', 'pandasetgt' -> 'pandaset', ...)."""
    if name not in _LABEL_SPACE:
        raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return _LABEL_SPACE[name]


def _intensity_key(name):
    """INTENSITY_STATS key for a dataset name (toy worlds use the stats of the format they mimic)."""
    return {"toy": "nuscenes", "toy_kitti": "semantic_kitti"}.get(name, name)


# Cameras (ScaLR datasets/nuscenes_for_scalr.py / datasets/pandaset_for_scalr.py)
NUSCENES_CAMERAS = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT"]
KITTI_CAMERAS = ["image_2"]
PANDASET_CAMERAS = ["back_camera", "front_camera", "front_left_camera", "front_right_camera", "left_camera",
                    "right_camera"]

# SemanticKITTI split (semantic-kitti.yaml, ScaLR datasets/semantic_kitti_for_scalr.py)
SEMANTIC_KITTI_SPLITS = {"train": ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"], "val": ["08"],
                         "test": [f"{s:02d}" for s in range(11, 22)]}

# nuScenes scene splits (700 train / 150 val scenes of v1.0-trainval, ScaLR datasets/nuscenes_for_scalr.py).
# The official val list of nuscenes-devkit (nuscenes/utils/splits.py) as scene-number ranges; train is every
# other v1.0-trainval scene (trainval = 850 scenes = 700 train + 150 val). v1.0-mini: mini_train / mini_val.
# `split_file=` / `--split-file` overrides them (JSON {"train": [names], "val": [names]} or list_files_nuscenes.npz).
NUSCENES_VAL_RANGES = ("3 12-18 35-36 38-39 92-110 221 268-278 329-332 344-346 519-524 552-565 625-627 629-630 "
                       "632-638 770-771 775 777-778 780-784 794-800 802 904-917 919-931 962-963 966-969 971-972 "
                       "1059-1073")


def _expand_scene_ranges(ranges):
    """'3 12-14' -> ['scene-0003', 'scene-0012', 'scene-0013', 'scene-0014']."""
    names = []
    for part in ranges.split():
        lo, _, hi = part.partition("-")
        names += [f"scene-{n:04d}" for n in range(int(lo), int(hi or lo) + 1)]
    return names


NUSCENES_SPLITS = {
    "val": _expand_scene_ranges(NUSCENES_VAL_RANGES),  # 150 scenes
    "mini_train": ["scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077",
                   "scene-1094", "scene-1100"],
    "mini_val": ["scene-0103", "scene-0916"],
}

PANDASET_TRAIN_MIN_LAT = 37.6  # ScaLR datasets/pandaset_for_scalr.py: gps.json[0]['lat'] > 37.6 -> train


@dataclass
class GridConfig:
    """Field of view, 2D grids and point budget of WaffleIron (ScaLR configs/, Supp. B.2)."""
    fov_min: tuple = (-64.0, -64.0, -8.0)
    fov_max: tuple = (64.0, 64.0, 8.0)
    grids: tuple = ((256, 256), (256, 32), (256, 32))  # one 2D grid per projection plane
    dim_proj: tuple = (2, 1, 0)  # plane j is the projection along axis dim_proj[j]
    voxel: float = 0.1  # metres, voxel_size of the ScaLR configs
    k: int = 16  # neighbours in the embedding (official queries k+1 and drops self)
    max_points: int = 20000  # LimitNumPoints (train only); None = no limit

    @classmethod
    def from_string(cls, text, **kw):
        """'64,64,8:0.5' -> FOV +-64 x +-64 x +-8 m with 0.5 m cells (grids derived)."""
        fov, cell = text.split(":")
        half = [float(v) for v in fov.split(",")]
        n = [int(round(2 * h / float(cell))) for h in half]
        grids = ((n[0], n[1]), (n[0], n[2]), (n[1], n[2]))
        return cls(fov_min=tuple(-h for h in half), fov_max=tuple(half), grids=grids, **kw)


def is_toy(name, root=None):
    """The one rule for "this run is on the embedded toy world": --data toy / toy_kitti, or merged without --root
    (toy nuScenes + toy KITTI, pillar 3 in miniature). Every toy default (grid, budget, architecture) keys on it."""
    return name in ("toy", "toy_kitti") or (name == "merged" and root is None)


def grid_config(dataset, stage="pretrain"):
    """Official FOV/grid for a dataset and stage ('pretrain' | 'probe' | 'finetune'), ScaLR configs/."""
    if stage not in ("pretrain", "probe", "finetune"):
        raise ValueError(f"stage must be pretrain, probe or finetune, got {stage!r}")
    if is_toy(dataset):
        # The toy world (not in the paper): same +-64 m x +-8 m FOV, 1 m cells instead of 0.5 m, so that the
        # depthwise convolutions of the spatial mixing (the CPU bottleneck) cost 4x less on a 2-core machine.
        return GridConfig.from_string("64,64,8:1.0")  # [128,128],[128,16],[128,16]
    if stage == "pretrain" or label_space(dataset) != "pandaset":
        return GridConfig()  # +-64 m, 256 x 256 x 32 cells of 0.5 m
    if dataset == "pandasetgt" and stage == "finetune":
        return GridConfig.from_string("96,96,8:0.5")  # [384,384],[384,32],[384,32]
    return GridConfig.from_string("128,128,8:0.5")  # Pandar64 LP & FT, PandarGT LP: [512,512],[512,32],[512,32]


def cell_size(cfg):
    """Side of a grid cell in metres (the x extent of the FOV over the first plane's first axis)."""
    return (cfg.fov_max[0] - cfg.fov_min[0]) / cfg.grids[0][0]


def with_cell(cfg, cell=None, k=None):
    """Copy of `cfg` with cells of `cell` metres over the SAME FOV (grids re-derived as in from_string) and/or
    `k` embedding neighbours; None keeps the value of `cfg`."""
    import dataclasses
    new = dataclasses.replace(cfg)
    if cell is not None:
        if not cell > 0:
            raise ValueError(f"grid cell size must be > 0 metres, got {cell}")
        n = [max(1, int(round((hi - lo) / cell))) for lo, hi in zip(cfg.fov_min, cfg.fov_max)]
        new.grids = tuple((n[a], n[b]) for a, b in ((0, 1), (0, 2), (1, 2)))  # planes along z, y, x (dim_proj)
    if k is not None:
        if k < 1:
            raise ValueError(f"the embedding needs k >= 1 neighbours, got {k}")
        new.k = int(k)
    return new


def open_labelled_split(name, split, root=None, version=None, purpose="training"):
    """get_dataset for a downstream stage; SystemExit saying what to do when the split has no labels or no scan."""
    kw = {"version": version} if version else {}
    ds = get_dataset(name, root=root, split=split, **kw)
    if not getattr(ds, "has_labels", True):
        raise SystemExit(f"The {split} split of {name} (root {root}) has no labels (e.g. nuScenes v1.0-test): "
                         f"{purpose} needs labelled train and val scans. Use a labelled version, e.g. "
                         f"--version v1.0-trainval.")
    if len(ds) == 0:
        raise SystemExit(f"The {split} split of {name} (root {root}) is empty: nothing to "
                         f"{'train on' if split == 'train' else 'evaluate'}. Check --root / --version.")
    return ds


# ==== [data] Readers of the native layouts ====
# Every error of a reader is a UserError naming the file (one `error:` line through run_main). The classes below
# also derive from the built-in type a caller may catch (ValueError: bad content; FileNotFoundError: absent file).
class DataFileError(UserError, ValueError):
    """A dataset file is truncated, corrupt, incomplete or inconsistent with another file."""


class SettingError(UserError, ValueError):
    """A dataset name, split or other setting that cannot work with the data given."""


class MissingDataFileError(UserError, FileNotFoundError):
    """A dataset file or folder that the layout requires is absent."""


class NoVisiblePointError(UserError, ValueError):
    """A scan has no point inside any of its camera images (distillation can skip it)."""


class NoPointInFovError(UserError, ValueError):
    """No point of a scan is left inside the field of view after voxelization and crop."""


class MissingCameraError(UserError, FileNotFoundError):
    """A scan has no record / image for a camera (skip that camera)."""


class UnreadableImageError(MissingCameraError):
    """A camera image exists but cannot be decoded (truncated / corrupt file): skipped like a missing one."""


def _read_records(path, dtype, ncols, what):
    """Flat binary file -> (N, ncols) array; one clear line naming the file if it is missing or truncated
    (its size must be a whole number of records: a cut-off .bin is blamed on the .bin itself)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataFileError(f"{what} file not found", path, "check the dataset root and that the "
                                   "download was fully extracted")
    record = np.dtype(dtype).itemsize * ncols
    size = path.stat().st_size
    if size % record:
        raise DataFileError(f"{what} file {path.name} is truncated: {size} bytes is not a multiple of the "
                            f"{record}-byte record ({ncols} x {np.dtype(dtype).name})", path,
                            "re-download / re-extract this file")
    return np.fromfile(path, dtype=dtype).reshape(-1, ncols)


def read_records(path, dtype, ncols, what="scan"):
    """Public form of _read_records, for scan readers outside data.py (e.g. `waffleiron.py features`)."""
    return _read_records(path, dtype, ncols, what)


_NONFINITE_WARNED = set()  # files already warned about: one warning per file and process


def drop_nonfinite(points, path):
    """The ONE place where non-finite points are removed, called by every reader where it reads a scan.

    points: (N, >= 4) rows [x, y, z, intensity, ...] as read from `path`. Returns (points[keep], keep), keep =
    bool (N,) over the rows of the file (the readers filter the labels of the same file with it, so points and
    labels stay aligned). A single NaN/inf coordinate would make voxelize's grid origin min(xyz) NaN and collapse
    the scan into one voxel; a NaN intensity would reach the grids through the features. One warning per file."""
    points = np.asarray(points)
    keep = np.isfinite(points[:, :4]).all(axis=1)  # (N,)
    if keep.all():
        return points, keep
    if str(path) not in _NONFINITE_WARNED:
        _NONFINITE_WARNED.add(str(path))
        warn(f"{int((~keep).sum())} of {len(keep)} points have a NaN/inf coordinate or intensity and are dropped, "
             f"with their labels ({path})")
    return points[keep], keep


def _map_labels(raw, lut, path, count):
    """Raw label ids -> 0..K-1 / IGNORE with checks: count == number of points, every id in the official table."""
    if len(raw) != count:
        raise DataFileError(f"label file {Path(path).name} has {len(raw)} labels but the scan has {count} points",
                            path, "the label file does not belong to this scan, or one of them is corrupt")
    raw = raw.astype(np.int64)
    bad = (raw < 0) | (raw >= len(lut))
    mapped = np.where(bad, -1, lut[np.clip(raw, 0, len(lut) - 1)])
    if (mapped < 0).any():
        unknown = np.unique(raw[mapped < 0])[:10].tolist()
        raise DataFileError(f"label file {Path(path).name} contains ids {unknown} that are not in the official "
                            f"class map (Supp. B.1)", path, "wrong dataset or corrupt file")
    return mapped


def _image_hw(path, default=None):
    """(H, W) from the image header (PIL, lazy); `default` when the file is missing."""
    if not Path(path).is_file():
        if default is None:
            raise MissingCameraError("camera image not found", path, "skip this camera or re-extract the images")
        return default
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError is an OSError
        raise _unreadable_image(path, err) from None


_UNREADABLE_WARNED = set()


def _unreadable_image(path, err):
    """UnreadableImageError for `path` (warned once per file: the caller skips the camera and counts it)."""
    if str(path) not in _UNREADABLE_WARNED:
        _UNREADABLE_WARNED.add(str(path))
        warn(f"camera image cannot be decoded ({type(err).__name__}: {err}), skipped like a missing one ({path})")
    return UnreadableImageError(f"camera image cannot be decoded ({type(err).__name__}: {err})", path,
                                "re-extract the images; the camera is skipped meanwhile")


def _load_image(path):
    """RGB uint8 (H, W, 3); MissingCameraError naming the file if missing, UnreadableImageError (a subclass, so
    the skip paths treat it alike) if truncated or corrupt (PIL decodes lazily: the error comes at convert)."""
    if not Path(path).is_file():
        raise MissingCameraError("camera image not found", path, "skip this camera or re-extract the images")
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise _unreadable_image(path, err) from None


def _load_json(path, what, todo="re-extract it from the dataset download"):
    """Parsed JSON of `path`; a file that is not valid JSON gives one line naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataFileError(f"{what} not found", path, todo)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise DataFileError(f"{what} is not valid JSON ({err.msg})", f"{path}, line {err.lineno} column "
                            f"{err.colno}", todo) from None
    except UnicodeDecodeError as err:
        raise DataFileError(f"{what} is not a UTF-8 text file ({err.reason})", path, todo) from None


def load_list_file(path, what="list file"):
    """A user-supplied list: .npy -> array, .npz -> {key: array}, anything else -> list of non-empty text lines.

    Arrays are loaded with allow_pickle=False: a pickled (object) array can run code when loaded, and the
    official ScaLR lists are plain string arrays. One line says so when a file needs pickle."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataFileError(f"{what} not found", path, "check the path")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as err:
        if "pickle" in str(err):
            raise DataFileError(f"{what} holds a pickled (object) array, which is refused: unpickling can run code",
                            path, "save it as a plain string array, e.g. np.save(path, np.asarray(entries, "
                                  "dtype=str))") from None
        raise DataFileError(f"{what} cannot be read ({err})", path, "pass a .npy / .npz of strings or a text "
                            "file with one entry per line") from None
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise DataFileError(f"{what} cannot be read ({type(err).__name__}: {err})", path,
                            "pass a .npy / .npz of strings or a text file with one entry per line") from None


def _inside_root(rel, root, where):
    """A file name of a dataset table, relative to the dataset root: refused if absolute or leaving the root
    ('../../x'), so that a table can only make the reader open files of the dataset itself."""
    parts = str(rel).replace("\\", "/").split("/")
    if os.path.isabs(str(rel)) or str(rel).startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise DataFileError(f"file name {str(rel)!r} leaves the dataset root {root}", where,
                            "the table must hold paths relative to the root; fix or re-extract it")
    return rel


class _LidarDataset:
    """Shared behaviour of the readers: points(i), labels(i), project(i, cam), scan_id(i), non-finite rows dropped."""
    name = None

    @property
    def label_space(self):
        return label_space(self.name)

    @property
    def class_names(self):
        return CLASS_NAMES[self.label_space]

    def normalize_intensity(self, intensity):
        # ScaLR datasets/pc_dataset.py: (i - MEAN) / STD per dataset / lidar
        mean, std = INTENSITY_STATS[self.name]
        return ((np.asarray(intensity, dtype=np.float32) - mean) / std).astype(np.float32)

    def points(self, i):
        """(N, 4) float32 x, y, z, intensity (native units) of scan i, rows with NaN/inf dropped (drop_nonfinite)."""
        return self._finite_scan(i)[0].copy()

    def _finite_scan(self, i):
        """(finite points (N, 4), keep (N_file,) bool) of scan i. The last scan read is kept, so that labels(i),
        which needs `keep` to stay aligned with points(i), and points(i) read the file once."""
        cached = getattr(self, "_scan_cache", None)
        if cached is None or cached[0] != i:
            pts, keep = drop_nonfinite(self._read_points(i), self.scan_file(i))
            self._scan_cache = (i, pts, keep)
        return self._scan_cache[1], self._scan_cache[2]

    def available_cameras(self, i):
        """Cameras of scan i whose image exists; a missing file gives a warning and is skipped."""
        out = []
        for cam in self.scan_cameras(i):
            path = self.image_path(i, cam)
            if Path(path).is_file():
                out.append(cam)
            else:  # Python's default warning filter shows each distinct message (= file) once
                warnings.warn(f"camera image missing, camera {cam} skipped for scan {self.scan_id(i)}: {path}")
        return out

    def project_all(self, i):
        """{cam: project(i, cam)} over available cameras; NoVisiblePointError if no point lands in any image."""
        out = {cam: self.project(i, cam) for cam in self.available_cameras(i)}
        if sum(len(p["idx"]) for p in out.values()) == 0:
            raise NoVisiblePointError(f"scan {self.scan_id(i)} has no point inside any camera image (cameras "
                                      f"with an image: {list(out) or 'none'}); skip it or check its calibration.")
        return out

    def image(self, i, cam):
        return _load_image(self.image_path(i, cam))


def _empty_split_error(what, split, root, hint, this=None):
    return DataFileError(f"{what}: split {split!r} contains no scan", root, hint + _layout_hint(root, this))


def _layout_hint(root, this=None):
    """' (this folder looks like a <dataset> root: pass --data <name>)' when `root` holds the layout of a dataset
    other than `this` (a KITTI root given as nuScenes, ...), else ''."""
    root = Path(root)
    if not root.is_dir():
        return ""
    if any(root.glob("v1.0-*")):
        guess = ("nuscenes", "nuScenes", "nuscenes")
    elif (root / "sequences").is_dir() or (root / "dataset" / "sequences").is_dir():
        guess = ("semantic_kitti", "SemanticKITTI", "semantic_kitti")
    elif any((p / "lidar").is_dir() and (p / "meta").is_dir() for p in root.iterdir() if p.is_dir()):
        guess = ("pandaset", "PandaSet", "pandaset64 or pandasetgt")
    else:
        return ""
    return "" if guess[0] == this else f" (this folder looks like a {guess[1]} root: pass --data {guess[2]})"


# Fields of each nuScenes table that this reader uses (nuScenes schema); every record is checked at load time so
# that an incomplete table ends in one line naming it, not in a KeyError in the middle of a run.
_NUSCENES_FIELDS = {
    "sample": ("token", "scene_token", "timestamp"),
    "sample_data": ("token", "sample_token", "calibrated_sensor_token", "ego_pose_token", "filename"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "sensor": ("token", "channel"),
    "ego_pose": ("token", "translation", "rotation"),
    "scene": ("token", "name"),
    "lidarseg": ("sample_data_token", "filename"),
}
_NUSCENES_TODO = "re-extract the version folder from the nuScenes download (tables of one release)"


def _nuscenes_table(folder, name, required=True):
    """Records of <folder>/<name>.json: a JSON list of objects, each with the fields in _NUSCENES_FIELDS."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        if not required:
            return []
        raise MissingDataFileError("nuScenes table missing", path, "the version folder must hold the JSON tables "
                                   "of the official download (sample.json, sample_data.json, ...)")
    records = _load_json(path, f"nuScenes table {name}.json", _NUSCENES_TODO)
    if not isinstance(records, list):
        raise DataFileError(f"nuScenes table {name}.json is a JSON {type(records).__name__}, not a list of "
                            f"records", path, _NUSCENES_TODO)
    fields = set(_NUSCENES_FIELDS.get(name, ()))
    for k, rec in enumerate(records):
        if not isinstance(rec, dict) or not fields <= rec.keys():
            missing = sorted(fields - set(rec)) if isinstance(rec, dict) else f"(a {type(rec).__name__})"
            raise DataFileError(f"record {k} of nuScenes table {name}.json lacks field(s) {missing}", path,
                                _NUSCENES_TODO)
    return records


def _nuscenes_ref(index, token, table, where):
    """index[token]; a dangling token (no record of `table` has it) gives one line naming the table and token."""
    rec = index.get(token)
    if rec is None:
        raise DataFileError(f"dangling token {token!r}: no record of nuScenes table {table}.json has it", where,
                            _NUSCENES_TODO)
    return rec


def nuscenes_scene_names(version, all_names, split, split_file=None):
    """Scene names of a split. mini: devkit lists; trainval: split_file or the official lists; test: all."""
    if split == "all":
        return sorted(all_names)
    if split_file is not None:
        lists = _load_json(split_file, "split file", "pass a JSON file {\"train\": [scene names], \"val\": [...]}")
        if not isinstance(lists, dict) or split not in lists:
            keys = sorted(lists) if isinstance(lists, dict) else f"a JSON {type(lists).__name__}, not an object"
            raise DataFileError(f"split file has no key {split!r} (keys: {keys})", split_file,
                                "pass a JSON file {\"train\": [scene names], \"val\": [...]} or another --split")
        if not isinstance(lists[split], list) or not all(isinstance(n, str) for n in lists[split]):
            raise DataFileError(f"split file entry {split!r} is not a list of scene names", split_file,
                                "list the scene names as strings, e.g. [\"scene-0001\", ...]")
        return sorted(set(lists[split]) & set(all_names))
    if "mini" in version:
        return sorted(set(NUSCENES_SPLITS.get(f"mini_{split}", [])) & set(all_names))
    if "test" in version:
        return sorted(all_names) if split == "test" else []
    if split == "test":
        return []
    # v1.0-trainval: official val list; train = the other trainval scenes (700 on the full release)
    val = sorted(set(NUSCENES_SPLITS["val"]) & set(all_names))
    names = sorted(all_names)
    return val if split == "val" else sorted(set(names) - set(val))


def _official_nuscenes_list(split_file, split):
    """Lidar file names of `split` in the official list_files_nuscenes.npz (keys train/val/test, entries
    (lidar path, label path, token); ScaLR datasets/nuscenes_for_scalr.py), or None when split_file is not such a
    file."""
    if split_file is None or not str(split_file).endswith(".npz"):
        return None
    lists = load_list_file(split_file, "split file")  # {key: array}, no pickle
    if split not in lists:
        raise DataFileError(f"split file has no key {split!r} (keys: {sorted(lists)})", split_file,
                            "pass the official list_files_nuscenes.npz or another --split")
    return {Path(str(e[0] if isinstance(e, (list, tuple, np.ndarray)) else e)).name for e in lists[split].tolist()}


def _find_nuscenes_version(root, version):
    root = Path(root)
    if not root.is_dir():
        raise MissingDataFileError("nuScenes root not found", root, "pass --root pointing at the folder that holds "
                                   "samples/ and v1.0-*/")
    if version is None:
        found = [v for v in ("v1.0-trainval", "v1.0-mini", "v1.0-test") if (root / v).is_dir()]
        if not found:
            raise MissingDataFileError("no nuScenes version folder (v1.0-trainval / v1.0-mini / v1.0-test)", root,
                                       "pass --root of the extracted nuScenes download"
                                       + _layout_hint(root, "nuscenes"))
        version = found[0]
    if not (root / version).is_dir():
        have = sorted(p.name for p in root.glob("v1.0-*"))
        raise MissingDataFileError(f"nuScenes version folder {version!r} not found (present: {have or 'none'})",
                                   root / version, "pass --version with one of them" + _layout_hint(root, "nuscenes"))
    return version


class NuScenes(_LidarDataset):
    """nuScenes v1.0-{trainval,mini,test} read from its JSON tables (no devkit): LIDAR_TOP keyframes,
    lidarseg labels, 6 cameras. Points in the LIDAR_TOP frame (ScaLR datasets/nuscenes_for_scalr.py)."""
    name = "nuscenes"

    def __init__(self, root, version=None, split="train", split_file=None):
        self.root = Path(root)
        self.version = _find_nuscenes_version(root, version)
        self.split = split
        folder = self.root / self.version
        tab = {n: _nuscenes_table(folder, n) for n in ("sample", "sample_data", "calibrated_sensor", "sensor",
                                                      "ego_pose", "scene")}
        self._cs = {r["token"]: r for r in tab["calibrated_sensor"]}
        self._pose = {r["token"]: r for r in tab["ego_pose"]}
        label_of = {r["sample_data_token"]: r["filename"] for r in _nuscenes_table(folder, "lidarseg", False)}
        by_sample = self._keyframes_by_sample(folder, tab)
        scene_name = {s["token"]: s["name"] for s in tab["scene"]}
        official = _official_nuscenes_list(split_file, split)  # official list_files_nuscenes.npz, if given
        keep = set(nuscenes_scene_names(self.version, scene_name.values(), split if official is None else "all",
                                        split_file if official is None else None))
        where = f"{folder / 'sample.json'}, field scene_token"
        samples = sorted((s for s in tab["sample"] if _nuscenes_ref(scene_name, s["scene_token"], "scene", where)
                          in keep), key=lambda s: (scene_name[s["scene_token"]], s["timestamp"]))
        self.scans = []  # dict(sample, lidar sd, cams {channel: sd}, label filename or None)
        for s in samples:
            sds = by_sample.get(s["token"], {})
            if "LIDAR_TOP" not in sds or (official is not None
                                           and Path(sds["LIDAR_TOP"]["filename"]).name not in official):
                continue
            cams = {c: sds[c] for c in NUSCENES_CAMERAS if c in sds}
            self.scans.append(dict(sample=s["token"], lidar=sds["LIDAR_TOP"], cams=cams,
                                   label=label_of.get(sds["LIDAR_TOP"]["token"])))
        if not self.scans:
            raise _empty_split_error(f"nuScenes {self.version}", split, self.root,
                                     f"scenes in this version: {sorted(scene_name.values())[:12]}; use "
                                     f"--split all or a --split-file that lists them", "nuscenes")
        self._check_scan_records(folder)
        self.cameras = list(NUSCENES_CAMERAS)
        self.has_labels = any(s["label"] is not None for s in self.scans)

    def _keyframes_by_sample(self, folder, tab):
        """{sample token: {channel: keyframe sample_data record}}; a dangling calibrated_sensor / sensor token
        ends in one line naming the table and the token."""
        channel_of = {r["token"]: r["channel"] for r in tab["sensor"]}
        where_cs = f"{folder / 'sample_data.json'}, field calibrated_sensor_token"
        where_sensor = f"{folder / 'calibrated_sensor.json'}, field sensor_token"
        by_sample = {}
        for sd in tab["sample_data"]:  # keyframe sample_data of every sensor, per sample
            if sd.get("is_key_frame", True):
                cs = _nuscenes_ref(self._cs, sd["calibrated_sensor_token"], "calibrated_sensor", where_cs)
                ch = _nuscenes_ref(channel_of, cs["sensor_token"], "sensor", where_sensor)
                by_sample.setdefault(sd["sample_token"], {})[ch] = sd
        return by_sample

    def _check_scan_records(self, folder):
        """Checks, at construction rather than hours into a run, every record the kept scans will use: the
        ego_pose of each lidar / camera sample_data exists, and every file name stays inside the root."""
        for s in self.scans:
            for sd in [s["lidar"], *s["cams"].values()]:
                where = f"{folder / 'sample_data.json'}, record {sd['token']}"
                _nuscenes_ref(self._pose, sd["ego_pose_token"], "ego_pose", where + ", field ego_pose_token")
                _inside_root(sd["filename"], self.root, where + ", field filename")
            if s["label"] is not None:
                _inside_root(s["label"], self.root, f"{folder / 'lidarseg.json'}, entry of sample_data "
                                                    f"{s['lidar']['token']}")

    def __len__(self):
        return len(self.scans)

    def scan_id(self, i):
        return self.scans[i]["sample"]

    def index_of(self, sample_token):
        for i, s in enumerate(self.scans):
            if sample_token in (s["sample"], s["lidar"]["token"]):
                return i
        raise SettingError(f"sample {sample_token} is not in split {self.split!r} of nuScenes {self.version}",
                           f"--sample, root {self.root}", "check the token or try --split all")

    def scan_has_labels(self, i):
        return self.scans[i]["label"] is not None

    def scan_cameras(self, i):
        return list(self.scans[i]["cams"])

    def lidar_path(self, i):
        return self.root / self.scans[i]["lidar"]["filename"]

    def scan_file(self, i):
        return self.lidar_path(i)

    def _read_points(self, i):
        # *.pcd.bin: float32 x, y, z, intensity, ring (ring dropped, as in ScaLR); all rows of the file
        return _read_records(self.lidar_path(i), np.float32, 5, "nuScenes lidar")[:, :4]

    def labels(self, i):
        """(N,) int64 labels of points(i) (same rows: those dropped as non-finite are dropped here too)."""
        scan = self.scans[i]
        if scan["label"] is None:
            raise DataFileError(f"nuScenes sample {scan['sample']} has no lidarseg labels (no lidarseg.json "
                                f"entry)", self.root / self.version, "install nuScenes-lidarseg or use unlabelled "
                                                                     "stages")
        path = self.root / scan["label"]
        if not path.is_file():
            raise MissingDataFileError("lidarseg label file not found", path,
                                       f"extract nuScenes-lidarseg into {self.root}")
        keep = self._finite_scan(i)[1]  # (N_file,) rows of the .pcd.bin kept by drop_nonfinite
        return _map_labels(np.fromfile(path, dtype=np.uint8), NUSCENES_LUT, path, len(keep))[keep]

    def image_path(self, i, cam):
        return str(self.root / self._cam_record(i, cam)["filename"])

    def _cam_record(self, i, cam):
        cams = self.scans[i]["cams"]
        if cam not in cams:
            raise MissingCameraError(f"nuScenes sample {self.scan_id(i)} has no {cam} record in sample_data.json "
                                     f"(cameras of this sample: {list(cams)}); skip this camera")
        return cams[cam]

    def lidar_to_image(self, i, cam):
        """(3, 4) float64 matrix K @ [cam <- lidar] for scan i and camera cam (ScaLR nuscenes_for_scalr.py chain)."""
        lid, sd = self.scans[i]["lidar"], self._cam_record(i, cam)
        cs_cam = self._cs[sd["calibrated_sensor_token"]]  # tokens checked at construction (_check_scan_records)
        where = f"{self.root / self.version / 'calibrated_sensor.json'}, record {cs_cam['token']}"
        try:
            K = np.asarray(cs_cam["camera_intrinsic"], dtype=np.float64).reshape(3, 3)
            T = nuscenes_lidar_to_camera(self._cs[lid["calibrated_sensor_token"]],
                                         self._pose[lid["ego_pose_token"]], self._pose[sd["ego_pose_token"]], cs_cam)
        except (ValueError, TypeError) as err:  # wrong-length quaternion / translation / 3x3 intrinsic
            raise DataFileError(f"calibration of {cam} for sample {self.scan_id(i)} is malformed ({err})", where,
                                _NUSCENES_TODO) from None
        return K @ T[:3]

    def project(self, i, cam, min_depth=1.0):
        sd = self._cam_record(i, cam)
        path = self.image_path(i, cam)
        hw = (sd["height"], sd["width"]) if sd.get("height") else _image_hw(path)
        # devkit NuScenesExplorer.map_pointcloud_to_image mask: depth > 1 m, 1 < u < W-1, 1 < v < H-1
        # (official ScaLR uses 0 < u: ScaLR datasets/nuscenes_for_scalr.py; our choice, see docs/official.md §1)
        out = project_with_matrix(self.points(i)[:, :3], self.lidar_to_image(i, cam), hw, min_depth, lo=1.0, hi=1.0)
        return dict(out, image_path=path, hw=hw)

_KITTI_CALIB_SIZES = {"P0": 12, "P1": 12, "P2": 12, "P3": 12, "Tr": 12, "Tr_velo_to_cam": 12, "R0_rect": 9,
                      "Tr_imu_to_velo": 12}
_KITTI_CALIB_TODO = "re-extract it from the KITTI calibration download"


def read_kitti_calib(path, need=()):
    """KITTI calib text -> {key: float64 array}; reads up to the first blank line (ScaLR semantic_kitti_for_scalr.py).
    need: keys that must be present, each alternative a 'A|B' string (e.g. 'Tr|Tr_velo_to_cam'); a missing key,
    a line that is not `key: numbers` or a matrix of the wrong size gives one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataFileError("KITTI calibration file not found", path, "SemanticKITTI needs sequences/SS/"
                                   "calib.txt (from the KITTI odometry calib download)")
    calib = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            break
        key, sep, values = line.partition(":")
        key = key.strip() if sep else (line.split() or ["KEY"])[0]
        try:
            calib[key] = np.array([float(v) for v in values.split()], dtype=np.float64)
        except ValueError:
            sep = ""
        size = _KITTI_CALIB_SIZES.get(key)
        if not sep or (size and calib[key].size != size):
            raise DataFileError(f"KITTI calibration line {n} is not `{key}: {size or 'some'} numbers`", path,
                                _KITTI_CALIB_TODO)
    for keys in need:
        if not any(k in calib for k in keys.split("|")):
            raise DataFileError(f"KITTI calibration has no {' or '.join(keys.split('|'))} matrix (keys: "
                                f"{sorted(calib)})", path, _KITTI_CALIB_TODO)
    return calib


def kitti_lidar_to_image(calib):
    """(3, 4) float64: P2 @ R0_rect @ Tr_velo_to_cam (object layout) or P2 @ Tr (SemanticKITTI calib.txt)."""
    P2 = calib["P2"].reshape(3, 4)
    Tr = np.eye(4)
    Tr[:3] = (calib["Tr"] if "Tr" in calib else calib["Tr_velo_to_cam"]).reshape(3, 4)
    R0 = np.eye(4)
    if "R0_rect" in calib:  # SemanticKITTI's odometry calib has no R0_rect (already rectified frame)
        R0[:3, :3] = calib["R0_rect"].reshape(3, 3)
    return P2 @ R0 @ Tr


KITTI_NOMINAL_HW = (376, 1241)  # image_2 size of sequences 00-02, used only when the png is absent


class SemanticKitti(_LidarDataset):
    """SemanticKITTI: dataset/sequences/SS/{velodyne,labels,image_2,calib.txt} (ScaLR semantic_kitti_for_scalr.py)."""
    name = "semantic_kitti"

    def __init__(self, root, split="train", sequences=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataFileError("SemanticKITTI root not found", self.root, "pass --root of the folder that "
                                       "holds dataset/sequences/ (or sequences/)")
        cands = [self.root / "dataset" / "sequences", self.root / "sequences"]
        self.seq_dir = next((c for c in cands if c.is_dir()), None)
        if self.seq_dir is None:
            raise MissingDataFileError(f"no sequences/ folder (looked for {cands[0]} and {cands[1]})", self.root,
                                       "extract the SemanticKITTI and KITTI odometry downloads there"
                                       + _layout_hint(self.root, "semantic_kitti"))
        self.split = split
        if sequences is None:
            if split != "all" and split not in SEMANTIC_KITTI_SPLITS:
                raise SettingError(f"unknown SemanticKITTI split {split!r}", "--split",
                                   f"use one of {sorted(SEMANTIC_KITTI_SPLITS)} or all")
            present = sorted(p.name for p in self.seq_dir.iterdir() if p.is_dir())
            sequences = present if split == "all" else SEMANTIC_KITTI_SPLITS[split]
        # official: files sorted by full path
        self.files = sorted(str(p) for s in sequences for p in (self.seq_dir / s / "velodyne").glob("*.bin"))
        if not self.files:
            raise _empty_split_error("SemanticKITTI", split, self.seq_dir,
                                     f"expected sequences {list(sequences)} with velodyne/*.bin", "semantic_kitti")
        self.cameras = list(KITTI_CAMERAS)
        self.has_labels = all(Path(self.label_path(i)).is_file() for i in range(len(self.files)))
        self._calib = {}

    def __len__(self):
        return len(self.files)

    def scan_id(self, i):
        p = Path(self.files[i])
        return f"{p.parent.parent.name}/{p.stem}"

    def scan_has_labels(self, i):
        return Path(self.label_path(i)).is_file()

    def scan_cameras(self, i):
        return list(KITTI_CAMERAS)

    def label_path(self, i):
        p = Path(self.files[i])
        return str(p.parent.parent / "labels" / (p.stem + ".label"))

    def scan_file(self, i):
        return self.files[i]

    def _read_points(self, i):
        return _read_records(self.files[i], np.float32, 4, "SemanticKITTI velodyne")  # x, y, z, remission

    def labels(self, i):
        """(N,) int64 labels of points(i) (same rows: those dropped as non-finite are dropped here too)."""
        path = Path(self.label_path(i))
        if not path.is_file():
            raise MissingDataFileError("SemanticKITTI label file not found", path,
                                       "test sequences 11-21 have none; use a labelled split")
        keep = self._finite_scan(i)[1]  # reads (and checks) the .bin first: a truncated .bin is blamed on itself
        raw = _read_records(path, np.uint32, 1, "SemanticKITTI label")[:, 0] & 0xFFFF  # lower 16 bits = class
        return _map_labels(raw, SEMANTIC_KITTI_LUT, path, len(keep))[keep]

    def calib(self, i):
        seq = Path(self.files[i]).parent.parent
        if seq not in self._calib:
            path = seq / "calib.txt"
            if not path.is_file():  # official layout: <root>/calib/dataset/sequences/SS/calib.txt
                alt = self.root / "calib" / "dataset" / "sequences" / seq.name / "calib.txt"
                path = alt if alt.is_file() else path
            self._calib[seq] = read_kitti_calib(path, need=("P2", "Tr|Tr_velo_to_cam"))
        return self._calib[seq]

    def image_path(self, i, cam="image_2"):
        p = Path(self.files[i])
        return str(p.parent.parent / cam / (p.stem + ".png"))

    def lidar_to_image(self, i, cam="image_2"):
        return kitti_lidar_to_image(self.calib(i))

    def project(self, i, cam="image_2", min_depth=1.0):
        path = self.image_path(i, cam)
        hw = _image_hw(path, default=KITTI_NOMINAL_HW)
        # ScaLR datasets/semantic_kitti_for_scalr.py: 0 < u < W-1, 0 < v < H-1 (its pre-filter is lidar x > 1 m;
        # we test depth > 1 m, docs/official.md §1)
        out = project_with_matrix(self.points(i)[:, :3], self.lidar_to_image(i, cam), hw, min_depth, lo=0.0, hi=1.0)
        return dict(out, image_path=path, hw=hw)


def _pose_matrix(pose):
    """PandaSet {'position': {x,y,z}, 'heading': {w,x,y,z}} -> 4x4 sensor-to-world (float64)."""
    q = pose["heading"]
    t = pose["position"]
    return make_transform(quaternion_to_matrix([q["w"], q["x"], q["y"], q["z"]]), [t["x"], t["y"], t["z"]])


_POSE_KEYS = ("position.x", "position.y", "position.z", "heading.w", "heading.x", "heading.y", "heading.z")
_PANDASET_TODO = "re-download or re-extract this PandaSet sequence"


def _read_json(path, what, index=None, keys=()):
    """A PandaSet JSON file, or its entry [index] (poses.json / gps.json are lists, one entry per frame), checked
    to hold `keys` ('a.b' = nested key): a missing entry or key gives one line naming the file and the key."""
    obj = _load_json(path, what, _PANDASET_TODO)
    where = path if index is None else f"{path}, entry {index}"
    if index is not None:
        if not isinstance(obj, list) or not 0 <= index < len(obj):
            count = f"{len(obj)} entries" if isinstance(obj, list) else f"a JSON {type(obj).__name__}"
            raise DataFileError(f"{what} has no entry {index} ({count})", path, _PANDASET_TODO)
        obj = obj[index]
    for key in keys:
        node = obj
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise DataFileError(f"{what} lacks key {key!r}", where, _PANDASET_TODO)
            node = node[part]
    return obj


# PandaSet's native files are pandas pickles, and unpickling can call any importable function (a crafted file
# naming os.system runs a command). They are read with an unpickler that resolves ONLY the numpy / pandas names
# a PandaSet frame needs: a DataFrame of float / int / bool / string columns over a (Range)Index, as saved by
# pandas 0.25 to 3.x. Any other name is refused before anything is called.
_PANDASET_PICKLE_ALLOWED = {
    ("builtins", "slice"), ("_codecs", "encode"),  # protocol 2 slices / bytes
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("pandas", "DataFrame"), ("pandas", "Series"), ("pandas", "Index"), ("pandas", "RangeIndex"),
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas", "StringDtype"), ("pandas.core.arrays.string_", "StringDtype"), ("pandas.arrays", "StringArray"),
    ("pandas.core.arrays.string_", "StringArray"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
}
# names moved between pandas / numpy releases (pandas.compat.pickle_compat keeps the same table)
_PANDASET_PICKLE_MOVED = {
    ("pandas.core.indexes.numeric", "Int64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.numeric", "UInt64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.numeric", "Float64Index"): ("pandas.core.indexes.base", "Index"),
    ("pandas.core.internals.blocks", "new_block"): ("pandas._libs.internals", "_unpickle_block"),
}


def _pandaset_unpickler(file, path):
    """pickle.Unpickler over `file` whose find_class allows only _PANDASET_PICKLE_ALLOWED."""
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if module.startswith("numpy.core."):  # numpy < 2 wrote numpy.core, numpy >= 2 has numpy._core
                module = "numpy._core." + module[len("numpy.core."):]
            module = "builtins" if module == "__builtin__" else module  # protocol 2 files use Python 2 names
            module, name = _PANDASET_PICKLE_MOVED.get((module, name), (module, name))
            if (module, name) not in _PANDASET_PICKLE_ALLOWED:
                raise DataFileError(f"PandaSet file {Path(path).name} names {module}.{name}, which is not a "
                                    f"numpy / pandas class of a PandaSet frame: refused (unpickling it could run "
                                    f"code)", path, "use the files of the official PandaSet download")
            if module.startswith("numpy._core.") and not hasattr(np, "_core"):
                module = "numpy.core." + module[len("numpy._core."):]
            return super().find_class(module, name)
    return Restricted(file)


def _read_pandaset_pickle(path):
    """A PandaSet .pkl.gz (gzip pickle of a pandas DataFrame) through the restricted unpickler, with one clear
    line when it is unreadable (truncated gzip, another file) or names anything but numpy / pandas classes."""
    import gzip
    import pandas as pd  # the classes the pickle names
    path = Path(path)
    try:
        with open(path, "rb") as f:
            zipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if zipped else open(path, "rb")) as f:
            df = _pandaset_unpickler(f, path).load()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated gzip, wrong file, incompatible pickle: one line
        raise DataFileError(f"cannot read PandaSet file {path.name} ({type(err).__name__}: {err})", path,
                            _PANDASET_TODO) from None
    if not isinstance(df, pd.DataFrame):
        raise DataFileError(f"PandaSet file {path.name} holds a {type(df).__name__}, not a DataFrame", path,
                            _PANDASET_TODO)
    return df


def _pandaset_columns(df, path, columns):
    """df[columns] as float64 (N, len(columns)); a missing column gives one line naming the file and the key."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataFileError(f"PandaSet frame {Path(path).name} lacks column(s) {missing} (columns: "
                            f"{[str(c) for c in df.columns]})", path, _PANDASET_TODO)
    return df[list(columns)].to_numpy(np.float64)


def pandaset_split(root, out_dir=None, verbose=True):
    """{'train': [seq], 'val': [seq]} by GPS latitude of the first frame (lat > 37.6 = train, San Francisco;
    ScaLR datasets/pandaset_for_scalr.py). Only sequences with annotations/semseg are used. Printed, and saved to
    out_dir if given."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataFileError("PandaSet root not found", root, "pass --root of the folder that holds the "
                                   "sequence folders 001/ 002/ ...")
    seqs = sorted(p.name for p in root.iterdir() if (p / "annotations" / "semseg").is_dir())
    split = {"train": [], "val": []}
    for s in seqs:
        lat = _read_json(root / s / "meta" / "gps.json", "PandaSet gps.json", 0, ("lat",))["lat"]
        if not isinstance(lat, (int, float)):
            raise DataFileError(f"PandaSet gps.json latitude {lat!r} is not a number", root / s / "meta" /
                                "gps.json", _PANDASET_TODO)
        split["train" if lat > PANDASET_TRAIN_MIN_LAT else "val"].append(s)
    if verbose:
        print(f"[data] PandaSet split by GPS latitude > {PANDASET_TRAIN_MIN_LAT}: train ({len(split['train'])}) "
              f"{split['train']}; val ({len(split['val'])}) {split['val']}")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "pandaset_split.json", "w") as f:
            json.dump(split, f, indent=1)
    return split


class PandaSet(_LidarDataset):
    """PandaSet native layout, one lidar: sensor 0 = Pandar64 ('pandaset64'), 1 = PandarGT ('pandasetgt').
    points(i) are in the ego frame (world -> T_lidar^-1, then z -= 1.6); project() works in world coordinates
    with the camera poses (both as in ScaLR datasets/pandaset_for_scalr.py)."""
    Z_SHIFT = 1.6

    def __init__(self, root, sensor="pandaset64", split="train", out_dir=None):
        self.name = sensor
        self.sensor_id = {"pandaset64": 0, "pandasetgt": 1}[sensor]
        self.root = Path(root)
        seq_split = pandaset_split(root, out_dir)
        seqs = sorted(seq_split["train"] + seq_split["val"]) if split == "all" else seq_split.get(split, [])
        self.frames = []  # (sequence, frame "NN")
        for s in seqs:
            labelled = {p.name.split(".")[0] for p in (self.root / s / "annotations" / "semseg").glob("*.pkl.gz")}
            frames = sorted(p.name.split(".")[0] for p in (self.root / s / "lidar").glob("*.pkl.gz"))
            self.frames += [(s, f) for f in frames if f in labelled and f.isdigit()]  # NN = index in poses.json
        if not self.frames:
            raise _empty_split_error("PandaSet", split, self.root,
                                     f"sequences by the GPS rule: {seq_split}; need lidar/NN.pkl.gz with "
                                     f"annotations/semseg/NN.pkl.gz", "pandaset")
        self.cameras = ["front_camera"] if self.sensor_id == 1 else list(PANDASET_CAMERAS)
        self.has_labels = True
        self._cache = (None, None)

    def __len__(self):
        return len(self.frames)

    def scan_id(self, i):
        return "/".join(self.frames[i])

    def scan_has_labels(self, i):
        return True

    def scan_cameras(self, i):
        s = self.frames[i][0]
        return [c for c in self.cameras if (self.root / s / "camera" / c).is_dir()]

    def _frame(self, i):
        """(world xyz float64 (N,3), intensity (N,), row mask (N_file,) of the file's rows kept) with a one-frame
        cache; the kept rows are this lidar's (column d) with finite x, y, z, i (drop_nonfinite)."""
        s, f = self.frames[i]
        path = self.root / s / "lidar" / f"{f}.pkl.gz"
        if self._cache[0] != path:
            if not path.is_file():
                raise MissingDataFileError("PandaSet lidar file not found", path, _PANDASET_TODO)
            df = _read_pandaset_pickle(path)
            cols = _pandaset_columns(df, path, ("x", "y", "z", "i", "d"))  # (N_file, 5) float64
            mask = cols[:, 4] == self.sensor_id  # d: 0 = Pandar64, 1 = PandarGT
            pts, keep = drop_nonfinite(cols[mask, :4], f"{path}, lidar d={self.sensor_id}")  # (N, 4) world x, y, z, intensity
            mask[np.flatnonzero(mask)[~keep]] = False
            self._cache = (path, (pts[:, :3], pts[:, 3], mask))
        return self._cache[1]

    def lidar_pose(self, i):
        s, f = self.frames[i]
        path = self.root / s / "lidar" / "poses.json"
        return _pose_matrix(_read_json(path, "PandaSet lidar poses", int(f), _POSE_KEYS))

    def points(self, i):
        xyz, inten, _ = self._frame(i)
        # ScaLR datasets/pandaset_for_scalr.py: world -> ego with T_lidar^-1, then z -= 1.6 m
        ego = apply_transform(np.linalg.inv(self.lidar_pose(i)), xyz)
        ego[:, 2] -= self.Z_SHIFT
        return np.concatenate([ego, inten[:, None]], axis=1).astype(np.float32)

    def labels(self, i):
        s, f = self.frames[i]
        path = self.root / s / "annotations" / "semseg" / f"{f}.pkl.gz"
        if not path.is_file():
            raise MissingDataFileError("PandaSet semseg file not found", path, _PANDASET_TODO)
        _, _, mask = self._frame(i)  # (N_file,) rows of this lidar with finite values
        raw = _pandaset_columns(_read_pandaset_pickle(path), path, ("class",))[:, 0]
        if len(raw) != len(mask):
            raise DataFileError(f"label file {path.name} has {len(raw)} rows but the lidar frame has {len(mask)}",
                                path, "the semseg file does not belong to this frame; " + _PANDASET_TODO)
        if not np.isfinite(raw).all():
            raise DataFileError(f"label file {path.name} has non-integer class values", path, _PANDASET_TODO)
        return _map_labels(raw[mask].astype(np.int64), PANDASET_LUT, path, int(mask.sum()))

    def image_path(self, i, cam):
        s, f = self.frames[i]
        return str(self.root / s / "camera" / cam / f"{f}.jpg")

    def lidar_to_image(self, i, cam):
        """(3, 4) float64 K @ [cam <- world] (world coordinates, ScaLR datasets/pandaset_for_scalr.py)."""
        s, f = self.frames[i]
        pose = _read_json(self.root / s / "camera" / cam / "poses.json", f"PandaSet {cam} poses", int(f),
                          _POSE_KEYS)
        k = _read_json(self.root / s / "camera" / cam / "intrinsics.json", f"PandaSet {cam} intrinsics",
                       keys=("fx", "fy", "cx", "cy"))
        K = np.array([[k["fx"], 0, k["cx"]], [0, k["fy"], k["cy"]], [0, 0, 1]], dtype=np.float64)
        return K @ np.linalg.inv(_pose_matrix(pose))[:3]

    def project(self, i, cam="front_camera", min_depth=1.0):
        path = self.image_path(i, cam)
        hw = _image_hw(path, default=(1080, 1920))
        # ScaLR datasets/pandaset_for_scalr.py keeps z_cam > 0 and 0 < u < W, 0 < v < H; our depth threshold is
        # 1 m as on the other datasets (docs/official.md §1)
        out = project_with_matrix(self._frame(i)[0], self.lidar_to_image(i, cam), hw, min_depth, lo=0.0, hi=0.0)
        return dict(out, image_path=path, hw=hw)

_MERGED_ORDER = ["nuscenes", "semantic_kitti", "pandaset64", "pandasetgt"]  # ScaLR datasets/merged_datasets.py
_MERGED_FOLDER = {"nuscenes": "nuscenes", "semantic_kitti": "semantic_kitti", "pandaset64": "pandaset",
                  "pandasetgt": "pandaset"}


class MergedDataset:
    """Concatenation of datasets in the official order nuScenes, KITTI, Pandar64, PandarGT (Supp. B.2,
    ScaLR datasets/merged_datasets.py). Each scan keeps its own dataset / label space: `sub(i) -> (dataset, j)`."""
    name = "merged"

    def __init__(self, datasets):
        self.datasets = sorted(datasets, key=lambda d: _MERGED_ORDER.index(d.name))
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        self.cameras = sorted({c for d in self.datasets for c in d.cameras})
        self.has_labels = all(d.has_labels for d in self.datasets)
        self.label_space = None  # per scan: self.sub(i)[0].label_space
        self.class_names = None

    def __len__(self):
        return int(self.offsets[-1])

    def sub(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"scan index {i} out of range for merged dataset ({len(self)} scans)")
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.datasets[k], int(i - self.offsets[k])

    def __getattr__(self, attr):  # points / labels / project / image / scan_id ... delegate to the sub-dataset
        if attr.startswith("_") or attr not in ("points", "labels", "project", "project_all", "image", "scan_id",
                                                "scan_has_labels", "scan_cameras", "available_cameras",
                                                "image_path", "lidar_to_image"):
            raise AttributeError(attr)

        def call(i, *a, **kw):
            ds, j = self.sub(i)
            out = getattr(ds, attr)(j, *a, **kw)
            return f"{ds.name}:{out}" if attr == "scan_id" else out
        return call


TOY_DEFAULT_ROOT = Path(__file__).resolve().parent / "data" / "toy"


def get_dataset(name, root=None, split="train", version=None, split_file=None, sets=None, out_dir=None, **kw):
    """Dataset by name (DATASET_NAMES). toy: nuScenes-format toy tree at root/nuscenes (generated if missing);
    toy_kitti: root/semantic_kitti; merged: sets (names) under root/{nuscenes,semantic_kitti,pandaset}."""
    if name not in DATASET_NAMES:
        raise SettingError(f"unknown dataset {name!r}", "--data", f"valid names: {', '.join(DATASET_NAMES)}")
    if split not in SPLIT_NAMES and split_file is None:  # a --split-file may name its own splits
        raise SettingError(f"unknown split {split!r}", "--split", f"use one of {', '.join(SPLIT_NAMES)}")
    if is_toy(name, root):
        root = Path(root) if root is not None else TOY_DEFAULT_ROOT
        ensure_toy(root, parts=_toy_parts_for(name, sets))  # [toy] section: generates the parts it reads if missing
        if name == "toy":
            return NuScenes(root / "nuscenes", version=version or "v1.0-mini", split=split, split_file=split_file)
        if name == "toy_kitti":
            return SemanticKitti(root / "semantic_kitti", split=split)
    if root is None:
        raise SettingError(f"--root is required for --data {name}", "--root", "pass the dataset folder (there is no "
                        "default location for real datasets)")
    root = Path(root)
    if name == "nuscenes":
        return NuScenes(root, version=version, split=split, split_file=split_file)
    if name == "semantic_kitti":
        return SemanticKitti(root, split=split, **kw)
    if name in ("pandaset64", "pandasetgt"):
        return PandaSet(root, sensor=name, split=split, out_dir=out_dir)
    # merged
    if not root.is_dir():
        raise MissingDataFileError("merged root not found", root, "it must hold nuscenes/, semantic_kitti/ "
                                   "and / or pandaset/")
    sets = [s for s in (sets or _MERGED_ORDER) if sets or (root / _MERGED_FOLDER[s]).is_dir()]
    if not sets:
        raise MissingDataFileError("no nuscenes/, semantic_kitti/ or pandaset/ folder", root,
                                   "pass the folder that holds them" + _layout_hint(root))
    sets = [{"toy": "nuscenes", "toy_kitti": "semantic_kitti"}.get(s, s) for s in sets]
    unknown = [s for s in sets if s not in _MERGED_FOLDER]
    if unknown:
        raise SettingError(f"unknown merged set(s) {unknown}", "--merged-sets", f"use names among {_MERGED_ORDER}")
    return MergedDataset([get_dataset(s, root / _MERGED_FOLDER[s], split, version if s == "nuscenes" else None,
                                      split_file if s == "nuscenes" else None, out_dir=out_dir) for s in sets])

def label_subset(ds, fraction, subset_file=None, out_dir=None):
    """Sorted scan indices of the fraction-labelled training subset used by finetuning (1 %, 10 %).
    - subset_file (.npy, e.g. the official nuscenes-ratio_100-v_0.npy): entries are matched to scans by
      lidar file name or token (tuples/dicts: any string field); a plain .txt of scan ids also works.
    - SemanticKITTI (ScaLR datasets/semantic_kitti_for_scalr.py): sorted file paths [::100] for 1 % (192 scans);
      we use [::10] for 10 %.
    - Otherwise (nuScenes without the official lists, PandaSet, toy) a DOCUMENTED deterministic rule,
      not the official lists: scans sorted by their lidar file path (time order within a log), every
      round(1/fraction)-th one, starting with the first.
    The list of scan ids is written to out_dir/subset_<dataset>_<pct>.txt and its size printed."""
    n = len(ds)
    if fraction >= 1.0 and subset_file is None:
        return list(range(n))
    if subset_file is not None:  # the list decides, whatever `fraction` says (the real fraction is printed)
        keep = _indices_from_subset_file(ds, subset_file)
    else:
        step = int(round(1.0 / fraction))
        paths = getattr(ds, "files", None) or [str(getattr(ds, "lidar_path", ds.scan_id)(i)) for i in range(n)]
        keep = sorted(sorted(range(n), key=lambda i: str(paths[i]))[::step])
    if not keep:
        raise SettingError(f"the {fraction:.0%} subset of {ds.name} is empty ({n} scans)"
                           + ("; no entry of the subset file matched a scan of this split" if subset_file else ""),
                           subset_file or "--fraction", "check the list / split" if subset_file else
                           "use a larger --fraction")
    pct = f"{fraction * 100:g}pct"
    print(f"[data] {ds.name} {pct} label subset: {len(keep)} of {n} scans ({100 * len(keep) / n:.2f} %)"
          + (f" (from {subset_file})" if subset_file else " (deterministic rule, see label_subset)"))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / f"subset_{ds.name}_{pct}.txt"
        path.write_text("".join(ds.scan_id(i) + "\n" for i in keep))
        print(f"[data] subset list written to {path}")
    return keep


def _indices_from_subset_file(ds, subset_file):
    """Match subset-file entries (strings anywhere in each entry) to scan ids / lidar file names."""
    loaded = load_list_file(subset_file, "subset file")  # no pickle: plain string arrays or text
    if isinstance(loaded, dict):  # .npz: the entries of all its arrays
        entries = [e for k in loaded for e in loaded[k].tolist()]
    else:
        entries = loaded.tolist() if isinstance(loaded, np.ndarray) else loaded
        entries = entries if isinstance(entries, list) else [entries]  # a 0-d array
    wanted = set()
    for e in entries:
        vals = e.values() if isinstance(e, dict) else (e if isinstance(e, (list, tuple)) else [e])
        for v in vals:
            if isinstance(v, (str, bytes, np.str_)):
                s = v.decode() if isinstance(v, bytes) else str(v)
                wanted.update({s, Path(s).name})
    keys = []
    for i in range(len(ds)):
        ks = {ds.scan_id(i)}
        if hasattr(ds, "lidar_path"):
            ks.add(Path(ds.lidar_path(i)).name)
            ks.add(ds.scans[i]["lidar"]["token"])
        if hasattr(ds, "files"):
            ks.add(ds.files[i])
        keys.append(ks)
    return [i for i in range(len(ds)) if keys[i] & wanted]


# ==== [data] Camera projections ====
def quaternion_to_matrix(q):
    """Unit quaternion [w, x, y, z] -> (3, 3) float64 rotation matrix (nuScenes / PandaSet convention)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def make_transform(rotation, translation):
    """(4, 4) float64 [R | t] mapping p -> R p + t."""
    T = np.eye(4)
    T[:3, :3] = rotation
    T[:3, 3] = translation
    return T


def apply_transform(T, xyz):
    """(N, 3) -> (N, 3) float64: T[:3,:3] @ p + T[:3,3]."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ T[:3, :3].T + T[:3, 3]


def nuscenes_lidar_to_camera(cs_lidar, pose_lidar, pose_cam, cs_cam):
    """(4, 4) float64 camera <- lidar for nuScenes records (ScaLR datasets/nuscenes_for_scalr.py,
    devkit map_pointcloud_to_image):
    lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera."""
    def rec(r):
        return make_transform(quaternion_to_matrix(r["rotation"]), r["translation"])
    # cam <- ego(t_cam) <- global <- ego(t_lidar) <- lidar
    return (np.linalg.inv(rec(cs_cam)) @ np.linalg.inv(rec(pose_cam)) @ rec(pose_lidar) @ rec(cs_lidar))


def project_with_matrix(xyz, P, hw, min_depth=1.0, lo=0.0, hi=1.0):
    """Pinhole projection of (N, 3) points with a (3, 4) matrix P = K @ [R | t] (x right, y down, no half-pixel
    shift). Keeps depth > min_depth and lo < u < W - hi, lo < v < H - hi (strict).
    Returns idx (K,) int64 rows of xyz, uv (K, 2) float64 (u = column, v = row), depth (K,) float64 metres."""
    xyz = np.asarray(xyz, dtype=np.float64)
    # [u*d, v*d, d] = P @ [x, y, z, 1]
    hom = xyz @ P[:, :3].T + P[:, 3]  # (N, 3)
    depth = hom[:, 2]
    cand = np.flatnonzero(depth > min_depth)
    uv = hom[cand, :2] / depth[cand, None]  # (N', 2)
    H, W = hw
    inside = (uv[:, 0] > lo) & (uv[:, 0] < W - hi) & (uv[:, 1] > lo) & (uv[:, 1] < H - hi)
    idx = cand[inside].astype(np.int64)
    return dict(idx=idx, uv=uv[inside], depth=depth[idx])


# ==== [data] Point preprocessing (ScaLR datasets/pc_dataset.py, utils/transforms.py) ====
_FOV_EPS = 1e-4  # Crop of ScaLR utils/transforms.py: strict crop so that int() never reaches the grid size


def _refuse_nonfinite(values, where):
    """Loud stop when NaN/inf reaches the preprocessing: the readers drop such points (drop_nonfinite), so this
    means a caller fed a scan that did not come through them."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DataFileError(f"{int(bad.sum())} of {len(values)} points have NaN/inf values", where,
                            "read scans through data.py's readers, or drop such rows with data.drop_nonfinite")


def voxelize(xyz, voxel=0.1, rng=None):
    """Kept rows (M,) int64, one point per voxel of `voxel` metres (ScaLR Voxelize): voxel = int((p - min) / v);
    first point per voxel, or a random one when rng is given (official: random permutation first). Sorted."""
    xyz = np.asarray(xyz)
    if len(xyz) == 0:
        return np.zeros(0, dtype=np.int64)
    _refuse_nonfinite(xyz, "voxelize")  # one NaN would make min(0) NaN and every key the same voxel
    q = ((xyz - xyz.min(0)) / voxel).astype(np.int64)  # (N, 3) >= 0
    dims = q.max(0) + 1
    keys = (q[:, 0] * dims[1] + q[:, 1]) * dims[2] + q[:, 2]  # packed int64 voxel key
    n = len(xyz)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)  # position of each point in `order`: the first of a voxel has the lowest
    # the same rows as np.unique(keys[order], return_index=True), 1.8x faster: one unstable sort groups the voxels
    # (numpy's vectorised quicksort), and each group keeps its lowest rank
    by_key = np.argsort(keys)
    sorted_keys = keys[by_key]
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))  # first of each voxel
    return np.sort(order[np.minimum.reduceat(rank[by_key], starts)])


def limit_points(xyz, max_points, rng):
    """Kept rows: the max_points points nearest (Euclidean) to a random centre point (official LimitNumPoints);
    all rows if N <= max_points. Sorted (M,) int64."""
    n = len(xyz)
    if max_points is None or n <= max_points:
        return np.arange(n, dtype=np.int64)
    centre = xyz[rng.integers(n)]
    d2 = ((xyz - centre) ** 2).sum(1)
    return np.sort(np.argpartition(d2, max_points - 1)[:max_points]).astype(np.int64)


def fov_mask(xyz, cfg):
    """bool (N,): fov_min + eps < p < fov_max - eps on x, y and z (strict, Crop of ScaLR utils/transforms.py)."""
    lo = np.asarray(cfg.fov_min, dtype=np.float64) + _FOV_EPS
    hi = np.asarray(cfg.fov_max, dtype=np.float64) - _FOV_EPS
    return np.all((xyz > lo) & (xyz < hi), axis=1)


def input_features(xyz, intensity_norm):
    """(N, 5) float32 network input, official order [intensity_norm, x, y, z, ||xyz||_2] (ScaLR pc_dataset.py)."""
    xyz = np.asarray(xyz, dtype=np.float32)
    radius = np.linalg.norm(xyz, axis=1)  # 3D norm, not the 2D range
    return np.concatenate([np.asarray(intensity_norm, np.float32)[:, None], xyz, radius[:, None]], axis=1)


def cell_indices(xyz, cfg):
    """(3, N) int64 flat cell index per projection plane (ScaLR datasets/pc_dataset.py): plane j projects along axis
    d = dim_proj[j] onto the remaining axes (a, b) in increasing order; q = int((p - fov_min) / res);
    cell = q_a * grid[j][1] + q_b."""
    xyz = np.asarray(xyz, dtype=np.float64)
    fmin, fmax = np.asarray(cfg.fov_min, np.float64), np.asarray(cfg.fov_max, np.float64)
    out = np.empty((len(cfg.dim_proj), len(xyz)), dtype=np.int64)
    for j, d in enumerate(cfg.dim_proj):
        a, b = [ax for ax in range(3) if ax != d]
        ga, gb = cfg.grids[j]
        # res = (fov_max - fov_min) / grid ; q = int((p - fov_min) / res)
        qa = ((xyz[:, a] - fmin[a]) / ((fmax[a] - fmin[a]) / ga)).astype(np.int64)
        qb = ((xyz[:, b] - fmin[b]) / ((fmax[b] - fmin[b]) / gb)).astype(np.int64)
        if len(xyz) and (qa.min() < 0 or qa.max() >= ga or qb.min() < 0 or qb.max() >= gb):
            raise ValueError("points outside the FOV reached cell_indices; crop with fov_mask first")
        out[j] = qa * gb + qb
    return out


def knn_indices(xyz, k=16):
    """(k, N) int64 indices of the k nearest neighbours of each point, self excluded (ScaLR pc_dataset.py:
    cKDTree queried with k + 1, column 0 = the point itself dropped). Scans with <= k points repeat self."""
    from scipy.spatial import cKDTree
    xyz = np.asarray(xyz, dtype=np.float64)
    n = len(xyz)
    if n == 0:
        return np.zeros((k, 0), dtype=np.int64)
    tree = cKDTree(xyz, leafsize=32, balanced_tree=False, compact_nodes=False)  # fast build, exact
    _, idx = tree.query(xyz, k=k + 1, workers=1)
    idx = np.asarray(idx, dtype=np.int64).reshape(n, k + 1)[:, 1:]  # (N, k)
    missing = idx >= n  # fewer than k+1 points: scipy returns n for the missing neighbours
    if missing.any():
        idx[missing] = np.broadcast_to(np.arange(n)[:, None], idx.shape)[missing]
    return np.ascontiguousarray(idx.T)


def nearest_indices(query_xyz, ref_xyz):
    """(Nq,) int64: index of the nearest ref point for every query point (1-NN upsampling, ScaLR pc_dataset.py)."""
    from scipy.spatial import cKDTree
    tree = cKDTree(np.asarray(ref_xyz, np.float64), balanced_tree=False, compact_nodes=False)
    return np.asarray(tree.query(np.asarray(query_xyz, np.float64), k=1, workers=1)[1], dtype=np.int64)


def _rotation_z(theta):
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]], dtype=np.float32)


def augment_pretrain(xyz, rng):
    """Pretraining augmentation on xyz (ScaLR im_pc_dataset.py): rotation about z by U(-pi, pi); with prob 2/3
    negate x or y (1/2 each); scale by U(0.9, 1.1)."""
    xyz = np.array(xyz, dtype=np.float32, copy=True)
    xyz[:, :2] = xyz[:, :2] @ _rotation_z(rng.uniform(-np.pi, np.pi)).T
    flip = rng.integers(3)  # 0: none, 1: x, 2: y  -> prob 2/3 of a flip
    if flip:
        xyz[:, flip - 1] *= -1
    return xyz * np.float32(rng.uniform(0.9, 1.1))


def augment_downstream(pc8, rng):
    """Downstream augmentation, official desynchronised version (ScaLR utils/transforms.py, finetune.py), on
    pc8 = [x, y, z, i, x, y, z, r] (geometric cols 0-2, feature cols 3-7):
    rotate cols (0,1) by theta1 and cols (4,5) by an independent theta2; with prob 2/3 negate col 0 or 1 only;
    scale cols 4-7 (feature x, y, z, radius) by U(0.9, 1.1)."""
    pc8 = np.array(pc8, dtype=np.float32, copy=True)
    pc8[:, 0:2] = pc8[:, 0:2] @ _rotation_z(rng.uniform(-np.pi, np.pi)).T
    pc8[:, 4:6] = pc8[:, 4:6] @ _rotation_z(rng.uniform(-np.pi, np.pi)).T
    flip = rng.integers(3)
    if flip:
        pc8[:, flip - 1] *= -1
    pc8[:, 4:8] *= np.float32(rng.uniform(0.9, 1.1))
    return pc8


def prepare_scan(points, dataset_name, cfg, train, rng=None, labels=None):
    """One scan -> network inputs, in the official downstream order (ScaLR PCDataset.__getitem__):
    8 columns [x,y,z | i_norm,x,y,z,r] from un-augmented coords -> voxelize -> (train) limit points + augment
    -> FOV crop -> cells -> kNN -> (eval) 1-NN upsample index of every original row."""
    if train and rng is None:
        rng = np.random.default_rng()
    points = np.asarray(points)
    _refuse_nonfinite(points[:, :4], f"prepare_scan, {dataset_name} scan")  # a NaN intensity never reaches grids
    xyz = points[:, :3].astype(np.float32)  # (N, 3)
    mean, std = INTENSITY_STATS[_intensity_key(dataset_name)]
    inten = (points[:, 3].astype(np.float32) - mean) / std  # ScaLR datasets/pc_dataset.py
    pc8 = np.concatenate([xyz, input_features(xyz, inten)], axis=1)  # (N, 8)
    kept = voxelize(xyz, cfg.voxel, rng if train else None)  # (M0,)
    if train:
        kept = kept[limit_points(xyz[kept], cfg.max_points, rng)]
        pc = augment_downstream(pc8[kept], rng)
    else:
        pc = pc8[kept]
    inside = fov_mask(pc[:, :3], cfg)
    kept, pc = kept[inside], pc[inside]  # (M,), (M, 8)
    if len(kept) == 0:
        raise NoPointInFovError(f"no point of this {dataset_name} scan lies inside the FOV {cfg.fov_min}.."
                                f"{cfg.fov_max}", f"{len(points)} points", "skip this scan or check its frame")
    out = dict(feat=np.ascontiguousarray(pc[:, 3:].T), xyz=pc[:, :3].copy(), cells=cell_indices(pc[:, :3], cfg),
               neighbors=knn_indices(pc[:, :3], cfg.k), kept=kept,
               labels=None if labels is None else np.asarray(labels, np.int64)[kept])
    # eval: every original point takes its nearest kept point; train: the loss uses the kept points only
    out["upsample"] = np.arange(len(kept), dtype=np.int64) if train else nearest_indices(xyz, pc[:, :3])
    return out


# ==== [data] Torch datasets and collate ====
_COLLATE_KEYS = ("feat", "cells", "neighbors", "labels", "upsample", "orig_labels", "xyz", "kept")


def collate(samples):
    """List of prepare_scan dicts -> padded batch (Collate / zero_pad of ScaLR datasets/pc_dataset.py):
    feat (B, 5, Nmax) float32 (pad 0), cells (B, 3, Nmax) int64 (pad 0), neighbors (B, k, Nmax) int64
    (pad Nmax - 1), occupied (B, Nmax) bool, num_points (B,), labels (sum M,) concatenated,
    upsample / orig_labels / xyz / kept: lists of tensors; any other key: list as given."""
    import torch
    B = len(samples)
    sizes = [s["feat"].shape[1] for s in samples]
    nmax, k = max(sizes), samples[0]["neighbors"].shape[0]
    feat = torch.zeros(B, samples[0]["feat"].shape[0], nmax)
    cells = torch.zeros(B, samples[0]["cells"].shape[0], nmax, dtype=torch.int64)
    neighbors = torch.full((B, k, nmax), nmax - 1, dtype=torch.int64)
    occupied = torch.zeros(B, nmax, dtype=torch.bool)
    for b, (s, m) in enumerate(zip(samples, sizes)):
        feat[b, :, :m] = torch.as_tensor(s["feat"])
        cells[b, :, :m] = torch.as_tensor(s["cells"])
        neighbors[b, :, :m] = torch.as_tensor(s["neighbors"])
        occupied[b, :m] = True
    out = dict(feat=feat, cells=cells, neighbors=neighbors, occupied=occupied,
               num_points=torch.tensor(sizes, dtype=torch.int64))
    if all(s.get("labels") is not None for s in samples):
        out["labels"] = torch.cat([torch.as_tensor(s["labels"], dtype=torch.int64) for s in samples])
    for key in ("upsample", "orig_labels", "xyz", "kept"):
        if all(s.get(key) is not None for s in samples):
            out[key] = [torch.as_tensor(s[key]) for s in samples]
    for key in samples[0]:
        if key not in _COLLATE_KEYS:
            out[key] = [s.get(key) for s in samples]
    return out


def _torch_dataset_base():
    import torch.utils.data
    return torch.utils.data.Dataset


class SegmentationDataset(_torch_dataset_base()):
    """torch Dataset of prepare_scan samples (+ 'orig_labels' of all original points, 'scan_id') for
    linear probing / finetuning. subset: list of scan indices (e.g. label_subset). Items are j or (j, epoch), as
    EpochSampler yields them: a training sample's randomness (voxel point, augmentation) is seeded by
    (seed, epoch, j), so reruns, resumes (mid-epoch too, with workers) and DDP layouts see the same samples."""

    def __init__(self, ds, cfg, train, subset=None, seed=0):
        if not ds.has_labels:
            raise ValueError(f"{getattr(ds, 'name', ds)} has no labels (e.g. nuScenes v1.0-test); "
                             f"segmentation training/evaluation needs a labelled split")
        self.ds, self.cfg, self.train, self.seed = ds, cfg, train, int(seed)
        indices = list(range(len(ds))) if subset is None else list(subset)
        self.indices = [i for i in indices if ds.scan_has_labels(i)]  # e.g. a keyframe without lidarseg file
        if len(self.indices) < len(indices):
            print(f"[data] SegmentationDataset: {len(indices) - len(self.indices)} of {len(indices)} scans have "
                  f"no label file and are left out")
        if not self.indices:
            raise ValueError(f"SegmentationDataset: no labelled scan in this split / subset of {ds.name}")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):  # item: j or (j, epoch); train randomness seeded by [seed, epoch, j]
        j, epoch = item if isinstance(item, tuple) else (item, 0)
        i = self.indices[j]
        sub, k = self.ds.sub(i) if hasattr(self.ds, "sub") else (self.ds, i)
        labels = sub.labels(k)
        rng = np.random.default_rng([self.seed, int(epoch), int(j)]) if self.train else None
        try:
            sample = prepare_scan(sub.points(k), sub.name, self.cfg, self.train, rng=rng, labels=labels)
        except NoPointInFovError as err:  # name the scan (the caller may skip and count it)
            raise NoPointInFovError(err.what, f"scan {self.ds.scan_id(i)}, {err.where}", err.todo) from None
        sample["orig_labels"] = labels
        sample["scan_id"] = self.ds.scan_id(i)
        return sample


class ScorableScans(_torch_dataset_base()):
    """A val SegmentationDataset whose scans that cannot be scored (no point inside the FOV, an empty or unreadable
    scan: data.py raises ValueError / UserError) come back as {'unscorable': scan id, 'reason': text} instead of
    ending the evaluation (or, before, a whole finetuning run after training)."""

    def __init__(self, seg):
        self.seg = seg

    def __len__(self):
        return len(self.seg)

    def __getitem__(self, item):
        try:
            return self.seg[item]
        except (ValueError, UserError) as err:
            j = item[0] if isinstance(item, tuple) else item
            return {"unscorable": self.seg.ds.scan_id(self.seg.indices[j]), "reason": str(err)}


def collate_scorable(samples):
    """data.collate of the scorable scans, plus 'unscorable': [(scan id, reason)] of the others."""
    good = [s for s in samples if "unscorable" not in s]
    batch = collate(good) if good else {}
    batch["unscorable"] = [(s["unscorable"], s["reason"]) for s in samples if "unscorable" in s]
    return batch


class ScoredBatches:
    """Iterates a loader of collate_scorable batches, yielding only the scorable scans and recording the others
    (a warning names each one)."""

    def __init__(self, loader):
        self.loader, self.skipped = loader, []

    def __iter__(self):
        for batch in self.loader:
            for scan_id, reason in batch.pop("unscorable"):
                self.skipped.append(scan_id)
                warn(f"scan {scan_id} cannot be used and is skipped: {reason}")
            if "feat" in batch:
                yield batch


# ==== [data] Loaders: one sampler for training and evaluation in every stage ====
def rank_world():
    """(rank, world size) of this process, (0, 1) outside torch.distributed: the one lookup of every file."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler:
    """The items one rank reads in one epoch, as (index, epoch) pairs; the dataset seeds each sample's randomness
    from (seed, epoch, index), so a run, its resume (mid-epoch too, with workers) and any DDP layout see the very
    same samples.
    train: a fresh permutation per epoch (torch.randperm seeded by seed + epoch), cut into global batches, the last
    incomplete one dropped (drop_last, as the official loaders); rank r reads slice r of every global batch, so
    1 process x B scans and N processes x B/N scans train on the same batches.
    eval: the items in order, each exactly once (no padding with duplicates), each global batch sliced the same
    way (the last one may be short). set_epoch(epoch, batches_done) skips the global batches already trained."""

    def __init__(self, n, global_batch, train, seed=0, rank=0, world=1):
        if global_batch < world or global_batch % world:
            raise ValueError(f"the global batch size {global_batch} must be a multiple of the number of processes "
                             f"{world} (the batch is divided across GPUs, as in the official code)")
        if train and n < global_batch:
            raise ValueError(f"the training set has {n} scans, fewer than one global batch of {global_batch} "
                             f"(drop_last): lower --batch-size or use more data")
        self.n, self.gb, self.train, self.seed, self.rank, self.world = n, global_batch, train, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, batches_done=0):
        self.epoch, self.skip = int(epoch), int(batches_done)

    def batches_per_epoch(self):
        return self.n // self.gb if self.train else -(-self.n // self.gb)

    def indices(self, skip=True):
        """This rank's items of the epoch, in order (without the skipped batches unless skip=False)."""
        import torch
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
                 if self.train else list(range(self.n)))
        b = self.gb // self.world
        return [i for k in range(self.skip if skip else 0, self.batches_per_epoch())
                for i in order[k * self.gb + self.rank * b: min(k * self.gb + (self.rank + 1) * b, self.n)]]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self.indices()])

    def __len__(self):  # the whole epoch of this rank, also while resuming (the schedule counts on it)
        return len(self.indices(skip=False))


def make_loader(dataset, global_batch, train, collate_fn=None, seed=0, workers=0, pin_memory=None):
    """The DataLoader of every stage: the global batch divided by the number of processes, EpochSampler order
    (shuffled + drop_last for training), items (index, epoch) for the dataset to seed its randomness.
    Call set_epoch(loader, epoch, batches_done) at the start of every epoch."""
    import torch
    rank, world = rank_world()
    sampler = EpochSampler(len(dataset), global_batch, train, seed=seed, rank=rank, world=world)
    return torch.utils.data.DataLoader(
        dataset, batch_size=global_batch // world, sampler=sampler, drop_last=False, collate_fn=collate_fn,
        num_workers=workers, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,  # workers started once, not at every epoch (the sampler runs here anyway)
        generator=torch.Generator().manual_seed(int(seed)))  # its own: iterating never draws from the global RNG


def one_blas_thread():
    """numpy's BLAS (OpenBLAS) on one thread in this process. A process that already keeps every core busy (torch's
    own threads, or one pool worker per core) must not also run OpenBLAS's threads: they busy-wait after each
    numpy product and take cores from the others (measured: twice the CPU time of the toy generator's workers;
    distillation steps several times slower on a shared 2-core machine). A thread count changes no result.
    Linux only (the loaded library is found in /proc/self/maps); elsewhere, or with another BLAS, nothing changes."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:   # address, permissions, offset, device, inode, path
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in f) if len(fields) == 6}
    except OSError:
        return
    for path in (p for p in paths if "openblas" in os.path.basename(p)):
        try:
            lib = ctypes.CDLL(path)   # the library numpy loaded (already mapped: nothing is loaded again)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(1)
                break


def set_epoch(loader, epoch, batches_done=0):
    """Start epoch `epoch` of a make_loader() loader, skipping its first `batches_done` batches (mid-epoch resume,
    exact: the samples depend only on (seed, epoch, index))."""
    loader.sampler.set_epoch(epoch, batches_done)


# ==== [data] Metrics ====
def confusion_matrix(gt, pred, num_classes):
    """(K, K) int64, rows = ground truth, columns = prediction; points labelled IGNORE are skipped
    (fast_hist of ScaLR utils/metrics.py: bincount(K * gt + pred))."""
    gt = np.asarray(gt, dtype=np.int64).ravel()
    pred = np.asarray(pred, dtype=np.int64).ravel()
    valid = gt != IGNORE
    return np.bincount(num_classes * gt[valid] + pred[valid],
                       minlength=num_classes ** 2).reshape(num_classes, num_classes).astype(np.int64)


def per_class_iou(cm):
    """(K,) float64 IoU_c = TP / (row_sum + col_sum - TP); NaN when the class is absent from GT and
    prediction (0/0, excluded from the mean); 0 when predicted but absent from GT (ScaLR utils/metrics.py)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / union


def mean_iou(cm):
    """mIoU as a fraction 0..1 (nanmean over classes); print it as a percentage with 1 decimal."""
    iou = per_class_iou(cm)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


# ==== [data] Preprocessing on the training device ====
# The same steps as the [data] Point preprocessing section, written in torch so that they run on the training
# device (a GPU) for a whole batch at once, instead of in DataLoader workers one scan at a time. The official loader
# (ScaLR datasets/pc_dataset.py) spends most of its time in the cKDTree kNN and is run with many worker processes;
# here the workers only read files and draw random numbers, the device does voxelisation, FOV crop, cells, kNN.
# Equal to the CPU path: the same kept points and cells (same float32 / float64 arithmetic, elementwise), the same
# neighbour sets up to ties (equal distances may be ordered differently). Batched tensors: the points of the B scans
# are concatenated, P = sum of the per-scan counts, with a scan index `batch` (P,) next to them.
# The kNN is an exact brute force (distances of a chunk of queries to every point, then topk): made for a GPU; on a
# CPU it is far slower than the cKDTree, which stays the CPU choice (`python data.py --bench` times both).


def _torch():
    import torch
    return torch


def voxelize_t(xyz, batch, voxel=0.1, order=None):
    """Batched voxelize(): xyz (P, 3) float32 points of B scans, batch (P,) int64 scan index -> kept rows (K,) int64,
    sorted. One point per `voxel` metre voxel of each scan, voxel = int((p - min of its scan) / voxel). The point
    kept in a voxel is the one that comes first in `order` (P,), a permutation of 0..P-1 (None: the identity, i.e.
    the first point, as voxelize(rng=None)); voxelize(rng) of each scan equals this with order = the scans'
    rng.permutation(N_b) + their offsets, concatenated."""
    torch = _torch()
    P = len(xyz)
    if P == 0:
        return torch.zeros(0, dtype=torch.int64, device=xyz.device)
    B = int(batch.max()) + 1
    lo = torch.full((B, 3), float("inf"), dtype=xyz.dtype, device=xyz.device)
    lo = lo.scatter_reduce(0, batch[:, None].expand(P, 3), xyz, reduce="amin")  # (B, 3) per-scan minimum
    q = ((xyz - lo[batch]) / voxel).long()  # (P, 3) >= 0, float32 arithmetic as the numpy path
    dims = q.max(0).values + 1
    key = ((batch * dims[0] + q[:, 0]) * dims[1] + q[:, 1]) * dims[2] + q[:, 2]  # (P,) packed (scan, voxel)
    rank = torch.arange(P, device=xyz.device)
    if order is not None:  # rank[i] = position of row i in `order`
        rank = torch.empty_like(rank).scatter_(0, order.to(xyz.device), torch.arange(P, device=xyz.device))
    _, voxel_id = torch.unique(key, return_inverse=True)  # (P,) voxel of each row
    first = torch.full((int(voxel_id.max()) + 1,), P, dtype=torch.int64, device=xyz.device)
    first = first.scatter_reduce(0, voxel_id, rank, reduce="amin")  # (V,) smallest rank in each voxel
    kept = order.to(xyz.device)[first] if order is not None else first
    return kept.sort().values


def fov_mask_t(xyz, cfg):
    """fov_mask() in torch: bool (P,), fov_min + eps < p < fov_max - eps on x, y, z, compared in float64."""
    torch = _torch()
    lo = torch.tensor(cfg.fov_min, dtype=torch.float64, device=xyz.device) + _FOV_EPS
    hi = torch.tensor(cfg.fov_max, dtype=torch.float64, device=xyz.device) - _FOV_EPS
    p = xyz.double()
    return ((p > lo) & (p < hi)).all(1)


def cell_indices_t(xyz, cfg):
    """cell_indices() in torch: (3, P) int64 flat cell per projection plane, in float64 as the numpy path:
    q = int((p - fov_min) / ((fov_max - fov_min) / grid)), cell = q_a * grid_b + q_b. Points must be cropped."""
    torch = _torch()
    p = xyz.double()
    out = torch.empty((len(cfg.dim_proj), len(xyz)), dtype=torch.int64, device=xyz.device)
    for j, d in enumerate(cfg.dim_proj):
        a, b = [ax for ax in range(3) if ax != d]
        ga, gb = cfg.grids[j]
        res_a = (cfg.fov_max[a] - cfg.fov_min[a]) / ga  # python float = numpy float64 scalar
        res_b = (cfg.fov_max[b] - cfg.fov_min[b]) / gb
        qa = ((p[:, a] - cfg.fov_min[a]) / res_a).long()
        qb = ((p[:, b] - cfg.fov_min[b]) / res_b).long()
        out[j] = qa * gb + qb
    return out


def pad_points_t(values, batch, sizes, fill=0):
    """(P, ...) rows of B scans -> (B, Nmax, ...) padded with `fill`, the scan-major layout of collate()."""
    torch = _torch()
    B, nmax = len(sizes), int(max(sizes))
    start = torch.cumsum(sizes, 0) - sizes  # (B,) first row of each scan
    slot = torch.arange(len(batch), device=batch.device) - start[batch]  # (P,) position inside its scan
    out = torch.full((B, nmax) + tuple(values.shape[1:]), fill, dtype=values.dtype, device=values.device)
    out[batch, slot] = values
    return out


def knn_t(xyz_pad, sizes, k=16, chunk=None):
    """knn_indices() for a padded batch: xyz_pad (B, Nmax, 3), sizes (B,) real points per scan -> (B, k, Nmax)
    int64 local indices of the k nearest neighbours, self excluded, sorted by distance; scans of <= k points
    repeat self (as the cKDTree path); padded columns hold Nmax - 1 (collate's padding). Exact distances
    (differences squared, not the |a|^2 + |b|^2 - 2ab expansion whose rounding would reorder close neighbours);
    `chunk` queries at a time bound the memory to B x chunk x Nmax distances (default: ~2^26 of them, 256 MB)."""
    torch = _torch()
    B, nmax, _ = xyz_pad.shape
    chunk = chunk or max(256, 2 ** 26 // max(B * nmax, 1))
    dev = xyz_pad.device
    sizes = sizes.to(dev)
    col = torch.arange(nmax, device=dev)
    pad_ref = col[None, None, :] >= sizes[:, None, None]  # (B, 1, Nmax) padded reference points
    kk = min(k, max(nmax - 1, 1))
    out = torch.full((B, k, nmax), nmax - 1, dtype=torch.int64, device=dev)
    for s in range(0, nmax, chunk):
        q = xyz_pad[:, s:s + chunk]  # (B, c, 3)
        d2 = torch.cdist(q, xyz_pad, compute_mode="donot_use_mm_for_euclid_dist")  # (B, c, Nmax) exact
        rows = torch.arange(s, s + q.shape[1], device=dev)
        d2 = d2.masked_fill(pad_ref, float("inf"))
        d2[:, torch.arange(q.shape[1], device=dev), rows] = float("inf")  # self excluded
        dist, idx = d2.topk(kk, dim=2, largest=False)  # (B, c, kk) nearest first
        idx = torch.where(torch.isinf(dist), rows[None, :, None], idx)  # fewer than k others: self
        if kk < k:
            idx = torch.cat([idx, rows[None, :, None].expand(B, len(rows), k - kk)], 2)
        out[:, :, s:s + q.shape[1]] = idx.transpose(1, 2)
    real = col[None, :] < sizes[:, None]  # (B, Nmax)
    return torch.where(real[:, None, :], out, torch.full_like(out, nmax - 1))


def scan_pc8(points, dataset_name):
    """(N, 8) float32 [x, y, z | i_norm, x, y, z, r] of a raw scan, as prepare_scan builds it (CPU, cheap: the
    DataLoader worker's only arithmetic in the device path; the norm stays in numpy so the bytes are the same)."""
    points = np.asarray(points)
    xyz = points[:, :3].astype(np.float32)
    mean, std = INTENSITY_STATS[_intensity_key(dataset_name)]
    inten = (points[:, 3].astype(np.float32) - mean) / std
    return np.concatenate([xyz, input_features(xyz, inten)], axis=1)


def _rotate_t(x, y, theta):
    """(x, y) @ R(theta).T as numpy's float32 matmul rounds it on this CPU: c = x r00, then one fused
    multiply-add c + y r01 (emulated in float64, exact product, then rounded to float32)."""
    R = _rotation_z(theta)  # (2, 2) float32, the matrix of augment_downstream / augment_pretrain
    r = [[float(v) for v in row] for row in R]
    nx = (y.double() * r[0][1] + (x * r[0][0]).double()).float()
    ny = (y.double() * r[1][1] + (x * r[1][0]).double()).float()
    return nx, ny


def _train_draws_t(pc, batch, kept, rngs, cfg):
    """Train mode after voxelize_t: per scan, in prepare_scan's rng order, LimitNumPoints (nearest max_points to a
    random centre) and augment_downstream (desynchronised rotations, flip of x or y, scale of the features).
    pc (P, 8) all rows, kept (K,) voxel rows -> (kept rows, augmented (K', 8) rows)."""
    torch = _torch()
    counts = torch.bincount(batch[kept], minlength=len(rngs)).tolist()  # one sync per batch
    chunks, out = kept.split(counts), []
    for b, (rows, rng) in enumerate(zip(chunks, rngs)):
        if cfg.max_points is not None and len(rows) > cfg.max_points:
            centre = pc[rows[int(rng.integers(len(rows)))], :3]
            d2 = ((pc[rows, :3] - centre) ** 2).sum(1)  # float32 as limit_points
            rows = rows[d2.topk(cfg.max_points, largest=False).indices.sort().values]
        p = pc[rows].clone()
        p[:, 0], p[:, 1] = _rotate_t(p[:, 0], p[:, 1], rng.uniform(-np.pi, np.pi))
        p[:, 4], p[:, 5] = _rotate_t(p[:, 4], p[:, 5], rng.uniform(-np.pi, np.pi))
        flip = rng.integers(3)
        if flip:
            p[:, flip - 1] *= -1
        p[:, 4:8] *= float(np.float32(rng.uniform(0.9, 1.1)))
        out.append((rows, p))
    return torch.cat([r for r, _ in out]), torch.cat([p for _, p in out])


def collate_light(samples):
    """collate() of samples that carry 'feat' (5, M) and the cropped 'xyz' (M, 3) but no 'cells' / 'neighbors'
    (CPU, in the DataLoader worker): the batch of collate() without those two, plus 'xyz' as a list."""
    light = [dict(s, cells=np.zeros((0, s["feat"].shape[1]), np.int64),
                  neighbors=np.zeros((1, s["feat"].shape[1]), np.int64)) for s in samples]
    out = collate(light)
    del out["cells"], out["neighbors"]
    return out


def add_cells_neighbors_t(batch, cfg, device):
    """Adds 'cells' (B, 3, Nmax) and 'neighbors' (B, k, Nmax), computed on `device` for the whole batch, to a
    collate_light() batch (in the training process, just before the forward); feat / occupied moved to device."""
    torch = _torch()
    sizes = batch["num_points"].to(device)
    xyz = torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in batch["xyz"]]).to(device)  # (P, 3)
    b = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)
    out = dict(batch, feat=batch["feat"].to(device), occupied=batch["occupied"].to(device))
    out["cells"] = pad_points_t(cell_indices_t(xyz, cfg).T, b, sizes).transpose(1, 2)  # (B, 3, Nmax), pad 0
    out["neighbors"] = knn_t(pad_points_t(xyz, b, sizes), sizes, cfg.k)  # (B, k, Nmax), pad Nmax - 1
    return out


def _time_ms(fn, repeats, sync=lambda: None, warmup=True):
    """Median wall time of fn() in ms (after one warm-up call), sync() before reading the clock (CUDA)."""
    if warmup:
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))


def _bench_cpu_path(pts, cfg, repeats):
    """ms per scan of each step of prepare_scan(train) in one DataLoader worker (one thread), in its order."""
    rng = np.random.default_rng(0)
    pc8 = scan_pc8(pts, "nuscenes")
    kept = voxelize(pc8[:, :3], cfg.voxel, rng)
    kept = kept[limit_points(pc8[kept, :3], cfg.max_points, rng)]
    pc = augment_downstream(pc8[kept], rng)
    xyz = pc[fov_mask(pc[:, :3], cfg), :3]
    steps = {"features (8 columns)": lambda: scan_pc8(pts, "nuscenes"),
             "voxelize 0.1 m": lambda: voxelize(pc8[:, :3], cfg.voxel, rng),
             "limit 20k + augment": lambda: augment_downstream(
                 pc8[kept[limit_points(pc8[kept, :3], cfg.max_points, rng)]], rng),
             "FOV crop": lambda: fov_mask(pc[:, :3], cfg),
             "cells (3 planes)": lambda: cell_indices(xyz, cfg),
             "kNN k=16 (cKDTree)": lambda: knn_indices(xyz, cfg.k)}
    return {name: _time_ms(fn, repeats) for name, fn in steps.items()}


def _bench_device_path(pts, cfg, repeats, device, batch):
    """ms per scan: the worker's share (features + the voxel permutation) and each device step, run on a batch of
    `batch` copies of the scan. Also returns the model inputs of that batch and the device's sync function."""
    torch = _torch()
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    pc8 = scan_pc8(pts, "nuscenes")
    n = len(pc8)
    pc = torch.from_numpy(np.concatenate([pc8] * batch)).to(dev)  # (B N, 8)
    b = torch.repeat_interleave(torch.arange(batch), n).to(dev)
    order = torch.from_numpy(np.concatenate([rng.permutation(n) + i * n for i in range(batch)]))
    rngs = lambda: [np.random.default_rng(i) for i in range(batch)]  # noqa: E731
    kept = voxelize_t(pc[:, :3], b, cfg.voxel, order)
    rows, p = _train_draws_t(pc, b, kept, rngs(), cfg)
    inside = fov_mask_t(p[:, :3], cfg)
    p, pb = p[inside], b[rows][inside]
    sizes = torch.bincount(pb, minlength=batch)
    xyz_pad = pad_points_t(p[:, :3], pb, sizes)
    steps = {"worker: features + permutation": (lambda: (scan_pc8(pts, "nuscenes"), rng.permutation(n)), 1),
             "voxelize 0.1 m": (lambda: voxelize_t(pc[:, :3], b, cfg.voxel, order), batch),
             "limit 20k + augment": (lambda: _train_draws_t(pc, b, kept, rngs(), cfg), batch),
             "FOV crop": (lambda: fov_mask_t(p[:, :3], cfg), batch),
             "cells (3 planes)": (lambda: cell_indices_t(p[:, :3], cfg), batch)}
    per = {name: _time_ms(fn, repeats, sync) / div for name, (fn, div) in steps.items()}
    slow = dev.type == "cpu"  # brute force on a CPU: seconds, timed once
    per["kNN k=16 (exact, brute force)"] = _time_ms(lambda: knn_t(xyz_pad, sizes, cfg.k), 1 if slow else repeats,
                                                    sync, warmup=not slow) / batch
    inputs = (pad_points_t(p[:, 3:], pb, sizes).transpose(1, 2),
              pad_points_t(cell_indices_t(p[:, :3], cfg).T, pb, sizes).transpose(1, 2), knn_t(xyz_pad, sizes, cfg.k),
              pad_points_t(torch.ones_like(pb, dtype=torch.bool), pb, sizes, fill=False))
    return per, inputs, sync


def _bench_model_step(inputs, cfg, depth, width, repeats, sync):
    """ms per scan of one training step of WI-depth-width on the batch: forward + backward + AdamW."""
    import waffleiron as wi
    torch = _torch()
    feat, cells, neighbors, occupied = inputs
    model = wi.WaffleIron(input_channels=5, feat_channels=width, depth=depth, nb_class=16,
                          grids=cfg.grids).to(feat.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = model(feat, cells, neighbors, occupied).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _time_ms(step, repeats, sync) / len(feat)


def bench_data_paths(pts, source, repeats=3, device="cpu", batch=2, model=(6, 64)):
    """Markdown table: the CPU data path (everything in the DataLoader worker) against the device path (worker:
    features + random draws; device: voxelize, limit + augment, crop, cells, kNN for the whole batch), in train
    mode on the official nuScenes grid, and the model step, so that the slowest of the three is visible."""
    cfg = GridConfig()
    cpu = _bench_cpu_path(pts, cfg, repeats)
    dev, inputs, sync = _bench_device_path(pts, cfg, repeats, device, batch)
    step = _bench_model_step(inputs, cfg, model[0], model[1], repeats, sync)
    worker_ms, dev_ms = dev.pop("worker: features + permutation"), sum(dev.values())
    lines = ["| path | part | runs in | ms / scan | share |", "|---|---|---|---:|---:|"]
    lines += [f"| cpu | {k} | worker | {v:.1f} | {100 * v / sum(cpu.values()):.0f}% |" for k, v in cpu.items()]
    lines += [f"| device | features + voxel permutation | worker | {worker_ms:.1f} | |"]
    lines += [f"| device | {k} | {device} | {v:.1f} | {100 * v / dev_ms:.0f}% |" for k, v in dev.items()]
    lines += [f"| model | WI-{model[0]}-{model[1]} forward + backward + AdamW, batch {batch} | {device} | "
              f"{step:.1f} | |"]
    # the device runs the preprocessing of the device path and the model step one after the other
    rates = {"cpu path: one worker": 1000 / sum(cpu.values()), f"cpu path: {device} (model)": 1000 / step,
             "device path: one worker": 1000 / worker_ms,
             f"device path: {device} (preprocessing + model)": 1000 / (dev_ms + step)}
    print(f"\nscans/s of the data paths and the model ({source}, {len(pts)} points, train mode, official nuScenes "
          f"grid; median of {repeats}; 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print("\n".join(lines))
    print("\n| scans/s | " + " | ".join(rates) + " |\n|---|" + "---:|" * len(rates))
    print("| | " + " | ".join(f"{v:.1f}" for v in rates.values()) + " |")
    for path in ("cpu path", "device path"):
        worker, dev_rate = [v for k, v in rates.items() if k.startswith(path)]
        print(f"{path}: {math.ceil(dev_rate / worker)} worker(s) keep the {device} busy; bound by "
              f"{'the model step' if path == 'cpu path' or dev_ms < step else 'the preprocessing on ' + device}")
    return dict(cpu=cpu, device=dev, worker_ms=worker_ms, model_ms=step, rates=rates)


# ==== [data] Benchmark and CLI ====
def _bench_scan(n, rng, scan=None):
    """A lidar scan of about n points: the file `scan` (--scan: .pcd.bin / .bin / .npy, read as
    `waffleiron.py features` reads it; all of it for n >= its size, else n random rows), else a synthetic 32-beam
    sweep of ground + walls."""
    if scan is not None:
        import waffleiron as wi
        pts = wi.read_scan_file(scan)[0]
        return (pts if n >= len(pts) else pts[np.sort(rng.choice(len(pts), n, replace=False))]), Path(scan).name
    az = rng.uniform(-np.pi, np.pi, n)
    el = np.deg2rad(rng.integers(0, 32, n) * (41.3 / 31) - 30.7)
    rng_ground = 1.8 / np.maximum(np.tan(-el), 1e-3)
    r = np.where(el < -0.02, np.minimum(rng_ground, 60), rng.uniform(5, 40, n))
    xyz = np.stack([r * np.cos(az), r * np.sin(az), np.minimum(r * np.tan(el), 6)], 1)
    return np.concatenate([xyz, rng.uniform(0, 255, (n, 1))], 1).astype(np.float32), "synthetic sweep"


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return float(np.median(times))


def bench(repeats=5, sizes=(20000, 35000), paths=True, device=None, scan=None):
    """Markdown table of ms per scan for each preprocessing step (median of `repeats`, one thread), in the
    official order: voxelize and crop on the raw scan, cells and kNN on the M voxelized + cropped points.
    paths: then the table of bench_data_paths (CPU vs device data path and the model step, scans/s) on the
    largest scan, on `device` (default: cuda when available, else cpu)."""
    rng = np.random.default_rng(0)
    cfg = GridConfig()
    rows, counts = {}, []
    for n in sizes:
        pts, source = _bench_scan(n, rng, scan)
        xyz = pts[:, :3]
        vox = xyz[voxelize(xyz, cfg.voxel)]
        vox = vox[fov_mask(vox, cfg)]  # (M, 3) what cells / kNN see
        counts.append(f"{len(xyz)} -> {len(vox)}")
        steps = {
            "voxelize 0.1 m (random point)": lambda: voxelize(xyz, cfg.voxel, rng),
            "FOV crop": lambda: fov_mask(vox, cfg),
            "cells (3 planes)": lambda: cell_indices(vox, cfg),
            "kNN k=16 (cKDTree, k+1 query)": lambda: knn_indices(vox, cfg.k),
            "features (5 ch)": lambda: input_features(xyz, pts[:, 3]),
            "limit 20k points (train)": lambda: limit_points(vox, cfg.max_points, rng),
            "augment (downstream, train)": lambda: augment_downstream(np.concatenate([xyz, pts], 1), rng),
            "1-NN upsample of all N points (eval)": lambda: nearest_indices(xyz, vox),
            "prepare_scan, train": lambda: prepare_scan(pts, "nuscenes", cfg, True, rng),
            "prepare_scan, eval": lambda: prepare_scan(pts, "nuscenes", cfg, False),
        }
        for name, fn in steps.items():
            rows.setdefault(name, []).append(_median_ms(fn, repeats))
    core = list(rows)[:4]
    rows["**crop + voxel + kNN + cells**"] = [sum(rows[c][j] for c in core) for j in range(len(sizes))]
    lines = ["| step | " + " | ".join(f"{c} pts" for c in counts) + " |", "|---|" + "---:|" * len(sizes)]
    lines += [f"| {k} | " + " | ".join(f"{v:.1f}" for v in vals) + " |" for k, vals in rows.items()]
    print(f"ms per scan ({source}; N -> M points after voxelization + crop; median of {repeats}; 1 thread; "
          f"target <= 50 ms for crop + voxel + kNN + cells at 35k; 1-min load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: timings inflate when the machine is busy)")
    print("\n".join(lines))
    if paths:
        import torch
        torch.set_num_threads(1)  # one worker / one device thread: the per-worker rate
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows["paths"] = bench_data_paths(pts, source, repeats=max(1, repeats // 2), device=device)
    return rows


def _colour(values, cmap_name):
    import matplotlib
    cmap = matplotlib.colormaps[cmap_name]
    return (np.asarray(cmap(values))[:, :3] * 255).astype(np.uint8)


def inspect_scan(ds, i, out_dir, colour="depth"):
    """One PNG per camera (points drawn over the image, coloured by depth or label) + pairs.npz with
    CAM__idx (K,) int64, CAM__uv (K, 2) float64, CAM__depth (K,) float64 for every camera with an image."""
    from PIL import Image
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proj = ds.project_all(i)
    labels = ds.labels(i) if colour == "label" and ds.scan_has_labels(i) else None
    pairs = {}
    for cam, p in proj.items():
        pairs.update({f"{cam}__idx": p["idx"], f"{cam}__uv": p["uv"], f"{cam}__depth": p["depth"]})
        img = ds.image(i, cam).copy()
        if labels is not None:
            lab = labels[p["idx"]]
            rgb = np.where(lab[:, None] == IGNORE, 0, _colour((lab % 20) / 19.0, "tab20"))
        else:
            rgb = _colour(np.clip(p["depth"] / 50.0, 0, 1), "turbo")
        col, row = np.floor(p["uv"]).astype(np.int64).T
        H, W = img.shape[:2]
        for dr in (-1, 0, 1):  # 3x3 dots
            for dc in (-1, 0, 1):
                img[np.clip(row + dr, 0, H - 1), np.clip(col + dc, 0, W - 1)] = rgb
        Image.fromarray(img).save(out_dir / f"{cam}.png", compress_level=1)  # fast
        print(f"[inspect] {cam}: {len(p['idx'])} points in the image -> {out_dir / (cam + '.png')}")
    np.savez(out_dir / "pairs.npz", **pairs)
    seen = len(np.unique(np.concatenate([p["idx"] for p in proj.values()])))
    print(f"[inspect] scan {ds.scan_id(i)}: {len(ds.points(i))} points, {seen} in at least one camera; "
          f"pairs -> {out_dir / 'pairs.npz'}")
    return pairs

def _dataset_args(p):
    p.add_argument("--data", default="toy", help=f"dataset name, one of {DATASET_NAMES} (default toy)")
    p.add_argument("--root", default=None, help="dataset root (native layout); toy: data/toy, generated if missing")
    p.add_argument("--version", default=None, help="nuScenes version folder (default: first of v1.0-trainval, "
                                                   "v1.0-mini, v1.0-test present)")
    p.add_argument("--split", default="all", help="train | val | test | all (default all)")
    p.add_argument("--split-file", default=None, help="nuScenes: official list_files_nuscenes.npz (ScaLR release "
                   "info_datasets.tar.gz) or JSON {train: [scene names], val: [...]} with the official 700/150 "
                   "scene lists; without it v1.0-trainval uses the official devkit lists (NUSCENES_SPLITS)")


def _dataset_command(cmd, argv):
    """data.py inspect | splits | subset: one dataset split, --out DIR."""
    p = argparse.ArgumentParser(prog=f"data.py {cmd}")
    _dataset_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sample", default=None, help="nuScenes sample token (inspect)")
    p.add_argument("--index", type=nonneg_int, default=0, help="scan index in the split (inspect; default 0)")
    p.add_argument("--colour", default="depth", choices=["depth", "label"], help="point colour (inspect)")
    p.add_argument("--fraction", type=positive_float, default=0.01,
                   help="label fraction in (0, 1] (subset; official 1%% / 10%%: 0.01 / 0.1)")
    p.add_argument("--subset-file", default=None, help="official .npy frame list (subset; nuScenes); plain "
                                                       "string arrays only (no pickle)")
    a = p.parse_args(argv)
    if a.data not in DATASET_NAMES:
        p.error(f"unknown --data {a.data!r}; valid names: {', '.join(DATASET_NAMES)}")
    if a.fraction > 1.0:
        p.error(f"--fraction must be in (0, 1] (e.g. 0.01 or 0.1), got {a.fraction:g}")
    ds = get_dataset(a.data, a.root, a.split, a.version, split_file=a.split_file, out_dir=a.out)
    if cmd == "inspect":
        if a.sample and not hasattr(ds, "index_of"):
            raise SettingError("--sample (a nuScenes sample token) needs --data nuscenes or toy", "--sample",
                               "use --index for this dataset")
        i = ds.index_of(a.sample) if a.sample else a.index
        if i >= len(ds):
            raise SettingError(f"scan index {i} is out of range: split {a.split!r} has {len(ds)} scans",
                               "--index", f"use 0..{len(ds) - 1}")
        inspect_scan(ds, i, a.out, a.colour)
    elif cmd == "subset":
        label_subset(ds, a.fraction, a.subset_file, a.out)
    else:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        path = Path(a.out) / f"split_{ds.name}_{a.split}.txt"
        path.write_text("".join(ds.scan_id(i) + "\n" for i in range(len(ds))))
        print(f"[data] {ds.name} split {a.split}: {len(ds)} scans -> {path}")


def main(argv=None):
    """CLI: --bench | --make-toy DIR | --toy-preview PNG | inspect | splits | subset (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("inspect", "splits", "subset"):
        return _dataset_command(argv[0], argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--bench", action="store_true", help="time each preprocessing step on 20k / 35k point scans")
    p.add_argument("--make-toy", metavar="DIR", default=None, help="write the toy world (nuscenes/ + "
                                                                    "semantic_kitti/) into DIR")
    p.add_argument("--scans", type=positive_int, default=None,
                   help="toy: nuScenes keyframes (default 64 = 48 train + 16 val; KITTI gets half + a quarter)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="toy: random seed (default 0)")
    p.add_argument("--scan", default=None, help="--bench on this real scan (.pcd.bin / .bin / .npy, e.g. a nuScenes "
                   "LIDAR_TOP sweep); default: a synthetic 32-beam sweep")
    p.add_argument("--toy-preview", metavar="PNG", default=None,
                   help="draw README's toy picture (docs/toy_scan.png): a toy val scan by class, beside its front "
                        "camera with the projected points (toy world from --root, generated if missing)")
    p.add_argument("--root", default=None, help="toy world folder for --toy-preview (default: data/toy)")
    a = p.parse_args(argv)
    if a.bench:
        bench(scan=a.scan)
    elif a.make_toy:
        kw = {k: v for k, v in (("scans", a.scans), ("seed", a.seed)) if v is not None}
        make_toy(a.make_toy, **kw)
    elif a.toy_preview:
        print(f"[toy] preview -> {render_toy_preview(a.root, a.toy_preview)}")
    else:
        p.print_help()



# ================================================================================================================
# ==== Appendix [toy]: the embedded toy world ====
# Nothing above uses this part except get_dataset('toy' | 'toy_kitti') through ensure_toy(), and the CLI.
# A procedural street, ray-cast by a spinning lidar and by pinhole cameras from the same poses, written as real
# nuScenes (v1.0-mini) and SemanticKITTI files, so the toy runs through exactly the readers of the real datasets.
# Layout across the road (|y| grows outwards, both sides): road (lane markings, crosswalk) | parking lane |
# raised sidewalk (driveways cross it) | yard of terrain and low vegetation (bumpy heightfield) | buildings.
# Objects: cars, trucks, buses, pedestrians, bicycles, poles, signs, trees, bushes, cones, barriers.
# Some classes share geometry and lidar intensity and differ only in colour/texture (road vs parking, sidewalk
# vs driveway, terrain vs low vegetation): what an image teacher can add to a lidar network.
# numpy only; every cast is vectorised over rays (Python loops only over chunks of rays and over scans).
# Deterministic: every scan draws from its own np.random.default_rng([seed, ...]) and no clock is read, so a seed
# gives the same bytes (on one platform: numpy's SIMD sin/cos may round differently on another CPU).
# Default (64 nuScenes keyframes, 48 KITTI scans): ~52 MB, ~37 CPU-s (nuScenes ~25, KITTI ~12; measured), so about
# 20 s on 2 free cores. Each tree (part) can be generated alone: get_dataset asks only for those it reads.
import hashlib  # json, math, os, time, Path: imported at the top of the file
import io

# material: (name, nuScenes lidarseg index, SemanticKITTI raw id, base RGB, lidar reflectance mean, std)
TOY_MATERIALS = [
    ("road", 24, 40, (70, 70, 76), 0.10, 0.04),
    ("lane_marking", 24, 60, (236, 236, 226), 0.40, 0.12),
    ("parking", 24, 44, (112, 120, 150), 0.10, 0.04),      # same asphalt for the lidar, blue-grey paint
    ("sidewalk", 26, 48, (188, 182, 168), 0.13, 0.05),
    ("driveway", 25, 49, (168, 78, 52), 0.13, 0.05),        # same height/intensity as sidewalk, red bricks
    ("terrain", 27, 72, (176, 154, 84), 0.15, 0.06),
    ("low_vegetation", 30, 70, (44, 118, 40), 0.15, 0.06),  # same heightfield/intensity as terrain
    ("tree_canopy", 30, 70, (36, 100, 36), 0.17, 0.07),
    ("trunk", 30, 71, (96, 66, 42), 0.14, 0.05),
    ("building", 28, 50, (200, 196, 186), 0.20, 0.08),
    ("car", 17, 10, (150, 30, 30), 0.22, 0.10),
    ("truck", 23, 18, (220, 220, 220), 0.24, 0.10),
    ("bus", 16, 13, (230, 190, 40), 0.24, 0.10),
    ("pedestrian", 2, 30, (60, 60, 120), 0.12, 0.05),
    ("bicycle", 14, 11, (40, 160, 200), 0.20, 0.08),
    ("pole", 28, 80, (128, 128, 134), 0.25, 0.08),
    ("traffic_sign", 28, 81, (30, 80, 190), 0.60, 0.15),
    ("traffic_cone", 12, 99, (245, 112, 20), 0.35, 0.10),
    ("barrier", 9, 51, (235, 235, 235), 0.30, 0.10),
]
TOY_MAT = {m[0]: i for i, m in enumerate(TOY_MATERIALS)}
TOY_MAT_NUSC = np.array([m[1] for m in TOY_MATERIALS], np.uint8)     # material -> nuScenes category.index
TOY_MAT_KITTI = np.array([m[2] for m in TOY_MATERIALS], np.uint32)   # material -> SemanticKITTI raw id
_TOY_RGB = np.array([m[3] for m in TOY_MATERIALS], np.float64)
_TOY_REFL = np.array([[m[4], m[5]] for m in TOY_MATERIALS], np.float64)

TOY_NUSC_CATEGORIES = [  # official nuScenes-lidarseg names, in category.index order 0..31 (nuScenes category.json)
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle",
    "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck", "flat.driveable_surface",
    "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade", "static.other", "static.vegetation",
    "vehicle.ego"]
TOY_MINI_TRAIN = ["scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796", "scene-1077", "scene-1094",
                  "scene-1100"]  # nuscenes-devkit utils/splits.py mini_train
TOY_MINI_VAL = ["scene-0103", "scene-0916"]  # mini_val
# nuScenes-like rig at 1/5 of 1600x900: channel -> (yaw in ego frame deg, translation in ego frame m, fx at 320 px)
TOY_NUSC_CAMS = {
    "CAM_FRONT": (0.0, (1.70, 0.02, 1.51), 253.3),
    "CAM_FRONT_RIGHT": (-55.0, (1.55, -0.49, 1.50), 252.2),
    "CAM_BACK_RIGHT": (-110.0, (1.04, -0.48, 1.56), 252.3),
    "CAM_BACK": (180.0, (0.03, 0.00, 1.57), 161.9),
    "CAM_BACK_LEFT": (110.0, (1.04, 0.48, 1.56), 252.8),
    "CAM_FRONT_LEFT": (55.0, (1.52, 0.49, 1.51), 252.5),
}
# camera time minus lidar time (microseconds), as in a nuScenes keyframe: cameras fire as the lidar sweeps past them
TOY_NUSC_CAM_DT = {"CAM_FRONT": -35491, "CAM_FRONT_RIGHT": -27612, "CAM_BACK_RIGHT": -20058, "CAM_BACK": -10426,
                   "CAM_BACK_LEFT": -528, "CAM_FRONT_LEFT": -43107}
TOY_NUSC_WH = (320, 180)
TOY_KITTI_WH = (620, 188)  # half of KITTI odometry's 1241x376
# KITTI odometry sequence-00 calibration (sequences/00/calib.txt); P rows 0-1 halved for the half-size image
_TOY_KITTI_TR = np.array([
    [4.276802385584e-04, -9.999672484946e-01, -8.084491683471e-03, -1.198459927713e-02],
    [-7.210626507497e-03, 8.081198471645e-03, -9.999413164504e-01, -5.403984729748e-02],
    [9.999738645903e-01, 4.859485810390e-04, -7.206933692422e-03, -2.921968648686e-01]])
_TOY_KITTI_P = {  # (fx, cx, cy, tx, ty, tz) at full resolution, from P0..P3
    "P0": (718.856, 607.1928, 185.2157, 0.0, 0.0, 0.0), "P1": (718.856, 607.1928, 185.2157, -386.1448, 0.0, 0.0),
    "P2": (718.856, 607.1928, 185.2157, 45.38225, -0.1130887, 3.779761e-03),
    "P3": (718.856, 607.1928, 185.2157, -337.2877, 2.369057, 4.915215e-03)}
_TOY_SIDEWALK_H = 0.15   # kerb height (m)
_TOY_YARD_A = 0.25       # yard heightfield amplitude above the sidewalk level (m)


def _toy_kitti_P(name):
    """(3,4) projection matrix of KITTI camera `name` for the half-size toy image."""
    fx, cx, cy, tx, ty, tz = _TOY_KITTI_P[name]
    return np.array([[fx / 2, 0, cx / 2, tx / 2], [0, fx / 2, cy / 2, ty / 2], [0, 0, 1, tz]])


# ---- procedural functions of world position (the same for lidar and camera, so both agree) ----
def _toy_hash2(ix, iy, key):
    """Deterministic pseudo-random value in [0,1) per integer lattice point."""
    v = np.sin(ix * 127.1 + iy * 311.7 + key * 74.7) * 43758.5453
    return v - np.floor(v)


def _toy_noise(x, y, scale, key):
    """Smooth 2D value noise in [0,1] with feature size `scale` metres."""
    x, y = x / scale, y / scale
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    a, b = _toy_hash2(ix, iy, key), _toy_hash2(ix + 1, iy, key)
    c, d = _toy_hash2(ix, iy + 1, key), _toy_hash2(ix + 1, iy + 1, key)
    return (a + (b - a) * fx) * (1 - fy) + (c + (d - c) * fx) * fy


def _toy_in_driveway(S, x, side):
    """(N,) bool: x lies on one of the driveways of its side (side: 0 = left y>0, 1 = right y<0)."""
    dw = S["driveways"]  # (D, 3): x0, x1, side
    if len(dw) == 0:
        return np.zeros(x.shape, bool)
    hit = np.zeros(x.shape, bool)
    for s in (0, 1):  # per side the driveways are disjoint and sorted along x (one per building, left to right)
        x0, x1 = dw[dw[:, 2] == s, 0], dw[dw[:, 2] == s, 1]
        if len(x0) == 0:
            continue
        assert np.all(x0[1:] >= x1[:-1]), "toy driveways overlap"
        on = side == s
        j = np.searchsorted(x0, x[on], side="right") - 1  # last driveway starting at or before x
        hit[on] = (j >= 0) & (x[on] < x1[np.maximum(j, 0)])  # NaN x: False, as the comparisons it replaces
    return hit


def _toy_ground_material(S, x, y):
    """Material of the ground at (x, y): the 2D map that makes the appearance-only classes."""
    ay, side = np.abs(y), (y < 0).astype(np.int64)
    ys0, ys1, yb = S["y_s0"][side], S["y_s1"][side], S["y_b"][side]
    yard = ay >= ys1  # the only points left terrain / low vegetation below: the noise is evaluated there only
    mat = np.full(x.shape, TOY_MAT["terrain"])
    veg = _toy_noise(x[yard], y[yard], S["veg_scale"], S["key"]) < S["veg_frac"]
    mat[yard] = np.where(veg, TOY_MAT["low_vegetation"], TOY_MAT["terrain"])
    dw = _toy_in_driveway(S, x, side)
    mat[(ay < yb) & dw] = TOY_MAT["driveway"]
    mat[(ay >= ys0) & (ay < ys1)] = np.where(dw, TOY_MAT["driveway"], TOY_MAT["sidewalk"])[(ay >= ys0) & (ay < ys1)]
    mat[(ay >= S["R"]) & (ay < ys0)] = TOY_MAT["parking"]
    road = ay < S["R"]
    mat[road] = TOY_MAT["road"]
    # lane markings (0.2 m wide): dashed lines between lanes, solid edge lines, a zebra crossing
    dash = (x % 9.0) < 3.6
    lines = (np.abs(ay - S["R"] + 0.3) < 0.1) | ((np.abs(ay - S["lane_w"] * np.round(ay / S["lane_w"])) < 0.1)
                                               & dash & (ay < S["R"] - 1.0))
    zebra = (x >= S["zebra"][0]) & (x < S["zebra"][1]) & ((y % 1.2) < 0.6)
    mat[road & (lines | zebra)] = TOY_MAT["lane_marking"]
    return mat


def _toy_yard_height(S, x, y):
    """Yard heightfield (m); -1 where the ground is not yard (road, parking, sidewalk: handled as planes)."""
    ay, side = np.abs(y), (y < 0).astype(np.int64)
    yard = ay >= S["y_s1"][side]  # the heightfield is evaluated at the yard points only (elementwise: same values)
    out = np.full(yard.shape, -1.0)
    x, y, ay, side = x[yard], y[yard], ay[yard], side[yard]
    p = S["bump_phase"]
    h = _TOY_SIDEWALK_H + _TOY_YARD_A * (0.5 + 0.3 * np.sin(0.8 * x + 0.5 * y + p[0])
                                        + 0.2 * np.sin(0.37 * x - 1.1 * y + p[1]))
    front = np.flatnonzero(ay < S["y_b"][side])     # in front of the building line: driveways may cross
    h[front[_toy_in_driveway(S, x[front], side[front])]] = _TOY_SIDEWALK_H   # flat driveway
    out[yard] = h
    return out


# ---- scene = ground layout + tables of primitives (boxes, vertical cylinders, ellipsoids) ----
class _ToyPrims:
    """Collects primitives; each gets a global id with material, RGB and instance id."""

    def __init__(self):
        self.rows = {"box": [], "cyl": [], "ell": []}
        self.mat, self.rgb, self.inst = [], [], []

    def add(self, kind, mat, row, rgb=None, inst=0):
        """kind 'box': cx,cy,cz, hx,hy,hz, yaw | 'cyl' (vertical): x,y, z0,z1, r |
        'ell' (axis-aligned): cx,cy,cz, rx,ry,rz."""
        self.rows[kind].append((len(self.mat),) + tuple(float(v) for v in row))
        self.mat.append(TOY_MAT[mat])
        self.rgb.append(_TOY_RGB[TOY_MAT[mat]] if rgb is None else np.asarray(rgb, np.float64))
        self.inst.append(inst)

    def tables(self):
        out = {"mat": np.array(self.mat, np.int64), "rgb": np.array(self.rgb, np.float64).reshape(-1, 3),
               "inst": np.array(self.inst, np.int64)}
        for kind, width in (("box", 8), ("cyl", 6), ("ell", 7)):
            a = np.array(self.rows[kind], np.float64).reshape(-1, width)
            out[kind] = {"id": a[:, 0].astype(np.int64), "p": a[:, 1:]}
        return out


_TOY_FACADES = np.array([[205, 200, 190], [160, 165, 175], [225, 220, 205], [150, 175, 200], [215, 200, 160],
                         [120, 125, 130]], np.float64)
_TOY_PAINTS = np.array([[150, 30, 30], [30, 50, 140], [20, 20, 22], [225, 225, 228], [120, 124, 130],
                        [40, 110, 60], [200, 160, 40], [90, 30, 90]], np.float64)


def _toy_vehicle(P, rng, kind, x, y, yaw, inst, z=0.0):
    """Adds a car / truck / bus made of two oriented boxes centred at (x, y) with heading `yaw`."""
    c, s = math.cos(yaw), math.sin(yaw)
    if kind == "car":
        L, W, paint = rng.uniform(3.9, 4.9), rng.uniform(1.7, 1.95), _TOY_PAINTS[rng.integers(len(_TOY_PAINTS))]
        P.add("box", "car", (x, y, z + 0.6, L / 2, W / 2, 0.4, yaw), paint, inst)
        cab = (-0.08 * L, 0.28 * L, z + 1.0 + 0.25, W / 2 - 0.07, 0.25)
        P.add("box", "car", (x + c * cab[0], y + s * cab[0], cab[2], cab[1], cab[3], cab[4], yaw), paint * 0.45, inst)
    elif kind == "truck":
        L = rng.uniform(5.0, 7.5)
        P.add("box", "truck", (x + c * (L / 2 + 1.1), y + s * (L / 2 + 1.1), z + 1.6, 1.1, 1.2, 1.2, yaw),
              _TOY_PAINTS[rng.integers(len(_TOY_PAINTS))], inst)
        P.add("box", "truck", (x, y, z + 2.15, L / 2, 1.25, 1.4, yaw), (225, 225, 225), inst)
    else:  # bus
        L = rng.uniform(10.0, 12.0)
        P.add("box", "bus", (x, y, z + 1.75, L / 2, 1.27, 1.4, yaw), (230, 190, 40), inst)


def _toy_world(rng, x_lo, x_hi, ego_x=(0.0, 0.0)):
    """Random street along x in [x_lo, x_hi] (road frame: z up, road centre y=0, ego drives +x on the right).

    Returns S: layout parameters (lane width, kerb lines y_s0/y_s1 and building line y_b per side, driveways,
    crosswalk, noise keys) and S['prims'] (tables of boxes, cylinders, ellipsoids). The parts are drawn in a fixed
    order from `rng` (layout, then per side: buildings, greenery, sidewalk objects, parked cars; then traffic), so
    a seed always gives the same street."""
    S, park = _toy_layout(rng, x_lo, x_hi)
    P, inst, dws = _ToyPrims(), [1], []

    def nid():  # a fresh instance id
        inst[0] += 1
        return inst[0]

    for side, sg in ((0, 1.0), (1, -1.0)):  # side 0 = left (y > 0), side 1 = right (y < 0); sg = sign of y
        ys0, ys1, yb = S["y_s0"][side], S["y_s1"][side], S["y_b"][side]
        dws += _toy_buildings(P, rng, side, sg, ys1, yb, x_lo, x_hi, nid)
        _toy_greenery(P, rng, sg, ys1, yb, x_lo, x_hi)
        _toy_sidewalk_objects(P, rng, sg, ys0, ys1, x_lo, x_hi, nid)
        if park[side]:
            _toy_parked_cars(P, rng, sg, S["R"], x_lo, x_hi, nid)
    S["driveways"] = np.array(dws, np.float64).reshape(-1, 3)
    _toy_traffic(S, P, rng, x_lo, x_hi, ego_x, nid)
    S["prims"] = P.tables()
    return S


def _toy_layout(rng, x_lo, x_hi):
    """Lanes, parking lanes (one flag per side), kerb, yard and building lines, ego lane, crosswalk -> (S, park)."""
    S = {"lanes": int(rng.integers(1, 3)), "lane_w": 3.3, "key": float(rng.uniform(0, 100)),
         "veg_scale": float(rng.uniform(4, 8)), "veg_frac": float(rng.uniform(0.35, 0.65)),
         "bump_phase": rng.uniform(0, 2 * np.pi, 2)}
    S["R"] = S["lanes"] * S["lane_w"]
    park = rng.random(2) < 0.6                      # a parking lane on side 0 (left) / 1 (right)
    S["y_s0"] = S["R"] + 2.4 * park
    S["y_s1"] = S["y_s0"] + rng.uniform(2.0, 4.0, 2)
    S["y_b"] = S["y_s1"] + rng.uniform(3.0, 9.0, 2)
    S["ego_y"] = -S["lane_w"] * (S["lanes"] - 0.5)
    zx = rng.uniform(x_lo + 20, x_hi - 20)
    S["zebra"] = (zx, zx + 4.0) if rng.random() < 0.7 else (np.inf, np.inf)
    return S, park


def _toy_buildings(P, rng, side, sg, ys1, yb, x_lo, x_hi, nid):
    """Buildings behind the yards, each maybe with a driveway (and a car on it) -> list of (x0, x1, side)."""
    x, dws = x_lo + rng.uniform(0, 10), []
    while x < x_hi:
        L, gap = rng.uniform(8, 25), rng.uniform(2, 12)
        if rng.random() < 0.8:
            D, H = rng.uniform(8, 15), rng.uniform(5, 20)
            P.add("box", "building", (x + L / 2, sg * (yb + D / 2), H / 2, L / 2, D / 2, H / 2, 0.0),
                  _TOY_FACADES[rng.integers(len(_TOY_FACADES))])
            if rng.random() < 0.75:
                w, x0 = rng.uniform(3, 6), x + rng.uniform(0, max(L - 6, 0.1))
                dws.append((x0, x0 + w, side))
                if rng.random() < 0.5:           # a car parked on the driveway
                    _toy_vehicle(P, rng, "car", x0 + w / 2, sg * (ys1 + (yb - ys1) / 2), np.pi / 2, nid(),
                                 _TOY_SIDEWALK_H)
        x += L + gap
    return dws


def _toy_greenery(P, rng, sg, ys1, yb, x_lo, x_hi):
    """Trees (trunk + canopy) along the yard edge, bushes (low vegetation) in the yard."""
    x = x_lo + rng.uniform(0, 8)
    while x < x_hi:
        if rng.random() < 0.6:
            ty, h, r = sg * (ys1 + rng.uniform(0.8, 2.0)), rng.uniform(2.0, 4.0), rng.uniform(0.12, 0.3)
            P.add("cyl", "trunk", (x, ty, 0.0, h + 0.5, r))
            R_c = rng.uniform(1.5, 3.0)
            P.add("ell", "tree_canopy", (x, ty, h + R_c * 0.8, R_c, R_c, R_c * rng.uniform(0.8, 1.3)))
        if rng.random() < 0.5:
            by, rb = sg * rng.uniform(ys1 + 1.0, yb), rng.uniform(0.5, 1.4)
            P.add("ell", "low_vegetation", (x + 4, by, _TOY_SIDEWALK_H + 0.2, rb, rb * rng.uniform(0.7, 1.3),
                                            rb * 0.6))
        x += rng.uniform(6, 16)


def _toy_sidewalk_objects(P, rng, sg, ys0, ys1, x_lo, x_hi, nid):
    """Poles (most with a sign), pedestrians and bicycles on the sidewalk."""
    hs = _TOY_SIDEWALK_H
    x = x_lo + rng.uniform(0, 15)
    while x < x_hi:
        py, h = sg * (ys0 + 0.5), rng.uniform(4, 8)
        P.add("cyl", "pole", (x, py, 0.0, h, rng.uniform(0.07, 0.12)))
        if rng.random() < 0.7:
            P.add("box", "traffic_sign", (x + 0.1, py, rng.uniform(2.4, 3.0), 0.04, 0.45, 0.4, 0.0),
                  [(30, 80, 190), (200, 30, 30), (240, 240, 240)][rng.integers(3)])
        for _ in range(rng.integers(0, 4)):
            P.add("cyl", "pedestrian", (x + rng.uniform(2, 12), sg * rng.uniform(ys0 + 0.5, ys1 - 0.3), hs,
                                       hs + rng.uniform(1.55, 1.9), rng.uniform(0.22, 0.3)),
                  _TOY_PAINTS[rng.integers(len(_TOY_PAINTS))] * 0.7, nid())
        if rng.random() < 0.5:
            P.add("box", "bicycle", (x + 1.5, sg * (ys0 + 0.9), hs + 0.55, 0.85, 0.08, 0.45, 0.0),
                  (40, 160, 200), nid())
        x += rng.uniform(12, 30)


def _toy_parked_cars(P, rng, sg, road_half_width, x_lo, x_hi, nid):
    """Cars parked in the parking lane of one side."""
    x = x_lo + rng.uniform(0, 6)
    while x < x_hi:
        if rng.random() < 0.6:
            _toy_vehicle(P, rng, "car", x, sg * (road_half_width + 1.2), rng.choice([0.0, np.pi]), nid())
        x += rng.uniform(5.5, 9.0)


def _toy_traffic(S, P, rng, x_lo, x_hi, ego_x, nid):
    """Stopped vehicles in the lanes (kept out of the ego lane along the ego path) and a construction zone."""
    for k in range(-S["lanes"], S["lanes"]):
        y = (k + 0.5) * S["lane_w"]
        is_ego_lane = abs(y - S["ego_y"]) < 0.1
        x = x_lo + rng.uniform(0, 20)
        while x < x_hi:
            if not (is_ego_lane and ego_x[0] - 15 < x < ego_x[1] + 20):
                kind = rng.choice(["car", "car", "car", "car", "truck", "bus"])
                _toy_vehicle(P, rng, kind, x, y + rng.uniform(-0.3, 0.3), 0.0 if y < 0 else np.pi, nid())
            x += rng.uniform(12, 35)
    for _ in range(2):                               # road works: cones and barriers along the far road edge,
        x, y = rng.uniform(ego_x[0] - 20, ego_x[1] + 10), S["R"] - 0.6   # one of them near the ego path
        for _ in range(rng.integers(3, 9)):
            if rng.random() < 0.5:
                P.add("cyl", "traffic_cone", (x, y, 0.0, 0.7, 0.17), inst=nid())
            else:
                P.add("box", "barrier", (x, y, 0.5, 1.0, 0.2, 0.5, 0.0), inst=nid())
            x += rng.uniform(2.5, 4.0)


# ---- vectorised ray casting: every ray starts at the same sensor origin o (3,), directions d (N,3) unit ----
def _toy_nearest_per_ray(ri, t):
    """Indices (into the pair arrays) of the nearest hit per ray, the first pair on ties. The pairs are ray-major
    (ri sorted, as _toy_candidates gives them), so a ray's pairs are one run: a min per run, no sort needed."""
    if len(ri) == 0:
        return np.zeros(0, np.int64)
    start = np.flatnonzero(np.r_[True, ri[1:] != ri[:-1]])
    run_min = np.repeat(np.minimum.reduceat(t, start), np.diff(np.r_[start, len(ri)]))
    at_min = np.flatnonzero(t == run_min)
    return at_min[np.r_[True, ri[at_min[1:]] != ri[at_min[:-1]]]]


def _toy_candidates(o, d, centres, radii, t_max, chunk=4096):
    """(ray, primitive) pairs whose bounding sphere the ray crosses before t_max (N,), the ray's nearest hit so
    far: (ri, pi) int64, ray-major. A primitive lies inside its sphere, so a sphere entered beyond t_max cannot
    hold a nearer hit: those pairs are dropped before the exact tests. Small chunks and in-place operations keep
    the (n, P) arrays in the cache (the test is memory-bound)."""
    oc = (centres - o).astype(np.float32)  # (P, 3)
    c2, r = (oc * oc).sum(1), (radii * 1.001 + 1e-3).astype(np.float32)   # margin: float32 rounding can't drop a hit
    r2, ris, pis = r * r, [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in range(0, len(d) if len(oc) else 0, chunk):
        tc = d[s:s + chunk].astype(np.float32) @ oc.T  # (n, P) distance along the ray to the closest approach
        miss2 = tc * tc
        np.subtract(c2, miss2, out=miss2)              # squared distance of the closest approach to the centre
        crosses = miss2 <= r2
        crosses &= tc > -r
        ri, pi = np.divmod(np.flatnonzero(crosses), len(oc))
        front = tc[ri, pi] - r[pi] <= t_max[ri + s]    # sphere entered (lower bound, margin r) before t_max
        ris.append(ri[front] + s)
        pis.append(pi[front])
    return np.concatenate(ris), np.concatenate(pis)


def _toy_box_table(o, p):
    """(P,7) boxes cx,cy,cz, hx,hy,hz, yaw -> (P,15): + cos(yaw), sin(yaw), and the slab planes of the ray origin o
    in the box frame, -h - o_l (3) and h - o_l (3): the terms of _toy_hit_boxes that depend on the box only."""
    cy, sy = np.cos(p[:, 6]), np.sin(p[:, 6])
    rel = o[None] - p[:, :3]
    ol = np.stack([cy * rel[:, 0] + sy * rel[:, 1], -sy * rel[:, 0] + cy * rel[:, 1], rel[:, 2]], 1)
    return np.concatenate([p[:, :7], cy[:, None], sy[:, None], -p[:, 3:6] - ol, p[:, 3:6] - ol], 1)


def _toy_hit_boxes(dT, ri, terms):
    """Oriented boxes (slab test in the box frame) for pairs (ray ri, box). dT (3,N): the ray directions,
    transposed; terms (8,K) per pair: columns 7..14 of _toy_box_table(o, boxes), transposed (a row per term, so
    that every array of the test is contiguous). Returns t (K,) and, for _toy_box_normal, the entry face per pair:
    its axis in the box frame (the first of the largest per-axis entry distances) and the ray direction on it."""
    dx, dy, dz = dT[0, ri], dT[1, ri], dT[2, ri]
    cy, sy = terms[0], terms[1]
    for j, dl in enumerate((cy * dx + sy * dy, -sy * dx + cy * dy, dz)):   # the ray direction in the box frame
        dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        t1, t2 = terms[2 + j] / dl, terms[5 + j] / dl
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        if j == 0:
            tnear, tfar, face, d_face = lo, hi, np.zeros(len(ri), np.int64), dl
        else:
            later = lo > tnear
            face, d_face = np.where(later, j, face), np.where(later, dl, d_face)
            tnear, tfar = np.maximum(tnear, lo), np.minimum(tfar, hi)
    t = np.where((tnear <= tfar) & (tnear > 1e-4), tnear, np.inf)  # rays starting inside a box see through it
    return t, face, d_face


def _toy_box_normal(face, d_face, cy, sy):
    """World normals (K,3) of box entry faces (axis face in the box frame, ray direction d_face on that axis) of
    boxes with yaw cos cy, sin sy."""
    k = np.arange(len(face))
    nl = np.zeros((len(face), 3))
    nl[k, face] = -np.sign(d_face)
    return np.stack([cy * nl[:, 0] - sy * nl[:, 1], sy * nl[:, 0] + cy * nl[:, 1], nl[:, 2]], 1)


def _toy_hit_cylinders(o, d, ri, p):
    """Vertical cylinders (side + top cap). p (K,5) = x, y, z0, z1, r."""
    dd = d[ri]
    ox, oy = o[0] - p[:, 0], o[1] - p[:, 1]
    a = np.maximum(dd[:, 0] ** 2 + dd[:, 1] ** 2, 1e-12)
    b = 2 * (ox * dd[:, 0] + oy * dd[:, 1])
    c = ox ** 2 + oy ** 2 - p[:, 4] ** 2
    disc = b * b - 4 * a * c
    ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    zs = o[2] + ts * dd[:, 2]
    ts = np.where((disc >= 0) & (ts > 1e-4) & (zs >= p[:, 2]) & (zs <= p[:, 3]), ts, np.inf)
    tt = (p[:, 3] - o[2]) / np.where(dd[:, 2] < -1e-12, dd[:, 2], -1e-12)
    xt, yt = ox + tt * dd[:, 0], oy + tt * dd[:, 1]
    tt = np.where((dd[:, 2] < -1e-12) & (tt > 1e-4) & (xt ** 2 + yt ** 2 <= p[:, 4] ** 2), tt, np.inf)
    t = np.minimum(ts, tt)
    side = ts <= tt
    n = np.stack([np.where(side, (ox + ts * dd[:, 0]) / p[:, 4], 0), np.where(side, (oy + ts * dd[:, 1]) / p[:, 4], 0),
                  np.where(side, 0.0, 1.0)], 1)
    return t, n


def _toy_hit_ellipsoids(o, d, ri, p):
    """Axis-aligned ellipsoids. p (K,6) = centre, radii."""
    oe, de = (o[None] - p[:, :3]) / p[:, 3:], d[ri] / p[:, 3:]
    A, B, C = (de * de).sum(1), 2 * (oe * de).sum(1), (oe * oe).sum(1) - 1
    disc = B * B - 4 * A * C
    t = (-B - np.sqrt(np.maximum(disc, 0))) / (2 * A)
    t = np.where((disc >= 0) & (t > 1e-4), t, np.inf)
    n = (oe + np.where(np.isfinite(t), t, 0)[:, None] * de) / p[:, 3:]
    return t, n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)


def _toy_hit_ground(S, o, d):
    """Road/parking plane z=0, sidewalk plane z=kerb with kerb faces -> t, normal, dz (the ray's z, NaN going up).
    The yard heightfield comes after the primitives (_toy_hit_yard)."""
    N = len(d)
    t, n = np.full(N, np.inf), np.tile([0.0, 0.0, 1.0], (N, 1))
    dz = np.where(d[:, 2] < -1e-9, d[:, 2], np.nan)  # rays going up never meet the ground
    hs = _TOY_SIDEWALK_H
    for z, lo, hi in ((0.0, None, "y_s0"), (hs, "y_s0", "y_s1")):
        tz = (z - o[2]) / dz
        y = o[1] + tz * d[:, 1]
        side = (y < 0).astype(np.int64)
        ok = (tz > 0) & (np.abs(y) < S[hi][side]) & ((np.abs(y) >= S[lo][side]) if lo else True)
        t = np.where(ok & (tz < t), tz, t)
    for side, sg in ((0, 1.0), (1, -1.0)):           # kerb faces seen from the road
        yk = sg * S["y_s0"][side]
        dy = np.where(sg * d[:, 1] > 1e-9, d[:, 1], np.nan)
        tk = (yk - o[1]) / dy
        zk = o[2] + tk * d[:, 2]
        ok = (tk > 0) & (zk >= 0) & (zk < hs) & (tk < t)
        t = np.where(ok, tk, t)
        n[ok] = (0.0, -sg, 0.0)
    return t, n, dz


def _toy_ground_hit_material(S, o, d, t, n):
    """Material of the ground hits t (K,), normals n (K,3) of the rays d (K,3)."""
    inward = o[None] + t[:, None] * d - 0.01 * n    # kerb faces: classify just behind the face
    return _toy_ground_material(S, inward[:, 0], inward[:, 1])


def _toy_first_below(S, o, ta, span, dr, f):
    """March step of _toy_hit_yard: per ray, the first sample t = ta + span * f[j] that lies on or below the yard
    heightfield (-1: none). A ray leaves the march at its first such sample: the heightfield is evaluated there and
    before only (the same values as on the full (R, steps+1) grid, with about a third fewer evaluations)."""
    k, live = np.full(len(ta), -1), np.arange(len(ta))
    for j in range(len(f)):
        tj = ta[live] + span[live] * f[j]
        pj = o[None] + tj[:, None] * dr[live]
        below = pj[:, 2] <= _toy_yard_height(S, pj[:, 0], pj[:, 1])
        k[live[below]] = j
        live = live[~below]
    return k


def _toy_hit_yard(S, o, d, dz, t_flat, t, n, prim, steps=10, bisect=6):
    """March the yard heightfield inside its height band, then bisect. Only rays that can reach the yard.

    Cast after the primitives but with the result of the order ground (t_flat: planes and kerbs, then the yard),
    then primitives: the yard wins where it is nearer than the flat ground and not farther than the primitive hit
    (a primitive replaces only a strictly farther hit). Cast last, the yard needs no march for the rays whose band
    starts beyond their nearest hit t (behind a wall, a car): most of its work. Updates t, n, prim (-1: ground) in
    place where the yard is the nearest."""
    hs = _TOY_SIDEWALK_H
    ta, tb = (hs + _TOY_YARD_A - o[2]) / dz, (hs - o[2]) / dz
    ya, yb = o[1] + ta * d[:, 1], o[1] + tb * d[:, 1]
    start = np.maximum(ta, 0)      # the yard hit, if any, lies at or beyond it (the march and bisection only go on)
    rows = np.nonzero((tb > 0) & (np.maximum(np.abs(ya), np.abs(yb)) >= S["y_s1"].min()) & (start < t_flat)
                      & (start <= t))[0]
    if len(rows) == 0:
        return
    ta, span, dr = start[rows], tb[rows] - start[rows], d[rows]
    f = np.linspace(0, 1, steps + 1)
    k = _toy_first_below(S, o, ta, span, dr, f)
    hit = k > 0  # bracketed between the last sample above and the first one below
    rows, lo, hi, dr = rows[hit], ta[hit] + span[hit] * f[k[hit] - 1], ta[hit] + span[hit] * f[k[hit]], dr[hit]
    for _ in range(bisect):
        mid = 0.5 * (lo + hi)
        pm = o[None] + mid[:, None] * dr
        b = pm[:, 2] <= _toy_yard_height(S, pm[:, 0], pm[:, 1])
        hi, lo = np.where(b, mid, hi), np.where(b, lo, mid)
    closer = (hi < t_flat[rows]) & (hi <= t[rows])
    rows, hi = rows[closer], hi[closer]
    ph = o[None] + hi[:, None] * d[rows]
    e = 0.05  # normal by finite differences of the heightfield
    hx = _toy_yard_height(S, ph[:, 0] + e, ph[:, 1]) - _toy_yard_height(S, ph[:, 0] - e, ph[:, 1])
    hy = _toy_yard_height(S, ph[:, 0], ph[:, 1] + e) - _toy_yard_height(S, ph[:, 0], ph[:, 1] - e)
    nn = np.stack([-hx / (2 * e), -hy / (2 * e), np.ones(len(hi))], 1)
    nn = np.where(np.abs(nn) > 50, 0, nn)            # steps at region borders
    t[rows], prim[rows] = hi, -1
    n[rows] = nn / np.linalg.norm(nn, axis=1, keepdims=True)


def toy_cast(S, o, d, max_range=np.inf):
    """Casts rays from origin o (3,) along unit directions d (N,3) (road frame).

    Returns dict t (N,) metres (inf = miss), mat (N,) material (-1 = miss), prim (N,) primitive id (-1 = ground),
    normal (N,3)."""
    with np.errstate(invalid="ignore", divide="ignore"):   # NaN/inf mark rays that miss a surface
        return _toy_cast_all(S, o, d, max_range)


def _toy_cast_all(S, o, d, max_range):
    t, n, dz = _toy_hit_ground(S, o, d)
    t_flat = t.copy()
    prim = np.full(len(d), -1, np.int64)
    dT = np.ascontiguousarray(d.T)  # (3, N): the box test gathers each component of many pairs contiguously
    T = S["prims"]
    axis = d.mean(0)
    axis = axis / max(np.linalg.norm(axis), 1e-9)
    cone = np.arccos(np.clip(d @ axis, -1, 1)).max() + 1e-3 if np.linalg.norm(d.mean(0)) > 0.3 else np.inf
    for kind, fn, centre, radius in (
            ("box", _toy_hit_boxes, lambda p: p[:, :3], lambda p: np.linalg.norm(p[:, 3:6], axis=1)),
            ("cyl", _toy_hit_cylinders, lambda p: np.stack([p[:, 0], p[:, 1], (p[:, 2] + p[:, 3]) / 2], 1),
             lambda p: np.hypot(p[:, 4], (p[:, 3] - p[:, 2]) / 2)),
            ("ell", _toy_hit_ellipsoids, lambda p: p[:, :3], lambda p: p[:, 3:].max(1))):
        tab = T[kind]
        if len(tab["id"]) == 0:
            continue
        oc, rad = centre(tab["p"]) - o, radius(tab["p"])
        dist = np.linalg.norm(oc, axis=1)
        # cull: out of range, or outside the cone that holds all rays (cheap frustum test for cameras)
        ang = np.arccos(np.clip(oc @ axis / np.maximum(dist, 1e-9), -1, 1)) - np.arcsin(np.clip(rad / np.maximum(
            dist, 1e-9), 0, 1))
        near = (dist - rad < min(max_range, 1e9)) & ((ang < cone) | (dist <= rad))
        ids, pp = tab["id"][near], tab["p"][near]
        ri, pi = _toy_candidates(o, d, centre(pp), radius(pp), t)
        if len(ri) == 0:
            continue
        if kind == "box":  # per-box terms once per box, normals of the nearest hits only (the same values)
            terms = np.ascontiguousarray(_toy_box_table(o, pp)[:, 7:].T)
            tk, face, d_face = fn(dT, ri, terms[:, pi])
        else:
            tk, nk = fn(o, d, ri, pp[pi])
        ok = np.flatnonzero(tk < t[ri])
        best = ok[_toy_nearest_per_ray(ri[ok], tk[ok])]  # index of the nearest pair of each ray that gets nearer
        r = ri[best]
        if kind == "box":
            nk = _toy_box_normal(face[best], d_face[best], terms[0, pi[best]], terms[1, pi[best]])
        else:
            nk = nk[best]
        t[r], n[r], prim[r] = tk[best], nk, ids[pi[best]]
    _toy_hit_yard(S, o, d, dz, t_flat, t, n, prim)
    miss = ~np.isfinite(t) | (t > max_range)
    t[miss], prim[miss] = np.inf, -1
    # materials last: the ground's map only for the rays that see the ground
    mat = np.where(prim >= 0, T["mat"][np.maximum(prim, 0)], -1)
    g = np.flatnonzero(~miss & (prim < 0))
    mat[g] = _toy_ground_hit_material(S, o, d[g], t[g], n[g])
    return {"t": t, "mat": mat, "prim": prim, "normal": n}


# ---- sensors ----
_TOY_SUN = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])


def _toy_stripes(a, period, width):
    """True on lines `width` metres wide every `period` metres of coordinate a."""
    return (a % period) < width


def _toy_albedo(S, hit, p):
    """(N,3) RGB 0..255 of the hit surfaces: material/primitive colour x procedural texture (world-anchored).
    Each texture is evaluated on the pixels of its material only (elementwise: the same values)."""
    mat, prim, n = hit["mat"], hit["prim"], hit["normal"]
    T = S["prims"]
    rgb = _TOY_RGB[np.maximum(mat, 0)]
    on_prim = np.flatnonzero(prim >= 0)
    rgb[on_prim] = T["rgb"][prim[on_prim]]
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    u = np.where(np.abs(n[:, 0]) > np.abs(n[:, 1]), y, x)      # horizontal coordinate on vertical faces
    k = S["key"]
    M, grid = TOY_MAT, _toy_stripes

    def pixels(*names):  # indices of the pixels of these materials
        return np.flatnonzero(np.isin(mat, [M[m] for m in names]))

    # texture factor per material
    ter, veg = pixels("terrain"), pixels("low_vegetation", "tree_canopy")
    f, g = np.empty(len(mat)), np.ones(len(mat), bool)
    g[ter], g[veg] = False, False
    f[g] = 0.85 + 0.3 * _toy_noise(x[g] + 0.5 * z[g], y[g] - 0.5 * z[g], 0.35, k + 1)   # generic grain
    f[ter] = 0.7 + 0.5 * _toy_noise(x[ter], y[ter], 1.3, k + 2)
    f[veg] = 0.55 + 0.7 * _toy_noise(x[veg] + z[veg], y[veg] - z[veg], 0.25, k + 3)
    i = pixels("sidewalk")                                          # paving joints
    f[i] = np.where(grid(x[i], 0.8, 0.06) | grid(y[i], 0.8, 0.06), 0.6, f[i])
    i = pixels("driveway")                                          # bricks
    f[i] = f[i] * (0.8 + 0.2 * ((np.floor(x[i] / 0.3) + np.floor(y[i] / 0.6)) % 2))
    out = rgb * f[:, None]
    i = pixels("parking")
    out[i[grid(x[i], 2.6, 0.15)]] = (235, 235, 230)                # stall lines
    i = pixels("traffic_cone")
    out[i[(z[i] > 0.3) & (z[i] < 0.45)]] = (235, 235, 230)         # reflective band
    i = pixels("building")
    ui, zi = u[i] % 3.0, z[i] % 3.2
    out[i[(np.abs(n[i, 2]) < 0.5) & (ui > 1.0) & (ui < 2.2) & (zi > 1.0) & (zi < 2.4)]] = (60, 72, 95)   # windows
    i = pixels("bus", "truck")
    out[i[(z[i] > 1.9) & (z[i] < 2.6) & (np.abs(n[i, 2]) < 0.5)]] = (60, 72, 95)                        # windows
    i = pixels("barrier")
    out[i] *= np.where(grid(u[i] + z[i], 0.8, 0.4), 1.0, 0.35)[:, None] * np.array([1.0, 0.25, 0.25])
    return out


def toy_render_camera(S, origin, R_cam, K, W, H):
    """Ray-casts one pinhole camera (road frame). R_cam (3,3): camera axes (x right, y down, z forward) as columns.

    Returns img (H,W,3) uint8, material (H,W) int64 (-1 = sky), depth (H,W) metres along the optical axis."""
    v, u = np.divmod(np.arange(H * W), W)
    pix = np.stack([u + 0.5, v + 0.5, np.ones(H * W)], 1)                  # pixel centres (u = col, v = row)
    dc = pix @ np.linalg.inv(K).T                                             # (HW,3) camera frame, z = 1
    dw = dc @ R_cam.T
    norm = np.linalg.norm(dw, axis=1)
    hit = toy_cast(S, origin, dw / norm[:, None])
    shade = 0.5 + 0.5 * np.clip(hit["normal"] @ _TOY_SUN, 0, 1)
    sky_el = np.clip(dw[:, 2] / norm, 0, 1)[:, None]
    rgb = np.array([200.0, 215, 235]) * (1 - sky_el) + np.array([90.0, 140, 215]) * sky_el
    ok = np.flatnonzero(np.isfinite(hit["t"]))                                # the sky keeps its colour
    t = hit["t"][ok]
    p = origin[None] + t[:, None] * dw[ok] / norm[ok, None]
    haze = np.clip(t / 250.0, 0, 0.5)[:, None]
    albedo = _toy_albedo(S, {key: v[ok] for key, v in hit.items()}, p)
    rgb[ok] = albedo * shade[ok, None] * (1 - haze) + haze * np.array([200.0, 210, 225])
    depth = np.where(np.isfinite(hit["t"]), hit["t"] / norm, np.inf)          # z_cam = t / |dc| since dc_z = 1
    return (np.clip(rgb, 0, 255).round().astype(np.uint8).reshape(H, W, 3), hit["mat"].reshape(H, W),
            depth.reshape(H, W))


def _toy_lidar(S, origin, R_sensor, elev_deg, n_az, max_range, rng):
    """Spinning lidar. R_sensor (3,3): sensor axes as columns in the road frame.

    Returns xyz (M,3) sensor frame, reflectance (M,) 0..1-ish, ring (M,), material (M,), instance (M,)."""
    el = np.deg2rad(np.asarray(elev_deg, np.float64))
    az = 2 * np.pi * (np.arange(n_az) + rng.uniform(0, 1)) / n_az
    A, E = np.meshgrid(az, el, indexing="ij")        # azimuth-major order, like a spinning sensor
    ring = np.tile(np.arange(len(el)), n_az)
    dl = np.stack([np.cos(E) * np.cos(A), np.cos(E) * np.sin(A), np.sin(E)], -1).reshape(-1, 3)
    hit = toy_cast(S, origin, dl @ R_sensor.T, max_range)
    keep = np.isfinite(hit["t"]) & (hit["t"] > 1.0) & (rng.random(len(dl)) > 0.01)  # 1 % dropped returns
    t = hit["t"][keep] + rng.normal(0, 0.015, keep.sum())                            # range noise
    mat, prim = hit["mat"][keep], hit["prim"][keep]
    cos_inc = np.abs((hit["normal"][keep] * (dl[keep] @ R_sensor.T)).sum(1))
    refl = np.clip(rng.normal(_TOY_REFL[mat, 0], _TOY_REFL[mat, 1]), 0.005, 1.0) * (0.4 + 0.6 * cos_inc)
    inst = np.where(prim >= 0, S["prims"]["inst"][np.maximum(prim, 0)], 0)
    return t[:, None] * dl[keep], refl, ring[keep], mat, inst


# ---- poses and the nuScenes / SemanticKITTI writers ----
def _toy_rotz(yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _toy_quat_from_matrix(R):
    """Rotation matrix -> unit quaternion [w, x, y, z] (nuScenes convention), w >= 0."""
    tr = np.trace(R)
    if tr > 0:
        s = 2 * math.sqrt(tr + 1)
        q = [s / 4, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2 * math.sqrt(1 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, s / 4, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2 * math.sqrt(1 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, s / 4, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2 * math.sqrt(1 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, s / 4]
    q = np.array(q) / np.linalg.norm(q)
    return q * (1 if q[0] >= 0 else -1)


def _toy_matrix_from_quat(q):
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _toy_ego_path(S, x):
    """Ego position (x, y) and heading along a gently weaving lane-keeping path."""
    a, w, ph = 0.25, 1 / 12.0, S["bump_phase"][0]
    return S["ego_y"] + a * np.sin(w * x + ph), math.atan(a * w * math.cos(w * x + ph))


def _toy_token(*parts):
    return hashlib.md5("|".join(str(p) for p in parts).encode()).hexdigest()


def _toy_encode_image(img, fmt):
    """Byte-deterministic JPEG (fixed quality/subsampling, no metadata) or PNG."""
    from PIL import Image
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(img).save(buf, format="JPEG", quality=90, subsampling=2, optimize=False)
    else:
        Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _toy_nusc_plan(n_scans):
    """[(scene index, real v1.0-mini scene name, keyframes)]: ~3/4 of the scans in the 8 mini_train scenes,
    ~1/4 in the 2 mini_val scenes; below 10 scans, fewer scenes with one keyframe each (tests)."""
    names = TOY_MINI_TRAIN + TOY_MINI_VAL
    if n_scans < 10:
        n_val = max(1, n_scans // 4)
        keep = TOY_MINI_TRAIN[:max(1, n_scans - n_val)] + TOY_MINI_VAL[:n_val]
        return [(i, name, 1) for i, name in enumerate(names) if name in keep]
    n_train, n_val = max(1, round(3 * n_scans / 32)), max(1, round(n_scans / 8))
    return [(i, name, n_val if name in TOY_MINI_VAL else n_train) for i, name in enumerate(names)]


def _toy_nusc_scene_world(seed, si, n_kf):
    rng = np.random.default_rng([seed, 1, si])
    speed = float(rng.uniform(6, 10))                       # m/s; keyframes every 0.5 s
    S = _toy_world(rng, -90.0, speed * 0.5 * n_kf + 90.0, (0.0, speed * 0.5 * n_kf + 2))
    S["speed"] = speed
    S["t0"] = 1532402927647951 + (seed % 997) * 10 ** 10 + si * 10 ** 9   # microseconds, fixed (no clock)
    S["global_yaw"], S["global_t"] = float(rng.uniform(-np.pi, np.pi)), np.array([300.0 + 400 * si, 900.0, 0.0])
    return S


def _toy_nusc_ego(S, ts):
    """Ego pose at timestamp ts (µs): road-frame (R (3,3), t (3,)) and global-frame (quaternion, translation)."""
    x = S["speed"] * (ts - S["t0"]) * 1e-6
    y, yaw = _toy_ego_path(S, x)
    R_road, t_road = _toy_rotz(yaw), np.array([x, y, 0.0])
    q = _toy_quat_from_matrix(_toy_rotz(yaw + S["global_yaw"]))
    t_glob = _toy_rotz(S["global_yaw"]) @ t_road + S["global_t"]
    return R_road, t_road, q, t_glob


def _toy_nusc_rig():
    """Calibrated sensors in the ego frame: name -> (quaternion, translation, intrinsic K or None)."""
    W, H = TOY_NUSC_WH
    rig = {"LIDAR_TOP": (_toy_quat_from_matrix(_toy_rotz(-np.pi / 2)), np.array([0.943713, 0.0, 1.84023]), None)}
    for ch, (yaw, t, fx) in TOY_NUSC_CAMS.items():
        ps = math.radians(yaw)
        R = np.array([[math.sin(ps), 0, math.cos(ps)], [-math.cos(ps), 0, math.sin(ps)], [0, -1.0, 0]])
        K = np.array([[fx, 0, W / 2 + 3.0], [0, fx, H / 2 + 8.0], [0, 0, 1.0]])
        rig[ch] = (_toy_quat_from_matrix(R), np.array(t), K)
    return rig


def _toy_nusc_logfile(seed, si):
    return f"n{seed % 1000:03d}-2018-08-{si + 1:02d}-12-00-00+0800"


def _toy_nusc_keyframe(out, seed, si, name, n_kf, k, class_maps):
    """Casts and writes keyframe k of scene `name`: LIDAR_TOP .pcd.bin, lidarseg .bin, 6 JPEGs. Returns records."""
    S, rig = _toy_nusc_scene_world(seed, si, n_kf), _toy_nusc_rig()
    rng = np.random.default_rng([seed, 2, si, k])
    nus, log = Path(out) / "nuscenes", _toy_nusc_logfile(seed, si)
    ts_l = S["t0"] + k * 500000 + int(rng.integers(-2000, 2000))
    sample = _toy_token(seed, name, k, "sample")

    def tok(ch, kk=k):  # sample_data (= ego_pose) token of channel ch at keyframe kk, "" outside the scene
        return _toy_token(seed, name, kk, ch) if 0 <= kk < n_kf else ""

    rec = {"sample": [{"token": sample, "timestamp": ts_l, "prev": _toy_token(seed, name, k - 1, "sample") if k else "",
                       "next": _toy_token(seed, name, k + 1, "sample") if k < n_kf - 1 else "",
                       "scene_token": _toy_token(seed, name, "scene")}], "sample_data": [], "ego_pose": []}

    def add_sd(ch, ts, fn, fmt, w, h, q, tg):
        rec["sample_data"].append({
            "token": tok(ch), "sample_token": sample, "ego_pose_token": tok(ch),
            "calibrated_sensor_token": _toy_token(seed, name, "calibrated_sensor", ch), "timestamp": ts,
            "fileformat": fmt, "is_key_frame": True, "height": h, "width": w, "filename": fn,
            "prev": tok(ch, k - 1), "next": tok(ch, k + 1)})
        rec["ego_pose"].append({"token": tok(ch), "timestamp": ts, "rotation": [float(v) for v in q],
                                "translation": [float(v) for v in tg]})

    Re, te, q, tg = _toy_nusc_ego(S, ts_l)
    ql, tl, _ = rig["LIDAR_TOP"]
    xyz, refl, ring, mat, _ = _toy_lidar(S, te + Re @ tl, Re @ _toy_matrix_from_quat(ql),
                                         np.linspace(-30.67, 10.67, 32), 600, 70.0, rng)
    intensity = np.clip(np.round(refl * 170.0), 0, 255)           # nuScenes intensity 0..255
    fn = f"samples/LIDAR_TOP/{log}__LIDAR_TOP__{ts_l}.pcd.bin"
    (nus / fn).write_bytes(np.concatenate([xyz, intensity[:, None], ring[:, None]], 1).astype("<f4").tobytes())
    (nus / f"lidarseg/v1.0-mini/{tok('LIDAR_TOP')}_lidarseg.bin").write_bytes(TOY_MAT_NUSC[mat].tobytes())
    add_sd("LIDAR_TOP", ts_l, fn, "pcd", 0, 0, q, tg)
    rec["lidarseg"] = [{"token": tok("LIDAR_TOP"), "sample_data_token": tok("LIDAR_TOP"),
                        "filename": f"lidarseg/v1.0-mini/{tok('LIDAR_TOP')}_lidarseg.bin"}]
    W, H = TOY_NUSC_WH
    for ch in TOY_NUSC_CAMS:
        ts = ts_l + TOY_NUSC_CAM_DT[ch]
        Re, te, q, tg = _toy_nusc_ego(S, ts)                       # each camera has its own ego pose
        qc, tc, K = rig[ch]
        img, cmat, depth = toy_render_camera(S, te + Re @ tc, Re @ _toy_matrix_from_quat(qc), K, W, H)
        fn = f"samples/{ch}/{log}__{ch}__{ts}.jpg"
        (nus / fn).write_bytes(_toy_encode_image(img, "jpg"))
        add_sd(ch, ts, fn, "jpg", W, H, q, tg)
        if class_maps:
            np.savez_compressed(Path(out) / "_classmaps" / "nuscenes" / f"{tok(ch)}.npz",
                                cls=np.where(cmat >= 0, TOY_MAT_NUSC[np.maximum(cmat, 0)], 255).astype(np.uint8),
                                depth=depth.astype(np.float32))
    return rec


def _toy_nusc_static_tables(seed, plan):
    """The tables that do not depend on the casts: sensor, calibrated_sensor, log, map, scene, category, ..."""
    rig = _toy_nusc_rig()
    T = {"sensor": [{"token": _toy_token(seed, "sensor", ch), "channel": ch,
                     "modality": "lidar" if ch == "LIDAR_TOP" else "camera"} for ch in rig],
         "calibrated_sensor": [], "log": [], "scene": [], "attribute": [], "instance": [], "sample_annotation": []}
    for si, name, n_kf in plan:
        for ch, (q, t, K) in rig.items():
            T["calibrated_sensor"].append({
                "token": _toy_token(seed, name, "calibrated_sensor", ch),
                "sensor_token": _toy_token(seed, "sensor", ch),
                "translation": [float(v) for v in t], "rotation": [float(v) for v in q],
                "camera_intrinsic": [] if K is None else [[float(v) for v in row] for row in K]})
        log_tok = _toy_token(seed, name, "log")
        T["log"].append({"token": log_tok, "logfile": _toy_nusc_logfile(seed, si), "vehicle": f"n{seed % 1000:03d}",
                         "date_captured": f"2018-08-{si + 1:02d}", "location": "toy-town"})
        T["scene"].append({"token": _toy_token(seed, name, "scene"), "log_token": log_tok, "nbr_samples": n_kf,
                           "first_sample_token": _toy_token(seed, name, 0, "sample"),
                           "last_sample_token": _toy_token(seed, name, n_kf - 1, "sample"), "name": name,
                           "description": f"toy world (data.py make_toy), seed {seed}"})
    T["map"] = [{"category": "semantic_prior", "token": _toy_token(seed, "map"),
                 "filename": "maps/toy_placeholder_not_a_map.png", "log_tokens": [r["token"] for r in T["log"]]}]
    T["category"] = [{"token": _toy_token("category", n), "name": n, "description": f"nuScenes-lidarseg class {n}",
                      "index": i} for i, n in enumerate(TOY_NUSC_CATEGORIES)]
    T["visibility"] = [{"description": f"visibility of whole object is between {a} and {b}%", "token": str(i + 1),
                        "level": f"v{a}-{b}"} for i, (a, b) in enumerate([(0, 40), (40, 60), (60, 80), (80, 100)])]
    return T


_TOY_KITTI_DRIVE = 4  # scans per street: a toy sequence is several short drives through different streets


def _toy_kitti_world(seed, seq, i):
    """The street of scan i (one per block of _TOY_KITTI_DRIVE scans, for diversity)."""
    n = _TOY_KITTI_DRIVE
    return _toy_world(np.random.default_rng([seed, 3, seq, i // n]), -90.0, 2.0 * n + 90.0, (0.0, 2.0 * n + 2))


def _toy_kitti_velo_pose(S, i):
    """Velodyne pose of scan i in its street's road frame: 2 m per scan (20 m/s at 10 Hz), sensor 1.73 m high."""
    x = 2.0 * (i % _TOY_KITTI_DRIVE)
    y, yaw = _toy_ego_path(S, x)
    return _toy_rotz(yaw), np.array([x, y, 1.73])


def _toy_kitti_cam2():
    """Camera 2 in the velodyne frame from calib (P2 @ Tr): K (3,3), cam->velo axes R (3,3), centre c (3,)."""
    P2, R, t = _toy_kitti_P("P2"), _TOY_KITTI_TR[:, :3], _TOY_KITTI_TR[:, 3]
    K = P2[:, :3]
    b = np.linalg.solve(K, P2[:, 3])                  # P2 = K [I | b]
    Rinv = np.linalg.inv(R)
    return K, Rinv, -Rinv @ (t + b)


def _toy_kitti_frame(out, seed, seq, n, i, class_maps):
    """Casts and writes scan i of sequence `seq`: velodyne .bin, labels .label, image_2 .png."""
    S = _toy_kitti_world(seed, seq, i)
    rng = np.random.default_rng([seed, 4, seq, i])
    Rv, tv = _toy_kitti_velo_pose(S, i)
    xyz, refl, _, mat, inst = _toy_lidar(S, tv, Rv, np.linspace(2.0, -24.8, 64), 360, 80.0, rng)
    remission = np.clip(np.round(refl * 2.2, 2), 0.0, 1.0)          # KITTI remission 0..1
    d = Path(out) / "semantic_kitti" / "dataset" / "sequences" / f"{seq:02d}"
    (d / "velodyne" / f"{i:06d}.bin").write_bytes(np.concatenate([xyz, remission[:, None]], 1).astype("<f4").tobytes())
    label = (inst.astype(np.uint32) << 16) | TOY_MAT_KITTI[mat]     # instance id in the upper 16 bits
    (d / "labels" / f"{i:06d}.label").write_bytes(label.astype("<u4").tobytes())
    K, Rc, c = _toy_kitti_cam2()
    W, H = TOY_KITTI_WH
    img, cmat, depth = toy_render_camera(S, tv + Rv @ c, Rv @ Rc, K, W, H)
    (d / "image_2" / f"{i:06d}.png").write_bytes(_toy_encode_image(img, "png"))
    if class_maps:
        np.savez_compressed(Path(out) / "_classmaps" / "semantic_kitti" / f"{seq:02d}_{i:06d}.npz",
                            cls=np.where(cmat >= 0, TOY_MAT_KITTI[np.maximum(cmat, 0)], 0).astype(np.uint16),
                            depth=depth.astype(np.float32))
    return None


def _toy_kitti_text_files(seed, seq, n, d):
    """calib.txt (P0..P3, Tr), poses.txt (cam0 poses in the first cam0 frame, 3x4 rows; each street is laid
    1 km further along x, so poses jump between streets), times.txt (s)."""
    lines = [f"{k}: " + " ".join(f"{v:.12e}" for v in M.ravel())
             for k, M in [(k, _toy_kitti_P(k)) for k in ("P0", "P1", "P2", "P3")] + [("Tr", _TOY_KITTI_TR)]]
    (d / "calib.txt").write_text("\n".join(lines) + "\n")
    Tr = np.vstack([_TOY_KITTI_TR, [0, 0, 0, 1]])
    poses = []
    for i in range(n):
        Rv, tv = _toy_kitti_velo_pose(_toy_kitti_world(seed, seq, i), i)
        Tw = np.eye(4)
        Tw[:3, :3], Tw[:3, 3] = Rv, tv + [1000.0 * (i // _TOY_KITTI_DRIVE), 0, 0]
        poses.append(Tw @ np.linalg.inv(Tr))          # world <- cam0
    first = np.linalg.inv(poses[0])
    (d / "poses.txt").write_text("".join(" ".join(f"{v:.6e}" for v in (first @ P)[:3].ravel()) + "\n" for P in poses))
    (d / "times.txt").write_text("".join(f"{0.1 * i:.6e}\n" for i in range(n)))


def _toy_unit(args):
    """One unit of work (a nuScenes keyframe or a KITTI scan) for the process pool."""
    kind, rest = args[0], args[1:]
    return _toy_nusc_keyframe(*rest) if kind == "nusc" else _toy_kitti_frame(*rest)


def _toy_tick(bar, result):
    bar.update(1)
    return result


TOY_DEFAULT_SCANS = 64  # nuScenes keyframes: 8 train scenes x 6 + 2 val scenes x 8; KITTI: 32 (seq 00) + 16 (seq 08)
TOY_PARTS = ("nuscenes", "semantic_kitti")  # the two trees of the toy world; each can be generated alone
# seconds per part with the default scans on 2 free cores (half the CPU seconds measured), for ensure_toy's message
_TOY_PART_SECONDS = {"nuscenes": 13, "semantic_kitti": 6}


def _toy_check_parts(parts):
    """`parts` in the order of TOY_PARTS; ValueError for anything else (a bare string included)."""
    if isinstance(parts, str) or not set(parts) <= set(TOY_PARTS):
        raise ValueError(f"toy parts {parts!r}: pick among {TOY_PARTS}")
    return [p for p in TOY_PARTS if p in parts]


def _toy_part_done(root, part):
    """A part is complete once its marker is written, after its files: DONE.<part>, or DONE (the whole world; the
    only marker of trees written before parts could be generated alone)."""
    return (Path(root) / "DONE").exists() or (Path(root) / f"DONE.{part}").exists()


def _toy_parts_for(name, sets=None):
    """The parts that get_dataset(name, sets=sets) reads on the toy world: toy -> nuscenes, toy_kitti ->
    semantic_kitti, merged -> those of its sets (default: both)."""
    if name in ("toy", "toy_kitti"):
        return ("nuscenes",) if name == "toy" else ("semantic_kitti",)
    folders = {{"toy": "nuscenes", "toy_kitti": "semantic_kitti"}.get(s, s) for s in (sets or TOY_PARTS)}
    return tuple(p for p in TOY_PARTS if p in folders)


def _toy_clear(out, parts):
    """Removes `parts` and their markers before they are written again (never a mix of two generations); the other
    parts stay complete: a DONE becomes their own markers. Refuses a folder that the generator did not write."""
    import shutil
    marker = out / ".toy_world"
    if not marker.exists() and any((out / d).exists() for d in TOY_PARTS):
        raise FileExistsError(f"{out} already holds nuscenes/ or semantic_kitti/ that the toy generator did not "
                              f"write (no {marker.name} marker); refusing to overwrite: pick an empty folder.")
    if (out / "DONE").exists():
        params = (out / "DONE").read_text().removeprefix("toy world complete: ")
        for q in TOY_PARTS:
            if q not in parts:
                (out / f"DONE.{q}").write_text(params)
        (out / "DONE").unlink()
    for p in parts:
        for old in (out / f"DONE.{p}", out / p, out / "_classmaps" / p):
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by data.py make_toy; the folder may be regenerated\n")


def _toy_mark_done(out, parts, seed, n):
    """Markers, written after the files: DONE.<part> for each part written, or, once every part is complete, DONE
    alone (the marker of a whole world, as before parts; it then stands for the parts' own markers)."""
    params = {q: (out / f"DONE.{q}").read_text().strip() for q in TOY_PARTS if (out / f"DONE.{q}").exists()}
    params.update({p: f"seed={seed} scans={n}" for p in parts})
    if len(params) < len(TOY_PARTS):
        for p in parts:
            (out / f"DONE.{p}").write_text(params[p] + "\n")
        return
    same = len(set(params.values())) == 1
    (out / "DONE").write_text("toy world complete: " + (params[parts[0]] if same else ", ".join(
        f"{q} {v}" for q, v in params.items())) + "\n")
    for q in TOY_PARTS:
        (out / f"DONE.{q}").unlink(missing_ok=True)


def make_toy(out_dir, scans=None, seed=0, progress=True, workers=2, class_maps=False, parts=TOY_PARTS):
    """Generates the toy world into out_dir: out_dir/nuscenes (v1.0-mini) and out_dir/semantic_kitti (00 train,
    08 val), then out_dir/DONE. `scans` = nuScenes keyframes (default 64: 48 mini_train + 16 mini_val); KITTI gets
    scans/2 (seq 00) + scans/4 (seq 08). Byte-identical for a seed, whatever `workers` (processes, fork).
    parts: the trees to (re)write, among TOY_PARTS; each is byte-identical to the same tree of a whole generation
    and the others are kept (_toy_mark_done: its marker is DONE.<part> until every part is complete).
    class_maps=True also writes each image's per-pixel class and depth to out_dir/_classmaps (tests only)."""
    from tqdm import tqdm
    n, out, parts = int(scans or TOY_DEFAULT_SCANS), Path(out_dir), _toy_check_parts(parts)
    if not parts:
        raise ValueError("toy parts: none asked for")
    _toy_clear(out, parts)
    plan, kitti, t_start = _toy_nusc_plan(n), {0: max(1, n // 2), 8: max(1, n // 4)}, time.time()
    nus, units = out / "nuscenes", []
    if "nuscenes" in parts:
        subs = ["v1.0-mini", "maps", "lidarseg/v1.0-mini"] + [f"samples/{c}" for c in ["LIDAR_TOP", *TOY_NUSC_CAMS]]
        for sub in subs:
            (nus / sub).mkdir(parents=True, exist_ok=True)
        units += [("nusc", str(out), seed, si, name, n_kf, k, class_maps) for si, name, n_kf in plan
                  for k in range(n_kf)]
    if "semantic_kitti" in parts:
        for seq in kitti:
            for sub in ("velodyne", "labels", "image_2"):
                (out / "semantic_kitti" / "dataset" / "sequences" / f"{seq:02d}" / sub).mkdir(parents=True,
                                                                                               exist_ok=True)
        units += [("kitti", str(out), seed, seq, m, i, class_maps) for seq, m in kitti.items() for i in range(m)]
    if class_maps:
        for sub in parts:
            (out / "_classmaps" / sub).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(units), desc=f"toy {' + '.join(parts)} -> {out}", disable=not progress, unit="scan")
    import multiprocessing as mp
    workers = min(workers, os.cpu_count() or 1, len(units))
    if workers > 1 and "fork" in mp.get_all_start_methods() and not mp.current_process().daemon:
        # units are independent and seeded: the same bytes; one BLAS thread per worker (one_blas_thread)
        with mp.get_context("fork").Pool(workers, initializer=one_blas_thread) as pool:
            results = [_toy_tick(bar, r) for r in pool.imap(_toy_unit, units)]
    else:
        results = [_toy_tick(bar, _toy_unit(u)) for u in units]
    bar.close()
    if "nuscenes" in parts:
        _toy_write_nusc_tables(nus, seed, plan, [r for r in results if r is not None])
    if "semantic_kitti" in parts:
        for seq, m in kitti.items():
            _toy_kitti_text_files(seed, seq, m, out / "semantic_kitti" / "dataset" / "sequences" / f"{seq:02d}")
    _toy_mark_done(out, parts, seed, n)
    if progress:
        mb = sum(f.stat().st_size for p in parts for f in (out / p).rglob("*") if f.is_file()) / 2 ** 20
        what = {"nuscenes": f"{sum(k for _, _, k in plan)} nuScenes keyframes (v1.0-mini: mini_train/mini_val)",
                "semantic_kitti": f"{kitti[0]} + {kitti[8]} SemanticKITTI scans (00 / 08)"}
        print(f"[toy] {', '.join(what[p] for p in parts)}, {mb:.1f} MB in {time.time() - t_start:.0f} s -> {out}")
    return out


def _toy_write_nusc_tables(nus, seed, plan, recs):
    """Writes the 14 v1.0-mini JSON tables (+ placeholder map PNG that nuscenes-devkit requires)."""
    T = _toy_nusc_static_tables(seed, plan)
    for key in ("sample", "sample_data", "ego_pose", "lidarseg"):
        T[key] = [row for r in recs for row in r[key]]
    for key, rows in T.items():
        (nus / "v1.0-mini" / f"{key}.json").write_text(json.dumps(rows, indent=1))
    placeholder = _toy_encode_image(np.zeros((1, 1, 3), np.uint8), "png")
    (nus / "maps" / "toy_placeholder_not_a_map.png").write_bytes(placeholder)


def ensure_toy(root=None, scans=None, seed=0, parts=TOY_PARTS):
    """Path of the toy world (default data/toy next to this file) once `parts` (TOY_PARTS: nuscenes,
    semantic_kitti) are complete: each missing or half-written one (no marker, which make_toy writes last) is
    generated with a progress bar, the others are kept."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent / "data" / "toy"
    parts = _toy_check_parts(parts)
    if all(_toy_part_done(root, p) for p in parts):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".toy_lock", "w") as lock:
        try:  # several processes (torchrun ranks) may ask at once: one generates, the others wait for it
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): single process assumed
            pass
        missing = [p for p in parts if not _toy_part_done(root, p)]
        if missing:
            secs = sum(_TOY_PART_SECONDS[p] for p in missing) * int(scans or TOY_DEFAULT_SCANS) / TOY_DEFAULT_SCANS
            print(f"[toy] no complete toy {' + '.join(missing)} at {root}: generating it (about {secs:.0f} s on 2 "
                  f"free cores, once)")
            make_toy(root, scans=scans, seed=seed, parts=missing)
    return root


# colours of the 16 nuScenes classes for pictures (barrier, bicycle, bus, car, construction_vehicle, motorcycle,
# pedestrian, traffic_cone, trailer, truck, driveable_surface, other_flat, sidewalk, terrain, manmade, vegetation)
TOY_PREVIEW_COLOURS = np.array([
    [255, 120, 50], [255, 192, 203], [255, 255, 0], [0, 150, 245], [0, 255, 255], [255, 127, 0], [255, 0, 0],
    [255, 240, 150], [135, 60, 0], [160, 32, 240], [255, 0, 255], [139, 137, 137], [75, 0, 75], [150, 240, 80],
    [230, 230, 250], [0, 175, 0]], np.float64) / 255


def render_toy_preview(root=None, out_png="toy_preview.png", index=0, cam="CAM_FRONT"):
    """README picture: one toy nuScenes val scan in bird's-eye view coloured by class, next to a camera image
    with the same labelled points projected on it (through the nuScenes reader, as every stage sees it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ds = get_dataset("toy", root=ensure_toy(root), split="val")
    pts, lab = ds.points(index), ds.labels(index)
    col = np.where((lab == IGNORE)[:, None], 0.5, TOY_PREVIEW_COLOURS[np.minimum(lab, 15)])
    proj = ds.project(index, cam)
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1, 1.6]})
    near = np.abs(pts[:, :2]).max(1) < 40
    ax[0].scatter(pts[near, 0], pts[near, 1], c=col[near], s=0.8, linewidths=0)
    ax[0].set(aspect="equal", title=f"toy LIDAR_TOP, {len(pts)} points (lidar frame, m)", xlabel="x", ylabel="y")
    ax[1].imshow(ds.image(index, cam))
    ax[1].scatter(proj["uv"][:, 0], proj["uv"][:, 1], c=col[proj["idx"]], s=2.0, linewidths=0)
    ax[1].set(title=f"{cam} with the projected labelled points", xticks=[], yticks=[])
    names = CLASS_NAMES["nuscenes"]
    present = np.unique(lab[lab != IGNORE])
    handles = [plt.Line2D([], [], marker="o", ls="", color=TOY_PREVIEW_COLOURS[k], label=names[k]) for k in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


if __name__ == "__main__":
    run_main(main)

