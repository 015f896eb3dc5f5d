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

// The k best of `pool` (any order) sorted to its front. For float scores (all >= 0, so their bits order as
// unsigned integers) each entry becomes one 64-bit key, score bits then the complement of the id, and the keys
// are sorted as integers: the same order as `better`, several times faster than comparing pairs.
template <typename T>
void sort_best(std::vector<Scored<T>>& pool, int64_t k, std::vector<uint64_t>& keys) {
  if constexpr (std::is_same<T, float>::value) {
    keys.resize(pool.size());
    for (size_t p = 0; p < pool.size(); ++p) {
      uint32_t bits;
      std::memcpy(&bits, &pool[p].value, sizeof(bits));
      keys[p] = (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(pool[p].id));
    }
    std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<uint64_t>());
    for (int64_t t = 0; t < k; ++t) {
      const uint32_t bits = static_cast<uint32_t>(keys[t] >> 32);
      std::memcpy(&pool[t].value, &bits, sizeof(bits));
      pool[t].id = 0xFFFFFFFFu - static_cast<uint32_t>(keys[t] & 0xFFFFFFFFu);
    }
  } else {
    std::partial_sort(pool.begin(), pool.begin() + k, pool.end(),
                      [](const Scored<T>& a, const Scored<T>& b) { return better(a, b); });
  }
}

// Per-thread buffers of select_row.
template <typename T>
struct RowBuffers {
  std::vector<T> rect, best, maxima;
  std::vector<Scored<T>> heads, pool;
  std::vector<uint64_t> keys;
};

// One row: rect = ReLU(pre + bias) (h*(m+n)), best[g] = max ReLU(u_g) * max ReLU(w_g). With h >= k the bound t is
// the k-th largest head best, found among the heads at or above a cheaper bound first (the k-th largest maximum
// of blocks of heads: k blocks each hold a head that good). The candidates are the latents scoring >= t of the
// heads whose best is >= t; the k best of them, sorted, are the row's top k (ties: smaller id).
template <typename T>
void select_row(const T* __restrict__ src, const T* __restrict__ bias, int64_t h, int64_t m, int64_t n, int64_t k,
                int64_t* out, int64_t* columns, RowBuffers<T>& buf) {
  const int64_t width = m + n, mn = m * n, C = h * width;
  T* __restrict__ r = buf.rect.data();
  if (bias) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) r[c] = std::max(src[c] + bias[c], T(0));
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) r[c] = std::max(src[c], T(0));
  }
  T* __restrict__ best = buf.best.data();
  for (int64_t g = 0; g < h; ++g) {
    const T* p = r + g * width;
    T u_best = 0, w_best = 0;
    for (int64_t i = 0; i < m; ++i) u_best = std::max(u_best, p[i]);
    for (int64_t j = 0; j < n; ++j) w_best = std::max(w_best, p[m + j]);
    best[g] = u_best * w_best;
  }
  T bound = 0;  // h < k: every latent is a candidate (scores are >= 0)
  T coarse = 0;
  if (h >= k) {
    int64_t block = 1;
    while (block * 2 * 4 * k <= h) block *= 2;
    if (block > 1) {
      const int64_t blocks = (h + block - 1) / block;
      T* maxima = buf.maxima.data();
      for (int64_t q = 0; q < blocks; ++q) {
        T mx = 0;
        for (int64_t g = q * block, e = std::min(h, g + block); g < e; ++g) mx = std::max(mx, best[g]);
        maxima[q] = mx;
      }
      std::nth_element(maxima, maxima + (k - 1), maxima + blocks, std::greater<T>());
      coarse = maxima[k - 1];
    }
  }
  auto& heads = buf.heads;
  heads.clear();
  for (int64_t g = 0; g < h; ++g)
    if (best[g] >= coarse) heads.push_back(Scored<T>{best[g], g});
  if (h >= k) {
    std::nth_element(heads.begin(), heads.begin() + (k - 1), heads.end(),
                     [](const Scored<T>& a, const Scored<T>& b) { return a.value > b.value; });
    bound = heads[k - 1].value;
  }
  auto& pool = buf.pool;
  pool.clear();
  for (const auto& head : heads) {
    if (head.value < bound) continue;
    const T* p = r + head.id * width;
    for (int64_t i = 0; i < m; ++i) {
      const T u = p[i];
      for (int64_t j = 0; j < n; ++j) {
        const T s = u * p[m + j];
        if (s >= bound) pool.push_back(Scored<T>{s, head.id * mn + i * n + j});
      }
    }
  }
  sort_best(pool, k, buf.keys);
  for (int64_t t = 0; t < k; ++t) {
    const int64_t id = pool[t].id, g = id / mn, i = (id % mn) / n, j = id % n;
    out[t] = id;
    columns[t] = g * width + i;          // u_{g,i}
    columns[k + t] = g * width + m + j;  // w_{g,j}
  }
}

template <typename T>
void select_rows(const T* pre, const T* bias, int64_t* out, int64_t* columns, int64_t N, int64_t h, int64_t m,
                 int64_t n, int64_t k) {
  const int64_t C = h * (m + n);
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    RowBuffers<T> buf;
    buf.rect.resize(C);
    buf.best.resize(h);
    buf.maxima.resize(h);
    buf.heads.reserve(h);
    buf.pool.reserve(4 * k);
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
