"""TensorFlow Recommenders' basic retrieval recipe on MovieLens-100K, timed (the reference for
benchmarks/train_throughput.py; runs in its own process, needs the `bench` extra).

Usage: tfrs_reference.py ML_100K_DIR [SEED]   (seed 42, as in TFRS's tutorial, by default)

Prints one JSON line: {"examples_per_s": ..., "accuracy@10": ..., "accuracy@100": ...}.
Metrics are computed only at evaluation (compute_metrics=not training), TFRS's fastest setting,
and examples/s is measured over epochs 2-3, after tracing and caching in epoch 1.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TFRS imports ScaNN's TensorFlow ops when ScaNN is installed (it is, for our index), and those ops
# are built for another TensorFlow version; the basic recipe does not use them.
sys.modules["scann"] = None

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402


def main(source_dir: str, seed: int = 42, epochs: int = 3, batch_size: int = 8192) -> None:
  data = np.loadtxt(os.path.join(source_dir, "u.data"), dtype=np.int64)
  users = data[:, 0].astype(str)
  movies = data[:, 1].astype(str)
  with open(os.path.join(source_dir, "u.item"), encoding="latin-1") as f:
    all_movies = np.array([line.split("|")[0] for line in f if line.strip()])
  tf.random.set_seed(seed)
  ratings = tf.data.Dataset.from_tensor_slices({"user_id": users, "movie_id": movies})
  shuffled = ratings.shuffle(100_000, seed=seed, reshuffle_each_iteration=False)
  train, test = shuffled.take(80_000), shuffled.skip(80_000).take(20_000)
  unique_users = np.unique(users)

  def tower(vocab):
    return tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=vocab, mask_token=None),
        tf.keras.layers.Embedding(len(vocab) + 1, 32)])

  class Model(tfrs.Model):
    def __init__(self):
      super().__init__()
      self.user_model = tower(unique_users)
      self.movie_model = tower(np.unique(all_movies))
      self.task = tfrs.tasks.Retrieval(metrics=tfrs.metrics.FactorizedTopK(
          candidates=tf.data.Dataset.from_tensor_slices(all_movies).batch(128).map(self.movie_model)))

    def compute_loss(self, features, training=False):
      return self.task(self.user_model(features["user_id"]), self.movie_model(features["movie_id"]),
                       compute_metrics=not training)

  model = Model()
  model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
  epoch_times = []

  class Timer(tf.keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      epoch_times.append(time.perf_counter() - self.start)

  model.fit(train.shuffle(100_000).batch(batch_size).cache(), epochs=epochs, verbose=0,
            callbacks=[Timer()])
  metrics = model.evaluate(test.batch(4096).cache(), return_dict=True, verbose=0)
  print(json.dumps({
      "examples_per_s": 80_000 * (epochs - 1) / sum(epoch_times[1:]),
      "accuracy@10": float(metrics["factorized_top_k/top_10_categorical_accuracy"]),
      "accuracy@100": float(metrics["factorized_top_k/top_100_categorical_accuracy"]),
  }))


if __name__ == "__main__":
  main(sys.argv[1], *map(int, sys.argv[2:3]))  # source_dir [seed]
