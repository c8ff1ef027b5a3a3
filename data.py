"""data.py — every dataset, camera projection, point preprocessing and metric of ScaLR.

(being written; see sections below)
"""
import numpy as np

# ==== [data] Constants, class maps, splits ====

# ==== [data] Readers of the native layouts ====

# ==== [data] Camera projections ====

# ==== [data] Point preprocessing (official.md §3) ====

# ==== [data] Torch datasets and collate ====

# ==== [data] Metrics ====

# ==== [toy] The embedded toy world ====

# ==== [data] Benchmark and CLI ====
