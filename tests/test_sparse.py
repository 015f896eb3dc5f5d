"""Sparse encode/decode primitives equal their dense definitions (values and gradients)."""

import pytest
import torch

import hf_sae.aux_tiles as aux_tiles_module
from hf_sae.kernels import aux_cpu_kernels, cpu_kernels
from hf_sae.losses import auxk_loss
from hf_sae.sparse import (
    FlatSelectedLinear,
    SparseLatents,
    TopKEncode,
    _scatter_rows_matmul,
    aux_block_and_tiles,
    csr_order,
    dense_aux_block,
    flat_decode,
    select_topk,
    sparse_decode,
)


@pytest.mark.parametrize("centred", [False, True])
def test_sparse_topk_encoder_backward_equals_dense_autograd(centred):
    torch.manual_seed(0)
    n, d, F, k, k_aux = 6, 8, 40, 3, 2
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(F, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(F, dtype=torch.float64, requires_grad=True)
    c = torch.randn(d, dtype=torch.float64, requires_grad=True) if centred else None
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    values, indices, aux_values, aux_indices = TopKEncode.apply(x, W, b, c, k, dead, k_aux)
    upstream, upstream_aux = torch.randn(n, k, dtype=torch.float64), torch.randn(n, k_aux, dtype=torch.float64)
    inputs = (x, W, b, c) if centred else (x, W, b)
    grads = torch.autograd.grad((values * upstream).sum() + (aux_values * upstream_aux).sum(), inputs)

    scores = torch.relu((x - c if centred else x) @ W.t() + b)
    dense_values = scores.gather(1, indices)
    dense_aux = scores.gather(1, aux_indices)
    assert torch.allclose(values, dense_values)
    assert torch.equal(indices, scores.topk(k, dim=-1).indices)
    assert set(aux_indices.flatten().tolist()) <= set(torch.nonzero(dead).flatten().tolist())
    expected = torch.autograd.grad((dense_values * upstream).sum() + (dense_aux * upstream_aux).sum(), inputs)
    for ours, ref in zip(grads, expected):
        assert torch.allclose(ours, ref, atol=1e-10)


def test_csr_order_groups_pairs_by_latent_in_pair_order():
    # pairs (flat n*k + t): 0->2, 1->0, 2->2, 3->1, 4->0, 5->2 with F = 4 (latent 3 unused)
    indices = torch.tensor([[2, 0], [2, 1], [0, 2]])
    crow, perm = csr_order(indices, 4)
    assert crow.tolist() == [0, 2, 3, 6, 6]
    assert perm.tolist() == [1, 4, 3, 0, 2, 5]


def test_scatter_rows_matmul_is_the_transposed_sparse_product():
    torch.manual_seed(1)
    indices = torch.tensor([[2, 0], [2, 1], [0, 2]])
    coefficients = torch.randn(3, 2, dtype=torch.float64)
    rows = torch.randn(3, 5, dtype=torch.float64)
    out, sums = _scatter_rows_matmul(indices, coefficients, rows, 4)
    dense = torch.zeros(3, 4, dtype=torch.float64).scatter_add_(1, indices, coefficients)  # S (N, F)
    assert torch.allclose(out, dense.t() @ rows, atol=1e-12)
    assert torch.allclose(sums, dense.sum(0), atol=1e-12)
    assert out[3].abs().max() == 0 and sums[3] == 0


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_column_tile_kernel_gives_the_csr_kernels_bits(dtype):
    # Both sum each output row's pairs in pair order, so the results are the same bits: several tiles of 3 columns
    # (the last one partial), a column read twice by one row, zero coefficients and a column nobody reads.
    torch.manual_seed(3)
    indices = torch.randint(0, 10, (40, 6))
    indices[:, 5] = indices[:, 4]  # duplicates within a row, as KronSAE's u columns
    indices[indices == 7] = 8  # column 7 is never read
    coefficients = torch.randn(40, 6, dtype=dtype)
    coefficients[::3, 1] = 0
    rows = torch.randn(40, 5, dtype=dtype)
    kernels = cpu_kernels()
    crow, order = kernels.csr_order(indices.reshape(-1), 11)
    csr = kernels.csr_scatter_rows(crow, order, 6, coefficients.reshape(-1), rows)
    tiled = kernels.tile_scatter_rows(indices, coefficients, rows, 11, 3)
    assert torch.equal(tiled[0], csr[0]) and torch.equal(tiled[1], csr[1])
    assert tiled[0][7].abs().max() == 0 and tiled[1][7] == 0
    # and _scatter_rows_matmul picks either by tile size, with the same result
    elements = rows.element_size() * rows.shape[1]
    for tile_bytes in (elements, 1 << 20):  # 1 column per tile: CSR; 11 columns per tile: tiled
        out, sums = _scatter_rows_matmul(indices, coefficients, rows, 11, tile_bytes=tile_bytes)
        assert torch.equal(out, csr[0]) and torch.equal(sums, csr[1])


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


def _flat_entries(n: int, num_latents: int, seed: int):
    """Ragged rows (0 to 9 latents each, one empty row) as flat (rows ascending, columns) entries."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 10, (n,), generator=generator)
    lengths[1] = 0
    rows = torch.repeat_interleave(torch.arange(n), lengths)
    columns = torch.cat([torch.randperm(num_latents, generator=generator)[:length] for length in lengths.tolist()])
    return rows, columns


def test_flat_decode_sums_each_rows_decoder_rows():
    rows, columns = _flat_entries(6, 20, seed=1)
    values = torch.rand(rows.shape[0], dtype=torch.float64)
    W_dec = torch.randn(20, 5, dtype=torch.float64)
    dense = torch.zeros(6, 20, dtype=torch.float64).index_put_((rows, columns), values)
    torch.testing.assert_close(flat_decode(values, rows, columns, W_dec, 6), dense @ W_dec)


def test_flat_selected_linear_has_the_dense_gradients_of_its_entries():
    rows, columns = _flat_entries(8, 30, seed=2)
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(rows.shape[0], dtype=torch.float64)
    with torch.no_grad():
        values = (x @ weight.t() + bias)[rows, columns]
    got = FlatSelectedLinear.apply(x, weight, bias, rows, columns, values)
    assert torch.equal(got, values)
    grads = torch.autograd.grad((got * upstream).sum(), [x, weight, bias])
    expected = torch.autograd.grad(((x @ weight.t() + bias)[rows, columns] * upstream).sum(), [x, weight, bias])
    for g, want in zip(grads, expected):
        torch.testing.assert_close(g, want)


def _reference_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending, ties by the lower index: a stable sort of the negated scores."""
    order = (-scores).argsort(dim=-1, stable=True)[:, :k]
    return scores.gather(1, order), order


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels could not be built here")
@pytest.mark.parametrize("F, k", [(4096, 32), (5000, 7), (300, 1), (100, 64), (2048, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_selection_kernel_is_topk_with_ties_to_the_lower_index(F, k, dtype):
    torch.manual_seed(3)
    scores = torch.randn(37, F)
    scores[:5] = scores[:5].round()  # rows of many exact ties (among them -0 and +0)
    scores[5, : F // 2] = -0.0
    scores[5, F // 2 :] = 0.0
    scores = scores.to(dtype)
    bias = torch.randn(F) * 0.1
    bias[: F // 3] = 0.0
    values, indices, _, _ = select_topk(scores, k, bias=bias)
    want_values, want_indices = _reference_topk(scores.float() + bias, k)
    assert torch.equal(indices, want_indices)
    assert torch.equal(values, want_values)


@pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels could not be built here")
def test_the_aux_selection_kernel_takes_the_best_dead_latents():
    torch.manual_seed(4)
    scores = torch.randn(29, 4096)
    dead = torch.rand(4096) < 0.5
    _, _, aux_values, aux_indices = select_topk(scores, 32, dead, 320)
    want_values, want_indices = _reference_topk(scores.masked_fill(~dead, -torch.inf), 320)
    assert torch.equal(aux_indices.sort(-1).values, want_indices.sort(-1).values)  # AuxK's are unsorted
    assert torch.equal(aux_values.sort(-1).values, want_values.sort(-1).values)


def test_dense_aux_block_maps_dead_latents_and_declines_sparse_or_foreign_choices():
    dead = torch.tensor([False, True, False, True, True, False, False, False])
    columns, positions = dense_aux_block(torch.tensor([[4, 1], [3, 4]]), dead)
    assert columns.tolist() == [1, 3, 4] and positions.tolist() == [[2, 0], [1, 2]]
    assert dense_aux_block(torch.tensor([[0, 1]]), dead) is None  # latent 0 is not dead
    many_dead = torch.ones(64, dtype=torch.bool)
    assert dense_aux_block(torch.tensor([[5, 9, 11, 20, 30, 40, 50]]), many_dead) is None  # 7 of 64 < 1/8
    assert dense_aux_block(torch.tensor([[5, 9, 11, 20, 30, 40, 50, 60]]), many_dead) is not None


AUX_BLOCK_PATHS = [pytest.param(0.0, id="dense-block")]
if aux_cpu_kernels() is not None:
    AUX_BLOCK_PATHS.append(pytest.param(1.01, id="tiled"))


@pytest.mark.parametrize("tiled_max_density", AUX_BLOCK_PATHS)
def test_topk_encoder_backward_with_a_dense_aux_block_equals_the_sparse_one(tiled_max_density, monkeypatch):
    monkeypatch.setattr(aux_tiles_module, "TILED_MAX_DENSITY", tiled_max_density)
    torch.manual_seed(5)
    n, d, F, k, k_aux = 9, 6, 48, 3, 5
    x = torch.randn(n, d, dtype=torch.float64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::2] = True  # 24 dead, k_aux 5: density 5/24 -> dense
    grads = []
    for mask in (dead, None):
        W = torch.randn(F, d, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_()
        b = torch.randn(F, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).requires_grad_()
        c = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).requires_grad_()
        values, indices, aux_values, aux_indices = TopKEncode.apply(x, W, b, c, k, dead, k_aux)
        if mask is None:  # the same forward, with the dense block (and its tiles) switched off for the backward
            values.grad_fn.aux_block = values.grad_fn.aux_tiles = None
        else:
            assert values.grad_fn.aux_block is not None
            assert (values.grad_fn.aux_tiles is not None) == (tiled_max_density > 1)
        upstream = torch.linspace(-1, 1, n * k, dtype=torch.float64).reshape(n, k)
        upstream_aux = torch.linspace(2, -1, n * k_aux, dtype=torch.float64).reshape(n, k_aux)
        loss = (values * upstream).sum() + (aux_values * upstream_aux).sum()
        grads.append(torch.autograd.grad(loss, (W, b, c)))
    for dense, sparse in zip(*grads):
        torch.testing.assert_close(dense, sparse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tiled_max_density", AUX_BLOCK_PATHS)
def test_auxk_loss_through_the_dense_block_equals_the_sparse_decode(tiled_max_density, monkeypatch):
    monkeypatch.setattr(aux_tiles_module, "TILED_MAX_DENSITY", tiled_max_density)
    torch.manual_seed(9)
    n, d, F, k_aux = 11, 7, 40, 6
    residual = torch.randn(n, d, dtype=torch.float64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[5:25] = True
    aux_indices = torch.stack([torch.randperm(20)[:k_aux] + 5 for _ in range(n)])
    results = []
    for mask in (dead, None):
        W = torch.randn(F, d, dtype=torch.float64, generator=torch.Generator().manual_seed(10)).requires_grad_()
        values = torch.rand(n, k_aux, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        values.requires_grad_()
        loss = auxk_loss(residual, values, aux_indices, W, mask)
        path = {0.0: "_DenseAuxK", 1.01: "_TiledAuxK"}[tiled_max_density] if mask is not None else None
        assert path is None or type(loss.grad_fn).__name__ == path + "Backward"
        results.append((loss.detach(), *torch.autograd.grad(loss, (values, W))))
    # by hand: ê = Σ v W[i], loss = ||e − ê||² / ||e − mean(e)||²
    e_hat = (values.detach().unsqueeze(-1) * W.detach()[aux_indices]).sum(1)
    by_hand = (residual - e_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    torch.testing.assert_close(results[0][0], by_hand, rtol=1e-12, atol=0)
    for dense, sparse in zip(*results):
        torch.testing.assert_close(dense, sparse, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(aux_cpu_kernels() is None, reason="needs the AuxK CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_tiled_aux_kernels_by_hand_and_against_dense_products(dtype):
    # By hand: rows 0 and 1 choose block positions [2, 0] and [1, 2] with values [2, 3] and [-1, 4].
    kernels = aux_cpu_kernels()
    positions = torch.tensor([[2, 0], [1, 2]])
    values = torch.tensor([[2.0, 3.0], [-1.0, 4.0]], dtype=dtype)
    M = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=dtype)  # (C 3, d 2)
    A = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=dtype)
    plan = kernels.aux_plan(positions, 3, 1, 1)
    decoded = kernels.aux_decode(plan[0], plan[1], positions, values, M, 1)
    assert decoded.tolist() == [[2 * 1 + 3 * 1, 2 * 1 + 3 * 0], [-1 * 0 + 4 * 1, -1 * 1 + 4 * 1]]
    assert kernels.aux_dots(plan[0], plan[1], positions, A, M, 1).tolist() == [[3.0, 1.0], [-1.0, 2.0]]
    scattered, sums = kernels.aux_scatter(plan[2], plan[3], positions, values, A, 3, 1)
    assert scattered.tolist() == [[3.0, 6.0], [-3.0, 1.0], [2 + 12.0, 4 - 4.0]] and sums.tolist() == [3.0, -1.0, 6.0]
    # Against the dense products: several blocks and tiles (the last ones partial) and a d with a tail after the
    # 64-float chunks; rows of the block that nobody chose get zero.
    g = torch.Generator().manual_seed(0)
    N, C, d, k = 77, 41, 70, 9
    positions = torch.rand(N, C - 1, generator=g).topk(k, dim=1).indices
    positions = (positions + (positions >= 7)).contiguous()  # distinct per row; block row 7 is never chosen
    values = torch.randn(N, k, generator=g, dtype=dtype)
    M, A = torch.randn(C, d, generator=g, dtype=dtype), torch.randn(N, d, generator=g, dtype=dtype)
    dense = torch.zeros(N, C, dtype=dtype).scatter_(1, positions, values)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for block, tile in [(8, 4), (128, 64), (1, 1)]:
        plan = kernels.aux_plan(positions, C, block, tile)
        decoded = kernels.aux_decode(plan[0], plan[1], positions, values, M, block)
        torch.testing.assert_close(decoded, dense @ M, **tolerance)
        dots = kernels.aux_dots(plan[0], plan[1], positions, A, M, block)
        torch.testing.assert_close(dots, (A @ M.t()).gather(1, positions), **tolerance)
        scattered, sums = kernels.aux_scatter(plan[2], plan[3], positions, values, A, C, block)
        torch.testing.assert_close(scattered, dense.t() @ A, **tolerance)
        torch.testing.assert_close(sums, dense.sum(0), **tolerance)
        assert scattered[7].abs().max() == 0 and sums[7] == 0
    with pytest.raises(RuntimeError, match="powers of two"):
        kernels.aux_plan(positions, C, 3, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.aux_plan(positions, 5, 8, 4)


def test_the_aux_block_is_computed_once_per_choice_and_again_after_a_change():
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::2] = True
    indices = torch.arange(0, 64, 2)[torch.stack([torch.randperm(32)[:6] for _ in range(5)])]
    first = aux_block_and_tiles(indices, dead, torch.float32, 4)
    assert aux_block_and_tiles(indices, dead, torch.float32, 4)[0] is first[0]  # the same tensors: kept
    assert aux_block_and_tiles(indices, dead.clone(), torch.float32, 4)[0] is first[0]  # a mask of the same values
    assert aux_block_and_tiles(indices.clone(), dead, torch.float32, 4)[0] is not first[0]  # another tensor
    other = dead.clone()
    other[1] = True
    assert aux_block_and_tiles(indices, other, torch.float32, 4)[0] is not first[0]  # another mask
    first = aux_block_and_tiles(indices, dead, torch.float32, 4)
    indices.add_(0)  # an in-place change (its version moves)
    again = aux_block_and_tiles(indices, dead, torch.float32, 4)
    assert again[0] is not first[0]  # modified in place: computed again
    torch.testing.assert_close(again[0][1], dense_aux_block(indices, dead)[1])
