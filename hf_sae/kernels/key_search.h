// Shared by the CPU kernels (hierarchical_cpu.cpp, kron_cpu.cpp): each still compiles from one source file plus
// this header, and hf_sae.kernels hashes the headers of this folder into every extension's build name, so a change
// here rebuilds both.
#pragma once

#include <cstdint>

// The largest t with at least k of key[0..n) >= t (the k-th largest key, 1 <= k <= n), found bit by bit from the
// top. Each step is a vectorised count, so it runs without the unpredictable branches of nth_element (several
// times faster for the few hundred block maxima, or the few thousand scores, it serves). K: an unsigned integer
// type whose order is the scores' order (see the callers' key functions).
template <typename K>
inline K kth_largest_key(const K* __restrict__ key, int64_t n, int64_t k) {
  K t = 0;
  for (int bit = 8 * static_cast<int>(sizeof(K)) - 1; bit >= 0; --bit) {
    const K candidate = t | (K(1) << bit);
    int32_t count = 0;
#pragma omp simd reduction(+ : count)
    for (int64_t j = 0; j < n; ++j) count += key[j] >= candidate ? 1 : 0;
    if (count >= k) t = candidate;
  }
  return t;
}
