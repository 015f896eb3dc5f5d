"""Configuration of :class:`~hf_sae.HierarchicalSAE`: a TopK SAE trained with the HierarchicalTopK objective.

Balagansky et al., "Train One Sparse Autoencoder Across Multiple Sparsity Budgets to Preserve Interpretability and
Accuracy" (EMNLP 2025). ``hierarchical=False`` turns it into the plain TopK SAE of Gao et al. (2024).
"""

from __future__ import annotations

from typing import ClassVar

from .configuration_sae import SAEConfig


class HierarchicalSAEConfig(SAEConfig):
    r"""Configuration of a HierarchicalTopK (or, with ``hierarchical=False``, plain TopK) SAE.

    All fields are those of :class:`~hf_sae.configuration_sae.SAEConfig`.

    Example:
    ```python
    >>> from hf_sae import HierarchicalSAEConfig, HierarchicalSAE
    >>> cfg = HierarchicalSAEConfig(d_in=2304, d_sae=65536, k=64,
    ...                             base_model="google/gemma-2-2b", hook_layer=12, hook_site="resid")
    >>> sae = HierarchicalSAE(cfg)
    ```
    """

    model_type: ClassVar[str] = "hierarchical_sae"
