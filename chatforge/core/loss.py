"""Cross-entropy through the LM head on trained positions only, in chunks, never holding [tokens x vocab] logits.

Use it like this::

    hidden = decoder(input_ids, ...).last_hidden_state          # [batch, seq, hidden]
    positions = labels[:, 1:] != -100                            # next-token targets that carry loss
    loss_sum, correct = chunked_lm_loss(hidden[:, :-1][positions], lm_head.weight, labels[:, 1:][positions])
    (loss_sum / n_tokens).backward()

    loss_model = CausalLMLoss(model)                             # the object training and eval both use
    loss_sum, n_tokens, n_correct = loss_model(**batch)          # batch from core.examples.collate
    rows = loss_model.per_row(**padded_batch)                    # eval: (loss sum, tokens, hits) per conversation

`CausalLMLoss` is an `nn.Module` so DDP (through accelerate) wraps the whole forward, loss included.

Why: Gemma 3's 262k-entry vocabulary makes the LM head most of the compute per token, and a plain
`CrossEntropyLoss(lm_head(hidden))` materialises fp32 logits for every position, padding and prompts included. Here
the head runs only on positions that carry loss, a chunk at a time, and the gradient of each chunk is computed in
the same pass (softmax minus one-hot), so the backward costs no second logits matmul and nothing vocabulary-sized
stays alive between forward and backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from chatforge.core.examples import IGNORE

LOGITS_BUDGET = 32 * 1024 * 1024  # fp32 logits per LM-head chunk (x4 bytes); see CausalLMLoss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token cross-entropies of `hidden @ weight.T` against `targets`, gradients computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        softcap: float,
    ) -> tuple[Tensor, Tensor]:
        need_hidden_grad = hidden.requires_grad
        need_weight_grad = weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            need_grad = need_hidden_grad or need_weight_grad
            logits, chunk_loss, chunk_correct = _logits_loss_and_grad(h, weight, t, softcap, need_grad)
            loss_sum += chunk_loss
            correct += chunk_correct
            if need_grad:
                grad_logits = logits.to(_compute_dtype(hidden, weight))  # the same buffer unless the head computes in 16 bits
                del logits
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk_size] = _head_input_grad(grad_logits, weight)
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).float()
                del grad_logits
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has_grads = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_correct: Tensor) -> tuple:  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        has_hidden, has_weight = ctx.has_grads
        grad_hidden = next(saved) * grad_loss if has_hidden else None
        grad_weight = (next(saved) * grad_loss).to(ctx.weight_dtype) if has_weight else None
        return grad_hidden, grad_weight, None, None, None


UPCAST_ROWS = 8192  # vocabulary rows of a 16-bit LM head up-cast (or softmaxed) at a time: ~21 MB fp32 for a 640-wide head


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype: the hidden states' (fp32 on the CPU) when the head is stored in fewer bits (train.lowmem)."""
    return hidden.dtype if weight.element_size() < hidden.element_size() else weight.dtype


def _head_logits(h: Tensor, weight: Tensor) -> Tensor:
    """h @ weight.T, up-casting a 16-bit stored head a slice of rows at a time (never a full fp32 copy)."""
    if weight.dtype == h.dtype or _compute_dtype(h, weight) == weight.dtype:
        return h @ weight.T
    logits = torch.empty((h.shape[0], weight.shape[0]), dtype=h.dtype, device=h.device)
    for start in range(0, weight.shape[0], UPCAST_ROWS):
        logits[:, start : start + UPCAST_ROWS] = h @ weight[start : start + UPCAST_ROWS].to(h.dtype).T
    return logits


def _logits_loss_and_grad(h: Tensor, weight: Tensor, targets: Tensor, softcap: float,
                          need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d loss / d logits, or the logits when `need_grad` is False; loss sum; argmax hits) of one chunk, in ONE
    vocabulary-sized fp32 buffer: every step works in place, a vocabulary slice at a time where it needs a
    temporary (the soft-cap path of the straightforward version held four buffers: raw, capped, logits, softmax)."""
    rows = torch.arange(targets.shape[0], device=targets.device)
    buffer = _head_logits(h, weight).float()  # raw logits
    if softcap:
        buffer.div_(softcap).tanh_()  # c = tanh(raw / cap); logits = cap * c, same argmax
    scale = softcap or 1.0
    target_value = buffer[rows, targets]  # c (or the logit) of each target
    row_max = buffer.amax(dim=-1)
    correct = (buffer.argmax(dim=-1) == targets).sum()
    exp_sum = torch.zeros_like(row_max)
    for lo in range(0, buffer.shape[1], UPCAST_ROWS):
        exp_sum += ((buffer[:, lo : lo + UPCAST_ROWS] - row_max[:, None]) * scale).exp_().sum(dim=-1)
    log_z = row_max * scale + exp_sum.log()
    loss = (log_z - target_value * scale).sum()
    if not need_grad:
        return buffer, loss, correct
    # d loss / d logit = softmax - onehot; with the cap, times d(cap * c) / d raw = 1 - c^2
    for lo in range(0, buffer.shape[1], UPCAST_ROWS):
        piece = buffer[:, lo : lo + UPCAST_ROWS]
        softmax = ((piece - row_max[:, None]) * scale).exp_().div_(exp_sum[:, None])
        if softcap:
            softmax.mul_(piece.mul_(piece).neg_().add_(1.0))  # piece becomes 1 - c^2
        piece.copy_(softmax)
    buffer[rows, targets] -= (1.0 - target_value * target_value) if softcap else 1.0
    return buffer, loss, correct


def _head_input_grad(grad_logits: Tensor, weight: Tensor) -> Tensor:
    """grad_logits @ weight, up-casting a 16-bit stored head a slice of rows at a time."""
    if weight.dtype == grad_logits.dtype:
        return grad_logits @ weight
    grad = torch.zeros((grad_logits.shape[0], weight.shape[1]), dtype=grad_logits.dtype, device=grad_logits.device)
    for start in range(0, weight.shape[0], UPCAST_ROWS):
        grad += grad_logits[:, start : start + UPCAST_ROWS] @ weight[start : start + UPCAST_ROWS].to(grad_logits.dtype)
    return grad


def chunked_lm_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 512, softcap: float | None = None
) -> tuple[Tensor, Tensor]:
    """Return (sum of cross-entropy, number of argmax hits) over `targets`; differentiable in the first value.

    hidden: [n, hidden] states at the positions that predict `targets` ([n] token ids); weight: the LM head [vocab,
    hidden]; softcap: Gemma-style final logit soft-capping (None when the model has none).
    """
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph connected (DDP expects every grad)
        return zero.float(), torch.zeros((), dtype=torch.long, device=hidden.device)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, float(softcap or 0.0))


def lm_head_weight(causal: nn.Module) -> Tensor:
    """The LM head's weight as the forward pass sees it: with peft trainable tokens, the frozen matrix with the
    trained rows copied in (a differentiable copy, so those rows get their gradient through our chunked loss)."""
    head = causal.get_output_embeddings()
    adapter = getattr(head, "token_adapter", None)
    if adapter is not None:
        return adapter.get_merged_weights(adapter.active_adapters)
    return head.weight


def causal_lm_of(model: nn.Module) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CausalLMLoss(nn.Module):
    """Forward = decoder, then the LM head and cross-entropy on trained positions only (see the module docstring)."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        causal = causal_lm_of(model)
        self.chunk_size = loss_chunk_rows(causal.get_output_embeddings().weight.shape[0], chunk_size)
        self.softcap = getattr(causal.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return (sum of token losses, number of trained tokens, number predicted right) over the whole batch."""
        hidden = self._hidden(input_ids, attention_mask, position_ids)
        targets = labels[:, 1:]
        trained = targets != IGNORE
        loss_sum, correct = chunked_lm_loss(
            hidden[:, :-1][trained], self._head(), targets[trained], self.chunk_size, self.softcap
        )
        return loss_sum, trained.sum(), correct

    def per_row(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> list[tuple[float, int, int]]:
        """(loss sum, trained tokens, argmax hits) for each row of a padded batch: one batched decoder pass, then the
        same chunked LM head row by row (right padding: a row's trained positions never see its padding). Eval's
        perplexity and the bias probe score with this, so they always measure what training optimises."""
        hidden = self._hidden(input_ids, attention_mask, None)
        head = self._head()
        targets = labels[:, 1:]
        rows = []
        for row in range(hidden.shape[0]):
            trained = targets[row] != IGNORE
            loss_sum, correct = chunked_lm_loss(hidden[row, :-1][trained], head, targets[row][trained],
                                                self.chunk_size, self.softcap)
            rows.append((float(loss_sum), int(trained.sum()), int(correct)))
        return rows

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
        causal = causal_lm_of(self.model)
        return causal.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

    def _head(self) -> Tensor:
        return lm_head_weight(causal_lm_of(self.model))


def loss_chunk_rows(vocab_size: int, configured: int | None) -> int:
    """Positions per LM-head chunk: as configured, else ~128 MB of fp32 logits (128 for a 262k vocabulary), so
    peak memory stays flat while each matmul is still large enough to run at full speed."""
    return configured or max(16, min(8192, LOGITS_BUDGET // vocab_size))
