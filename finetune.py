"""finetune.py — being written."""
