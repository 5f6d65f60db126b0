"""TensorFlow Recommenders' basic retrieval recipe on MovieLens-100K, reproduced exactly.

User-ID and movie-ID embeddings of 32, no MLP, dot product, in-batch softmax summed over the batch
(TFRS's Retrieval task), Adagrad 0.1, batch 8192, 3 epochs, random 80/20 split by interaction.

  python -m launch.run --config=configs/movielens_100k_tfrs.py \
      --config.data.source_dir=/path/to/ml-100k --workdir=runs/ml100k_tfrs
"""

from configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.data.source = "movielens_100k"
  c.data.split.update(kind="random", ratios=(0.8, 0.0, 0.2))
  c.model.update(
      query_features=("user_id",), item_features=("item_id",), id_embedding_dim=32,
      hidden_dims=(), output_dim=0, l2_normalize=False, temperature=1.0)
  c.loss.update(remove_accidental_hits=False, logq_correction=False, num_uniform_negatives=0,
                reduction="sum")
  c.optimizer.update(name="adagrad", learning_rate=0.1)
  c.train.update(batch_size=8192, num_epochs=3.0, log_every_steps=5, checkpoint_every_steps=100)
  return c
