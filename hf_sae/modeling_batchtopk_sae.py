"""BatchTopKSAE: TopK over the whole batch in training, one threshold at inference.

Bussmann, Leask and Nanda, "BatchTopK Sparse Autoencoders" (arXiv 2412.06410). The encoder is the TopK SAE's,
a = ReLU(W_encᵀ(x − b_dec) + b_enc). In training, the N·k largest activations of a batch of N tokens are kept
(:func:`hf_sae.sparse.batch_topk_select`), so the mean L0 is k while each token keeps as many latents as the batch
gives it; AuxK (Gao et al. 2024) revives dead latents as for TopK. After each training batch the inference threshold θ
moves towards the smallest activation the batch kept (see ``threshold_lr`` in :class:`BatchTopKSAEConfig`).

Encoding contract (latents are sorted descending, as for every hf-sae SAE):

* ``encode(x)``: every latent whose activation exceeds θ (a JumpReLU with one threshold), padded with zeros to the
  largest L0 of the batch, so the width of the result varies with the input. Before θ has been estimated (a fresh,
  untrained SAE) it is the per-token TopK at k.
* ``encode(x, k=j)`` (1 <= j <= k): the per-token TopK at budget j, the j largest activations of each token
  (nested in j). Wherever a token has at least j latents above θ, it is the first j of ``encode(x)``.
* ``forward`` in training mode uses the batch selection (and updates θ and the dead-latent counters); in eval mode it
  uses ``encode(x)``.

Training cost: a few outlier tokens (large norms) can keep hundreds of latents each while the mean L0 stays k, so
the padded (N, width) selection can be ~100x wider than k. When it is wider than ``flat_width_factor`` · k, the
encoder values, the decode and the loss run on the flat list of the ≈ N·k kept (row, latent, value) entries
(:class:`~hf_sae.sparse.FlatSelectedLinear`, :func:`~hf_sae.losses.flat_mse_loss`, Matryoshka's
:func:`~hf_sae.losses.flat_matryoshka_loss`): the same loss and gradients at the cost of a TopK step. The
HierarchicalTopK objective (``config.hierarchical``) keeps the padded path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .configuration_batchtopk_sae import BatchTopKSAEConfig
from .losses import flat_mse_loss, hierarchical_topk_loss
from .modeling_hierarchical_sae import HierarchicalSAE
from .modeling_sae import SAEOutput
from .registry import register_architecture
from .sparse import (
    CentringGradient,
    FlatSelectedLinear,
    SelectedLinear,
    SparseLatents,
    SparseLinearGather,
    batch_topk_select,
    compact_latents,
)


class BatchTopKSAE(HierarchicalSAE):
    """BatchTopK SAE. Parameters as :class:`~hf_sae.HierarchicalSAE` (``encoder.weight`` (d_sae, d_in),
    ``encoder.bias``, unit-norm ``W_dec``, ``b_dec``), plus two saved buffers: ``threshold`` θ (a scalar, in the
    units of the activations) and ``threshold_batches`` (how many training batches estimated it; 0: not yet)."""

    config_class = BatchTopKSAEConfig
    supports_latent_parallel = False  # the top-k is over the whole batch, not per token
    #: training takes the flat (ragged) path when the selection's padded width exceeds this multiple of k
    #: (``math.inf``: always padded; 0: always flat); the results are the same either way (see _use_flat_path)
    flat_width_factor: float = 2.0

    def __init__(self, config: BatchTopKSAEConfig):
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, *args, **kwargs):
        """As nn.Module's; a cast to half precision (``.to(torch.bfloat16)``) keeps θ in float32, where the running
        average's small steps do not round away (as SAELens keeps its threshold)."""
        out = super()._apply(fn, *args, **kwargs)
        threshold = self._buffers.get("threshold")
        if threshold is not None and threshold.dtype in (torch.bfloat16, torch.float16):
            self._buffers["threshold"] = threshold.float()
        return out

    def reset_parameters(self) -> None:
        """The TopK init (random unit decoder rows, W_enc = W_decᵀ, zero biases) and no threshold estimate yet."""
        super().reset_parameters()
        if hasattr(self, "threshold"):
            self.threshold.zero_()
            self.threshold_batches.zero_()

    def encoder_biases(self) -> list[Tensor]:
        """What folding an activation scale s divides by s: b_enc and θ (b_dec is the base class's)."""
        return [self.encoder.bias, self.threshold]

    # -------------------------------------------------------------------------------------------- encoding
    def encode(self, x: Tensor, k: int | None = None) -> SparseLatents:
        """(..., d_in) -> SparseLatents sorted descending: above θ (k=None; width = the batch's largest L0) or the
        per-token TopK at budget k (see the module docstring)."""
        if k is not None or int(self.threshold_batches) == 0:
            return super().encode(x, k)
        self._check_input(x)
        flat = self._scale_in(x.reshape(-1, self.config.d_in))
        values, indices = self._threshold_latents(flat)
        shape = (*x.shape[:-1], values.shape[-1])
        return SparseLatents(values.reshape(shape), indices.reshape(shape))

    def _scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, d_in) -> (x − b_dec, its pre-activations (N, d_sae)), without gradient (selection only)."""
        centred = x - self.b_dec
        with torch.no_grad():
            return centred, torch.addmm(self.encoder.bias, centred, self.encoder.weight.t())

    def _values_at(self, centred: Tensor, pre: Tensor, columns: Tensor) -> Tensor:
        """pre at ``columns`` (N, t), with the sparse encoder backward when training needs it (only the selected
        latents' rows get gradient; b_dec's share through the bias, see CentringGradient)."""
        weight, bias = self.encoder.weight, self.encoder.bias
        if not (torch.is_grad_enabled() and (weight.requires_grad or centred.requires_grad)):
            return pre.gather(1, columns)
        if self.b_dec.requires_grad:
            bias = CentringGradient.apply(bias, weight, self.b_dec)
        return SparseLinearGather.apply(centred.detach(), weight, bias, columns, pre, False)

    def _threshold_latents(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (N, d_in) scaled -> (values, indices) of every latent above θ, sorted, padded to the largest L0."""
        centred, pre = self._scores(x)
        with torch.no_grad():
            acts = pre.clamp_min(0)
            acts = acts.masked_fill_(acts <= self.threshold.to(acts.dtype), 0)
            selected, indices = compact_latents(acts)
        return self._values_at(centred, pre, indices) * (selected > 0), indices

    def _batch_selection(
        self, x: Tensor, dead_mask: Tensor | None, k_aux: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training selection without gradient, θ updated: the batch's N·k largest activations
        (:func:`hf_sae.sparse.batch_topk_select`, the encoder bias added inside the selection pass), padded (N, width)
        and sorted, and AuxK's k_aux best dead latents per token (N, k_aux)."""
        weight, bias = self.encoder.weight, self.encoder.bias
        with torch.no_grad():
            scores = (x - self.b_dec) @ weight.t()  # (N, d_sae), the bias is added by the selection
            chosen = batch_topk_select(scores, self.config.k, bias, dead_mask, k_aux)
            del scores
            self._update_threshold(chosen[0])
        return chosen

    def _encoder_needs_grad(self, centred: Tensor) -> bool:
        return torch.is_grad_enabled() and (self.encoder.weight.requires_grad or centred.requires_grad)

    def _encoder_bias(self) -> Tensor:
        """b_enc, through :class:`~hf_sae.sparse.CentringGradient` when b_dec trains (b_dec's share of the gradient)."""
        bias = self.encoder.bias
        if self.b_dec.requires_grad:
            bias = CentringGradient.apply(bias, self.encoder.weight, self.b_dec)
        return bias

    def _batch_latents(self, x: Tensor, dead_mask: Tensor | None, k_aux: int):
        """Training selection (:meth:`_batch_selection`), then the sparse encoder backward through exactly those
        latents: (values, indices) (N, width) padded, (aux_values, aux_indices) (N, k_aux)."""
        return self._padded_values(x, self._batch_selection(x, dead_mask, k_aux))

    def _padded_values(self, x: Tensor, chosen: tuple[Tensor, Tensor, Tensor, Tensor]):
        """The selection's values with the encoder's sparse gradient (:class:`~hf_sae.sparse.SelectedLinear` over
        the (N, width + k_aux) selected columns)."""
        selected, indices, aux_selected, aux_indices = chosen
        centred = x - self.b_dec
        values = torch.cat([selected.to(x.dtype), aux_selected.to(x.dtype).clamp_min(0)], dim=1)
        if self._encoder_needs_grad(centred):
            columns = torch.cat([indices, aux_indices], dim=1)
            values = SelectedLinear.apply(centred.detach(), self.encoder.weight, self._encoder_bias(), columns, values)
        width = indices.shape[1]
        return values[:, :width] * (selected > 0), indices, values[:, width:], aux_indices

    def _flat_values(self, x: Tensor, chosen: tuple[Tensor, Tensor, Tensor, Tensor]):
        """The selection as flat entries: (values (nnz,) with the encoder's gradient, rows, columns (nnz,), rows
        ascending; positions (nnz,) in the padded rows) and AuxK's (aux_values, aux_indices) (N, k_aux), the same
        values and gradients as :meth:`_padded_values` at cost O(nnz · d_in) (nnz <= N·k, the kept entries)."""
        selected, indices, aux_selected, aux_indices = chosen
        rows, positions = (selected > 0).nonzero(as_tuple=True)
        columns = indices[rows, positions]
        values = selected[rows, positions].to(x.dtype)
        aux_values = aux_selected.to(x.dtype).clamp_min(0)
        centred = x - self.b_dec
        if self._encoder_needs_grad(centred):
            weight, bias = self.encoder.weight, self._encoder_bias()
            values = FlatSelectedLinear.apply(centred.detach(), weight, bias, rows, columns, values)
            if aux_indices.shape[1] > 0:
                aux_values = SelectedLinear.apply(centred.detach(), weight, bias, aux_indices, aux_values)
        return values, rows, columns, positions, aux_values, aux_indices

    def _use_flat_path(self, width: int) -> bool:
        """Whether a training selection of this padded width takes the flat (ragged) path: when the width is more
        than ``flat_width_factor`` · k (an outlier token kept many latents) and the objective has a flat form.
        Both paths give the same latents, loss and gradients; the padded one is faster for narrow selections."""
        return self._has_flat_loss() and width > self.flat_width_factor * self.config.k

    def _has_flat_loss(self) -> bool:
        """The HierarchicalTopK objective (every prefix of each row's sorted latents) has no flat form here."""
        return not self.config.hierarchical

    def _flat_reconstruction_losses(
        self, x: Tensor, values: Tensor, rows: Tensor, columns: Tensor
    ) -> tuple[Tensor, Tensor, dict]:
        """:meth:`_reconstruction_losses` of flat latents (the non-hierarchical MSE)."""
        loss, x_hat = flat_mse_loss(x, values, rows, columns, self.W_dec, self.b_dec)
        return loss, x_hat, {}

    def _batch_training_terms(self, x: Tensor, dead_mask: Tensor | None, k_aux: int):
        """One training batch: selection, values with gradient, and the reconstruction objective, on the flat or
        the padded path (:meth:`_use_flat_path`) -> (values, indices) (N, width) padded (values with gradient),
        (aux_values, aux_indices), loss, x̂, extra terms."""
        chosen = self._batch_selection(x, dead_mask, k_aux)
        if not self._use_flat_path(chosen[1].shape[1]):
            values, indices, aux_values, aux_indices = self._padded_values(x, chosen)
            return values, indices, aux_values, aux_indices, *self._reconstruction_losses(x, values, indices)
        flat_values, rows, columns, positions, aux_values, aux_indices = self._flat_values(x, chosen)
        loss, x_hat, extra = self._flat_reconstruction_losses(x, flat_values, rows, columns)
        indices = chosen[1]
        values = flat_values.new_zeros(indices.shape).index_put((rows, positions), flat_values)
        return values, indices, aux_values, aux_indices, loss, x_hat, extra

    @torch.no_grad()
    def _update_threshold(self, selected: Tensor) -> None:
        """θ ← θ + r (m − θ), m = the smallest kept activation, r = max(threshold_lr, 1/t) (no device sync)."""
        smallest = torch.where(selected > 0, selected, torch.inf).amin().to(self.threshold.dtype)
        found = torch.isfinite(smallest)
        batches = self.threshold_batches + found.long()
        rate = torch.clamp_min(1.0 / batches.clamp_min(1).to(self.threshold.dtype), self.config.threshold_lr)
        self.threshold.copy_(torch.where(found, self.threshold + rate * (smallest - self.threshold), self.threshold))
        self.threshold_batches.copy_(batches)

    # -------------------------------------------------------------------------------------------- training
    def _reconstruction_losses(self, x: Tensor, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, dict]:
        """(loss, reconstruction, extra named terms) of the latents: the MSE, or the HierarchicalTopK objective by
        value (every prefix 1..width of the sorted latents) when ``config.hierarchical``."""
        budgets = None if self.config.hierarchical and self.training else [values.shape[1]]
        loss, x_hat = hierarchical_topk_loss(x, values, indices, self.W_dec, self.b_dec, budgets)
        return loss, x_hat, {}

    def forward(self, x: Tensor, return_dict: bool | None = None) -> SAEOutput:
        """(..., d_in) -> SAEOutput. Training mode: BatchTopK selection, θ update, loss + AuxK; eval mode: the
        threshold encoding and its MSE. ``latents`` has the width of the selection (padded with zeros)."""
        self._check_input(x)
        cfg = self.config
        flat = self._scale_in(x.reshape(-1, cfg.d_in))
        dead, n_dead, k_aux = self._auxk_dead_latents()
        if self.training:
            values, indices, aux_values, aux_indices, loss, x_hat, extra = self._batch_training_terms(flat, dead, k_aux)
        else:
            if int(self.threshold_batches) > 0:
                values, indices = self._threshold_latents(flat)
            else:
                values, indices, _, _ = self._encode_topk(flat, cfg.k)
            loss, x_hat, extra = self._reconstruction_losses(flat, values, indices)
        losses = {"reconstruction": loss, **extra}
        if k_aux > 0:
            losses["auxk"] = self._auxk_term(flat, x_hat, aux_values, aux_indices, n_dead)
            loss = loss + losses["auxk"]
        return self._sae_output(x, values, indices, x_hat, loss, losses)


register_architecture(BatchTopKSAEConfig, BatchTopKSAE, presets={"batchtopk": {}})
