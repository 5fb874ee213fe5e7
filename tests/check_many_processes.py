"""Run the plain-loop distributed checks with more than 4 processes (the ``(2, n)`` all_reduce path), by hand.

Too costly for the suite on 2 cores; uses the suite's own helpers and assertions. Usage (from the repository root)::

    OMP_NUM_THREADS=1 python tests/check_many_processes.py [--nproc 5]

Replicated mode: FOP (accumulation 1) and K-FAC (accumulation 2); specialists: FOP and K-FAC (accumulation 2).
6 steps, inverse interval 3; each must give bitwise-identical replicas and match one process fed the same
sub-batches (allclose), as ``test_factors_meet_only_on_inverse_steps_and_match_one_process`` and the
specialists tests check for 2 and 3 processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_distributed as td  # noqa: E402
from dist_workers import single_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=5, help="processes (> 4 takes the (2, n) all_reduce path)")
    nproc = parser.parse_args().nproc
    root = Path(tempfile.mkdtemp())
    for mode, accum in (("fop", 1), ("kfac", 2)):
        records = td.plain_torchrun(nproc, root / f"replicated_{mode}", "--mode", mode, "--steps", "6", "--accum",
                                    str(accum), "--inverse_interval", "3", "--scenario", "plain")
        td._assert_plain_replicas_identical(records)
        td._assert_matches_single(records, single_process(nproc, mode, 6, accum, 3, "plain"))
        print(f"replicated {mode}, {nproc} processes: replicas bitwise identical, allclose to one process", flush=True)
    records = td.plain_torchrun(nproc, root / "specialists", "--steps", "6", "--accum", "2", "--inverse_interval", "3",
                                "--job", "fop,fop,specialists,plain,-,-", "--job", "kfac,kfac,specialists,plain,-,-")
    for mode in ("fop", "kfac"):
        td._assert_run_matches(records, mode, single_process(nproc, mode, 6, 2, 3, "plain"))
        print(f"specialists {mode}, {nproc} processes (owners {records[0]['fop']['owners']}): replicas bitwise "
              "identical, allclose to one process", flush=True)


if __name__ == "__main__":
    main()
