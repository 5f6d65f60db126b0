"""Gowalla, the NGCF / LightGCN benchmark split, under the honest protocol: fit on
train - valid, choose the epoch on valid (recall@20), report on test with training items masked.

  python -m launch.run --config=configs/gowalla.py --workdir=runs/gowalla \
      [--config.data.source_dir=/path/to/gowalla]

The data directory holds `train.txt.gz`, `valid.txt.gz` (a carve-out of train.txt) and
`test.txt.gz`, one line per user, `user item item ...`; by default `../shared/data/gowalla` next to
the repository (see its README). Any directory in this layout works.
"""

import os

from configs.base import get_base_config

# ../shared/data/gowalla relative to the repository root, as an absolute path so that the config
# means the same from any working directory.
DEFAULT_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gowalla"))


def get_config():
  c = get_base_config()
  c.data.update(source="logs", source_dir=DEFAULT_DIR, history_length=20)
  c.data.logs.update(format="adjacency", validation_from_train=True)
  c.data.logs.split_files.update(
      train=("train.txt.gz",), validation=("valid.txt.gz",), test=("test.txt.gz",))
  c.data.split.kind = "predefined"
  # IDs and the history bag only (the data has nothing else), one linear projection per tower to
  # 64 dims, cosine scores at temperature 0.1.
  c.model.update(
      query_features=("user_id", "history"), item_features=("item_id",),
      id_embedding_dim=64, hidden_dims=(), output_dim=64, l2_normalize=True, temperature=0.1)
  c.loss.update(remove_accidental_hits=True, logq_correction=False, num_uniform_negatives=0)
  c.optimizer.update(name="adam", learning_rate=5e-3, schedule="constant")
  # One epoch of train - valid is 351 steps of 2048. Validation every epoch (a full-catalog pass
  # over 29,858 users, about 20 s here) picks the best state by recall@20; num_epochs is the
  # horizon, early stopping usually ends sooner.
  c.train.update(batch_size=2048, num_epochs=20.0, log_every_steps=50, checkpoint_every_steps=1000,
                 eval_every_steps=351, select_by="recall@20", early_stopping_evals=3)
  c.eval.update(ks=(10, 20, 50), user_batch_size=1024)
  return c
