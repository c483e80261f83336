"""Where a benchmark number came from: machine, date, commit and software.

Every JSON under bench/results carries `stamp()` under the key "stamp", and its file name
starts with `machine_slug()` (e.g. "cpu-xeon-2core"), so a reader can tell which numbers
are current and which machine they describe without reading the run's log.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twa_kernels import _provenance
# the names bench scripts read from this module
from twa_kernels._provenance import CPU_FEATURES, cpu_flags, cpu_model, machine_slug  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


# Where benchmarks and experiments write their results: a results file written earlier in
# the same batch of runs does not make the code the next run measures differ from the commit.
OUTPUT_DIRS = ("bench/results", "results")


def stamp() -> dict:
    """Machine, UTC date, commit (and whether the tree's code was clean: changes under
    OUTPUT_DIRS do not count) and software versions (twa_kernels._provenance.stamp).

    A copy of the tree without its git directory (as shipped to a remote GPU machine) names
    its commit in $TWA_BENCH_COMMIT; its cleanliness is then unknown (None)."""
    info = _provenance.stamp(REPO, OUTPUT_DIRS)
    info["commit"] = info["commit"] or os.environ.get("TWA_BENCH_COMMIT") or None
    info["transparent_hugepage"] = transparent_hugepage()
    return info


def transparent_hugepage() -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never; None where it cannot
    be read): with "never" no buffer gets huge pages, and the kernels' times rise by their
    TLB misses."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    chosen = re.search(r"\[(\w+)\]", text)
    return chosen.group(1) if chosen else None


if __name__ == "__main__":  # `python bench/stamp.py` prints the CPU's slug, for results file names
    print(machine_slug())


def write_result(path: Path, result: dict) -> None:
    """`result` as JSON at `path`, written whole or not at all (io.write_json): an interrupted
    run leaves the earlier file, never half of one."""
    from twa_kernels.io import write_json

    write_json(path, result)
