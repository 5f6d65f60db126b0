"""Defaults shared by every config. Each config file starts from `get_base_config()`."""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.source = "synthetic"  # synthetic | movielens_100k | logs
  d.data_dir = ""  # where TFDS builds go; "" means <workdir>/data
  # movielens_100k: the GroupLens ml-100k directory; logs: the directory that relative file names
  # in data.logs.files / data.logs.split_files are read from ("": the current directory).
  d.source_dir = ""
  d.synthetic = ml_collections.ConfigDict(dict(
      num_users=4000, num_items=2000, num_interactions=200_000, num_categories=40,
      num_tags=60, latent_dim=8, sharpness=8.0, popularity_exponent=0.8, min_per_user=5,
      seed=0,
      # YYYY-MM-DD: one day of a world that changes over time (pipelines/synthetic.py,
      # generate_day; python -m launch.nightly sets it). "": the static dataset above.
      date="",
      # The world by day (only read with a date). Day 0 (start_date) holds num_users users and
      # num_items items; the sizes below are per day.
      world=ml_collections.ConfigDict(dict(
          start_date="2026-01-01",
          interactions_per_day=20_000,
          new_users_per_day=0.05,  # new users each day, as a share of num_users
          new_items_per_day=0.03,  # new items each day, as a share of num_items
          daily_active_users=0.3,  # share of the earlier users active on a day (new ones always are)
          item_lifetime_days=60.0,  # median; popularity fades as exp(-age / lifetime), gone at 2x
          popularity_drift=0.5,  # amplitude (log scale) of each item's periodic popularity drift
          # The interactions of this many days up to the date (users and items of any of them, no
          # oracle): a full retrain's data (benchmarks/nightly.py). 1: the day alone.
          window_days=1,
      )),
  ))
  d.logs = ml_collections.ConfigDict(dict(
      # csv | tsv | parquet | adjacency: one line per user, "user item item ..." (the NGCF/LightGCN
      # format, e.g. Gowalla; users and items only, timestamps 0); .gz files are decompressed.
      files=(), format="csv",
      user_id="user_id", item_id="item_id", timestamp="timestamp", weight="",
      user_categorical=(), user_multi=(), user_numeric=(),
      item_categorical=(), item_multi=(), item_numeric=(),
      multi_separator="|",
      # data.split.kind="predefined" takes each interaction's split from the data, in one of two
      # ways: a column of the files holding train | validation | test ...
      split_column="",
      # ... or files per split, instead of data.logs.files.
      split_files=ml_collections.ConfigDict(dict(train=(), validation=(), test=())),
      # The validation files are a carve-out of the training files (as Gowalla's valid.txt is of
      # train.txt): training interactions whose (user, item) pair is in validation are dropped.
      validation_from_train=False,
      # CSV, TSV or Parquet tables of the current users / items (by extension, else `format`):
      # the ID column and the side's declared feature columns, one row per ID. Their features
      # replace those of the interactions, and an entity without interactions (a new item) is in
      # the catalog with its features. "": the entities of the interactions only.
      user_table="", item_table="",
      # Every file holding no rows is a day without interactions (the nightly job sets this):
      # a catalog from user_table / item_table and empty splits. Otherwise an empty file is refused.
      allow_empty=False,
  ))
  d.split = ml_collections.ConfigDict(dict(
      # random | per_user_ratio | temporal_last_n | temporal_global | predefined (given by the
      # data: data.logs.split_column or data.logs.split_files).
      kind="per_user_ratio",
      ratios=(0.8, 0.1, 0.1), last_n=1, last_n_validation=1, time_quantiles=(0.8, 0.9), seed=0,
  ))
  d.history_length = 20
  d.training_history = "auto"  # auto | before | others (see pipelines.prepare.training_history_mode)
  d.num_oov_buckets = 1
  d.min_count = 1
  d.max_bag_length = 16
  d.weight_column = ""  # an interaction column to use as per-example weight, e.g. "rating"
  # Training weights times (the user's number of training interactions) ** -exponent: 0 weighs
  # every interaction alike; 1 gives every user the same total weight, as per-user metrics
  # (recall@K, NDCG@K averaged over users) do, like LightGCN's user-first sampler.
  d.user_weight_exponent = 0.0
  # An ID registry file (two_tower/registry.py) whose rows IDs and feature tokens take instead of
  # vocabularies of this data alone; set by python -m launch.nightly for each day. "": none.
  d.id_registry = ""
  # Users' latest items of earlier days (pipelines/histories.py), set by python -m launch.nightly:
  # every history of this build goes on with them, so a user's history does not start empty each
  # day. Needs id_registry. "": the histories of this data alone.
  d.carried_history = ""
  d.cache = "auto"  # auto | always | never: hold the decoded training split in memory
  d.worker_count = 0  # grain worker processes; 0 reads in the training process
  d.prefetch_buffer_size = 2

  c.model = m = ml_collections.ConfigDict()
  m.query_features = ("user_id", "history")  # names from the dataset schema (user side)
  m.item_features = ("item_id",)  # (item side)
  m.id_embedding_dim = 32
  m.feature_embedding_dim = 16
  m.hidden_dims = (128,)
  m.output_dim = 64  # 0: no output projection (the concatenated embeddings are the output)
  m.l2_normalize = True
  m.temperature = 0.1
  m.share_item_embeddings = False  # the history bag uses the item tower's item-ID table
  # concat | sum: how a tower combines its features' embeddings before the MLP. "sum" (every
  # feature the same size) with user_id + a shared-table history and no MLP is SimpleX's user
  # tower: the user's own vector plus the mean of the items they had.
  m.combine_features = "concat"
  m.embedding_init_scale = 0.05  # uniform(-s, s), as Keras' default Embedding initializer
  # float32 | bfloat16: the dtype of the towers' embedding lookups, matmuls and activations.
  # Parameters and optimizer state stay float32, and tower outputs, the loss's logits and
  # log-sum-exp, evaluation and index embeddings are float32 either way. It changes the trained
  # model (slightly), so it is not a runtime key: a work directory keeps the one it started with.
  m.compute_dtype = "float32"
  # ID dropout (training only): each step, with this probability an example's user ID and each
  # candidate item's ID are replaced by a hashed-bucket row, the row a new ID without interactions
  # is looked up to, so the other features alone learn to carry signal (cold start: tonight's new
  # items are embedded from a bucket row plus their features). Needs data.num_oov_buckets >= 1.
  # Deterministic given seed and step. 0: off.
  m.id_dropout = 0.0
  # A learned per-item scalar added to every score: score = <query, item> / temperature + bias[item]
  # (as matrix factorisation's item bias). Cosine scores at a temperature are bounded, so an item's
  # overall popularity must otherwise be carried by its direction. Needs "item_id" in
  # model.item_features. Served as one more embedding dimension (the query's is 1). The Gowalla and
  # MovieLens recipes set it (better on both validation splits); the default stays off because a
  # work directory recorded before this key existed reads it at its default.
  m.item_bias = False

  c.loss = l = ml_collections.ConfigDict()
  l.remove_accidental_hits = True
  l.logq_correction = False
  # Q of the logQ correction: static (each item's share of the prepared training split) | streaming
  # (decayed counts of the positives trained on so far, per item-ID row, with this half-life in
  # steps; carried in checkpoints and, in the nightly lifecycle, across days; needs "item_id" in
  # model.item_features). See two_tower/item_frequency.py.
  l.logq_estimator = "static"
  l.logq_half_life_steps = 500.0
  l.num_uniform_negatives = 0  # extra negatives sampled uniformly from the catalog (mixed negatives)
  l.global_negatives = True  # in-batch negatives from the whole global batch, not the local shard
  l.reduction = "mean"  # mean | sum (sum is what TFRS's Retrieval task uses)
  l.row_chunk = 512  # query rows per block of the blockwise softmax

  c.optimizer = o = ml_collections.ConfigDict()
  o.name = "adam"  # adam | adamw | adagrad | sgd
  o.learning_rate = 1e-3
  o.schedule = "constant"  # constant | cosine | warmup_cosine
  o.warmup_steps = 0
  o.weight_decay = 0.0
  o.grad_clip_norm = 0.0  # 0: no clipping
  o.adagrad_initial_accumulator = 0.1
  # dense | rowwise_adagrad | sparse_adam. dense: the embedding tables are parameters like the
  # others (optimizer.name updates every row, and every row's state, on every step). The other two
  # read and update only the table rows a step's batch looks up (two_tower/rowsparse.py): what
  # keeps steps fast past ~1M rows. rowwise_adagrad: one accumulator per row (TorchRec's and TPU
  # embedding's default), at embedding_learning_rate. sparse_adam: dense Adam's trajectory (the
  # momentum steps a row missed are applied in closed form when it is next looked up), at
  # learning_rate. The dense layers keep optimizer.name. Not with grad_clip_norm.
  o.embeddings = "dense"
  # rowwise_adagrad's learning rate (on optimizer.schedule's shape). Adagrad divides each row's
  # gradient by the root of its accumulated squares, so a row's step is about this size: it wants a
  # rate 10-100x Adam's (0.05-0.5 is usual; 0.3 was best on MovieLens-100K validation, see README).
  o.embedding_learning_rate = 0.3

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 1024  # global batch
  t.num_epochs = 10.0
  t.num_steps = -1  # > 0 overrides num_epochs
  t.log_every_steps = 20
  t.checkpoint_every_steps = 200
  t.max_checkpoints_to_keep = 3
  t.eval_every_steps = 0  # 0: no periodic validation
  # With periodic validation: keep the best state by this validation metric (e.g. "ndcg@10"),
  # which evaluation, indexing and scoring then use, and stop after `early_stopping_evals`
  # validations without improvement (0: never stop early).
  t.select_by = ""
  t.early_stopping_evals = 0

  c.eval = e = ml_collections.ConfigDict()
  e.split = "test"
  e.ks = (10, 50, 100)
  e.user_batch_size = 512

  # The item index (python -m launch.build_index). 0 means "chosen from the catalog size" by the
  # rules in two_tower/index.py (documented in docs/serving.md).
  c.index = x = ml_collections.ConfigDict()
  x.brute_force_max_items = 20_000  # catalogs up to this size are searched exactly (brute force)
  x.brute_force_int8 = False  # brute force over int8-quantized embeddings: 4x less memory
  x.num_leaves = 0  # tree partitions; auto: round(sqrt(items))
  x.leaves_to_search = 0  # auto: 2% of the leaves (at least 8), raised by calibration if needed
  x.reorder_multiplier = 0.0  # exact re-ordering depth = multiplier x neighbours; auto: 4, calibrated
  x.training_sample_size = 0  # items sampled to train the tree and the quantizer; auto: see rules
  x.dims_per_block = 2  # asymmetric hashing: dimensions per 4-bit code
  x.anisotropic_threshold = 0.2  # anisotropic quantization (score-aware loss) threshold
  x.calibrate = True  # raise the auto search settings until the calibration sample meets the floor
  # Real query embeddings used to calibrate (disjoint from validation): the larger the sample, the
  # smaller the statistical margin above the floor (two_tower/calibration.py), so the faster the
  # settings it finds; its exact top-100 costs about 10 s per 2,000 queries at 1M items on 2 cores.
  x.calibration_queries = 2000
  x.validation_queries = 1000  # real query embeddings used by the validation gate
  x.min_recall_at_100 = 0.95  # validation gate: refuse to publish below these
  x.min_recall_at_10 = 0.0
  x.keep_versions = 3  # published versions kept on disk (the live one is always kept)
  x.embed_batch_size = 8192  # items per jitted item-tower batch
  x.num_threads = 0  # search threads; 0: one per core
  x.seed = 0

  # Batch candidate generation (python -m launch.score).
  c.score = s = ml_collections.ConfigDict()
  s.top_k = 100
  s.exclude_history = True  # drop the user's training items; over-fetch so each user still gets K
  s.overfetch = -1  # extra neighbours fetched per user; -1: 90th percentile of training-item counts
  s.users_per_shard = 50_000  # users per Parquet shard (the unit of resumption)
  s.batch_size = 4096  # users per query-tower / search batch
  s.require_latest_checkpoint = False  # refuse a live index built from an older checkpoint

  # The nightly lifecycle (python -m launch.nightly): one work directory trained day after day.
  # There train.num_steps / train.num_epochs are each day's budget, and each day runs the
  # optimizer.schedule over its own steps. Keys of this block and of `gate`, train.*,
  # optimizer.learning_rate / embedding_learning_rate / schedule / warmup_steps, model.id_dropout
  # and the runtime keys may change between days; any other change (the model's shape, the
  # features) is refused.
  c.nightly = n = ml_collections.ConfigDict()
  n.min_count = 1  # occurrences (over days) before an ID gets its own row; until then a hashed bucket
  n.expire_after_days = 0  # an ID unseen for this many days is evicted and its row reused; 0: never
  n.row_chunk = 256  # tables grow by whole chunks of rows (rounded to a multiple of mesh.table_row_multiple)
  # A table that must grow grows by at least this share of its rows: the shapes (and the compiled
  # training step, kept in the work directory's compilation cache) then change only every few days.
  n.min_growth = 0.25
  # Replay: each day also trains on a seeded sample (this share) of the training examples of the
  # finished days among the `replay_days` before it, read from their prepared data (examples whose
  # item is not in today's catalog are dropped; a user idle today trains with its row of the
  # earlier day's user tables). train.num_epochs counts them. 0: none.
  n.replay_days = 0
  n.replay_rate = 0.1
  # Bootstrap: the lifecycle's first `bootstrap_days` days each also train on every earlier day's
  # training examples (replay at rate 1, whatever replay_days says): while the history is short,
  # training on all of it costs little, and a young model forgets what it saw a day ago. 0: off.
  n.bootstrap_days = 0

  # Before publishing a nightly model: it must score gate.metric on the day's holdout at most
  # max_regression (relative) below the live model scored on the same holdout.
  c.gate = g = ml_collections.ConfigDict()
  g.metric = "recall@10"
  g.max_regression = 0.05

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1  # data-parallel axis size; -1: the devices left over by mesh.model
  ms.model = 1  # model axis size (table rows, dense outputs); -1: the devices left over by mesh.data
  ms.shard_tables_over = "model"  # model | all: embedding-table rows over the model axis or every device
  ms.table_row_multiple = 1  # pad table rows to a multiple of this (keep it for a work directory's life)
  ms.replicate_uneven_mb = 16.0  # a parameter its mesh axes do not divide: replicated up to this size
  return c
