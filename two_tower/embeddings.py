"""Tower outputs in bulk: the item tower over the catalog, the query tower over users.

Rows are embedded in fixed-size jitted batches (one compilation) sharded over the `data` axis of a
mesh of this process's devices; with several JAX processes each one takes its own block of rows, so
no process waits on another. Everything streams: batch i+1 is dispatched before batch i is copied
to the host, and a consumer sees one batch at a time, so the host holds about two batches whatever
the catalog size.

On disk (`write_embeddings`), one side's embeddings are

  <dir>/<side>_embeddings.pNNNNN.npy   float32 [rows of process NNNNN, D]
  <dir>/<side>_ids.pNNNNN.npy          the original IDs of those rows (not vocabulary indices)
  <dir>/<side>_embeddings.json         step, count, dim and the parts, written last by process 0

The parts of processes 0, 1, ... concatenated are the rows in the order they were given.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from two_tower import features as feats
from two_tower import atomic, sharding
from two_tower.errors import MissingArtifactError, UserError
from two_tower.sharding import DATA, MODEL

SIDES = ("item", "query")


def process_block(num_rows: int, index: int | None = None, count: int | None = None) -> slice:
  """The contiguous block of `num_rows` rows that process `index` of `count` embeds."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  per = -(-num_rows // count)
  return slice(min(index * per, num_rows), min((index + 1) * per, num_rows))


def local_view(params: Any, catalog: Any, mesh: Mesh) -> tuple[Any, Any, Mesh]:
  """(params, catalog, mesh) that this process can use on its own.

  With one process that is what it was given. With several, parameters sharded over other
  processes are gathered and replicated over this process's devices, so that each process embeds
  its own rows with no collective: jobs that resume (scoring) may have different amounts of work
  left on each process.
  """
  if jax.process_count() == 1:
    return params, catalog, mesh
  local = Mesh(np.asarray(jax.local_devices()).reshape(-1, 1), (DATA, MODEL))
  replicated = sharding.replicated(local)
  params = jax.device_put(multihost_utils.process_allgather(params, tiled=True), replicated)
  host_catalog = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), catalog)
  return params, jax.device_put(host_catalog, replicated), local


class Embedder:
  """Embeds rows of the catalog with one tower, `batch_size` rows per jitted call.

  The jitted function is built once, here; parameters are an argument of every call, so one
  Embedder serves every checkpoint of a model (periodic validation embeds the catalog each time).
  """

  def __init__(self, graphdef: Any, catalog: feats.Catalog, mesh: Mesh, batch_size: int = 8192):
    data = mesh.shape[DATA]
    self.batch_size = max(data, -(-batch_size // data) * data)  # divisible by the data axis
    self._batch_sharding = sharding.logical_sharding(mesh, "batch")
    self._catalog = catalog

    def embed(params, catalog, rows, side):
      model = nnx.merge(graphdef, params)
      if side == "item":
        return model.embed_items(feats.item_features(catalog, rows))
      return model.embed_queries(feats.query_features(catalog, rows))

    self._embed = jax.jit(embed, static_argnames="side", out_shardings=self._batch_sharding)

  def _batches(self, params: Any, side: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, jax.Array]]:
    """(rows, device embeddings [batch_size, D]) per batch; the last batch is padded."""
    if side not in SIDES:
      raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    rows = np.asarray(rows, np.int32)
    b = self.batch_size
    for lo in range(0, len(rows), b):
      chunk = rows[lo:lo + b]
      # Pad with a real row: every call has the same shape, and the padding is cut off later.
      padded = np.pad(chunk, (0, b - len(chunk)), mode="edge")
      yield chunk, self._embed(params, self._catalog, jax.device_put(padded, self._batch_sharding),
                               side=side)

  def stream(self, params: Any, side: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (rows, float32 [len(rows), D] embeddings) batch by batch, in order, on the host."""
    pending = None
    for chunk, out in self._batches(params, side, rows):
      if pending is not None:  # the next batch is already queued: copy the previous one now
        yield pending[0], np.asarray(pending[1], np.float32)[:len(pending[0])]
      pending = (chunk, out)
    if pending is not None:
      yield pending[0], np.asarray(pending[1], np.float32)[:len(pending[0])]

  def embed(self, params: Any, side: str, rows: np.ndarray) -> np.ndarray:
    """All of `rows` at once, on the host: for samples that fit in memory."""
    parts = [e for _, e in self.stream(params, side, rows)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

  def embed_on_device(self, params: Any, side: str, rows: np.ndarray) -> jax.Array:
    """All of `rows` at once, kept on device (evaluation scores against them there)."""
    parts = [out for _, out in self._batches(params, side, rows)]
    return jnp.concatenate(parts)[:len(rows)]


def _part(directory: str, side: str, kind: str, process: int) -> str:
  return os.path.join(directory, f"{side}_{kind}.p{process:05d}.npy")


def meta_path(directory: str, side: str) -> str:
  return os.path.join(directory, f"{side}_embeddings.json")


def write_embeddings(directory: str, side: str, embedder: Embedder, params: Any,
                     rows: np.ndarray, ids: np.ndarray, step: int, on_batch=None) -> list[str]:
  """Embeds this process's block of `rows` into `directory`; returns the files it wrote.

  `ids[r]` is the original ID of row r. The embeddings are written into a memory-mapped .npy
  as they come, so memory stays at a couple of batches. Process 0 writes the JSON description
  after every process has finished its part (a barrier), so a description means complete parts.
  """
  os.makedirs(directory, exist_ok=True)
  rows = np.asarray(rows)
  block = rows[process_block(len(rows))]
  p = jax.process_index()
  emb_path, ids_path = _part(directory, side, "embeddings", p), _part(directory, side, "ids", p)
  out = None
  lo = 0
  for chunk, emb in embedder.stream(params, side, block):
    if out is None:
      out = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32,
                                      shape=(len(block), emb.shape[1]))
    out[lo:lo + len(chunk)] = emb
    lo += len(chunk)
    if on_batch is not None:
      on_batch(len(chunk))
  dim = out.shape[1] if out is not None else -1
  if out is not None:
    out.flush()
    del out
  else:  # this process got no rows (more processes than rows)
    np.save(emb_path, np.zeros((0, 0), np.float32))
  np.save(ids_path, np.asarray(ids)[block], allow_pickle=False)
  dims = multihost_utils.process_allgather(np.asarray([dim], np.int64)).reshape(-1) \
      if jax.process_count() > 1 else np.asarray([dim])
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"two_tower:embeddings:{side}:{directory}")
  if p == 0:
    count = jax.process_count()
    atomic.write_json(meta_path(directory, side), {
        "side": side, "step": int(step), "count": int(len(rows)), "dim": int(dims.max()),
        "dtype": "float32",
        "parts": [[os.path.basename(_part(directory, side, "embeddings", i)),
                   os.path.basename(_part(directory, side, "ids", i))] for i in range(count)],
    })
  return [emb_path, ids_path] + ([meta_path(directory, side)] if p == 0 else [])


def read_embeddings(directory: str, side: str, mmap: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
  """(ids, float32 [count, D] embeddings, description) written by `write_embeddings`.

  With a single part and `mmap`, the embeddings are memory-mapped (nothing is read up front).
  """
  path = meta_path(directory, side)
  if not os.path.exists(path):
    raise MissingArtifactError(f"{path} does not exist: the {side} embeddings were not (fully) "
                               "written: rebuild them")
  with open(path) as f:
    meta = json.load(f)
  embs, ids = [], []
  for emb_name, ids_name in meta["parts"]:
    e = np.load(os.path.join(directory, emb_name), mmap_mode="r" if mmap else None)
    if e.size:
      embs.append(e)
    ids.append(np.load(os.path.join(directory, ids_name), allow_pickle=False))
  emb = embs[0] if len(embs) == 1 else np.concatenate(embs) if embs else np.zeros(
      (0, meta["dim"]), np.float32)
  ids_all = np.concatenate(ids) if ids else np.zeros(0)
  if len(emb) != meta["count"] or len(ids_all) != meta["count"]:
    raise UserError(f"the {side} embeddings in {directory} hold {len(emb)} rows and "
                     f"{len(ids_all)} IDs, their description says {meta['count']}: rewrite them")
  return ids_all, emb, meta

