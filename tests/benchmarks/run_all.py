"""Runs every benchmark in tests/benchmarks/ (``make bench``); each prints JSON lines.

Among them ``bench_gate.py``, the gate's calibration: it trains two seeds of the configured
model once (cached under ``.asr-retune/bench/gate/``), measures the gate's pass rates by
simulation and writes them to ``configs/gate-calibration.json`` for the report's footer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"# {script.name}", flush=True)
        rc = subprocess.call([sys.executable, str(script)])
        if rc:
            failed.append(script.name)
    if failed:
        print(f"# failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
