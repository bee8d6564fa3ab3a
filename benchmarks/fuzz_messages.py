"""Fuzz target: the message fuzz properties with many examples (run by hand).

    python benchmarks/fuzz_messages.py            # 10,000 examples of each property
    python benchmarks/fuzz_messages.py 50000      # more

Runs tests/test_fuzz_messages.py with ``ALIGNFL_FUZZ_EXAMPLES`` set (and random, not
derandomised, search), and prints the number of examples and the seconds per property.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    os.environ["ALIGNFL_FUZZ_EXAMPLES"] = str(n)
    start = time.perf_counter()
    code = pytest.main([str(ROOT / "tests" / "test_fuzz_messages.py"), "-q", "-p",
                        "no:cacheprovider", "--durations=0", "--rootdir", str(ROOT)])
    print(f"{n} examples per property, {time.perf_counter() - start:.0f} s in all, exit {code}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
