// CPU kernel of KronSAE's TopK selection (float32 / float64): the k largest mAND scores of every row without
// scoring all h*m*n latents (Kurochkin et al. 2025, KronSAE).
//
// pre: (N, h*(m+n)) fused pre-activations, per head m base u then n extension w. Per head the squared scores are
// the rank-one outer product ReLU(u_h) ReLU(w_h)^T, so the head's best latent is max ReLU(u_h) * max ReLU(w_h).
// With h >= k, the k-th largest head best t bounds the k-th largest score from below (k heads each hold a latent
// scoring >= t), so only the latents scoring >= t (in heads whose best is >= t) are candidates: the same float
// products as the dense ranking ReLU(u)*ReLU(w), which orders like mAND = sqrt(u*w), then partially sorted. Ties
// are broken by the smaller latent id, so the result is deterministic and equals a dense top-k with that rule.
// The encoder bias is added on the fly (the matmul need not broadcast it into its (N, h*(m+n)) output). Rows run in
// parallel; one pass over pre, no (N, d_sae) tensor.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "key_search.h"

namespace {

template <typename T>
struct Scored {
  T value;
  int64_t id;
};

// a ranks above b: larger score, then smaller id.
template <typename T>
inline bool better(const Scored<T>& a, const Scored<T>& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// Unsigned integers ordered as the scores (all >= +0: rect() below never makes -0 or NaN), as wide as T.
template <typename T>
struct KeyOf {
  using type = uint64_t;
};
template <>
struct KeyOf<float> {
  using type = uint32_t;
};

template <typename T>
inline typename KeyOf<T>::type key_of(T value) {
  typename KeyOf<T>::type bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

template <typename T>
inline T value_of(typename KeyOf<T>::type key) {
  T value;
  std::memcpy(&value, &key, sizeof(value));
  return value;
}

// Per-thread buffers of select_row.
template <typename T>
struct RowBuffers {
  using Key = typename KeyOf<T>::type;
  std::vector<T> rect, u_best, w_best;
  std::vector<Key> head_keys, maxima, chosen_keys;
  std::vector<int32_t> chosen;
  std::vector<uint64_t> keys;       // float: score bits << 32 | complement of the latent id
  std::vector<Scored<T>> scored;    // double: (score, id) pairs
};

// The candidates (latents of the chosen heads scoring >= bound) and the k best of them, sorted, into out/columns.
// float: one 64-bit integer key per latent, score bits then the complement of the id, so sorting the integers
// orders by score, then smaller id (several times faster than comparing pairs); written branch-free (the slot is
// kept only when the score reaches the bound). double: (score, id) pairs and `better`.
template <typename T>
void best_candidates(const T* __restrict__ r, const int32_t* chosen, int64_t n_chosen, T bound, int64_t m, int64_t n,
                     int64_t k, int64_t* out, int64_t* columns, RowBuffers<T>& buf) {
  const int64_t width = m + n, mn = m * n;
  int64_t count = 0;
  if constexpr (std::is_same<T, float>::value) {
    buf.keys.resize(n_chosen * mn);
    uint64_t* __restrict__ keys = buf.keys.data();
    for (int64_t q = 0; q < n_chosen; ++q) {
      const int64_t g = chosen[q];
      const T* p = r + g * width;
      for (int64_t i = 0; i < m; ++i) {
        const T u = p[i];
        const uint32_t first = static_cast<uint32_t>(g * mn + i * n);
        for (int64_t j = 0; j < n; ++j) {
          const T score = u * p[m + j];
          keys[count] = (static_cast<uint64_t>(key_of(score)) << 32) | (0xFFFFFFFFu - (first + static_cast<uint32_t>(j)));
          count += score >= bound ? 1 : 0;
        }
      }
    }
    std::partial_sort(keys, keys + k, keys + count, std::greater<uint64_t>());
    for (int64_t t = 0; t < k; ++t) out[t] = 0xFFFFFFFFu - static_cast<uint32_t>(keys[t] & 0xFFFFFFFFu);
  } else {
    auto& pool = buf.scored;
    pool.clear();
    for (int64_t q = 0; q < n_chosen; ++q) {
      const int64_t g = chosen[q];
      const T* p = r + g * width;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          const T score = p[i] * p[m + j];
          if (score >= bound) pool.push_back(Scored<T>{score, g * mn + i * n + j});
        }
    }
    count = static_cast<int64_t>(pool.size());
    std::partial_sort(pool.begin(), pool.begin() + k, pool.end(),
                      [](const Scored<T>& a, const Scored<T>& b) { return better(a, b); });
    for (int64_t t = 0; t < k; ++t) out[t] = pool[t].id;
  }
  for (int64_t t = 0; t < k; ++t) {
    const int64_t id = out[t], g = id / mn, i = (id % mn) / n, j = id % n;
    columns[t] = g * width + i;          // u_{g,i}
    columns[k + t] = g * width + m + j;  // w_{g,j}
  }
}

// One row: rect = ReLU(pre + bias) (h*(m+n)), best[g] = max ReLU(u_g) * max ReLU(w_g), kept as integer keys. With
// h >= k the bound t is the k-th largest head best. For many heads it is searched only among the heads at or above
// a cheaper bound: the k-th largest of 4k strided block maxima (k blocks each hold a head that good; strided, so
// the maxima are element-wise vector maxima). The candidates are the latents scoring >= t of the heads whose best
// is >= t (at least k: each such head's best latent); the k best of them, sorted, are the row's top k (ties:
// smaller id).
template <typename T>
void select_row(const T* __restrict__ src, const T* __restrict__ bias, int64_t h, int64_t m, int64_t n, int64_t k,
                int64_t* out, int64_t* columns, RowBuffers<T>& buf) {
  using Key = typename KeyOf<T>::type;
  const int64_t width = m + n, C = h * width;
  T* __restrict__ r = buf.rect.data();
  // v > 0 ? v : 0 rather than max(v, 0): -0 and NaN become +0, so the score bits order as unsigned integers
  if (bias) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T v = src[c] + bias[c];
      r[c] = v > T(0) ? v : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) r[c] = src[c] > T(0) ? src[c] : T(0);
  }
  // per-head maxima as vector loops over the heads (strided reads), one pass per base and per extension index
  T* __restrict__ u_best = buf.u_best.data();
  T* __restrict__ w_best = buf.w_best.data();
#pragma omp simd
  for (int64_t g = 0; g < h; ++g) {
    u_best[g] = r[g * width];
    w_best[g] = r[g * width + m];
  }
  for (int64_t i = 1; i < m; ++i) {
#pragma omp simd
    for (int64_t g = 0; g < h; ++g) u_best[g] = std::max(u_best[g], r[g * width + i]);
  }
  for (int64_t j = 1; j < n; ++j) {
#pragma omp simd
    for (int64_t g = 0; g < h; ++g) w_best[g] = std::max(w_best[g], r[g * width + m + j]);
  }
  Key* __restrict__ head_keys = buf.head_keys.data();
#pragma omp simd
  for (int64_t g = 0; g < h; ++g) head_keys[g] = key_of<T>(u_best[g] * w_best[g]);
  Key bound = 0;  // h < k: every latent is a candidate (scores are >= 0)
  if (h >= k) {
    Key coarse = 0;
    const int64_t blocks = 4 * k;
    if (h >= 2 * blocks) {
      Key* __restrict__ maxima = buf.maxima.data();
      for (int64_t q = 0; q < blocks; ++q) maxima[q] = head_keys[q];
      for (int64_t g0 = blocks; g0 < h; g0 += blocks) {
        const int64_t e = std::min(blocks, h - g0);
#pragma omp simd
        for (int64_t q = 0; q < e; ++q) maxima[q] = std::max(maxima[q], head_keys[g0 + q]);
      }
      coarse = kth_largest_key(maxima, blocks, k);
    }
    int32_t* __restrict__ chosen = buf.chosen.data();
    Key* __restrict__ chosen_keys = buf.chosen_keys.data();
    int64_t n_coarse = 0;
    for (int64_t g = 0; g < h; ++g) {  // branch-free compaction of the heads at or above the coarse bound
      chosen[n_coarse] = static_cast<int32_t>(g);
      chosen_keys[n_coarse] = head_keys[g];
      n_coarse += head_keys[g] >= coarse ? 1 : 0;
    }
    bound = kth_largest_key(chosen_keys, n_coarse, k);
  }
  int32_t* __restrict__ chosen = buf.chosen.data();
  int64_t n_chosen = 0;
  for (int64_t g = 0; g < h; ++g) {
    chosen[n_chosen] = static_cast<int32_t>(g);
    n_chosen += head_keys[g] >= bound ? 1 : 0;
  }
  best_candidates<T>(r, chosen, n_chosen, value_of<T>(bound), m, n, k, out, columns, buf);
}

template <typename T>
void select_rows(const T* pre, const T* bias, int64_t* out, int64_t* columns, int64_t N, int64_t h, int64_t m,
                 int64_t n, int64_t k) {
  const int64_t C = h * (m + n);
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    RowBuffers<T> buf;
    buf.rect.resize(C);
    buf.head_keys.resize(h);
    buf.u_best.resize(h);
    buf.w_best.resize(h);
    buf.maxima.resize(4 * k);
    buf.chosen.resize(h);
    buf.chosen_keys.resize(h);
    for (int64_t r = begin; r < end; ++r) {
      // the next row's cache lines are fetched while this one is scored: rows are a few KB, and without it each
      // row starts with a train of cache misses the hardware prefetcher does not hide (4x slower reading)
      if (r + 1 < end) {
        const char* next = reinterpret_cast<const char*>(pre + (r + 1) * C);
        for (int64_t offset = 0; offset < C * static_cast<int64_t>(sizeof(T)); offset += 64)
          __builtin_prefetch(next + offset, 0, 3);
      }
      select_row(pre + r * C, bias, h, m, n, k, out + r * k, columns + r * 2 * k, buf);
    }
  });
}

}  // namespace

// pre: (N, h*(m+n)) contiguous float32/float64 fused pre-activations without their bias, bias: (h*(m+n),) of the
// same dtype or empty (pre then includes it) -> (ids, columns): ids (N, k) int64 latent ids h*m*n + i*n + j by
// descending score (ties: smaller id first); columns (N, 2k) the fused-encoder columns each latent reads: its u
// (first k), then its w.
std::vector<torch::Tensor> kron_select_topk(torch::Tensor pre, torch::Tensor bias, int64_t h, int64_t m, int64_t n,
                                            int64_t k) {
  TORCH_CHECK(pre.dim() == 2 && pre.size(1) == h * (m + n), "pre must be (N, h*(m+n))");
  TORCH_CHECK(k >= 1 && k <= h * m * n, "k must be in [1, h*m*n]");
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == pre.size(1) && bias.scalar_type() == pre.scalar_type()),
              "bias must be empty or (h*(m+n),) of pre's dtype");
  pre = pre.contiguous();
  bias = bias.contiguous();
  auto out = torch::empty({pre.size(0), k}, pre.options().dtype(torch::kLong));
  auto columns = torch::empty({pre.size(0), 2 * k}, pre.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "kron_select_topk", [&] {
    const scalar_t* b = bias.numel() ? bias.data_ptr<scalar_t>() : nullptr;
    select_rows<scalar_t>(pre.data_ptr<scalar_t>(), b, out.data_ptr<int64_t>(), columns.data_ptr<int64_t>(),
                          pre.size(0), h, m, n, k);
  });
  return {out, columns};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("kron_select_topk", &kron_select_topk, "KronSAE top-k latent ids from fused pre-activations");
}
