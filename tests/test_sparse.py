"""Sparse encode/decode primitives equal their dense definitions (values and gradients)."""

import torch

from hf_sae.sparse import SparseLatents, TopKEncode, sparse_decode


def test_sparse_topk_encoder_backward_equals_dense_autograd():
    torch.manual_seed(0)
    n, d, F, k, k_aux = 6, 8, 40, 3, 2
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(F, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(F, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    values, indices, aux_values, aux_indices = TopKEncode.apply(x, W, b, k, dead, k_aux)
    upstream, upstream_aux = torch.randn(n, k, dtype=torch.float64), torch.randn(n, k_aux, dtype=torch.float64)
    grads = torch.autograd.grad((values * upstream).sum() + (aux_values * upstream_aux).sum(), (x, W, b))

    scores = torch.relu(x @ W.t() + b)
    dense_values = scores.gather(1, indices)
    dense_aux = scores.gather(1, aux_indices)
    assert torch.allclose(values, dense_values)
    assert set(aux_indices.flatten().tolist()) <= set(torch.nonzero(dead).flatten().tolist())
    expected = torch.autograd.grad((dense_values * upstream).sum() + (dense_aux * upstream_aux).sum(), (x, W, b))
    for ours, ref in zip(grads, expected):
        assert torch.allclose(ours, ref, atol=1e-10)


def test_sparse_decode_and_dense_view():
    W = torch.randn(10, 4)
    latents = SparseLatents(torch.tensor([[2.0, 1.0]]), torch.tensor([[7, 3]]))
    assert torch.allclose(sparse_decode(latents.values, latents.indices, W), 2 * W[7] + W[3])
    dense = latents.to_dense(10)
    assert dense[0, 7] == 2 and dense[0, 3] == 1 and dense.sum() == 3
    assert torch.equal(latents.truncate(1).indices, torch.tensor([[7]]))


def test_kron_sparse_encoder_backward_equals_dense_autograd():
    from hf_sae import KronSAE, KronSAEConfig

    sae = KronSAE(KronSAEConfig(d_in=8, num_heads=5, base_dim=2, ext_dim=3, k=4, dtype="float64")).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    values, indices, _, _ = sae._encode_topk(x, 4)
    upstream = torch.randn_like(values)
    grads = torch.autograd.grad((values * upstream).sum(), [sae.encoder.weight, sae.encoder.bias])
    dense = sae._pre_acts_flat(x).gather(1, indices)  # plain autograd through the dense mAND scores
    assert torch.allclose(values, dense)
    expected = torch.autograd.grad((dense * upstream).sum(), [sae.encoder.weight, sae.encoder.bias])
    for ours, ref in zip(grads, expected):
        assert torch.allclose(ours, ref, atol=1e-10)
