"""Benchmark: ``ecr-webhook --help`` start-up vs ``python -c "import click"``.

Target (issue 2): at most 2x.  Uses hyperfine when installed, else repeated
subprocess runs (best of N).  Prints both figures and the ratio.
Run: ``.venv/bin/python bench/startup.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

EXE = str(Path(sys.executable).parent / "ecr-webhook")


def best_of(cmd: list[str], n: int = 30) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    click_s = best_of([sys.executable, "-c", "import click"])
    help_s = best_of([EXE, "--help"])
    dry_help_s = best_of([EXE, "dry-run", "--help"])
    print(f"python -c 'import click':  {click_s * 1000:.1f} ms (median of 30)")
    print(f"ecr-webhook --help:        {help_s * 1000:.1f} ms")
    print(f"ecr-webhook dry-run --help: {dry_help_s * 1000:.1f} ms")
    print(f"ratio --help / import click: {help_s / click_s:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
