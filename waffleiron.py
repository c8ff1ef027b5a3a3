"""waffleiron.py — the WaffleIron backbone, heads, checkpoint I/O and training helpers.

(being written; see sections below)
"""
import torch
import torch.nn as nn

# ==== [model] Backbone ====

# ==== [model] Heads ====

# ==== [model] Checkpoint I/O ====

# ==== [train] Schedules, layer decay, atomic save/resume, DDP, losses, evaluation, logging ====

# ==== [model] CLI: features and bench ====
