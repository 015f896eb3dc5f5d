"""One SAE optimisation step with the recipe's decoder maintenance (Gao et al. 2024).

Used by the training script, the benchmarks and the tests, so that every caller keeps decoder rows unit-norm the
same way: project out the gradient parallel to each row, step, renormalise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .modeling_sae import SAEOutput, SAEPreTrainedModel


def training_step(
    sae: SAEPreTrainedModel,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    max_grad_norm: float | None = None,
    scheduler=None,
) -> SAEOutput:
    """Forward, backward, decoder-gradient projection, optional clipping, optimiser step, decoder renormalisation.

    x: (N, d_in) activations in the SAE's input space. Returns the forward's :class:`SAEOutput` (loss detached).
    """
    optimizer.zero_grad(set_to_none=True)
    output = sae(x)
    output.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    sae.set_decoder_norm_to_unit_norm()
    output.loss = output.loss.detach()
    return output
