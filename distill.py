"""distill.py — being written."""
