"""The per-objective gradients a FIRM step combines, and the Gram matrix of them.

gram = exact: ``objective_gradients`` gives the M LoRA gradients from one graph (G = g g^T).
gram = last-hidden (MGDA-UB, Sener & Koltun 2018): ``last_hidden_gram`` gives G at the policy's
last hidden states from one backward through the LM head (``token_loss_weights`` and
``logprob_hidden_gradients``); only the weights are approximate, the step is then exact.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from firm.sampling import predicting_positions


def objective_gradients(losses: torch.Tensor, params: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    """[M, D] float64: row m is the gradient of losses[m] with respect to ``params``, flattened.

    Default: M backward passes through the one graph (retained between them). ``batched``: one
    vmapped backward with the M unit vectors as grad_outputs (autograd's is_grads_batched);
    the same numbers, faster or slower depending on the hardware (scripts/bench_step.py).
    """
    M = losses.shape[0]
    if batched:
        eye = torch.eye(M, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(losses, list(params), grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        return torch.cat([(g if g is not None else p.new_zeros((M, *p.shape))).reshape(M, -1)
                          for g, p in zip(grads, params)], dim=1).double()
    rows = []
    for m in range(M):
        grads = torch.autograd.grad(losses[m], list(params), retain_graph=m < M - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows).double()


def token_loss_weights(rows: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """[R, B, T]: d rows[r] / d logprobs[b, t], each loss row's weight on each response token's
    log-prob. A backward through the loss arithmetic only; the model's graph is kept."""
    return torch.stack([torch.autograd.grad(row, logprobs, retain_graph=True)[0] for row in rows])


def logprob_hidden_gradients(logprobs: torch.Tensor, representation: torch.Tensor) -> torch.Tensor:
    """[B, T, H]: the gradient of each response token's log-prob at the last hidden state that
    predicted it (``representation`` is policy_outputs' [B, L, H] tensor). A log-prob reads only
    its own position's hidden state, so the gradient of their sum separates by position: ONE
    backward through the LM head gives all of them. The model's graph is kept."""
    (grad,) = torch.autograd.grad(logprobs, representation, grad_outputs=torch.ones_like(logprobs),
                                  retain_graph=True)
    return grad[:, predicting_positions(logprobs.shape[1])]


def last_hidden_gram(token_weights: torch.Tensor, hidden_gradients: torch.Tensor) -> np.ndarray:
    """[M, M] float64 MGDA-UB Gram (Sener & Koltun, 2018) of the M losses' gradients at the last
    hidden states. Loss m's gradient there is token_weights[m, b, t] * hidden_gradients[b, t] at
    each response position (the chain rule through that position's log-prob), so
    G_ij = sum_{b,t} w_i w_j |v_bt|^2: no per-objective backward at all."""
    weights = token_weights.double().reshape(token_weights.shape[0], -1)
    squared_norms = hidden_gradients.double().pow(2).sum(-1).reshape(1, -1)
    return ((weights * squared_norms) @ weights.T).cpu().numpy()
