"""The chunked LM-head loss equals plain cross-entropy, in value and in gradients, with and without soft-capping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatforge.core.loss import chunked_lm_loss


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_chunked_loss_matches_plain_cross_entropy(softcap: float | None, weight_trainable: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_trainable)
    targets = torch.randint(0, 50, (37,))
    loss_sum, correct = chunked_lm_loss(hidden, weight, targets, chunk_size=8, softcap=softcap)
    (loss_sum * 0.5).backward()
    ours_hidden_grad = hidden.grad.clone()
    ours_weight_grad = weight.grad.clone() if weight_trainable else None
    hidden.grad = None
    weight.grad = None

    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="sum")
    (reference * 0.5).backward()
    assert torch.allclose(loss_sum.double(), reference, atol=1e-5)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    assert torch.allclose(ours_hidden_grad, hidden.grad, atol=1e-5)
    if weight_trainable:
        assert torch.allclose(ours_weight_grad, weight.grad, atol=1e-5)


def test_no_trained_positions_gives_zero_loss_and_zero_grads() -> None:
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss_sum, correct = chunked_lm_loss(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss_sum.backward()
    assert loss_sum.item() == 0.0 and correct.item() == 0
    assert torch.count_nonzero(weight.grad) == 0
