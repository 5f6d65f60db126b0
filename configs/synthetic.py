"""The default job: built-in synthetic data with planted preferences, a feature-rich two-tower."""

from configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.model.query_features = ("user_id", "segment", "age", "account_age", "history")
  c.model.item_features = ("item_id", "category", "tags", "price")
  c.loss.update(logq_correction=True, num_uniform_negatives=256)
  c.optimizer.learning_rate = 1e-2
  c.train.update(batch_size=1024, num_epochs=4.0, eval_every_steps=150, select_by="ndcg@10")
  return c
