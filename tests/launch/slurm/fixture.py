"""pytest fixture ``slurm_cluster``: one local SLURM cluster (``cluster.py``) for the whole test session.

Use from a test module (tests are not packages; ``--import-mode=importlib``)::

    slurm_cluster = load_by_path(Path(__file__).parent / "slurm" / "fixture.py").slurm_cluster
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_by_path(path: Path):
    """Import a helper module from a file under a name that cannot clash with installed packages."""
    name = f"_shira_tests_{path.parent.name}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cluster = load_by_path(Path(__file__).with_name("cluster.py"))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running cluster (munged, slurmctld, slurmd n1 and n2, both idle); stopped by PID afterwards."""
    # A short path: the munge socket path must fit in a unix socket address (108 bytes).
    running = cluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield running
    finally:
        cluster.stop(running)
