// Shared by the CPU kernels (hierarchical_cpu.cpp, aux_cpu.cpp): each still compiles from one source file plus the
// headers of this folder, which hf_sae.kernels hashes into every extension's build name.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

// A stable counting sort of the M ids by bucket_of(id) (ids in [0, F), else an error naming `what`; buckets in
// [0, buckets)): start (buckets + 1, zeroed by the caller) gets the bucket offsets and order the item numbers,
// bucket q's items being order[start[q]:start[q + 1]] in increasing order. O(M + buckets), against the
// O(M log M) of an argsort. bucket_of is a template argument so the identity costs no division; Order may be
// int32_t when M < 2^31.
template <typename Id, typename Order, typename BucketOf>
void counting_order(const Id* ids, int64_t M, int64_t F, int64_t buckets, BucketOf bucket_of, int64_t* start,
                    Order* order, const char* what) {
  for (int64_t p = 0; p < M; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < F, what);
    start[bucket_of(ids[p]) + 1]++;
  }
  for (int64_t q = 0; q < buckets; ++q) start[q + 1] += start[q];
  std::vector<int64_t> next(start, start + buckets);
  for (int64_t p = 0; p < M; ++p) order[next[bucket_of(ids[p])]++] = static_cast<Order>(p);
}
