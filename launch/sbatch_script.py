"""Render the sbatch script (``launch/templates/sbatch.sh.j2``, or a user's template) from typed settings."""

from __future__ import annotations

import datetime as dt
import re
import shlex
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import jinja2

from .errors import LaunchError

LAUNCHERS = ("torchrun", "srun")
# sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+$")


@dataclass(frozen=True)
class SbatchSettings:
    """Everything the template sees; checked by ``check()`` before rendering."""

    job_name: str
    run_dir: str  # absolute; logs/slurm-%j.out goes under it
    workdir: str  # the job's working directory (where the launcher ran: relative paths in the config hold)
    nodes: int
    nproc_per_node: int  # training processes per node
    launcher: str  # "torchrun": one agent per node, c10d rendezvous; "srun": srun starts every rank
    torchrun: list[str]  # ["/venv/bin/torchrun"] or [python, "-m", "torch.distributed.run"]
    python: str  # interpreter for ``-m shira_dist.train`` under the srun launcher
    module_args: list[str]  # shira_dist.train --config ... output_dir=... overrides
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    rdzv_port: int | None = None  # None: 20000 + job id % 20000, chosen inside the job
    env: list[tuple[str, str]] = field(default_factory=list)
    extra_directives: list[str] = field(default_factory=list)  # e.g. "--account=proj", "--mem=0"

    @property
    def ntasks_per_node(self) -> int:
        return 1 if self.launcher == "torchrun" else self.nproc_per_node

    def check(self) -> SbatchSettings:
        for what, value in (("--nodes", self.nodes), ("--nproc-per-node", self.nproc_per_node)):
            if value < 1:
                raise LaunchError(f"{what}={value}: must be >= 1")
        if self.launcher not in LAUNCHERS:
            raise LaunchError(f"--launcher={self.launcher!r}: allowed {', '.join(LAUNCHERS)}")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise LaunchError(f"--gpus-per-node={self.gpus_per_node} / --cpus-per-task={self.cpus_per_task}: "
                              f"GPUs must be >= 0, CPUs >= 1")
        if self.time is not None and not _TIME.match(self.time):
            raise LaunchError(f"--time={self.time!r}: use minutes, H:M:S or D-H:M:S, e.g. 30 or 02:00:00 or 1-00:00:00")
        if self.partition is not None and not _PARTITION.match(self.partition):
            raise LaunchError(f"--partition={self.partition!r}: letters, digits, '_', '.', '-' (comma-separated list)")
        if self.rdzv_port is not None and not 0 < self.rdzv_port < 65536:
            raise LaunchError(f"--rdzv-port={self.rdzv_port}: must be in 1..65535")
        for directive in self.extra_directives:
            if not directive.startswith("--") or "\n" in directive:
                raise LaunchError(f"--sbatch-arg={directive!r}: one sbatch option per flag, e.g. --sbatch-arg=--mem=0")
        return self


def default_template() -> str:
    """The packaged template; read through importlib.resources so it works installed or editable."""
    return resources.files("shira_dist.launch").joinpath("templates", "sbatch.sh.j2").read_text()


def render_sbatch(settings: SbatchSettings, template_text: str | None = None) -> str:
    """The sbatch script for ``settings``; undefined template variables are errors, not blanks."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["qjoin"] = lambda vs: shlex.join(str(v) for v in vs)
    try:
        template = env.from_string(template_text if template_text is not None else default_template())
        return template.render(**asdict(settings.check()), ntasks_per_node=settings.ntasks_per_node,
                               created=dt.datetime.now().isoformat(timespec="seconds"))
    except jinja2.TemplateError as exc:
        raise LaunchError(f"sbatch template: {type(exc).__name__}: {exc}") from None


def read_template(path: str | None) -> str | None:
    """A user's ``--template`` file (None: the packaged one)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"--template={path}: file not found")
    return p.read_text()
