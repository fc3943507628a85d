"""How long the command line takes to answer before any work: `offsite --help`, `--version` and some
commands' help (their flags come from config dataclasses; the table says whether torch got imported).

    python benchmarks/cli_startup.py            # 5 runs each, median wall time in fresh processes
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

CASES = [["--help"], ["--version"], ["keygen", "-h"], ["compress", "-h"], ["finetune", "-h"]]


def main(runs: int = 5) -> None:
    print("| command | median wall time (s) | imports torch |")
    print("|---|---|---|")
    for argv in CASES:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", "import sys; from offsite.cli import main\ntry:\n    main(sys.argv[1:])\n"
                                  "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)", *argv],
                                 capture_output=True, text=True)
            times.append(time.perf_counter() - start)
        print(f"| offsite {' '.join(argv)} | {statistics.median(times):.2f} | {out.stderr.strip().splitlines()[-1]} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
