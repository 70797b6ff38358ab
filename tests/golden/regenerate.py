"""Regenerate the golden numbers (only when a change is *meant* to move them; say so in the commit).

    .venv/bin/python tests/golden/regenerate.py [--only toy|pm]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from golden.compute import compute_pm, compute_toy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["toy", "pm"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "toy"):
            (HERE / "toy.json").write_text(json.dumps(compute_toy(Path(tmp) / "toy"), indent=1) + "\n")
        if args.only in (None, "pm"):
            shared = HERE.parents[2] / "shared" / "data" / "ichallenge-pm"
            (HERE / "pm_r18.json").write_text(json.dumps(compute_pm(shared, Path(tmp) / "pm"), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
