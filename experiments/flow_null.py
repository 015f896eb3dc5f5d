"""What a feature-flow score reaches by chance, so that thresholds can be set against it (issue 18, item 4).

A flow score is a top-1 cosine: s(P) of a resid feature is the largest cosine of its decoder row with the rows of
the predecessor SAE P (Mechanistic Permutability). Two nulls:

* the **isotropic noise floor** of this d_in and d_sae: the largest cosine of a random unit vector with d_sae other
  random unit vectors in R^d_in (≈ sqrt(2 ln d_sae / d_in) for large d_in: 0.161 for d_in 640, d_sae 4096). A
  threshold below it links every feature to something.
* the **rotated null** of a real pair of dictionaries: the target's rows matched against the predecessor's rows
  after one random orthogonal rotation of R^d_in. The rotation keeps each dictionary's own geometry (its rows'
  clustering, the anisotropy training gave it) and destroys only their alignment with each other, so its top-1
  cosines are what this particular pair scores with no flow between them. Real dictionaries are anisotropic, so
  this floor sits above the isotropic one.

A threshold is *justified* when the chosen quantile (99.9%) of the null lies below it: then at most 0.1% of
features pass it by chance.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUANTILE = 0.999


def _unit_rows(matrix: Tensor) -> Tensor:
    return torch.nn.functional.normalize(matrix.float(), dim=-1)


def _top1(target: Tensor, source: Tensor, block: int = 4096) -> Tensor:
    """(F, d) x (G, d) unit rows -> (F,) the largest cosine of each target row with the source rows."""
    return torch.cat([(target[i : i + block] @ source.T).amax(dim=1) for i in range(0, target.shape[0], block)])


@torch.no_grad()
def isotropic_floor(d_in: int, d_sae: int, draws: int = 4, seed: int = 0) -> Tensor:
    """(draws · d_sae,) top-1 cosines of random unit vectors against d_sae random unit vectors in R^d_in."""
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(draws):
        a = _unit_rows(torch.randn(d_sae, d_in, generator=generator))
        b = _unit_rows(torch.randn(d_sae, d_in, generator=generator))
        scores.append(_top1(a, b))
    return torch.cat(scores)


def expected_floor(d_in: int, d_sae: int) -> float:
    """The large-d_in approximation sqrt(2 ln d_sae / d_in) of the isotropic floor's typical value."""
    return math.sqrt(2 * math.log(d_sae) / d_in)


def random_rotation(d: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal (d, d) matrix: QR of a Gaussian matrix with the signs of R's diagonal fixed."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@torch.no_grad()
def rotated_null(target_dec: Tensor, source_dec: Tensor, seed: int = 0) -> Tensor:
    """(F,) top-1 cosines of ``target_dec``'s rows (F, d) with ``source_dec``'s rows (G, d) rotated by one random
    orthogonal matrix: the pair's scores without any alignment between the two dictionaries."""
    generator = torch.Generator().manual_seed(seed)
    rotation = random_rotation(source_dec.shape[1], generator)
    return _top1(_unit_rows(target_dec), _unit_rows(source_dec) @ rotation)


def quantile(scores: Tensor, q: float = QUANTILE) -> float:
    return float(torch.quantile(scores.double(), q))


def justified_threshold(default: float, nulls: list[Tensor], q: float = QUANTILE) -> float:
    """The smallest threshold ≥ ``default`` that every null's q-quantile stays below, rounded up to 0.01 (a quantile
    within 1e-6 of a step counts as on it)."""
    floor = max(quantile(null, q) for null in nulls)
    return max(default, math.ceil(floor * 100 - 1e-4) / 100)


def same_index_share(ids: Tensor) -> float:
    """Share of features whose top-1 match ``ids`` (F,) is their own index (chance: 1 / d_sae)."""
    return float((ids == torch.arange(ids.numel())).double().mean())
