"""Evaluation metrics of fine-tuning tasks, on host numpy arrays of a whole eval set.

Every function takes predictions, targets and optional 0/1 weights (padding rows have weight
0 and count nowhere), and returns a Python float. They follow the definitions that
scikit-learn and scipy use, so GLUE figures compare with published ones:

  accuracy   fraction of predicted labels equal to the target
  f1         binary F1 of the positive class (label 1), as for MRPC and QQP
  matthews   Matthews correlation coefficient (CoLA), multi-class form
  pearson    Pearson correlation of scores (STS-B)
  spearman   Spearman rank correlation, ties given their average rank
"""

from __future__ import annotations

import numpy as np


def _select(*arrays, weights=None):
  if weights is None:
    return arrays
  keep = np.asarray(weights) > 0
  return tuple(np.asarray(a)[keep] for a in arrays)


def accuracy(pred, target, weights=None) -> float:
  pred, target = _select(pred, target, weights=weights)
  return float(np.mean(np.asarray(pred) == np.asarray(target))) if len(pred) else 0.0


def f1(pred, target, weights=None, positive: int = 1) -> float:
  pred, target = _select(pred, target, weights=weights)
  p, t = np.asarray(pred) == positive, np.asarray(target) == positive
  tp = float(np.sum(p & t))
  denom = float(np.sum(p) + np.sum(t))
  return 2.0 * tp / denom if denom else 0.0


def matthews(pred, target, weights=None) -> float:
  """Multi-class MCC from the confusion matrix (Gorodkin 2004), 0 when undefined."""
  pred, target = _select(pred, target, weights=weights)
  pred, target = np.asarray(pred, np.int64), np.asarray(target, np.int64)
  k = int(max(pred.max(initial=0), target.max(initial=0))) + 1
  c = np.zeros((k, k), np.float64)
  np.add.at(c, (target, pred), 1.0)
  t_sum, p_sum = c.sum(1), c.sum(0)
  n, correct = c.sum(), np.trace(c)
  cov_ytyp = correct * n - t_sum @ p_sum
  cov_ypyp = n * n - p_sum @ p_sum
  cov_ytyt = n * n - t_sum @ t_sum
  denom = np.sqrt(cov_ytyt * cov_ypyp)
  return float(cov_ytyp / denom) if denom else 0.0


def pearson(pred, target, weights=None) -> float:
  x, y = (np.asarray(a, np.float64) for a in _select(pred, target, weights=weights))
  x, y = x - x.mean(), y - y.mean()
  denom = np.sqrt((x * x).sum() * (y * y).sum())
  return float((x * y).sum() / denom) if denom else 0.0


def _rank(a: np.ndarray) -> np.ndarray:
  """Ranks from 1, ties sharing their average rank (scipy.stats.rankdata 'average')."""
  order = np.argsort(a, kind='mergesort')
  sorted_a = a[order]
  starts = np.r_[True, sorted_a[1:] != sorted_a[:-1]]
  group = np.cumsum(starts) - 1
  first = np.flatnonzero(starts)
  ends = np.r_[first[1:], len(a)]
  avg = (first + ends + 1) / 2.0  # Mean of ranks first+1 .. end.
  ranks = np.empty(len(a), np.float64)
  ranks[order] = avg[group]
  return ranks


def spearman(pred, target, weights=None) -> float:
  x, y = (np.asarray(a, np.float64) for a in _select(pred, target, weights=weights))
  return pearson(_rank(x), _rank(y))


METRICS = {'accuracy': accuracy, 'f1': f1, 'matthews': matthews, 'pearson': pearson, 'spearman': spearman}


def compute(names, pred, target, weights=None) -> dict[str, float]:
  """{name: value} for each metric name."""
  return {n: METRICS[n](pred, target, weights) for n in names}
