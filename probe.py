"""probe.py — being written."""
