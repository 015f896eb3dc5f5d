"""The recipe's optimiser reads parameter generators (an easy way to lose every parameter) and is fused on CPU."""

import torch

from training.saes import adamw_with_schedule


def test_adamw_with_schedule_takes_generators_and_updates_them():
    layer = torch.nn.Linear(3, 2)
    optimizer, scheduler = adamw_with_schedule([{"params": layer.parameters(), "lr": 1e-2}], total_steps=10)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 2
    assert optimizer.defaults["fused"] is True
    before = layer.weight.detach().clone()
    for _ in range(2):  # the first step's learning rate is 0 (warm-up starts at 0)
        layer(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    assert not torch.equal(before, layer.weight)
