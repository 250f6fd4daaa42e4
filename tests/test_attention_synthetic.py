"""Attention metrics, health, images and the pattern classifier on synthetic matrices with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.core.errors import InvalidArgument
from labkit.measures import attention
from labkit.records import imaging

T = 48


def causal_norm(a: torch.Tensor) -> torch.Tensor:
    a = a.tril()
    return a / a.sum(-1, keepdim=True)


def diag():
    return torch.eye(T)


def previous():
    a = torch.zeros(T, T)
    a[0, 0] = 1
    a[torch.arange(1, T), torch.arange(T - 1)] = 1
    return a


def sink():
    a = torch.zeros(T, T)
    a[:, 0] = 1
    return a


def local(w=3):
    i = torch.arange(T)
    d = i[:, None] - i[None, :]
    return causal_norm(((d >= 0) & (d <= w)).float())


def uniform():
    return causal_norm(torch.ones(T, T))


def clustered(block=8):
    i = torch.arange(T)
    return causal_norm(((i[:, None] // block) == (i[None, :] // block)).float())


def sparse(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.full((T, T), 1e-4)
    for r in range(T):
        a[r, torch.randint(0, r + 1, (2,), generator=g)] = 1.0
    a[:, 0] = 1e-4
    return causal_norm(a)


@pytest.mark.parametrize("make, label", [
    (diag, imaging.Pattern.DIAGONAL), (previous, imaging.Pattern.PREVIOUS), (sink, imaging.Pattern.SINK),
    (local, imaging.Pattern.LOCAL), (uniform, imaging.Pattern.GLOBAL), (clustered, imaging.Pattern.CLUSTERED),
    (sparse, imaging.Pattern.SPARSE), (lambda: sparse(1), imaging.Pattern.SPARSE),
])
def test_classifier_labels_each_synthetic_kind(make, label):
    m = make()
    assert imaging.classify(m).label == label
    noisy = causal_norm(m + 0.002 * torch.rand(T, T, generator=torch.Generator().manual_seed(3)))
    assert imaging.classify(noisy).label == label  # robust to a little noise


def test_features_have_known_values():
    f = imaging.pattern_features(uniform())
    assert f["row_entropy_norm"] == pytest.approx(1.0)
    cells = T * (T + 1) / 2
    assert f["spatial_entropy_bits"] < math.log2(cells)  # rows are normalised, not cells: below the max
    assert imaging.pattern_features(diag())["diagonal_mass"] == 1.0
    assert imaging.pattern_features(sink())["distinct_starts"] == 1
    with pytest.raises(InvalidArgument, match="square"):
        imaging.pattern_features(torch.ones(3, 5))


def _row(probs: torch.Tensor) -> attention.AttentionRow:
    return attention.AttentionRow(probs.log())  # softmax(log p) = p; zeros become −inf scores (masked)


def test_step_metrics_closed_forms():
    uniform4 = torch.full((2, 3, 4), 0.25)
    m = attention.step_metrics(_row(uniform4))
    assert m.mean_entropy_bits == pytest.approx(2.0) and m.varentropy_bits == pytest.approx(0.0)
    assert m.agreement == pytest.approx(0.0)
    mixed = torch.tensor([[[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]])  # one focused, one uniform head
    m = attention.step_metrics(_row(mixed))
    assert m.entropy_bits[0].tolist() == pytest.approx([0.0, 2.0])
    assert m.varentropy_bits == pytest.approx(1.0)  # variance of {0, 2}
    assert m.agreement == pytest.approx((0.375 + 0.125 * 3) * 2 / 8)


def test_health_and_collapse():
    assert attention.attention_health(torch.full((4, 9), 2.5)) == "Healthy"
    assert attention.attention_health(torch.full((4, 9), 0.2)) == "Collapsed"
    assert attention.attention_health(torch.full((4, 9), 6.0)) == "TooDiffuse"
    e = torch.full((10,), 5.0)
    e[:8] = 0.1  # 80% of heads below 0.5 bit, mean still ≥ 1 bit
    assert attention.is_collapsed(e) and e.mean() >= 1.0
    e[7] = 0.6  # 70% below: not collapsed
    assert not attention.is_collapsed(e)
    t = attention.HealthThresholds(collapse_mean_bits=0.5, collapsed_fraction=0.95, focused_bits=1.0)
    assert attention.attention_health(torch.full((3,), 0.8), t) == "TooFocused"
    s = attention.RunStats.of([1.0, 2.0, 3.0])
    assert (s.mean, s.min, s.max, s.count) == (2.0, 1.0, 3.0, 3) and s.std == pytest.approx(math.sqrt(2 / 3))


def test_token_importance_sums_to_one():
    imp = attention.token_importance(torch.stack([sink(), uniform()]))
    assert imp.sum().item() == pytest.approx(1.0) and imp.argmax().item() == 0
