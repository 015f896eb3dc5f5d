// CPU kernel of KronSAE's TopK selection (float32 / float64): the k largest mAND scores of every row without
// scoring all h*m*n latents (Kurochkin et al. 2025, KronSAE).
//
// pre: (N, h*(m+n)) fused pre-activations, per head m base u then n extension w. Per head the squared scores are
// the rank-one outer product ReLU(u_h) ReLU(w_h)^T, so the head's best latent is max ReLU(u_h) * max ReLU(w_h).
// A latent of score s is in the top k only if fewer than k heads have a best latent above s: its head is among the
// k heads with the largest best latent. Only those k*m*n candidates are scored (the same float products as the
// dense ranking ReLU(u)*ReLU(w), which orders like mAND = sqrt(u*w)), then partially sorted. Ties are broken by the
// smaller latent id, so the result is deterministic. Rows run in parallel; one pass over pre, no (N, d_sae) tensor.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

namespace {

template <typename T>
struct Scored {
  T value;
  int64_t id;
};

// a ranks above b: larger score, then smaller id. As a heap comparator it keeps the worst kept entry at the front.
template <typename T>
inline bool better(const Scored<T>& a, const Scored<T>& b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

// Keep the `size` best entries offered to a min-heap (worst at the front).
template <typename T>
inline void offer(std::vector<Scored<T>>& heap, int64_t size, const Scored<T>& entry) {
  auto cmp = better<T>;
  if (static_cast<int64_t>(heap.size()) < size) {
    heap.push_back(entry);
    std::push_heap(heap.begin(), heap.end(), cmp);
  } else if (better(entry, heap.front())) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    heap.back() = entry;
    std::push_heap(heap.begin(), heap.end(), cmp);
  }
}

template <typename T>
void select_rows(const T* pre, int64_t* out, int64_t* columns, int64_t N, int64_t h, int64_t m, int64_t n,
                 int64_t k) {
  const int64_t width = m + n, mn = m * n, kh = std::min(k, h);
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    std::vector<Scored<T>> heads, latents;
    heads.reserve(kh);
    latents.reserve(k);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = pre + r * h * width;
      heads.clear();
      for (int64_t g = 0; g < h; ++g) {  // the kh heads with the largest best latent
        const T* p = row + g * width;
        T u_best = 0, w_best = 0;
        for (int64_t i = 0; i < m; ++i) u_best = std::max(u_best, p[i]);
        for (int64_t j = 0; j < n; ++j) w_best = std::max(w_best, p[m + j]);
        offer(heads, kh, Scored<T>{u_best * w_best, g});
      }
      std::sort(heads.begin(), heads.end(), better<T>);  // best head first
      latents.clear();
      for (const auto& head : heads) {
        // every latent of this head scores <= head.value: once the k kept are all above it, no later head helps
        if (static_cast<int64_t>(latents.size()) == k && latents.front().value > head.value) break;
        const T* p = row + head.id * width;
        for (int64_t i = 0; i < m; ++i) {
          const T u = std::max(p[i], T(0));
          for (int64_t j = 0; j < n; ++j)
            offer(latents, k, Scored<T>{u * std::max(p[m + j], T(0)), head.id * mn + i * n + j});
        }
      }
      std::sort(latents.begin(), latents.end(), better<T>);
      for (int64_t t = 0; t < k; ++t) {
        const int64_t id = latents[t].id, g = id / mn, i = (id % mn) / n, j = id % n;
        out[r * k + t] = id;
        columns[r * 2 * k + t] = g * width + i;          // u_{g,i}
        columns[r * 2 * k + k + t] = g * width + m + j;  // w_{g,j}
      }
    }
  });
}

}  // namespace

// pre: (N, h*(m+n)) contiguous float32/float64 -> (ids, columns): ids (N, k) int64 latent ids h*m*n + i*n + j by
// descending score; columns (N, 2k) the fused-encoder columns each latent reads: its u (first k), then its w.
std::vector<torch::Tensor> kron_select_topk(torch::Tensor pre, int64_t h, int64_t m, int64_t n, int64_t k) {
  TORCH_CHECK(pre.dim() == 2 && pre.size(1) == h * (m + n), "pre must be (N, h*(m+n))");
  TORCH_CHECK(k >= 1 && k <= h * m * n, "k must be in [1, h*m*n]");
  pre = pre.contiguous();
  auto out = torch::empty({pre.size(0), k}, pre.options().dtype(torch::kLong));
  auto columns = torch::empty({pre.size(0), 2 * k}, pre.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "kron_select_topk", [&] {
    select_rows<scalar_t>(pre.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), columns.data_ptr<int64_t>(), pre.size(0), h, m, n, k);
  });
  return {out, columns};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("kron_select_topk", &kron_select_topk, "KronSAE top-k latent ids from fused pre-activations");
}
