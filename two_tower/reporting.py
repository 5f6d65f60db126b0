"""Progress bar and TensorBoard event files (written by process 0 only)."""

from __future__ import annotations

import sys
import time
from typing import Mapping

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


class Reporter:
  """Steps/s and ETA on a progress bar, scalars to TensorBoard; no-ops off process 0."""

  def __init__(self, logdir: str, *, total_steps: int, initial_step: int, desc: str = "train",
               unit: str = "step"):
    self.active = jax.process_index() == 0
    self._writer = SummaryWriter(logdir) if self.active else None
    self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit=unit,
                     dynamic_ncols=True, disable=not self.active,
                     mininterval=0.5 if sys.stderr.isatty() else 10.0)

  def step(self, n: int = 1) -> None:
    self._bar.update(n)

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    if not self.active:
      return
    for name, value in values.items():
      self._writer.add_scalar(f"{prefix}{name}", value, step)
    self._writer.flush()

  def postfix(self, **values) -> None:
    self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()},
                          refresh=False)

  def write(self, message: str) -> None:
    if self.active:
      self._bar.write(message)

  def close(self) -> None:
    self._bar.close()
    if self._writer is not None:
      self._writer.close()


class Stopwatch:
  """Examples/s over the steady state: the clock starts after the first (compiling) steps."""

  def __init__(self, warmup_steps: int = 2):
    self.warmup_steps = warmup_steps
    self._start = None
    self._examples = 0
    self._steps = 0

  def tick(self, examples: int, sync=None) -> None:
    self._steps += 1
    if self._steps == self.warmup_steps:
      if sync is not None:
        jax.block_until_ready(sync)
      self._start = time.perf_counter()
    elif self._steps > self.warmup_steps:
      self._examples += examples

  def examples_per_s(self, sync=None) -> float | None:
    if self._start is None or self._examples == 0:
      return None
    if sync is not None:
      jax.block_until_ready(sync)
    return self._examples / (time.perf_counter() - self._start)
