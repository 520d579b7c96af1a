"""Multinomial logistic regression on frozen features, for many L2 strengths at once.

One L-BFGS per strength, run side by side: each evaluation scores every strength with one
matrix product over the rows. Choosing a strength means fitting the same rows many times,
and one wide product costs little more than one narrow one (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HISTORY = 100  # curvature pairs each L-BFGS keeps (as torch.optim.LBFGS)
ARMIJO = 1e-4  # the share of the predicted decrease a step must achieve
HALVINGS = 30
TOLERANCE_GRAD = 1e-7  # converged: no gradient entry above this, or no parameter moved more than the next
TOLERANCE_CHANGE = 1e-9
MEMORY = 2**27  # floats the fits may take together; past it, strengths take turns


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, classes: int, weight_decays: Sequence[float], iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each strength λ, the (W, b) minimising mean cross-entropy + λ‖W‖²:
    W (strengths, features, classes), b (strengths, classes)."""
    decays = torch.as_tensor(weight_decays, dtype=x.dtype, device=x.device)
    # Per strength: its parameters, gradients and curvature pairs, and its logits over the rows.
    per_fit = (x.shape[1] + 1) * classes * (2 * min(HISTORY, iterations) + 6) + 4 * len(x) * classes
    group = max(1, MEMORY // per_fit)
    fits = [_fit_together(x, y, classes, decays[i : i + group], iterations) for i in range(0, len(decays), group)]
    return torch.cat([w for w, _ in fits]), torch.cat([b for _, b in fits])


def _fit_together(
    x: torch.Tensor, y: torch.Tensor, classes: int, decays: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, features = x.shape
    target = torch.nn.functional.one_hot(y, classes).to(x.dtype)[:, None]

    def objective(
        theta: torch.Tensor, decays: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # theta (strengths, features + 1, classes): W's rows, then b
        strengths = len(decays)
        weight, bias = theta[:, :features], theta[:, features]
        logits = (x @ weight.permute(1, 0, 2).reshape(features, -1)).view(rows, strengths, classes) + bias
        log_p = logits.log_softmax(-1)
        loss = -(log_p * target).sum((0, 2)) / rows + decays * weight.pow(2).sum((1, 2))
        residual = (log_p.exp() - target) / rows
        grad_weight = (x.T @ residual.reshape(rows, -1)).view(features, strengths, classes).permute(1, 0, 2)
        grad = torch.cat([grad_weight + 2 * decays[:, None, None] * weight, residual.sum(0)[:, None]], 1)
        return loss, grad

    theta = torch.zeros(len(decays), features + 1, classes, dtype=x.dtype, device=x.device)
    loss, grad = objective(theta, decays)
    history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    scale = torch.ones_like(loss)
    active = grad.abs().amax((1, 2)) > TOLERANCE_GRAD
    for iteration in range(iterations):
        if not active.any():
            break
        direction = -_inverse_hessian_times(grad, history, scale)
        slope = _dot(grad, direction)
        if (uphill := slope >= 0).any():  # a stale curvature pair: fall back to steepest descent
            direction = torch.where(uphill[:, None, None], -grad, direction)
            slope = _dot(grad, direction)
        # The first step is scaled as torch.optim.LBFGS scales it; later ones try the full step first.
        step = (1 / grad.abs().sum((1, 2))).clamp(max=1) if iteration == 0 else torch.ones_like(loss)
        step = step * active
        new_loss, new_grad, enough, pending = loss.clone(), grad.clone(), ~active, active.clone()
        resolution = 4 * torch.finfo(x.dtype).eps * loss.abs()
        for _ in range(HALVINGS):  # backtracking, for the strengths whose step was too long
            retry = pending.nonzero().flatten()
            if not len(retry):
                break
            trial_loss, trial_grad = objective(theta[retry] + step[retry, None, None] * direction[retry], decays[retry])
            # Where the predicted decrease is within the loss's rounding, the loss cannot judge the
            # step; a smaller gradient can, and a shorter step would not help.
            rounding = -step[retry] * slope[retry] <= resolution[retry]
            decreased = trial_loss <= loss[retry] + ARMIJO * step[retry] * slope[retry]
            flatter = trial_grad.abs().amax((1, 2)) < grad[retry].abs().amax((1, 2))
            ok = torch.where(rounding, flatter, decreased)
            new_loss[retry], new_grad[retry], enough[retry] = trial_loss, trial_grad, ok
            pending[retry] = ~ok & ~rounding
            step[retry] = torch.where(ok, step[retry], step[retry] / 2)
        step = step * enough  # what never decreased enough stays where it was, and stops
        active &= enough
        moved = step[:, None, None] * direction
        new_loss, new_grad = torch.where(enough, new_loss, loss), torch.where(enough[:, None, None], new_grad, grad)
        change = new_grad - grad
        curvature = _dot(moved, change)
        fine = curvature > 1e-10
        history = [*history, (moved, change, torch.where(fine, 1 / curvature.clamp_min(1e-10), 0.0))][-HISTORY:]
        scale = torch.where(fine, curvature / _dot(change, change).clamp_min(1e-30), scale)
        active &= (new_grad.abs().amax((1, 2)) > TOLERANCE_GRAD) & (moved.abs().amax((1, 2)) > TOLERANCE_CHANGE)
        theta, loss, grad = theta + moved, new_loss, new_grad
    return theta[:, :features], theta[:, features]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((1, 2))


def _inverse_hessian_times(
    grad: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scale: torch.Tensor
) -> torch.Tensor:
    """L-BFGS's two-loop recursion, per strength; a pair whose weight is 0 (no curvature) is skipped."""
    q = grad.clone()
    alphas = []
    for moved, change, weight in reversed(history):
        alpha = weight * _dot(moved, q)
        q -= alpha[:, None, None] * change
        alphas.append(alpha)
    r = q * scale[:, None, None]
    for (moved, change, weight), alpha in zip(history, reversed(alphas)):
        beta = weight * _dot(change, r)
        r += (alpha - beta)[:, None, None] * moved
    return r
