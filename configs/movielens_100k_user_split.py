"""The best MovieLens-100K recipe on RecBole's protocol: per-user random 8:1:1 split, full ranking
with each user's training (and validation) items masked.

  python -m launch.run --config=configs/movielens_100k_user_split.py \
      --config.data.source_dir=/path/to/ml-100k --workdir=runs/ml100k_user_split
"""

from configs import movielens_100k


def get_config():
  c = movielens_100k.get_config()
  c.data.split.update(kind="per_user_ratio", ratios=(0.8, 0.1, 0.1))
  # The validation split picks the best state (RecBole's protocol: early stopping on validation).
  # num_epochs is the learning-rate schedule's horizon; early stopping ends training sooner.
  c.train.update(num_epochs=15.0, eval_every_steps=80, select_by="ndcg@10", early_stopping_evals=5)
  return c
