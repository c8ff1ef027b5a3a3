"""test_all.py — the checklist of the paper, one test per fact."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def test_top_level_layout_is_flat():
    names = sorted(p.name for p in ROOT.glob("*.py") if not p.name.startswith("_t_"))
    assert names == sorted(["data.py", "waffleiron.py", "distill.py", "probe.py", "finetune.py",
                            "eval_robust.py", "test_all.py"])
