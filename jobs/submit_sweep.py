"""Submit a whole sweep (same as ``replandscape submit SWEEP``).

    python jobs/submit_sweep.py configs/sweeps/paper.yaml cluster=example-gpu [--dry-run] [--wait]
"""

from __future__ import annotations

import sys

from replandscape.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
