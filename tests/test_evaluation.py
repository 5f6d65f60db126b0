"""Retrieval metrics on hand-checked rankings."""

import numpy as np
import pytest

from two_tower.evaluation import Evaluator, _chunk_metrics, _isin_pairs, _padded_lists


def test_metrics_on_a_hand_made_ranking():
  # User 0 ranks items 0 > 1 > 2 > 3 > 4 > 5; item 0 was in training (masked), items 2 and 5 are
  # the test items. Masked ranking: 1, 2, 3, 4, 5 -> item 2 at rank 2 (1-based), item 5 at rank 5.
  # User 1 ranks 5 > 4 > ... > 0, nothing masked, test item 5 at rank 1; two interactions with it.
  scores = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], np.float32)
  targets = np.array([[2, 5], [5, -1]])
  exclude = np.array([[0], [-1]])
  interactions = np.array([[2, 5, -1], [5, 5, -1]])
  out, coverage = _chunk_metrics(scores, targets, exclude, interactions, np.array([True, True]),
                                 ks=(1, 2, 5), max_k=6)
  out = {k: np.asarray(v) for k, v in out.items()}
  np.testing.assert_allclose(out["recall@2"], [0.5, 1.0])
  np.testing.assert_allclose(out["recall@5"], [1.0, 1.0])
  np.testing.assert_allclose(out["hit_rate@1"], [0.0, 1.0])
  np.testing.assert_allclose(out["mrr@5"], [0.5, 1.0])
  dcg = 1 / np.log2(3) + 1 / np.log2(6)
  idcg = 1 + 1 / np.log2(3)
  np.testing.assert_allclose(out["ndcg@5"], [dcg / idcg, 1.0], rtol=1e-6)
  # Unmasked per-interaction accuracy: user 0's item 2 is 3rd, item 5 is 6th; user 1's is 1st.
  np.testing.assert_array_equal(out["accuracy@2"], [0, 2])
  np.testing.assert_array_equal(out["accuracy@5"], [1, 2])
  # Top 100 of 6 items: all of them, but user 0 never sees its masked item 0.
  assert np.asarray(coverage).tolist() == [1, 2, 2, 2, 2, 2]


def test_accuracy_counts_ranks_in_the_unmasked_ranking():
  # accuracy@K ranks over the whole catalog, masked items included; checked against a full sort on
  # random scores where many masked items rank high.
  rng = np.random.default_rng(0)
  users, items, k = 16, 300, 100
  scores = rng.normal(size=(users, items)).astype(np.float32)
  exclude = np.stack([rng.choice(items, 40, replace=False) for _ in range(users)])
  exclude[::3, 20:] = -1  # users with fewer masked items
  interactions = rng.integers(0, items, (users, 30))
  targets = np.full((users, 1), -1)
  out, _ = _chunk_metrics(scores, targets, exclude, interactions, np.ones(users, bool),
                          ks=(10, k), max_k=k)
  rank = (-scores).argsort(1).argsort(1)  # 0-based rank of every item in the unmasked order
  item_rank = np.take_along_axis(rank, interactions, 1)
  for cut in (10, k):
    np.testing.assert_array_equal(out[f"accuracy@{cut}"], (item_rank < cut).sum(1))


def test_padded_lists_group_by_owner():
  owner = np.array([3, 1, 3, 3, 7])
  values = np.array([10, 11, 12, 10, 13])
  out = _padded_lists(owner, values, np.array([1, 3, 5]), unique=True)
  assert out.tolist() == [[11, -1], [10, 12], [-1, -1]]


def test_a_masked_item_is_not_a_target():
  # User 0 had items 0 and 1 in training and items 1 and 2 in test (sampling with replacement):
  # item 1 is masked, so it can never be retrieved and is not a target; the only target is 2.
  # User 1's only test item was in training too: no target at all.
  rows = np.array([0, 1])
  train_users, train_items = np.array([0, 0, 1]), np.array([0, 1, 3])
  test_users, test_items = np.array([0, 0, 1]), np.array([1, 2, 3])
  target = ~_isin_pairs(test_users, test_items, train_users, train_items)
  targets = _padded_lists(test_users[target], test_items[target], rows, unique=True)
  exclude = _padded_lists(train_users, train_items, rows, unique=True)
  assert targets.tolist() == [[2], [-1]] and exclude.tolist() == [[0, 1], [3, -1]]
  scores = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]], np.float32)
  interactions = _padded_lists(test_users, test_items, rows, unique=False)
  out, _ = _chunk_metrics(scores, targets, exclude, interactions, np.array([True, True]),
                          ks=(1, 2), max_k=6)
  out = {k: np.asarray(v) for k, v in out.items()}
  # User 0: masked ranking 2, 3, ...: its one target first. User 1 counts for nothing.
  for name in ("recall@1", "ndcg@1", "mrr@1", "hit_rate@1"):
    np.testing.assert_allclose(out[name], [1.0, 0.0], err_msg=name)
  # accuracy@K stays per interaction and unmasked: user 0's item 1 is second, user 1's item 3 third.
  np.testing.assert_array_equal(out["accuracy@2"], [1, 0])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  from conftest import tiny_config
  from pipelines.prepare import prepare
  return prepare(tiny_config().data, str(tmp_path_factory.mktemp("data")))


def _by_user(users, items):
  out = {}
  for u, i in zip(users.tolist(), items.tolist()):
    out.setdefault(u, set()).add(i)
  return out


def _rows_as_sets(matrix):
  return [set(row[row >= 0].tolist()) for row in matrix]


def test_evaluator_masks_and_targets(tiny_data):
  train = _by_user(*tiny_data.pairs("train"))
  validation = _by_user(*tiny_data.pairs("validation"))
  for split, masked in (("validation", [train]), ("test", [train, validation])):
    evaluator = Evaluator(tiny_data, None, split, (10,))
    evaluated = _by_user(*tiny_data.pairs(split))
    assert evaluator.users.tolist() == sorted(evaluated)
    want_exclude = [set().union(*(m.get(u, set()) for m in masked)) for u in evaluator.users]
    assert _rows_as_sets(evaluator.exclude) == want_exclude
    assert _rows_as_sets(evaluator.targets) == [
        evaluated[u] - ex for u, ex in zip(evaluator.users.tolist(), want_exclude)]
    # The synthetic data samples with replacement: the rule matters here.
    assert any(evaluated[u] & ex for u, ex in zip(evaluator.users.tolist(), want_exclude))


def test_a_perfect_ranking_scores_1(tiny_data):
  # Scoring exactly the user's test items first: every target is retrieved. Masked test items
  # and users without targets must not pull the metrics below 1.
  evaluator = Evaluator(tiny_data, None, "test", (100,))
  test = _by_user(*tiny_data.pairs("test"))
  num_items = tiny_data.schema.num_items

  def perfect(rows):
    scores = np.zeros((len(rows), num_items), np.float32)
    for r, u in enumerate(rows.tolist()):
      scores[r, sorted(test.get(u, ()))] = 1.0
    return scores

  metrics = evaluator.evaluate_scores(perfect)
  for name in ("recall@100", "ndcg@100", "mrr@100", "hit_rate@100"):
    assert metrics[name] == pytest.approx(1.0), name
  assert evaluator.num_target_users < len(evaluator.users)  # some users have no target


def test_target_items_restrict_the_targets_not_the_ranking(tiny_data):
  users, items = tiny_data.pairs("test")
  chosen = np.unique(items)[::3]
  evaluator = Evaluator(tiny_data, None, "test", (10, 100), target_items=chosen)
  everything = Evaluator(tiny_data, None, "test", (100,))
  kept = np.isin(items, chosen)
  assert evaluator.users.tolist() == sorted(set(users[kept].tolist()))
  full_targets = dict(zip(everything.users.tolist(), _rows_as_sets(everything.targets)))
  for u, targets in zip(evaluator.users.tolist(), _rows_as_sets(evaluator.targets)):
    assert targets == full_targets[u] & set(chosen.tolist())
  assert evaluator.num_interactions == kept.sum()
  # Masked items are the user's training items whether or not they are target items.
  exclude = dict(zip(everything.users.tolist(), _rows_as_sets(everything.exclude)))
  assert all(got == exclude[u] for u, got in zip(evaluator.users.tolist(),
                                                  _rows_as_sets(evaluator.exclude)))
  # Ranked last, the chosen items are never retrieved; ranked first, always.
  last = np.zeros(tiny_data.schema.num_items, np.float32)
  last[chosen] = -1.0
  assert evaluator.evaluate_scores(lambda rows: np.tile(last, (len(rows), 1)))["recall@10"] == 0.0
  metrics = evaluator.evaluate_scores(lambda rows: np.tile(-last, (len(rows), 1)))
  assert metrics["recall@100"] == 1.0 and metrics["recall@10"] > 0.0
