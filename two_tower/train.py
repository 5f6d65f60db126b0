"""Training: a pure, jitted `train_step(state, batch, catalog) -> (state, metrics)` and the loop
around it (data, checkpoints, evaluation, logging)."""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pipelines import loader
from pipelines.prepare import PreparedData
from two_tower import atomic, item_frequency, rowsparse, sharding
from two_tower import replay as replay_lib
from two_tower import features as feats
from two_tower.checkpoint import Checkpointer
from two_tower.evaluation import Evaluator
from two_tower.losses import dedupe_candidates, expected_counts, sampled_softmax_loss
from two_tower.optim import learning_rate_schedule, make_optimizer
from two_tower.reporting import Reporter, Stopwatch
from two_tower.state import TrainState, create_train_state
from two_tower.workdir import Workdir

Hook = Callable[[int, "TrainState"], None]

# ----------------------------------------------------------------------------- step


Inputs = dict[str, dict[str, jax.Array]]  # {"query_tower": features, "item_tower": features}


def batch_loss(state: TrainState, batch: dict[str, jax.Array], catalog: feats.Catalog, *, graphdef,
               config: ml_collections.ConfigDict, mesh: Mesh
               ) -> tuple[Callable[[Any, Inputs], tuple[jax.Array, dict]], Inputs, Any]:
  """(loss_fn, inputs, item_counts) of training step `state.step` on `batch`:
  `loss_fn(params, inputs)` is the sampled-softmax loss (and metrics) of the towers' features
  `inputs`, which hold the rows the embedding tables are looked up with (the row-sparse update
  renumbers them); `item_counts` are the streaming item counts after this batch (None unless
  loss.logq_estimator="streaming")."""
  loss_cfg = config.loss
  sampling_prob = catalog["item"][feats.SAMPLING_PROB]
  num_items = feats.num_rows(catalog, "item")  # traced when the catalog is padded
  num_shards = mesh.shape[sharding.DATA]
  num_negatives = loss_cfg.num_uniform_negatives
  step_key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  negatives = None
  if num_negatives > 0:
    negatives = jax.random.randint(step_key, (num_negatives,), 0, num_items)
  # Rows of weight 0 are the loader's padding of a short last batch: not negatives, not counted.
  valid = batch["weight"] > 0
  unique_items, positive, counts = dedupe_candidates(
      batch["item_index"], negatives, num_items=sampling_prob.shape[0], num_shards=num_shards,
      global_negatives=loss_cfg.global_negatives, valid=valid)
  item_counts = state.item_counts
  if item_counts is not None:  # loss.logq_estimator="streaming": Q from the stream so far
    item_rows = catalog["item"]["item_id"]
    item_counts = item_frequency.update(item_counts, item_rows[batch["item_index"]], valid,
                                        half_life_steps=loss_cfg.logq_half_life_steps)
    sampling_prob = item_frequency.probability(
        item_counts, state.step + 1, half_life_steps=loss_cfg.logq_half_life_steps,
        batch_size=config.train.batch_size)[item_rows]
  log_q = None
  if loss_cfg.logq_correction:
    log_q = jnp.log(expected_counts(
        sampling_prob[unique_items], valid, num_shards=num_shards,
        global_negatives=loss_cfg.global_negatives, num_uniform_negatives=num_negatives,
        num_items=num_items))

  def loss_fn(params, inputs):
    model = nnx.merge(graphdef, params)
    queries = model.embed_queries(inputs["query_tower"])
    candidates = model.embed_items(inputs["item_tower"])
    return sampled_softmax_loss(
        queries, candidates, positive, counts, batch["weight"], mesh=mesh, log_q=log_q,
        remove_accidental_hits=loss_cfg.remove_accidental_hits, reduction=loss_cfg.reduction,
        row_chunk=loss_cfg.row_chunk)

  inputs = {"query_tower": feats.query_features(catalog, batch["user_index"], batch["history"]),
            "item_tower": feats.item_features(catalog, unique_items)}
  if config.model.id_dropout > 0:
    drop = functools.partial(feats.drop_ids, rate=config.model.id_dropout,
                             num_oov=config.data.num_oov_buckets)
    inputs = {"query_tower": drop(inputs["query_tower"], jax.random.fold_in(step_key, 1)),
              "item_tower": drop(inputs["item_tower"], jax.random.fold_in(step_key, 2))}
  return loss_fn, inputs, item_counts


def train_step(state: TrainState, batch: dict[str, jax.Array], catalog: feats.Catalog, *,
               graphdef, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               mesh: Mesh) -> tuple[TrainState, dict[str, jax.Array]]:
  loss_fn, inputs, item_counts = batch_loss(state, batch, catalog, graphdef=graphdef,
                                            config=config, mesh=mesh)
  if config.optimizer.get("embeddings", "dense") != "dense":
    params, opt_state, metrics, grad_norm = rowsparse.value_grad_and_update(
        loss_fn, state.params, state.opt_state, inputs, graphdef=graphdef, tx=tx)
  else:
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, inputs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
  metrics["grad_norm"] = grad_norm
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       item_counts=item_counts), metrics


# ----------------------------------------------------------------------------- loop


class Preempted(RuntimeError):
  """Training stopped by SIGTERM after saving a checkpoint."""


class PreemptionHandler:
  """Turns SIGTERM (what schedulers send before preempting) into a checkpoint-and-stop request."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int, every: int) -> bool:
    """Whether any process was asked to stop. All processes must save the same step together, so
    with several they agree every `every` steps (a host collective, not paid on every step)."""
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class BestTracker:
  """Keeps the best parameters by a validation metric, and decides early stopping. Its state lives
  in the best checkpoint (metrics saved with it), so a resumed run decides exactly as an unbroken
  one."""

  def __init__(self, best: Checkpointer, metric: str, patience: int, eval_every: int):
    self.best, self.metric, self.patience, self.eval_every = best, metric, patience, eval_every
    self.step = best.latest_step()
    self.value = best.metrics(self.step)[metric] if self.step is not None else -np.inf

  def update(self, step: int, metrics: dict[str, float], state: TrainState) -> None:
    if metrics[self.metric] > self.value:
      self.step, self.value = step, metrics[self.metric]
      self.best.save(step, state, metrics=metrics, params_only=True, force=True)

  def should_stop(self, step: int) -> bool:
    since = (step - (self.step or 0)) // self.eval_every
    return self.patience > 0 and since >= self.patience


@dataclasses.dataclass
class TrainingSetup:
  """Everything a training run needs, created on the mesh (nothing restored yet)."""

  config: ml_collections.ConfigDict
  workdir: Workdir
  mesh: Mesh
  data: PreparedData
  graphdef: Any
  state: TrainState
  state_sharding: Any
  catalog: feats.Catalog
  tx: optax.GradientTransformation
  num_steps: int
  num_examples: int


def setup_training(config: ml_collections.ConfigDict, workdir: str,
                   replayed: replay_lib.Replayed | None = None) -> TrainingSetup:
  """`replayed`: examples trained on besides the training split (the nightly replay), and the
  users they train beyond the data's catalog."""
  wd = Workdir(workdir)
  wd.bind(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.batch_size, mesh, jax.process_count())
  data = wd.prepare_data(config)
  num_replayed = 0 if replayed is None else len(replayed)
  num_steps, num_examples = loader.train_length(
      data.schema.split_sizes["train"] + num_replayed, config.train.batch_size,
      config.train.num_epochs, config.train.num_steps)
  tx = make_optimizer(config.optimizer, num_steps)
  graphdef, state, state_sh = create_train_state(data.schema, config, tx, mesh)
  catalog = feats.load_catalog(data, config.model.query_features, config.model.item_features)
  if replayed is not None:
    catalog = replay_lib.with_users(catalog, replayed.users)
  if config.data.id_registry:
    # The nightly lifecycle: each day's catalog differs a little from the day before's. Padded to
    # its side's ID-table rows (the registry's capacity, which grows in chunks of at least
    # nightly.min_growth), the training shapes change only when the embedding tables' do, and the
    # other days reuse the compiled step (launch/nightly.py's compilation cache).
    catalog = feats.pad_catalog(catalog, {
        side: data.schema.feature(f"{side}_id").vocab_size for side in ("user", "item")})
  catalog = jax.device_put(catalog, sharding.replicated(mesh))
  return TrainingSetup(config, wd, mesh, data, graphdef, state, state_sh, catalog, tx, num_steps,
                       num_examples)


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """A run that continues another run's model (the nightly job: today's data from yesterday's
  state). Its steps are numbered on from `step`, the parent's: it trains steps
  (step, step + the run's own num_steps], so step numbers (checkpoints, the random negatives of
  each step) stay unique over the model's life."""

  step: int
  # The initial state when the work directory has no checkpoint yet, placed like setup.state.
  initial_state: Callable[[TrainingSetup], TrainState]


def carry_over(config: ml_collections.ConfigDict, workdir: str, warm_start: WarmStart
               ) -> dict[str, Any]:
  """A run with nothing to train on (the nightly job's day without interactions): `warm_start`'s
  state, on this run's (possibly grown) tables, saved as the work directory's checkpoint at the
  parent's step. Idempotent: a rerun finds the checkpoint and saves nothing."""
  s = setup_training(config, workdir)
  checkpointer = s.workdir.checkpointer(config.train)
  if checkpointer.latest_step() is None:
    checkpointer.save(warm_start.step, warm_start.initial_state(s), force=True)
    checkpointer.wait()
  step = checkpointer.latest_step()
  path = checkpointer.path(step)
  checkpointer.close()
  return {"steps": int(step), "checkpoint": path}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       hooks: Sequence[Hook] = (), warm_start: WarmStart | None = None,
                       replayed: replay_lib.Replayed | None = None) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint in `workdir`, else from `warm_start` when given)
  and writes train_summary.json. `replayed`: examples trained on together with the training
  split, in this data's indexing (two_tower/replay.py)."""
  num_replayed = 0 if replayed is None else len(replayed)
  s = setup_training(config, workdir, replayed)
  first_step = warm_start.step if warm_start is not None else 0
  last_step = first_step + s.num_steps
  cfg = config.train
  checkpointer = s.workdir.checkpointer(cfg)
  best = s.workdir.best_checkpointer() if cfg.select_by else None
  split = loader.open_split(s.data.record_source("train"), s.data.schema.history_length,
                            config.data.cache)
  if num_replayed:
    split = replay_lib.ReplaySplit(split, replayed)
  dataset = loader.train_dataset(
      split, batch_size=cfg.batch_size, num_examples=s.num_examples, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.data.worker_count, prefetch_buffer_size=config.data.prefetch_buffer_size)
  data_iter = iter(dataset)
  state = s.state
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    state = checkpointer.restore_train_state(resumed_from, state, data_iter)
  elif warm_start is not None:
    state = warm_start.initial_state(s)
  start = int(state.step)

  step_fn = jax.jit(
      functools.partial(train_step, graphdef=s.graphdef, tx=s.tx, config=config, mesh=s.mesh),
      in_shardings=(s.state_sharding, sharding.batch_sharding(s.mesh), sharding.replicated(s.mesh)),
      out_shardings=(s.state_sharding, sharding.replicated(s.mesh)),
      donate_argnums=0,
  )
  # Sparse Adam's rows lag dense Adam's by their pending momentum until looked up again: the
  # state is settled before it is evaluated or saved (a no-op for the other optimizers).
  settle = jax.jit(
      lambda st: st.replace(**dict(zip(("params", "opt_state"),
                                       rowsparse.settle(st.params, st.opt_state)))),
      in_shardings=(s.state_sharding,), out_shardings=s.state_sharding, donate_argnums=0,
  ) if config.optimizer.get("embeddings", "dense") == "sparse_adam" else (lambda st: st)
  validator = tracker = None
  if cfg.eval_every_steps > 0 and s.data.schema.split_sizes.get("validation", 0) > 0:
    validator = Evaluator(s.data, s.catalog, "validation", config.eval.ks, config.eval.user_batch_size,
                          graphdef=s.graphdef, mesh=s.mesh)
    if cfg.select_by:  # a validation metric: checked with the config
      tracker = BestTracker(best, cfg.select_by, cfg.early_stopping_evals, cfg.eval_every_steps)
  end = start if tracker is not None and tracker.should_stop(start) else last_step
  reporter = Reporter(s.workdir.path("tensorboard"), total_steps=s.num_steps,
                      initial_step=start - first_step)
  reporter.write(f"training {s.num_steps} steps of {cfg.batch_size} examples on mesh "
                 f"{dict(s.mesh.shape)}; data: {s.data.path}")
  if resumed_from is not None:
    reporter.write(f"resumed from {checkpointer.path(resumed_from)} (data position included)")
  stopwatch = Stopwatch()
  schedule = learning_rate_schedule(config.optimizer, s.num_steps)
  batch_sharding = sharding.batch_sharding(s.mesh)
  final_loss = float("nan")
  preemption = PreemptionHandler()
  try:
    for step in range(start, end):
      local = next(data_iter)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
               for k in loader.BATCH_KEYS}
      state, metrics = step_fn(state, batch, s.catalog)
      # Padding rows of a short last batch are not examples.
      stopwatch.tick(loader.examples_in_step(step - first_step, cfg.batch_size, s.num_examples),
                     sync=metrics)
      for hook in hooks:
        hook(step + 1, state)
      done = step + 1
      if done % cfg.log_every_steps == 0 or done == last_step:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        values["learning_rate"] = float(schedule(done - first_step))
        speed = stopwatch.examples_per_s()
        if speed:
          values["examples_per_s"] = speed
        reporter.scalars(done, values, "train/")
        reporter.postfix(loss=values["loss"], ex_per_s=round(speed or 0))
        final_loss = values["loss"]
        if not np.isfinite(final_loss):
          raise FloatingPointError(
              f"training loss became {final_loss} at step {done}: lower optimizer.learning_rate "
              "or set optimizer.grad_clip_norm")
      if validator is not None and (done % cfg.eval_every_steps == 0 or done == last_step):
        state = settle(state)
        val = validator(state.params)
        reporter.scalars(done, val, "validation/")
        reporter.write(f"step {done}: validation " + ", ".join(
            f"{k}={val[k]:.4f}" for k in ("recall@10", "ndcg@10", "accuracy@100") if k in val))
        if tracker is not None:
          tracker.update(done, val, state)
      stop_early = tracker is not None and tracker.should_stop(done)
      preempted = preemption.should_stop(done, cfg.log_every_steps)
      force_save = done == last_step or preempted or stop_early
      if force_save or checkpointer.should_save(done):
        state = settle(state)
      checkpointer.save(done, state, data_iter, force=force_save)
      reporter.step()
      if preempted:
        raise Preempted(f"stopped by SIGTERM at step {done}; checkpoint {checkpointer.path(done)} "
                        "saved: run the same command again to resume")
      if stop_early:
        reporter.write(f"early stop at step {done}: no better validation {tracker.metric} in "
                       f"{tracker.patience} evaluations (best {tracker.value:.4f} at step {tracker.step})")
        break
  finally:
    preemption.restore()
    reporter.close()
    checkpointer.wait()  # let in-flight saves finish, also when stopping on an error
    if best is not None:
      best.wait()
  last = checkpointer.latest_step()
  summary = {
      "steps": int(state.step),
      "replayed_examples": num_replayed,
      "examples_per_s": stopwatch.examples_per_s(sync=state.step),
      "final_loss": final_loss,
      "checkpoint": checkpointer.path(last) if last is not None else None,
      "best_checkpoint": best.path(tracker.step) if tracker and tracker.step is not None else None,
      "best_validation": {tracker.metric: tracker.value, "step": tracker.step} if tracker else None,
      "batch_size": cfg.batch_size,
      "mesh": dict(s.mesh.shape),
      "data": s.data.path,
  }
  if jax.process_index() == 0:
    atomic.write_json(s.workdir.path("train_summary.json"), summary)
  checkpointer.close()
  if best is not None:
    best.close()
  return summary
