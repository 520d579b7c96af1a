import math

import torch

from byolcli.training.optim import LARS, ema_rate, lars_groups, learning_rate


def reference_lars_step(params, grads, momenta, adapted, lr, weight_decay, trust=1e-3, momentum=0.9):
    """One LARS step, parameter by parameter, written from the formula in LARS's docstring."""
    for p, g, m, lars in zip(params, grads, momenta, adapted):
        u = g + weight_decay * p if lars else g.clone()
        if lars and p.norm() > 0 and u.norm() > 0:
            u = u * trust * p.norm() / u.norm()
        m.mul_(momentum).add_(u)
        p.sub_(lr * m)


def test_lars_steps_follow_the_formula_layer_by_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    with torch.no_grad():
        model[3].weight.zero_()  # a zero-norm weight: its trust ratio falls back to 1
    optimizer = LARS(lars_groups(model), lr=0.1, weight_decay=1e-3)
    params = [p.detach().clone() for p in model.parameters()]
    momenta = [torch.zeros_like(p) for p in params]
    adapted = [p.ndim > 1 for p in model.parameters()]
    for _ in range(3):
        model(torch.randn(8, 5)).pow(2).sum().backward()
        reference_lars_step(params, [p.grad for p in model.parameters()], momenta, adapted, lr=0.1, weight_decay=1e-3)
        optimizer.step()
        optimizer.zero_grad()
        for expected, actual in zip(params, model.parameters()):
            assert torch.allclose(actual, expected, atol=1e-7, rtol=1e-5)
    assert model[3].weight.abs().sum() > 0


def test_schedules_warm_up_then_decay_and_tau_rises_to_one():
    peak = 0.2
    assert math.isclose(learning_rate(0, 100, 10, peak), peak / 10)
    assert math.isclose(learning_rate(9, 100, 10, peak), peak)
    assert math.isclose(learning_rate(55, 100, 10, peak), peak / 2)
    assert learning_rate(100, 100, 10, peak) == 0
    assert math.isclose(ema_rate(0, 100, 0.99), 0.99)
    assert math.isclose(ema_rate(50, 100, 0.99), 0.995)
    assert math.isclose(ema_rate(100, 100, 0.99), 1.0)
