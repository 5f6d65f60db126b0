"""The best MovieLens-100K recipe on RecBole's protocol: per-user random 8:1:1 split, full ranking
with each user's training (and validation) items masked.

  python -m launch.run --config=configs/movielens_100k_user_split.py \
      --config.data.source_dir=/path/to/ml-100k --workdir=runs/ml100k_user_split
"""

from configs import movielens_100k


def get_config():
  c = movielens_100k.get_config()
  c.data.split.update(kind="per_user_ratio", ratios=(0.8, 0.1, 0.1))
  # This split's own validation picks the loss and optimizer settings between the two candidates:
  # temperature 0.2, learning rate 2e-3, 1,024 uniform negatives gives validation ndcg@10
  # 0.2579 +- 0.0024 (seeds 0,1,2), against 0.2442 +- 0.0017 for the random split's choice
  # (temperature 0.3, 3e-3, none; configs/movielens_100k.py).
  c.model.temperature = 0.2
  # A learned bias per item added to the score: validation ndcg@10 0.2603 +- 0.0020 against
  # 0.2547 +- 0.0025 without (model seeds 0,1,2; 2026-11-24, python -m launch.sweep over
  # {"model.item_bias": [false, true], "seed": [0, 1, 2]}), as on Gowalla (configs/gowalla.py).
  c.model.item_bias = True
  c.loss.num_uniform_negatives = 1024
  c.optimizer.learning_rate = 2e-3
  # The validation split picks the best state (RecBole's protocol: early stopping on validation).
  # num_epochs is the learning-rate schedule's horizon; early stopping ends training sooner.
  c.train.update(num_epochs=15.0, eval_every_steps=80, select_by="ndcg@10", early_stopping_evals=5)
  return c
