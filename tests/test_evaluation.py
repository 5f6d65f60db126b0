"""Retrieval metrics on hand-checked rankings."""

import numpy as np
import pytest

from two_tower.evaluation import _chunk_metrics, _padded_lists


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


def test_padded_lists_group_by_owner():
  owner = np.array([3, 1, 3, 3, 7])
  values = np.array([10, 11, 12, 10, 13])
  out = _padded_lists(owner, values, np.array([1, 3, 5]), unique=True)
  assert out.tolist() == [[11, -1], [10, 12], [-1, -1]]
