r"""Render the sbatch script (``launch/templates/sbatch.sh.j2``, or a user's template) from typed settings.

Every value that comes from the user is quoted where the template inserts it, in the form the reader
of that line expects:

    shell lines      ``{{ value | q }}`` / ``{{ values | qjoin }}``: shlex.quote, bash reads one word
    #SBATCH lines    ``{{ value | sq }}``: sbatch's own tokenizer (src/sbatch/opt.c ``_get_argument``)
                     reads these, not bash: ``"..."`` groups spaces, a backslash escapes the next
                     character (``\\``, ``\"``, ``\#``; an unescaped ``#`` starts a comment in
                     SLURM releases that honour only double quotes). For bash they are comments.
    comment lines    ``{{ value | q }}``, so a copied ``sbatch PATH`` line works

A line break cannot be quoted into one ``#SBATCH`` or comment line, so the options are checked
for newlines, carriage returns and NUL bytes when parsed (``options.check_text_options``), and
again here for settings built in code.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import jinja2

from .env_vars import ENV_KEY
from .errors import LaunchError
from .options import check_one_line

LAUNCHERS = ("torchrun", "srun")
# sbatch --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})\Z", re.ASCII)
_PARTITION = re.compile(r"^[A-Za-z0-9_.,-]+\Z")
# "--option" or "--option=value": one sbatch long option per --sbatch-arg.
_DIRECTIVE = re.compile(r"^(--[A-Za-z][A-Za-z0-9-]*)(=.*)?\Z")
# Characters sbatch's tokenizer reads literally outside quotes (and that need no quoting for a reader).
_SBATCH_BARE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+\Z")


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
    env: list[tuple[str, str]] = field(default_factory=list)  # exported in the script (not secrets)
    secret_env_keys: list[str] = field(default_factory=list)  # reach the job through sbatch's environment only
    extra_directives: list[str] = field(default_factory=list)  # e.g. "--account=proj", "--mem=0"

    @property
    def ntasks_per_node(self) -> int:
        return 1 if self.launcher == "torchrun" else self.nproc_per_node

    @property
    def output(self) -> str:
        """``--output``: ``<run dir>/logs/slurm-%j.out``, a ``%`` in the run directory written ``%%`` (literal)."""
        return self.run_dir.replace("%", "%%") + "/logs/slurm-%j.out"

    def check(self) -> SbatchSettings:
        self._check_text()
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
            if not _DIRECTIVE.match(directive):
                raise LaunchError(f"--sbatch-arg={directive!r}: one sbatch long option per flag, --OPTION or "
                                  f"--OPTION=VALUE, e.g. --sbatch-arg=--mem=0 or --sbatch-arg=--exclusive")
        for key in [k for k, _ in self.env] + self.secret_env_keys:
            if not ENV_KEY.match(key):
                raise LaunchError(f"--env {key!r}: KEY must be a shell variable name, e.g. NCCL_DEBUG")
        if "\\" in self.run_dir:
            raise LaunchError(f"--runs-dir: the run directory {self.run_dir!r} contains a backslash, which "
                              f"sbatch's --output cannot name (SLURM drops backslashes from it and stops "
                              f"expanding %j); choose a --runs-dir without one")
        return self

    def _check_text(self) -> None:
        """No value may break a line of the script (see the module docstring); names the option it came from."""
        for what, value in (("working directory", self.workdir), ("--runs-dir", self.run_dir),
                            ("--job-name", self.job_name), ("python", self.python), ("--partition", self.partition),
                            ("--time", self.time), *(("torchrun", v) for v in self.torchrun),
                            *(("training argument", v) for v in self.module_args),
                            *(("--env", f"{k}={v}") for k, v in self.env),
                            *(("--sbatch-arg", v) for v in self.extra_directives)):
            if value is not None:
                check_one_line(what, value)


def sbatch_quote(value) -> str:
    """``value`` as one word for sbatch's ``#SBATCH`` tokenizer: bare when it is plain (``/runs/a-1``,
    ``01:00:00``), else ``"..."`` with ``\\``, ``"`` and ``#`` backslash-escaped: ``/a b`` -> ``"/a b"``."""
    text = str(value)
    if _SBATCH_BARE.match(text):
        return text
    return '"' + re.sub(r'([\\"#])', r"\\\1", text) + '"'


def sbatch_option(directive: str) -> str:
    """``--comment=a b`` -> ``--comment="a b"``; ``--exclusive`` stays as it is."""
    option, sep, value = directive.partition("=")
    return f"{option}={sbatch_quote(value)}" if sep else option


def default_template() -> str:
    """The packaged template; read through importlib.resources so it works installed or editable."""
    return resources.files("shira_dist.launch").joinpath("templates", "sbatch.sh.j2").read_text()


def render_sbatch(settings: SbatchSettings, template_text: str | None = None) -> str:
    """The sbatch script for ``settings``; undefined template variables are errors, not blanks."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    env.filters["qjoin"] = lambda vs: shlex.join(str(v) for v in vs)
    env.filters["sq"] = sbatch_quote
    env.filters["sbatch_option"] = sbatch_option
    try:
        template = env.from_string(template_text if template_text is not None else default_template())
        return template.render(**asdict(settings.check()), ntasks_per_node=settings.ntasks_per_node,
                               output=settings.output, created=dt.datetime.now().isoformat(timespec="seconds"))
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
