"""MatryoshkaSAE: a BatchTopK SAE whose every dictionary prefix is trained to reconstruct on its own.

Bussmann, Nabeshima, Karvonen and Nanda, "Learning Multi-Level Features with Matryoshka Sparse Autoencoders"
(arXiv 2503.17547); Nabeshima (2024). The d_sae latents are consecutive groups with prefix widths m_1 < … < m_G =
d_sae (``config.group_sizes``). With the BatchTopK selection (:class:`~hf_sae.BatchTopKSAE`: N·k per batch in
training, the threshold θ at inference), the loss is

    L = Σ_g mean_{batch, d_in} (x − x̂_g)²,   x̂_g = b_dec + Σ_{selected i < m_g} a_i W_dec[i]

(:func:`hf_sae.losses.matryoshka_loss`): prefix g decodes only its own latents, so the early latents must explain
as much as they can alone. AuxK is on the whole dictionary's residual. Encoding and decoding are BatchTopK's;
:meth:`MatryoshkaSAE.decode_prefix` decodes one prefix.
"""

from __future__ import annotations

from torch import Tensor

from .configuration_matryoshka_sae import MatryoshkaSAEConfig
from .errors import SAEInputError
from .losses import flat_matryoshka_loss, matryoshka_loss
from .modeling_batchtopk_sae import BatchTopKSAE
from .registry import register_architecture
from .sparse import SparseLatents


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: parameters and buffers of :class:`~hf_sae.BatchTopKSAE`; the group structure is
    the config's ``group_sizes`` (``config.prefix_widths``)."""

    config_class = MatryoshkaSAEConfig

    def _reconstruction_losses(self, x: Tensor, values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, dict]:
        """The sum over prefixes of their MSE (:func:`hf_sae.losses.matryoshka_loss`)."""
        loss, x_hat = matryoshka_loss(x, values, indices, self.W_dec, self.b_dec, self.config.prefix_widths)
        return loss, x_hat, {}

    def _has_flat_loss(self) -> bool:
        return True

    def _flat_reconstruction_losses(
        self, x: Tensor, values: Tensor, rows: Tensor, columns: Tensor
    ) -> tuple[Tensor, Tensor, dict]:
        """The sum over prefixes of their MSE on flat latents (:func:`hf_sae.losses.flat_matryoshka_loss`)."""
        loss, x_hat = flat_matryoshka_loss(x, values, rows, columns, self.W_dec, self.b_dec, self.config.prefix_widths)
        return loss, x_hat, {}

    def decode_prefix(self, latents: SparseLatents | tuple[Tensor, Tensor], group: int) -> Tensor:
        """(..., d_in): the reconstruction from the latents of prefix ``group`` only (indices < m_group; groups count
        from 0, and the last, G − 1, is the whole dictionary: :meth:`decode`)."""
        widths = self.config.prefix_widths
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < len(widths):
            raise SAEInputError(f"group={group!r} is outside 0..{len(widths) - 1} (this SAE has prefixes {widths}).")
        values, indices = latents
        return self.decode((values * (indices < widths[group]), indices))


register_architecture(MatryoshkaSAEConfig, MatryoshkaSAE, presets={"matryoshka": {}})
