// AuxK's products on the dead-latent block, tiled so that the matrix read at random stays in L2 (CPU).
//
// AuxK decodes k_aux of the n_dead dead latents per row: a sparse (N, C) matrix A of density k_aux / C (C = n_dead;
// 320 / 2048 = 0.16 at d_in 640 with half of 4096 latents dead). As four dense (N, C) x (C, d) products it costs
// 4 C / d_sae encoder matmuls whatever the density; gathered row by row it is bound by cache bandwidth (every
// multiply-add loads a decoder element from L3). Here the pairs are visited in cells of (block of output rows,
// tile of input rows): the tile of the matrix read at random fits in L2, each output row's chunk of 64 floats sits
// in registers while the row's pairs of the tile are summed into it, so a multiply-add costs one L2 load.
//
//   out[i] = sum over pairs (i, j, a) of a * M[j]      (spmm: the decode, the decoder and encoder gradients)
//   dot[p] = <A[i], M[j]> for pair p = (i, j)          (sddmm: the gradient into the aux values)
//
// A pair p is the entry p = n * k + t of the (N, k) positions pos (into the C block): in the row-major plan
// (i, j) = (n, pos[p]); in the transposed plan (i, j) = (pos[p], n). Sums run in a fixed order: deterministic.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "counting_order.h"

namespace {

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float v __attribute__((vector_size(32)));
};
template <>
struct Lanes<double> {
  typedef double v __attribute__((vector_size(32)));
};
constexpr int kVectors = 8;  // accumulators per chunk: 64 floats / 32 doubles of an output row in registers

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Pair p = n * k + t -> its row n (a 32-bit division).
struct PairRow {
  int32_t k;
  int64_t operator()(int32_t p) const { return p / k; }
};

// out[i] += sum over the run's pairs of a_p * M[j_p], for one run of pairs sharing i, chunk by chunk of d.
template <typename T, typename J, typename A>
inline void axpy_run(T* __restrict__ out, const T* __restrict__ M, int64_t d, const int32_t* run, int64_t length,
                     J j_of, A a_of) {
  typedef typename Lanes<T>::v V;
  constexpr int64_t lanes = sizeof(V) / sizeof(T), chunk = lanes * kVectors;
  int64_t c0 = 0;
  for (; c0 + chunk <= d; c0 += chunk) {
    V acc[kVectors];
    for (int v = 0; v < kVectors; ++v) acc[v] = load<V>(out + c0 + v * lanes);
    for (int64_t u = 0; u < length; ++u) {
      const int32_t p = run[u];
      const T a = a_of(p);
      const T* __restrict__ row = M + j_of(p) * d + c0;
      for (int v = 0; v < kVectors; ++v) acc[v] += a * load<V>(row + v * lanes);
    }
    for (int v = 0; v < kVectors; ++v) store(out + c0 + v * lanes, acc[v]);
  }
  for (int64_t u = 0; u < length; ++u) {  // the tail of d (d not a multiple of the chunk)
    const int32_t p = run[u];
    const T a = a_of(p);
    const T* __restrict__ row = M + j_of(p) * d;
    for (int64_t c = c0; c < d; ++c) out[c] += a * row[c];
  }
}

// <A[i], M[j_p]> for each pair p of one run sharing i: pairs in groups of kGroup, each with its own vector
// accumulator, while A[i]'s chunk of 4 vectors sits in registers, so a multiply-add loads one element of M.
constexpr int kGroup = 8;
template <typename T, typename J>
inline void dot_run(T* __restrict__ dots, const T* __restrict__ Ai, const T* __restrict__ M, int64_t d,
                    const int32_t* run, int64_t length, J j_of) {
  typedef typename Lanes<T>::v V;
  constexpr int64_t lanes = sizeof(V) / sizeof(T), quad = 4 * lanes;
  const int64_t body = d - d % quad;
  for (int64_t u0 = 0; u0 < length; u0 += kGroup) {
    const int group = static_cast<int>(std::min<int64_t>(kGroup, length - u0));
    const T* rows[kGroup];
    for (int g = 0; g < group; ++g) rows[g] = M + j_of(run[u0 + g]) * d;
    V acc[kGroup] = {};
    for (int64_t c = 0; c < body; c += quad) {
      const V a0 = load<V>(Ai + c), a1 = load<V>(Ai + c + lanes), a2 = load<V>(Ai + c + 2 * lanes),
              a3 = load<V>(Ai + c + 3 * lanes);
      for (int g = 0; g < group; ++g) {
        const T* __restrict__ row = rows[g] + c;
        acc[g] += a0 * load<V>(row) + a1 * load<V>(row + lanes) + a2 * load<V>(row + 2 * lanes) +
                  a3 * load<V>(row + 3 * lanes);
      }
    }
    for (int g = 0; g < group; ++g) {
      T total = 0;
      for (int64_t l = 0; l < lanes; ++l) total += acc[g][l];
      for (int64_t c = body; c < d; ++c) total += Ai[c] * rows[g][c];
      dots[run[u0 + g]] = total;
    }
  }
}

// Visits the runs (consecutive pairs sharing i) of every cell of each block of output rows, blocks in parallel
// (a block's rows are written by its thread only).
template <typename I, typename F>
void for_each_run(const int64_t* start, const int32_t* order, int64_t blocks, int64_t tiles, I i_of, F fn) {
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t cell = b0 * tiles; cell < b1 * tiles; ++cell) {
      for (int64_t e = start[cell], end = start[cell + 1]; e < end;) {
        const int64_t i = i_of(order[e]);
        int64_t f = e + 1;
        while (f < end && i_of(order[f]) == i) ++f;
        fn(i, order + e, f - e);
        e = f;
      }
    }
  });
}

}  // namespace

// The two visiting orders of the (N, k) positions pos (values in [0, C)), for output-row blocks of `block` rows and
// input tiles of `tile` rows (powers of two): row-major cells (output n, input pos; a cell's pairs in pair order,
// so grouped by n) and transposed cells (output pos, input n; a cell's pairs grouped by pos, n ascending: one
// counting sort by (pos block, n tile, pos)). The two sorts run in parallel.
// Returns {row_start (blocks_n * tiles_c + 1), row_order (N k), col_start, col_order}, the cell c of col_start
// being (pos block, n tile) = (c / tiles_n, c % tiles_n).
std::vector<torch::Tensor> aux_plan(torch::Tensor pos, int64_t C, int64_t block, int64_t tile) {
  TORCH_CHECK(pos.scalar_type() == torch::kLong && pos.dim() == 2 && pos.is_contiguous(), "aux_plan: (N, k) int64");
  TORCH_CHECK(block >= 1 && tile >= 1 && !(block & (block - 1)) && !(tile & (tile - 1)) && C >= 1,
              "aux_plan: block and tile must be powers of two, C >= 1");
  const int64_t N = pos.size(0), k = pos.size(1), M = N * k;
  TORCH_CHECK(M < (int64_t(1) << 31), "aux_plan: more than 2^31 pairs");
  const int64_t* q = pos.data_ptr<int64_t>();
  bool in_range = true;
  for (int64_t p = 0; p < M; ++p) in_range &= q[p] >= 0 && q[p] < C;
  TORCH_CHECK(in_range, "aux_plan: position out of range");
  const int bshift = __builtin_ctzll(block), tshift = __builtin_ctzll(tile);
  const int64_t tiles_c = (C + tile - 1) / tile, blocks_n = (N + block - 1) / block;
  const int64_t tiles_n = (N + tile - 1) / tile, blocks_c = (C + block - 1) / block;
  const int64_t row_cells = blocks_n * tiles_c, col_keys = (blocks_c * tiles_n) << bshift;
  std::vector<int64_t> row_start(row_cells + 1, 0), col_key_start(col_keys + 1, 0);
  std::vector<int32_t> row_order(M), col_order(M);
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t which = begin; which < end; ++which) {
      std::vector<int32_t> key(M);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < k; ++t) {
          const int64_t c = q[n * k + t];
          key[n * k + t] = static_cast<int32_t>(
              which == 0 ? (n >> bshift) * tiles_c + (c >> tshift)
                         : (((c >> bshift) * tiles_n + (n >> tshift)) << bshift) + (c & (block - 1)));
        }
      const auto identity = [](int32_t cell) { return cell; };
      if (which == 0)
        counting_order(key.data(), M, row_cells, row_cells, identity, row_start.data(), row_order.data(), "aux_plan");
      else
        counting_order(key.data(), M, col_keys, col_keys, identity, col_key_start.data(), col_order.data(), "aux_plan");
    }
  });
  std::vector<int64_t> col_start(blocks_c * tiles_n + 1);  // cell starts: every block-th key start
  for (int64_t cell = 0; cell <= blocks_c * tiles_n; ++cell) col_start[cell] = col_key_start[cell << bshift];
  auto i64 = torch::TensorOptions().dtype(torch::kLong), i32 = torch::TensorOptions().dtype(torch::kInt);
  auto as_tensor = [](const auto& v, torch::TensorOptions o) {
    auto t = torch::empty({static_cast<int64_t>(v.size())}, o);
    std::memcpy(t.data_ptr(), v.data(), v.size() * t.element_size());
    return t;
  };
  return {as_tensor(row_start, i64), as_tensor(row_order, i32), as_tensor(col_start, i64), as_tensor(col_order, i32)};
}

// Row-major plan: out (N, d) with out[n] = sum_t values[n, t] * M[pos[n, t]], M (C, d).
torch::Tensor aux_decode(torch::Tensor start, torch::Tensor order, torch::Tensor pos, torch::Tensor values,
                         torch::Tensor M, int64_t block) {
  const int64_t N = pos.size(0), k = pos.size(1), d = M.size(1), blocks = (N + block - 1) / block;
  const int64_t tiles = (start.numel() - 1) / blocks;
  TORCH_CHECK(values.sizes() == pos.sizes() && values.scalar_type() == M.scalar_type() && M.is_contiguous() &&
                  values.is_contiguous(),
              "aux_decode: shapes");
  auto out = torch::zeros({N, d}, M.options());
  const PairRow row_of{static_cast<int32_t>(k)};
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "aux_decode", [&] {
    const int64_t* q = pos.data_ptr<int64_t>();
    const scalar_t *a = values.data_ptr<scalar_t>(), *m = M.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_run(start.data_ptr<int64_t>(), order.data_ptr<int32_t>(), blocks, tiles,
                 row_of, [&](int64_t n, const int32_t* run, int64_t length) {
                   axpy_run<scalar_t>(o + n * d, m, d, run, length, [q](int32_t p) { return q[p]; },
                                      [a](int32_t p) { return a[p]; });
                 });
  });
  return out;
}

// Row-major plan: dots (N, k) with dots[n, t] = <A[n], M[pos[n, t]]>, A (N, d), M (C, d).
torch::Tensor aux_dots(torch::Tensor start, torch::Tensor order, torch::Tensor pos, torch::Tensor A, torch::Tensor M,
                       int64_t block) {
  const int64_t N = pos.size(0), d = M.size(1), k = pos.size(1), blocks = (N + block - 1) / block;
  const int64_t tiles = (start.numel() - 1) / blocks;
  TORCH_CHECK(A.size(0) == N && A.size(1) == d && A.scalar_type() == M.scalar_type() && A.is_contiguous() &&
                  M.is_contiguous(),
              "aux_dots: shapes");
  auto dots = torch::empty({N, k}, M.options());
  const PairRow row_of{static_cast<int32_t>(k)};
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "aux_dots", [&] {
    const int64_t* q = pos.data_ptr<int64_t>();
    const scalar_t *x = A.data_ptr<scalar_t>(), *m = M.data_ptr<scalar_t>();
    scalar_t* o = dots.data_ptr<scalar_t>();
    for_each_run(start.data_ptr<int64_t>(), order.data_ptr<int32_t>(), blocks, tiles,
                 row_of, [&](int64_t n, const int32_t* run, int64_t length) {
                   dot_run<scalar_t>(o, x + n * d, m, d, run, length, [q](int32_t p) { return q[p]; });
                 });
  });
  return dots;
}

// Transposed plan: out (C, d) with out[c] = sum over (n, t) with pos[n, t] = c of coef[n, t] * rows[n], and the
// column sums of coef (C,). rows (N, d).
std::vector<torch::Tensor> aux_scatter(torch::Tensor start, torch::Tensor order, torch::Tensor pos, torch::Tensor coef,
                                       torch::Tensor rows, int64_t C, int64_t block) {
  const int64_t k = pos.size(1), d = rows.size(1), blocks = (C + block - 1) / block;
  const int64_t tiles = (start.numel() - 1) / blocks;
  TORCH_CHECK(coef.sizes() == pos.sizes() && coef.scalar_type() == rows.scalar_type() && rows.is_contiguous() &&
                  coef.is_contiguous() && rows.size(0) == pos.size(0),
              "aux_scatter: shapes");
  auto out = torch::zeros({C, d}, rows.options());
  auto sums = torch::zeros({C}, rows.options());
  const PairRow row_of{static_cast<int32_t>(k)};
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "aux_scatter", [&] {
    const int64_t* q = pos.data_ptr<int64_t>();
    const scalar_t *a = coef.data_ptr<scalar_t>(), *r = rows.data_ptr<scalar_t>();
    scalar_t *o = out.data_ptr<scalar_t>(), *s = sums.data_ptr<scalar_t>();
    for_each_run(start.data_ptr<int64_t>(), order.data_ptr<int32_t>(), blocks, tiles,
                 [q](int32_t p) { return q[p]; }, [&](int64_t c, const int32_t* run, int64_t length) {
                   axpy_run<scalar_t>(o + c * d, r, d, run, length, row_of,
                                      [a](int32_t p) { return a[p]; });
                   for (int64_t u = 0; u < length; ++u) s[c] += a[run[u]];
                 });
  });
  return {out, sums};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aux_plan", &aux_plan, "row-major and transposed cell orders of AuxK's (N, k) block positions (CPU)");
  m.def("aux_decode", &aux_decode, "sum_t values[n, t] M[pos[n, t]] by L2 tiles (CPU)");
  m.def("aux_dots", &aux_dots, "<A[n], M[pos[n, t]]> by L2 tiles (CPU)");
  m.def("aux_scatter", &aux_scatter, "sum over pos[n, t] = c of coef[n, t] rows[n], by L2 tiles (CPU)");
}
