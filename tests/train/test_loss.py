"""The chunked LM-head loss equals plain cross-entropy, in value and in gradients, with and without soft-capping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


PEAK_PROBE = """
import resource, sys, torch
from chatforge.core.loss import chunked_lm_loss
torch.manual_seed(0)
vocab, rows = 262144, 64
hidden = torch.randn(rows, 16, requires_grad=True)
weight = torch.randn(vocab, 16)
targets = torch.randint(0, vocab, (rows,))
chunked_lm_loss(hidden[:2], weight[:1000], targets[:2] % 1000, chunk_size=2, softcap=30.0)[0].backward()  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loss, _ = chunked_lm_loss(hidden, weight, targets, chunk_size=rows, softcap=float(sys.argv[1]) or None)
loss.backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / (rows * vocab * 4))
"""


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_a_chunk_holds_one_vocabulary_sized_buffer(softcap: float) -> None:
    """Peak memory of one Gemma-sized chunk (64 positions x 262k vocabulary, soft-capped or not) stays near one fp32
    logits buffer (the straightforward version peaked at 2 buffers without the cap and 6 with it). Measured as the
    rise of a fresh process's peak RSS: big tensors are mmap'd by malloc, so they count exactly when alive."""
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(softcap)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    buffers = float(done.stdout.split()[-1])
    assert buffers < 1.6, buffers
