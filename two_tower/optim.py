"""optax optimizers and learning-rate schedules from config.optimizer (the embedding tables'
row-sparse updates, optimizer.embeddings="rowwise_adagrad" or "sparse_adam", are in
two_tower/rowsparse.py)."""

from __future__ import annotations

import ml_collections
import optax

from two_tower import rowsparse


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int,
                           peak: float | None = None) -> optax.Schedule:
  """optimizer.schedule over `num_steps`, peaking at `peak` (default optimizer.learning_rate)."""
  lr = cfg.learning_rate if peak is None else peak
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(num_steps, 1))
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, min(cfg.warmup_steps, max(num_steps - 1, 0)), max(num_steps, 1))
  raise ValueError(
      f"optimizer.schedule must be constant, cosine or warmup_cosine, got {cfg.schedule!r}")


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(cfg, num_steps)
  if cfg.name == "adam":
    opt = optax.adam(schedule)
  elif cfg.name == "adamw":
    opt = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.name == "adagrad":
    # Keras' Adagrad defaults (initial accumulator 0.1, eps 1e-7), as TFRS uses them.
    opt = optax.adagrad(schedule, initial_accumulator_value=cfg.adagrad_initial_accumulator, eps=1e-7)
  elif cfg.name == "sgd":
    opt = optax.sgd(schedule)
  else:
    raise ValueError(f"optimizer.name must be adam, adamw, adagrad or sgd, got {cfg.name!r}")
  if cfg.grad_clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), opt)
  embeddings = cfg.get("embeddings", "dense")
  if embeddings == "dense":
    return opt
  if embeddings not in ("rowwise_adagrad", "sparse_adam"):
    raise ValueError("optimizer.embeddings must be dense, rowwise_adagrad or sparse_adam, got "
                     f"{embeddings!r}")
  # The embedding tables by rows (two_tower/rowsparse.py), on the same schedule's shape. Adam's
  # step size does not depend on the gradient's scale, so sparse Adam takes Adam's rate; Adagrad's
  # shrinks with its accumulated squares and wants its own, larger one.
  peak = cfg.embedding_learning_rate if embeddings == "rowwise_adagrad" else cfg.learning_rate
  return rowsparse.row_sparse(opt, embeddings, learning_rate_schedule(cfg, num_steps, peak=peak))
