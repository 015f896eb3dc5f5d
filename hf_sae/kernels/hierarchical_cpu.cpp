// CPU kernels of hf-sae's training step (float32 / float64): the fused HierarchicalTopK decode + loss, and the
// latent-major (CSR) sparse backward of TopK encoders and decoders.
//
// For each row b the prefix reconstructions x_hat_j = b_dec + sum_{t<=j} v_t W_dec[i_t] are never stored: the
// residual r_j = x - x_hat_j lives in one d_in-sized buffer per thread, so memory is O(batch * d_in), as for
// plain TopK. Forward returns the per-row weighted sum of squared residuals and r_K; the backward of a row runs
// right after its forward (one pass, hierarchical_forward_backward) and walks t = K..1 with a running suffix sum
// S_t = sum_{j>=t} w_j r_j (Balagansky et al. 2025, reference kernels in corl-team/flexsae):
//   dL/dv_t = -c <W_dec[i_t], S_t>,  dL/dW_dec[i_t] += -c v_t S_t,  dL/db_dec = -c sum_b S_1,  c = 2 g / (B d).
// Rows are processed in parallel; updates of a decoder row are guarded by a per-latent spin lock (or, with
// deterministic=true, in fixed row chunks with private gradients for bit-reproducible results).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <limits>
#include <utility>
#include <memory>
#include <vector>

#include "counting_order.h"
#include "key_search.h"

namespace {

// Software prefetch of one d-wide row (all its cache lines) ahead of use: the sparse passes read rows of W or of
// the batch in data-dependent order, which the hardware prefetcher cannot predict; fetching the next row while
// the current one is processed hides most of the cache-miss latency (L3 / memory) that otherwise bounds them.
constexpr int64_t kPrefetchAhead = 2;

template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 3);
}

template <typename T>
inline void prefetch_row_for_write(T* row, int64_t d) {
  char* p = reinterpret_cast<char*>(row);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 1, 3);
}

// One row of the forward: r = x_b - b_dec - sum_t v_t W[i_t] (r_t at every t, in r), the row's weighted sum of
// squared residuals returned, and the reconstruction x_hat_K = x_b - r_K written while both rows are in L1.
template <typename T>
inline T forward_row(int64_t b, const T* x, const T* values, const int64_t* indices, const T* W, const T* b_dec,
                     const T* weights, T* __restrict__ r, T* reconstruction, int64_t B, int64_t K, int64_t d) {
  const T* __restrict__ xb = x + b * d;
  for (int64_t c = 0; c < d; ++c) r[c] = xb[c] - b_dec[c];
  T acc = 0;
  for (int64_t t = 0; t < K; ++t) {
    const T v = values[b * K + t];
    const T* __restrict__ e = W + indices[b * K + t] * d;
    if (b * K + t + kPrefetchAhead < B * K) prefetch_row(W + indices[b * K + t + kPrefetchAhead] * d, d);
    const T w = weights[t];
    if (w != T(0)) {
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < d; ++c) {
        const T rc = r[c] - v * e[c];
        r[c] = rc;
        s += rc * rc;
      }
      acc += w * s;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) r[c] -= v * e[c];
    }
  }
  T* __restrict__ out = reconstruction + b * d;
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) out[c] = xb[c] - r[c];
  return acc;
}

template <typename T>
void forward_rows(const T* x, const T* values, const int64_t* indices, const T* W, const T* b_dec,
                  const T* weights, T* residual, T* reconstruction, T* row_loss, int64_t B, int64_t K, int64_t d) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      row_loss[b] = forward_row<T>(b, x, values, indices, W, b_dec, weights, residual + b * d, reconstruction, B, K, d);
  });
}

inline void lock(std::atomic<uint8_t>& flag) {
  uint8_t expected = 0;
  while (!flag.compare_exchange_weak(expected, 1, std::memory_order_acquire)) expected = 0;
}

inline void unlock(std::atomic<uint8_t>& flag) { flag.store(0, std::memory_order_release); }

// One row of the HierarchicalTopK backward: walks t = K..1 keeping r_t (r holds r_K on entry) and the suffix sum
// S_t in thread-local buffers; writes grad_values of the row and adds -scale v_t S_t into grad_W[i_t] (under the
// latent's lock if any).
template <typename T>
inline void backward_row(int64_t b, const T* values, const int64_t* indices, const T* W, const T* weights,
                         T scale, T* grad_values, T* grad_W, T* suffix_out, int64_t K, int64_t d,
                         T* __restrict__ r, T* __restrict__ S, std::atomic<uint8_t>* locks) {
  for (int64_t c = 0; c < d; ++c) S[c] = 0;
  for (int64_t t = K - 1; t >= 0; --t) {
    const T w = weights[t];
    const T v = values[b * K + t];
    const int64_t f = indices[b * K + t];
    const T* __restrict__ e = W + f * d;
    if (t >= kPrefetchAhead) {
      const int64_t ahead = indices[b * K + t - kPrefetchAhead];
      prefetch_row(W + ahead * d, d);
      prefetch_row_for_write(grad_W + ahead * d, d);
    }
    const T coef = -scale * v;
    T* __restrict__ g = grad_W + f * d;
    // one pass: S_t = S_{t+1} + w r_t, <e, S_t>, r_{t-1} = r_t + v e, and grad_W[f] += coef S_t while S_t is in a
    // register (under the latent's lock, only when it writes: another row may update the same decoder row)
    T dot = 0;
    if (coef != T(0)) {
      if (locks) lock(locks[f]);
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) {
        const T s = S[c] + w * r[c];
        S[c] = s;
        dot += e[c] * s;
        r[c] += v * e[c];
        g[c] += coef * s;
      }
      if (locks) unlock(locks[f]);
    } else {
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) {
        const T s = S[c] + w * r[c];
        S[c] = s;
        dot += e[c] * s;
        r[c] += v * e[c];
      }
    }
    grad_values[b * K + t] = -scale * dot;
  }
  T* __restrict__ out = suffix_out + b * d;
  for (int64_t c = 0; c < d; ++c) out[c] = S[c];
}

// Non-deterministic: rows in parallel, decoder rows guarded by per-latent spin locks. Deterministic: the rows are
// cut into `chunks` fixed ranges, each accumulating into its own copy of grad_W (chunk 0 into grad_W itself),
// summed in chunk order afterwards: bit-reproducible for a given chunk count, and still parallel.
// residual_of(b, r) puts row b's r_K into the thread-local buffer r: the fused forward + backward runs the row's
// forward there, so the backward re-reads the row's decoder rows from L2.
template <typename T, typename ResidualOf>
void backward_rows(const T* values, const int64_t* indices, const T* W, const T* weights, ResidualOf residual_of,
                   T scale, T* grad_values, T* grad_W, T* suffix_out, int64_t B, int64_t K, int64_t d,
                   int64_t F, bool deterministic, int64_t chunks) {
  if (!deterministic) {
    std::unique_ptr<std::atomic<uint8_t>[]> locks(new std::atomic<uint8_t>[F]);
    for (int64_t f = 0; f < F; ++f) locks[f].store(0);
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> r(d), S(d);
      for (int64_t b = begin; b < end; ++b) {
        residual_of(b, r.data());
        backward_row<T>(b, values, indices, W, weights, scale, grad_values, grad_W, suffix_out, K, d, r.data(),
                        S.data(), locks.get());
      }
    });
    return;
  }
  chunks = std::max<int64_t>(1, std::min(chunks, B));
  std::vector<std::vector<T>> extra(chunks - 1);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> r(d), S(d);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      T* target = grad_W;
      if (chunk > 0) {
        extra[chunk - 1].assign(F * d, T(0));
        target = extra[chunk - 1].data();
      }
      for (int64_t b = chunk * B / chunks; b < (chunk + 1) * B / chunks; ++b) {
        residual_of(b, r.data());
        backward_row<T>(b, values, indices, W, weights, scale, grad_values, target, suffix_out, K, d, r.data(),
                        S.data(), nullptr);
      }
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, F, 64, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        T* __restrict__ g = grad_W + f * d;
        for (int64_t chunk = 1; chunk < chunks; ++chunk) {
          const T* __restrict__ part = extra[chunk - 1].data() + f * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) g[c] += part[c];
        }
      }
    });
  }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

inline bool before(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
  // descending by value, NaN last, ties: lower index first
  if (std::isnan(a.first) || std::isnan(b.first)) {
    if (std::isnan(a.first) != std::isnan(b.first)) return std::isnan(b.first);
    return a.second < b.second;
  }
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

// Floats as unsigned integers of the same order (negative ones bit-flipped, positive ones with the sign bit set).
// Branch-free on the bits, so loops over it vectorise.
inline uint32_t orderable_bits(uint32_t bits) {
  bits = bits == 0x80000000u ? 0u : bits;  // -0 == +0: one key, so ties between them still go to the lower index
  return bits ^ ((0u - (bits >> 31)) | 0x80000000u);
}

inline uint32_t orderable(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return orderable_bits(bits);
}

inline float from_orderable(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The k-th largest of values[0..n) (no NaN, at least k of them finite).
inline float kth_largest(const float* values, int64_t n, int64_t k, std::vector<uint32_t>& keys) {
  keys.resize(n);
  uint32_t* __restrict__ key = keys.data();
  for (int64_t g = 0; g < n; ++g) key[g] = orderable(values[g]);
  return from_orderable(kth_largest_key(key, n, k));
}

// Orderable keys of bits[0..n) into key, NaN (exponent all ones, mantissa not 0) and masked-out entries 0 (below
// every real float); returns how many are neither. One instance per case keeps each loop vectorised.
template <bool Masked>
inline int32_t build_keys(const uint32_t* __restrict__ bits, const uint8_t* __restrict__ keep, int32_t n,
                          uint32_t* __restrict__ key) {
  int32_t valid = 0;
#pragma omp simd reduction(+ : valid)
  for (int32_t j = 0; j < n; ++j) {
    const bool ok = (!Masked || keep[j] != 0) && (bits[j] & 0x7FFFFFFFu) <= 0x7F800000u;
    key[j] = ok ? orderable_bits(bits[j]) : 0u;
    valid += ok ? 1 : 0;
  }
  return valid;
}

// Top k without a block bound (k close to F, e.g. AuxK's k_aux among the dead latents): the k-th largest key t of
// the candidates (masked-out and NaN entries excluded), then every key above t and the lowest-index keys equal to
// t, written in index order (unsorted) or sorted. False when at most k entries are candidates (the caller's pool
// path then keeps them all, NaN-padded as documented).
inline bool select_by_key(const float* __restrict__ row, const bool* __restrict__ mask, int64_t F, int64_t k,
                          bool sorted, float* out_v, int64_t* out_i, std::vector<uint32_t>& keys,
                          std::vector<uint64_t>& wide) {
  keys.resize(F);
  uint32_t* __restrict__ key = keys.data();
  const uint32_t* __restrict__ bits = reinterpret_cast<const uint32_t*>(row);
  const int32_t n = static_cast<int32_t>(F);
  const int32_t valid = mask ? build_keys<true>(bits, reinterpret_cast<const uint8_t*>(mask), n, key)
                             : build_keys<false>(bits, nullptr, n, key);
  if (valid <= k) return false;
  const uint32_t t = kth_largest_key(key, F, k);
  int32_t above = 0;
#pragma omp simd reduction(+ : above)
  for (int32_t j = 0; j < static_cast<int32_t>(F); ++j) above += key[j] > t ? 1 : 0;
  // branch-free: every entry is written at the next free slot, which advances only when it is kept (exactly k are:
  // all above t, then the first k - above equal to t), so one slot past k takes the writes after the last keep
  int64_t ties = k - above, taken = 0;
  wide.resize(k + 1);
  int64_t* slot = reinterpret_cast<int64_t*>(wide.data());
  for (int64_t j = 0; j < F; ++j) {
    const bool tie = key[j] == t && ties > 0;
    ties -= tie ? 1 : 0;
    slot[taken] = j;
    taken += (key[j] > t || tie) ? 1 : 0;
  }
  for (int64_t p = 0; p < k; ++p) { out_i[p] = slot[p]; out_v[p] = row[slot[p]]; }
  if (sorted) {
    wide.resize(k);
    for (int64_t p = 0; p < k; ++p)
      wide[p] = (static_cast<uint64_t>(orderable(out_v[p])) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(out_i[p]));
    std::sort(wide.begin(), wide.end(), std::greater<uint64_t>());
    for (int64_t p = 0; p < k; ++p) {
      out_v[p] = from_orderable(static_cast<uint32_t>(wide[p] >> 32));
      out_i[p] = 0xFFFFFFFFu - static_cast<uint32_t>(wide[p] & 0xFFFFFFFFu);
    }
  }
  return true;
}

// The k largest of row[0..F) (only where mask is true, if given), written to out_v / out_i sorted descending (ties:
// lower index first). A lower bound of the k-th largest comes from block maxima: with at least 4k blocks, the k-th
// largest block maximum has k values at or above it. Block g holds the columns j = g mod (number of blocks), so the
// maxima are vector maxima of consecutive slices; the bound is found by a branch-free bitwise search, only blocks
// whose maximum reaches it are scanned for candidates (typically a few times k), and those are sorted as 64-bit
// integer keys.
void select_top(const float* __restrict__ row, const bool* __restrict__ mask, int64_t F, int64_t k, bool sorted,
                float* out_v, int64_t* out_i, std::vector<float>& maxima, std::vector<uint32_t>& keys,
                std::vector<uint64_t>& wide, std::vector<std::pair<float, int64_t>>& pool) {
  const float neg = -std::numeric_limits<float>::infinity();
  int64_t block = 1;
  while (block * 2 * 4 * k <= F) block *= 2;
  // blocks of fewer than 4 columns (k above F / 32, e.g. AuxK's k_aux): a bound from them leaves too many
  // candidates to scan and partially sort; the key search over the whole row is cheaper
  if (block < 4 && select_by_key(row, mask, F, k, sorted, out_v, out_i, keys, wide)) return;
  float bound = neg;  // k close to F: no useful bound, every candidate is kept
  const int64_t blocks = block >= 4 ? (F + block - 1) / block : 0;
  if (blocks > 0) {
    // block g holds the columns j = g (mod blocks): the maxima are element-wise maxima of consecutive
    // blocks-wide slices of the row (vector max, no horizontal reductions); any partition gives the bound
    maxima.assign(blocks, neg);
    float* __restrict__ mx = maxima.data();
    for (int64_t lo = 0; lo < F; lo += blocks) {
      const int64_t width = std::min(blocks, F - lo);
      const float* __restrict__ slice = row + lo;
      if (mask) {
        const bool* __restrict__ keep = mask + lo;
#pragma omp simd
        for (int64_t g = 0; g < width; ++g) mx[g] = (keep[g] && slice[g] > mx[g]) ? slice[g] : mx[g];
      } else {
#pragma omp simd
        for (int64_t g = 0; g < width; ++g) mx[g] = slice[g] > mx[g] ? slice[g] : mx[g];
      }
    }
    int64_t finite_blocks = 0;
    for (int64_t g = 0; g < blocks; ++g) finite_blocks += mx[g] > neg ? 1 : 0;
    if (finite_blocks >= k) bound = kth_largest(mx, blocks, k, keys);
  }
  pool.clear();
  if (bound != neg) {  // only blocks whose maximum reaches the bound can hold a candidate
    for (int64_t g = 0; g < blocks; ++g) {
      if (!(maxima[g] >= bound)) continue;
      for (int64_t j = g; j < F; j += blocks) {
        const float v = row[j];
        if ((!mask || mask[j]) && v >= bound) pool.emplace_back(v, j);
      }
    }
  } else {
    for (int64_t j = 0; j < F; ++j)
      if (!mask || mask[j]) pool.emplace_back(row[j], j);
  }
  const int64_t take = std::min<int64_t>(k, pool.size());
  if (bound != neg && sorted) {  // no NaN in the pool: sort 64-bit keys (value, then the smaller index) instead
    wide.resize(pool.size());
    for (size_t p = 0; p < pool.size(); ++p)
      wide[p] = (static_cast<uint64_t>(orderable(pool[p].first)) << 32) |
                (0xFFFFFFFFu - static_cast<uint32_t>(pool[p].second));
    std::partial_sort(wide.begin(), wide.begin() + take, wide.end(), std::greater<uint64_t>());
    for (int64_t t = 0; t < take; ++t) {
      out_v[t] = from_orderable(static_cast<uint32_t>(wide[t] >> 32));
      out_i[t] = 0xFFFFFFFFu - static_cast<uint32_t>(wide[t] & 0xFFFFFFFFu);
    }
    for (int64_t t = take; t < k; ++t) { out_v[t] = std::numeric_limits<float>::quiet_NaN(); out_i[t] = 0; }
    return;
  }
  const auto order = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return before(a, b);  // a lambda, not a function pointer: inlined into the sort
  };
  if (sorted) {
    std::partial_sort(pool.begin(), pool.begin() + take, pool.end(), order);
  } else if (take < static_cast<int64_t>(pool.size())) {
    std::nth_element(pool.begin(), pool.begin() + (take - 1), pool.end(), order);
  }
  for (int64_t t = 0; t < take; ++t) { out_v[t] = pool[t].first; out_i[t] = pool[t].second; }
  for (int64_t t = take; t < k; ++t) { out_v[t] = std::numeric_limits<float>::quiet_NaN(); out_i[t] = 0; }
}

// Row-wise top-k of scores (N, F) (plus bias (F,) if given), and optionally the top-k_aux among `dead` columns,
// rows in parallel.
template <typename S>
void topk_rows(const S* scores, const float* bias, const bool* dead, int64_t N, int64_t F, int64_t k, int64_t k_aux,
               float* values, int64_t* indices, float* aux_values, int64_t* aux_indices) {
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> converted, maxima;
    std::vector<uint32_t> keys;
    std::vector<uint64_t> wide;
    std::vector<std::pair<float, int64_t>> pool;
    for (int64_t n = begin; n < end; ++n) {
      const float* row;
      const S* __restrict__ src = scores + n * F;
      if (n + 1 < end) prefetch_row(src + F, F);  // rows are KBs: fetched while this one is ranked
      if (std::is_same<S, float>::value && bias == nullptr) {
        row = reinterpret_cast<const float*>(src);
      } else {
        converted.resize(F);
        float* __restrict__ out = converted.data();
        if (bias) {
#pragma omp simd
          for (int64_t j = 0; j < F; ++j) out[j] = to_float(src[j]) + bias[j];
        } else {
#pragma omp simd
          for (int64_t j = 0; j < F; ++j) out[j] = to_float(src[j]);
        }
        row = out;
      }
      select_top(row, nullptr, F, k, true, values + n * k, indices + n * k, maxima, keys, wide, pool);
      if (k_aux > 0) select_top(row, dead, F, k_aux, false, aux_values + n * k_aux, aux_indices + n * k_aux, maxima, keys,
                              wide, pool);
    }
  });
}

template <typename T>
void row_dots_impl(const T* rows, const T* W, const T* bias, const int64_t* indices, T* out, int64_t N, int64_t k,
                   int64_t d) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* __restrict__ x = rows + n * d;
      for (int64_t t = 0; t < k; ++t) {
        const int64_t f = indices[n * k + t];
        const T* __restrict__ w = W + f * d;
        if (n * k + t + kPrefetchAhead < N * k) prefetch_row(W + indices[n * k + t + kPrefetchAhead] * d, d);
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < d; ++c) dot += x[c] * w[c];
        out[n * k + t] = dot + bias[f];
      }
    }
  });
}

template <typename T>
void csr_rows(const int64_t* crow, const int64_t* perm, int64_t k, const T* coef, const T* rows, T* out, T* coef_sum,
              int64_t F, int64_t d) {
  at::parallel_for(0, F, 16, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      T* __restrict__ o = out + f * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0;
      T total = 0;
      for (int64_t p = crow[f]; p < crow[f + 1]; ++p) {
        const int64_t pair = perm[p];
        const T a = coef[pair];
        total += a;
        if (a == T(0)) continue;
        const T* __restrict__ r = rows + (pair / k) * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) o[c] += a * r[c];
      }
      coef_sum[f] = total;
    }
  });
}

template <typename T>
void topk_decoder_rows(const int64_t* crow, const int64_t* perm, int64_t k, const T* values, const T* W,
                       const T* residual, T scale, T* grad_values, T* grad_W, int64_t F, int64_t d) {
  at::parallel_for(0, F, 16, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      const T* __restrict__ e = W + f * d;
      T* __restrict__ g = grad_W + f * d;
      for (int64_t c = 0; c < d; ++c) g[c] = 0;
      for (int64_t p = crow[f]; p < crow[f + 1]; ++p) {
        const int64_t pair = perm[p];
        const T a = -scale * values[pair];
        const T* __restrict__ r = residual + (pair / k) * d;
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < d; ++c) {
          dot += e[c] * r[c];
          g[c] += a * r[c];
        }
        grad_values[pair] = -scale * dot;
      }
    }
  });
}

// grad[f] -= <grad[f], W[f]> W[f] for every row f, in place: the row is read twice while it sits in L1, where an
// einsum and an addcmul_ stream the whole (F, d) gradient and decoder through memory twice each.
template <typename T>
void remove_parallel_impl(T* grad, const T* W, int64_t F, int64_t d) {
  at::parallel_for(0, F, 64, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      T* __restrict__ g = grad + f * d;
      const T* __restrict__ w = W + f * d;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += g[c] * w[c];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) g[c] -= dot * w[c];
    }
  });
}

// W[f] /= max(||W[f]||, eps) for every row f, in place, one row at a time (one pass over W instead of two).
template <typename T>
void normalize_rows_impl(T* W, T eps, int64_t F, int64_t d) {
  at::parallel_for(0, F, 64, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      T* __restrict__ w = W + f * d;
      T sumsq = 0;
#pragma omp simd reduction(+ : sumsq)
      for (int64_t c = 0; c < d; ++c) sumsq += w[c] * w[c];
      const T norm = std::max(std::sqrt(sumsq), eps);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) w[c] /= norm;
    }
  });
}

}  // namespace

// values, indices (N, k) of the k largest of scores + bias (bias: (F,) float32, or empty for none) of each row,
// sorted descending (ties: lower index first), as float32; with k_aux > 0 also the k_aux largest among the
// columns where `dead` is true (unsorted). Scores may be float32 or bfloat16. Adding the bias here saves the
// (N, F) broadcast copy of an addmm. The caller guarantees k <= F and k_aux <= the number of dead columns.
std::vector<torch::Tensor> topk_scores(torch::Tensor scores, torch::Tensor bias, int64_t k, torch::Tensor dead,
                                       int64_t k_aux) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous(), "topk_scores: contiguous (N, F) scores");
  const int64_t N = scores.size(0), F = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= F, "topk_scores: need 1 <= k <= F");
  auto f32 = scores.options().dtype(torch::kFloat32);
  auto i64 = scores.options().dtype(torch::kLong);
  auto values = torch::empty({N, k}, f32);
  auto indices = torch::empty({N, k}, i64);
  auto aux_values = torch::empty({N, k_aux}, f32);
  auto aux_indices = torch::empty({N, k_aux}, i64);
  const bool* dead_ptr = nullptr;
  if (k_aux > 0) {
    TORCH_CHECK(dead.scalar_type() == torch::kBool && dead.numel() == F, "topk_scores: (F,) bool dead mask");
    dead_ptr = dead.data_ptr<bool>();
  }
  const float* bias_ptr = nullptr;
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.numel() == F && bias.is_contiguous(),
                "topk_scores: (F,) contiguous float32 bias");
    bias_ptr = bias.data_ptr<float>();
  }
  float* av = k_aux > 0 ? aux_values.data_ptr<float>() : nullptr;
  int64_t* ai = k_aux > 0 ? aux_indices.data_ptr<int64_t>() : nullptr;
  if (scores.scalar_type() == torch::kFloat32) {
    topk_rows<float>(scores.data_ptr<float>(), bias_ptr, dead_ptr, N, F, k, k_aux, values.data_ptr<float>(),
                     indices.data_ptr<int64_t>(), av, ai);
  } else {
    TORCH_CHECK(scores.scalar_type() == torch::kBFloat16, "topk_scores: float32 or bfloat16 scores");
    topk_rows<c10::BFloat16>(scores.data_ptr<c10::BFloat16>(), bias_ptr, dead_ptr, N, F, k, k_aux, values.data_ptr<float>(),
                             indices.data_ptr<int64_t>(), av, ai);
  }
  return {values, indices, aux_values, aux_indices};
}

// out[n, t] = <rows[n], W[indices[n, t]]> + bias[indices[n, t]]: a linear layer evaluated at TopK columns only
// (the exact values of latents chosen from lower-precision scores).
torch::Tensor row_dots(torch::Tensor rows, torch::Tensor W, torch::Tensor bias, torch::Tensor indices) {
  const int64_t N = rows.size(0), d = rows.size(1), k = indices.size(1);
  auto out = torch::empty({N, k}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_dots", [&] {
    row_dots_impl<scalar_t>(rows.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                            indices.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), N, k, d);
  });
  return out;
}

// The CSR layout of the flat (N*k) TopK latent ids by latent, by a stable counting sort: pairs of latent f are
// perm[crow[f]:crow[f+1]], in increasing pair order. O(N*k + F), against the O(N*k log) argsort it replaces.
std::vector<torch::Tensor> csr_order(torch::Tensor flat, int64_t F) {
  TORCH_CHECK(flat.scalar_type() == torch::kLong && flat.is_contiguous(), "csr_order: contiguous int64 ids");
  auto crow = torch::zeros({F + 1}, flat.options());
  auto perm = torch::empty({flat.numel()}, flat.options());
  counting_order(flat.data_ptr<int64_t>(), flat.numel(), F, F, [](int64_t id) { return id; },
                 crow.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), "csr_order: latent id out of range");
  return {crow, perm};
}

// out[f] = sum over the pairs p of latent f of coef[p] * rows[p / k], and coef_sum[f] = sum of those coef[p]:
// the weight and bias gradients of a linear layer read at TopK columns, one latent per task (no atomics).
std::vector<torch::Tensor> csr_scatter_rows(torch::Tensor crow, torch::Tensor perm, int64_t k, torch::Tensor coef,
                                            torch::Tensor rows) {
  const int64_t F = crow.size(0) - 1, d = rows.size(1);
  auto out = torch::empty({F, d}, rows.options());
  auto coef_sum = torch::empty({F}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "csr_scatter_rows", [&] {
    csr_rows<scalar_t>(crow.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), k, coef.data_ptr<scalar_t>(),
                       rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), coef_sum.data_ptr<scalar_t>(), F, d);
  });
  return {out, coef_sum};
}

template <typename T>
void tile_rows(const std::vector<int64_t>& start, const std::vector<int64_t>& order, const int64_t* id, int64_t t,
               const T* coef, const T* rows, T* out, T* coef_sum, int64_t d) {
  const int64_t tiles = static_cast<int64_t>(start.size()) - 1;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      for (int64_t e = start[q]; e < start[q + 1]; ++e) {
        const int64_t p = order[e], f = id[p];
        const T a = coef[p];
        coef_sum[f] += a;
        if (a == T(0)) continue;
        if (e + kPrefetchAhead < start[q + 1]) prefetch_row(rows + (order[e + kPrefetchAhead] / t) * d, d);
        const T* __restrict__ r = rows + (p / t) * d;
        T* __restrict__ g = out + f * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) g[c] += a * r[c];
      }
    }
  });
}

// out[f] = sum over the pairs p = n*t + j with ids[p] = f of coef[p] * rows[n], and coef_sum[f] = sum of those coef
// (what csr_scatter_rows computes), for a narrow linear layer that each row reads at many columns (KronSAE's fused
// encoder: 2k of h*(m+n) columns per row). The columns are cut into tiles of `tile` output rows that fit in L2;
// each tile's pairs are visited in row order, so a row of `rows` is read once per tile it touches instead of once
// per pair, and the tile's outputs stay in cache. Tiles run in parallel (no atomics); the order of the sums per
// output row is the pairs' order, so the result is deterministic.
std::vector<torch::Tensor> tile_scatter_rows(torch::Tensor ids, torch::Tensor coef, torch::Tensor rows, int64_t F,
                                             int64_t tile) {
  TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.is_contiguous() && ids.dim() == 2, "tile_scatter_rows: ids");
  TORCH_CHECK(coef.sizes() == ids.sizes() && coef.is_contiguous() && rows.is_contiguous() && rows.dim() == 2 &&
                  rows.size(0) == ids.size(0) && coef.scalar_type() == rows.scalar_type() && tile >= 1,
              "tile_scatter_rows: shapes");
  const int64_t t = ids.size(1), M = ids.numel(), d = rows.size(1), tiles = (F + tile - 1) / tile;
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> start(tiles + 1, 0), order(M);  // pairs of a tile in row order
  counting_order(id, M, F, tiles, [tile](int64_t f) { return f / tile; }, start.data(), order.data(),
                 "tile_scatter_rows: id out of range");
  auto out = torch::zeros({F, d}, rows.options());
  auto coef_sum = torch::zeros({F}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "tile_scatter_rows", [&] {
    tile_rows<scalar_t>(start, order, id, t, coef.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(), coef_sum.data_ptr<scalar_t>(), d);
  });
  return {out, coef_sum};
}

// Backward of the TopK MSE (one budget K) through the decoder, latent-major: each decoder row is read once and its
// gradient written once. grad_values[p] = -scale <W[f], r_b>, grad_W[f] = -scale sum_p values[p] r_b.
std::vector<torch::Tensor> topk_decoder_backward(torch::Tensor crow, torch::Tensor perm, torch::Tensor values,
                                                 torch::Tensor W, torch::Tensor residual, double scale) {
  const int64_t F = W.size(0), d = W.size(1), k = values.size(1);
  auto grad_values = torch::empty_like(values);
  auto grad_W = torch::empty_like(W);
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "topk_decoder_backward", [&] {
    topk_decoder_rows<scalar_t>(crow.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), k, values.data_ptr<scalar_t>(),
                                W.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), (scalar_t)scale,
                                grad_values.data_ptr<scalar_t>(), grad_W.data_ptr<scalar_t>(), F, d);
  });
  return {grad_values, grad_W};
}

std::vector<torch::Tensor> hierarchical_forward(torch::Tensor x, torch::Tensor values, torch::Tensor indices,
                                                torch::Tensor W, torch::Tensor b_dec, torch::Tensor weights) {
  const int64_t B = x.size(0), d = x.size(1), K = values.size(1);
  auto residual = torch::empty_like(x);
  auto reconstruction = torch::empty_like(x);
  auto row_loss = torch::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hierarchical_forward", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
                           W.data_ptr<scalar_t>(), b_dec.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                           residual.data_ptr<scalar_t>(), reconstruction.data_ptr<scalar_t>(),
                           row_loss.data_ptr<scalar_t>(), B, K, d);
  });
  return {row_loss, residual, reconstruction};
}

// hierarchical_forward and its backward (gradients times `scale`) in one pass over the rows: each row's backward
// runs right after its forward, while the row's K decoder rows are still in L2 and r_K in L1 (no (B, d) residual
// is written or read back). For a loss whose gradient is needed anyway: it costs the backward even if none follows.
std::vector<torch::Tensor> hierarchical_forward_backward(torch::Tensor x, torch::Tensor values, torch::Tensor indices,
                                                         torch::Tensor W, torch::Tensor b_dec, torch::Tensor weights,
                                                         double scale, bool deterministic, int64_t chunks) {
  const int64_t B = x.size(0), d = x.size(1), K = values.size(1), F = W.size(0);
  auto reconstruction = torch::empty_like(x);
  auto row_loss = torch::empty({B}, x.options());
  auto grad_values = torch::empty_like(values);
  auto grad_W = torch::zeros_like(W);
  auto suffix = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hierarchical_forward_backward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *vp = values.data_ptr<scalar_t>(), *Wp = W.data_ptr<scalar_t>();
    const scalar_t *bp = b_dec.data_ptr<scalar_t>(), *wp = weights.data_ptr<scalar_t>();
    const int64_t* ip = indices.data_ptr<int64_t>();
    scalar_t* loss = row_loss.data_ptr<scalar_t>();
    scalar_t* rec = reconstruction.data_ptr<scalar_t>();
    auto forward = [&](int64_t b, scalar_t* r) {
      loss[b] = forward_row<scalar_t>(b, xp, vp, ip, Wp, bp, wp, r, rec, B, K, d);
    };
    backward_rows<scalar_t>(vp, ip, Wp, wp, forward, (scalar_t)scale, grad_values.data_ptr<scalar_t>(),
                            grad_W.data_ptr<scalar_t>(), suffix.data_ptr<scalar_t>(), B, K, d, F, deterministic,
                            chunks);
  });
  return {row_loss, reconstruction, grad_values, grad_W, suffix};
}

// In place: grad[f] -= <grad[f], W[f]> W[f] (the decoder-gradient projection of the training step; rows of W unit).
void remove_parallel_rows(torch::Tensor grad, torch::Tensor W) {
  TORCH_CHECK(grad.is_contiguous() && W.is_contiguous() && grad.sizes() == W.sizes(), "remove_parallel_rows: shapes");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "remove_parallel_rows", [&] {
    remove_parallel_impl<scalar_t>(grad.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), W.size(0), W.size(1));
  });
}

// In place: W[f] /= max(||W[f]||, eps) (the decoder renormalisation after each optimiser step).
void normalize_rows(torch::Tensor W, double eps) {
  TORCH_CHECK(W.is_contiguous() && W.dim() == 2, "normalize_rows: a contiguous matrix");
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "normalize_rows", [&] {
    normalize_rows_impl<scalar_t>(W.data_ptr<scalar_t>(), (scalar_t)eps, W.size(0), W.size(1));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("remove_parallel_rows", &remove_parallel_rows, "in place: each row of grad minus its part along W's row");
  m.def("normalize_rows", &normalize_rows, "in place: each row of W divided by its norm (CPU)");
  m.def("hierarchical_forward", &hierarchical_forward, "fused HierarchicalTopK decode + loss (CPU)");
  m.def("hierarchical_forward_backward", &hierarchical_forward_backward,
        "hierarchical_forward and its backward in one pass over the rows (CPU)");
  m.def("topk_scores", &topk_scores, "row-wise top-k (and top-k_aux among dead columns) in one pass (CPU)");
  m.def("row_dots", &row_dots, "a linear layer at TopK columns only (CPU)");
  m.def("csr_order", &csr_order, "stable counting sort of latent ids into CSR order (CPU)");
  m.def("csr_scatter_rows", &csr_scatter_rows, "per-latent sum of weighted rows in CSR order (CPU)");
  m.def("tile_scatter_rows", &tile_scatter_rows, "csr_scatter_rows for narrow layers, by column tiles (CPU)");
  m.def("topk_decoder_backward", &topk_decoder_backward, "latent-major TopK MSE decoder backward (CPU)");
}
