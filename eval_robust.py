"""eval_robust.py — being written."""
