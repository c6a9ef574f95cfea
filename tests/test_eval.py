import pytest
import torch

from omnimoe.eval import recall_at_k


def test_recall_counts_same_caption_as_hit():
    t = torch.eye(4)
    q = torch.tensor([[1.0, 0, 0, 0], [0, 0.1, 1.0, 0], [0, 0, 0, 1.0]])
    # query 1's best target is #2, which shares its caption "b" with target #1: a hit at 1
    r = recall_at_k(q, t, ["a", "b", "d"], ["a", "b", "b", "c"], ks=(1, 2))
    assert r["R@1"] == pytest.approx(2 / 3) and r["n"] == 3
    assert r["R@2"] == pytest.approx(2 / 3)  # "d" is not among the targets: never a hit
    assert recall_at_k(q, t, ["a", "b", "d"], ["a", "b", "b", "d"], ks=(1,))["R@1"] == 1.0


def test_recall_k_beyond_targets_and_bad_input():
    r = recall_at_k(torch.randn(5, 3), torch.randn(2, 3), list("abcde"), ["a", "b"], ks=(1, 5, 10))
    assert r["R@10"] == r["R@5"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="one group label"):
        recall_at_k(torch.randn(2, 3), torch.randn(2, 3), ["a"], ["a", "b"])
