"""Every package of the source tree is listed in pyproject.toml, so a non-editable install
(a wheel, a cluster's site-packages) has all of it, not only what an editable checkout sees."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_source_package_is_installed():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    roots = {name: REPO / folder for name, folder in tool["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            package = ".".join((name, *rel))
            # a sub-folder mapped elsewhere (shira_dist.kernels -> kernels/) is found from its own root
            if not any(package == other or package.startswith(other + ".") for other in roots if other != name
                       and other.startswith(name + ".")):
                found.add(package)
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    # a listed folder without __init__.py is a data package (the sbatch template): it must exist
    data_only = listed - found
    assert data_only == {"shira_dist.launch.templates"} and any((REPO / "launch" / "templates").glob("*.j2"))
