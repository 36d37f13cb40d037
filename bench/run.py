"""
Run the relay benchmarks (``make bench``).

Today there is one: ``bench/backpressure.py``, run with its defaults (1 GiB
through a listener that drains at 20 MB/s, 600 s deadline).  Any argument is
passed through to it, for example::

    python bench/run.py --bytes 134217728 --rate 50

The exit status is backpressure.py's: 0 good, 1 data check failed,
2 deadline passed, 3 over the memory budget (with --enforce-budget),
4 anything else.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from backpressure import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
