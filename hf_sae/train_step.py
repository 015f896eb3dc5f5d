"""The one training step, :func:`training_step`: the only place an SAE parameter is updated.

The training script, the experiments, the benchmarks and the tests all call :func:`training_step`, so a benchmark
times what users run. The recipe (Gao et al. 2024, Sec. A) per step:

1. forward (optionally under autocast) and backward of the SAEs' summed losses;
2. drop from ``W_dec.grad`` the component parallel to each (unit) decoder row;
3. clip each SAE's gradient to ``max_grad_norm`` **on its own** (one SAE's large gradient never shrinks another's);
4. if any gradient is NaN/inf, skip the step (no optimiser or schedule step; the caller counts skips);
5. optimiser step, schedule step, zero the gradients;
6. renormalise every decoder row to unit norm.

Several SAEs (a multi-SAE run, one optimiser with a parameter group each) pass lists; under DDP the caller passes
``forward`` (the wrapped module, so gradients are all-reduced in backward) and ``backward`` (``accelerator.backward``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import HfSaeError
from .modeling_sae import SAEOutput, SAEPreTrainedModel


@dataclass
class TrainingStepOutput:
    """What one :func:`training_step` did.

    Attributes:
        loss: the summed loss of every SAE (detached).
        outputs: one :class:`SAEOutput` per SAE (losses detached), in the order of the SAEs.
        grad_norms: each SAE's gradient norm before clipping (a 0-d tensor each; reading it syncs the device).
        stepped: False when a NaN/inf gradient made the step be skipped.
    """

    loss: Tensor
    outputs: list[SAEOutput]
    grad_norms: list[Tensor]
    stepped: bool

    @property
    def output(self) -> SAEOutput:
        """The output of the first (for a single-SAE step: the only) SAE."""
        return self.outputs[0]


def _forward_all(saes: Sequence[SAEPreTrainedModel], inputs: Sequence[Tensor]) -> list[SAEOutput]:
    return [sae(x) for sae, x in zip(saes, inputs)]


def training_step(
    sae: SAEPreTrainedModel | Sequence[SAEPreTrainedModel],
    optimizer: torch.optim.Optimizer,
    x: Tensor | Sequence[Tensor],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    forward: Callable[[list[Tensor]], list[SAEOutput]] | None = None,
    backward: Callable[[Tensor], None] | None = None,
) -> TrainingStepOutput:
    """One optimisation step of one SAE, or of several SAEs that share an optimiser.

    Args:
        sae: an SAE, or a list of SAEs trained together.
        optimizer: the optimiser over their parameters.
        x: (N, d_in) activations in the SAE's input space, or one such tensor per SAE.
        scheduler: stepped after each optimiser step (not after a skipped step).
        max_grad_norm: clip each SAE's gradient norm to this; None or 0 disables clipping (norms are still measured
            to catch NaN/inf).
        autocast_dtype: run forward and backward under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        forward: computes the outputs from the list of inputs instead of calling each SAE (a DDP-wrapped stack).
        backward: called with the summed loss instead of ``loss.backward()`` (``accelerator.backward``).

    Returns: :class:`TrainingStepOutput` (summed loss, per-SAE outputs and gradient norms, whether it stepped).
    """
    # one SAE (or a latent-parallel shard of one), a list or an nn.ModuleList
    saes = [sae] if isinstance(sae, nn.Module) and not isinstance(sae, nn.ModuleList) else list(sae)
    inputs = [x] if isinstance(x, Tensor) else list(x)
    if len(saes) != len(inputs):
        raise HfSaeError(f"training_step got {len(saes)} SAE(s) but {len(inputs)} input tensor(s); pass one each.")
    if max_grad_norm is not None and not max_grad_norm >= 0:
        raise HfSaeError(f"max_grad_norm={max_grad_norm!r} must be >= 0 (0 or None disables clipping).")
    optimizer.zero_grad(set_to_none=True)
    device_type = inputs[0].device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with autocast:
        outputs = forward(inputs) if forward is not None else _forward_all(saes, inputs)
        loss = sum(output.loss for output in outputs)
    if backward is not None:
        backward(loss)
    else:
        loss.backward()
    limit = max_grad_norm if max_grad_norm else math.inf
    grad_norms = []
    for model in saes:
        model.remove_gradient_parallel_to_decoder_directions()
        grad_norms.append(model.clip_grad_norm_(limit))
    # Gradients are all-reduced before this point under DDP, so every process takes the same decision here.
    stepped = bool(torch.isfinite(torch.stack(grad_norms)).all())
    if stepped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if stepped:
        for model in saes:
            model.set_decoder_norm_to_unit_norm()
    for output in outputs:
        output.loss = output.loss.detach()
        output.losses = {name: value.detach() for name, value in (output.losses or {}).items()}
    return TrainingStepOutput(loss=loss.detach(), outputs=outputs, grad_norms=grad_norms, stepped=stepped)
