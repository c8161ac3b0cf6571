"""A test-only entry point for distributed runs: `python tests/rank_entry.py compress ... --nproc N`.

It runs the CLI as `python -m compressor` does, but first installs the fault hook that
COMPRESSOR_TEST_FAULT=RANK:LAYER[:raise|exit] describes (that rank raises, or exits with code 7,
when the walk reaches that decoder layer) and makes the --nproc launcher start its ranks through
this file too, so every rank installs it. Production code reads no such variable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from compressor.cli import main
from compressor.distributed import launch, policy, rank

FAULT_ENV = "COMPRESSOR_TEST_FAULT"


def install_fault(spec: str) -> None:
    who, layer, how = (spec.split(":") + ["raise"])[:3]

    def fault(index: int) -> None:
        if int(who) == rank() and int(layer) == index:
            if how == "exit":
                os._exit(7)
            raise RuntimeError(f"fault injected by {FAULT_ENV}={spec} on rank {rank()} in layer {index}")

    policy.fault_hook = fault


if __name__ == "__main__":
    launch.RANK_COMMAND = (str(Path(__file__).resolve()),)
    if os.environ.get(FAULT_ENV):
        install_fault(os.environ[FAULT_ENV])
    sys.exit(main())
