"""What the cluster launchers share: the training command line, and running (or printing) commands."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = ("train", "run", "evaluate")  # python -m launch.<job>


@dataclasses.dataclass(frozen=True)
class Command:
  """One command of a launch: argv, and what to feed its stdin (e.g. a manifest)."""

  argv: tuple[str, ...]
  stdin: str | None = None
  description: str = ""

  def render(self) -> str:
    line = shlex.join(self.argv)
    if self.stdin is not None:
      line += " <<'EOF'\n" + self.stdin.rstrip("\n") + "\nEOF"
    return f"# {self.description}\n{line}" if self.description else line


def add_job_flags(parser: argparse.ArgumentParser) -> None:
  """Flags naming the job every process runs: the entry point, config, work directory, overrides."""
  parser.add_argument("--job", choices=JOBS, default="train", help="python -m launch.<job>")
  parser.add_argument("--config", default="configs/synthetic.py", help="config file (repo-relative)")
  parser.add_argument("--workdir", default=None,
                      help="work directory, on storage that every host sees (shared file system)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set mesh.model=4 (repeatable)")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print what would run (commands, script or manifest) and do nothing")


def env_pairs(items: Sequence[str]) -> list[tuple[str, str]]:
  """(NAME, VALUE) of each --env NAME=VALUE; NAME must be a valid environment variable name."""
  pairs = []
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise SystemExit(f"--env {item!r}: expected NAME=VALUE, e.g. --env XLA_FLAGS=--xla_dump_to=/tmp")
    pairs.append((key, value))
  return pairs


def job_argv(args: argparse.Namespace, python: str = "python3") -> list[str]:
  """The job's command line, identical on every process (the processes check they agree)."""
  if not args.workdir:
    raise SystemExit("--workdir is required to start a job")
  argv = [python, "-m", f"launch.{args.job}", f"--workdir={args.workdir}"]
  if args.job != "evaluate":
    argv.append(f"--config={args.config}")
    for item in args.set:
      key, sep, value = item.partition("=")
      if not sep or not key:
        raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. --set mesh.model=2")
      argv.append(f"--config.{key}={value}")
  elif args.set:
    raise SystemExit("--set does not apply to --job=evaluate: it uses the work directory's config")
  return argv


def execute(commands: Sequence[Command], dry_run: bool, out=None) -> int:
  """Prints each command; unless `dry_run`, runs them in order and stops at the first failure."""
  out = out or sys.stdout
  for command in commands:
    print(("" if dry_run else "+ ") + command.render(), file=out, flush=True)
    if dry_run:
      continue
    code = subprocess.run(list(command.argv), input=command.stdin, text=True, check=False).returncode
    if code:
      print(f"error: command failed with exit status {code}: {shlex.join(command.argv)}",
            file=sys.stderr)
      return code
  return 0
