"""``--env KEY=VALUE``: which values may be written into the run directory, and which only travel in an environment.

    --env NCCL_DEBUG=INFO          plain: exported in command.sh / sbatch.sh (shell-quoted), listed in launch.yaml
    --env WANDB_API_KEY=...        secret: only in the environment of the process the launcher starts
                                   (torchrun, the deepspeed runner, or sbatch with --export=ALL); launch.yaml
                                   and the scripts name the key, never the value

A run directory is easy to share, copy into a report or leave readable on a cluster's file
system, so a credential written there leaks. Keys that look like credentials (``*_KEY``,
``*_TOKEN``, ``*_SECRET``, anything with ``PASSWORD``, ``PASSWD``, ``SECRET`` or ``CREDENTIAL``,
case-insensitive; ``WANDB_API_KEY``, ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``) are treated as secrets.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from .errors import LaunchError

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_SECRET_KEY = re.compile(r"(^|_)(KEY|TOKEN|SECRET)$|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.IGNORECASE)
# An argv item that sets a variable: "KEY=VALUE" or "--env=KEY=VALUE" (or an abbreviation such as "--e=").
_ARGV_ASSIGNMENT = re.compile(r"^(?P<option>-[^=]*=)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)=")
REDACTED = "<redacted: passed via the environment>"


def is_secret(key: str) -> bool:
    """True for keys that name credentials (see the module docstring); their values are never written down."""
    return _SECRET_KEY.search(key) is not None


@dataclass(frozen=True)
class LaunchEnv:
    """The ``--env`` variables of one launch, split by whether their values may reach a file."""

    plain: dict[str, str]  # written into scripts (quoted) and launch.yaml
    secret: dict[str, str]  # only in the started process's environment

    @property
    def all(self) -> dict[str, str]:
        """Every variable, for the environment of the process the launcher starts."""
        return {**self.plain, **self.secret}

    def record(self) -> dict[str, str]:
        """For launch.yaml: plain values as given, secret values replaced by a note saying where they went."""
        return {**self.plain, **{key: REDACTED for key in self.secret}}

    def shell_prefix(self) -> str:
        """``K=V `` assignments in front of a printed command (--dry-run); secrets are left out (see notes())."""
        return "".join(f"{key}={shlex.quote(value)} " for key, value in self.plain.items())

    def notes(self) -> str:
        """Comment lines naming the secret keys: they reach the run through the environment only."""
        return "".join(f"# {key}: passed to the run through the environment; the value is not written down\n"
                       for key in self.secret)

    def script_lines(self) -> str:
        """Lines for command.sh: export the plain values; a re-run without a secret in the environment stops
        with a message naming it instead of training without it."""
        checks = "".join(f': "${{{key}?{key} must be set in the environment (its value is not stored in the '
                         f'run directory)}}"\n' for key in self.secret)
        exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in self.plain.items())
        return self.notes() + checks + exports


def parse_env(items: list[str]) -> LaunchEnv:
    """``["A=1", "B=x=y", "HF_TOKEN=t"]`` -> plain ``{"A": "1", "B": "x=y"}``, secret ``{"HF_TOKEN": "t"}``.

    Keys must be shell variable names: they are written unquoted as ``export KEY=...``.
    """
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY.match(key):
            shown = f"{key}=<value not shown>" if sep and is_secret(key) else item
            raise LaunchError(f"--env {shown!r}: expected KEY=VALUE with KEY a shell variable name "
                              f"(letters, digits, '_', not starting with a digit), e.g. NCCL_DEBUG=INFO")
        (secret if is_secret(key) else plain)[key] = value
    return LaunchEnv(plain, secret)


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with every ``SECRET_KEY=value`` (alone or as ``--env=SECRET_KEY=value``) redacted,
    for launch.yaml: the launcher's own command line is recorded, and it carries the --env values."""
    out = []
    for item in argv:
        match = _ARGV_ASSIGNMENT.match(item)
        if match is not None and is_secret(match.group("key")):
            item = f"{match.group('option') or ''}{match.group('key')}={REDACTED}"
        out.append(item)
    return out
