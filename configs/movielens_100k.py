"""The best MovieLens-100K recipe of this project (random 80/20 split by interaction).

Both towers use every feature the data has; the user's latest rated movies (a bag, as at
evaluation) feed the query tower; in-batch negatives are mixed with uniformly sampled ones, with
logQ correction; L2-normalised embeddings at temperature 0.2.

  python -m launch.run --config=configs/movielens_100k.py \
      --config.data.source_dir=/path/to/ml-100k --workdir=runs/ml100k
"""

from configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.data.source = "movielens_100k"
  c.data.split.update(kind="random", ratios=(0.8, 0.0, 0.2))
  c.data.history_length = 50
  c.model.update(
      query_features=("user_id", "age", "gender", "occupation", "zip_prefix", "history"),
      item_features=("item_id", "genres", "title_words", "year"),
      id_embedding_dim=32, feature_embedding_dim=16, hidden_dims=(256,), output_dim=64,
      l2_normalize=True, temperature=0.2)
  c.loss.update(remove_accidental_hits=True, logq_correction=True, num_uniform_negatives=1024)
  c.optimizer.update(name="adam", learning_rate=2e-3, schedule="warmup_cosine", warmup_steps=50)
  c.train.update(batch_size=1024, num_epochs=10.0, log_every_steps=50, checkpoint_every_steps=500)
  return c
