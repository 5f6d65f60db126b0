"""The default job: built-in synthetic data with planted preferences, a feature-rich two-tower."""

from configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.model.query_features = ("user_id", "segment", "age", "account_age", "history")
  c.model.item_features = ("item_id", "category", "tags", "price")
  c.train.batch_size = 1024
  c.train.num_epochs = 4.0
  c.optimizer.learning_rate = 3e-3
  c.train.eval_every_steps = 300
  return c
