"""Speedup report from run directories (script wrapper of ``dkd.report``).

    python profiling/report.py runs/kd_c1000 runs/dis_c1000_k50 -o reports/c1000

The implementation lives in ``dkd/report.py`` because this folder is not installed;
``dkd report`` calls the same ``write_report``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's `dkd` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dkd.report import main, write_report  # noqa: E402

__all__ = ["main", "write_report"]

if __name__ == "__main__":
    raise SystemExit(main())
