// Fused HierarchicalTopK decode + loss for CPU tensors (float32 / float64).
//
// For each row b the prefix reconstructions x_hat_j = b_dec + sum_{t<=j} v_t W_dec[i_t] are never stored: the
// residual r_j = x - x_hat_j lives in one d_in-sized buffer per thread, so memory is O(batch * d_in), as for
// plain TopK. Forward returns the per-row weighted sum of squared residuals and r_K; backward walks t = K..1 with a
// running suffix sum S_t = sum_{j>=t} w_j r_j (Balagansky et al. 2025, reference kernels in corl-team/flexsae):
//   dL/dv_t = -c <W_dec[i_t], S_t>,  dL/dW_dec[i_t] += -c v_t S_t,  dL/db_dec = -c sum_b S_1,  c = 2 g / (B d).
// Rows are processed in parallel; updates of a decoder row are guarded by a per-latent spin lock (or, with
// deterministic=true, processed in order on one thread for bit-reproducible gradients).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <memory>
#include <vector>

namespace {

template <typename T>
void forward_rows(const T* x, const T* values, const int64_t* indices, const T* W, const T* b_dec,
                  const T* weights, T* residual, T* row_loss, int64_t B, int64_t K, int64_t d) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* r = residual + b * d;
      const T* xb = x + b * d;
      for (int64_t c = 0; c < d; ++c) r[c] = xb[c] - b_dec[c];
      T acc = 0;
      for (int64_t t = 0; t < K; ++t) {
        const T v = values[b * K + t];
        const T* e = W + indices[b * K + t] * d;
        const T w = weights[t];
        if (w != T(0)) {
          T s = 0;
          for (int64_t c = 0; c < d; ++c) {
            const T rc = r[c] - v * e[c];
            r[c] = rc;
            s += rc * rc;
          }
          acc += w * s;
        } else {
          for (int64_t c = 0; c < d; ++c) r[c] -= v * e[c];
        }
      }
      row_loss[b] = acc;
    }
  });
}

inline void lock(std::atomic<uint8_t>& flag) {
  uint8_t expected = 0;
  while (!flag.compare_exchange_weak(expected, 1, std::memory_order_acquire)) expected = 0;
}

inline void unlock(std::atomic<uint8_t>& flag) { flag.store(0, std::memory_order_release); }

template <typename T>
void backward_rows(const T* values, const int64_t* indices, const T* W, const T* weights, const T* residual,
                   T scale, T* grad_values, T* grad_W, T* suffix_out, int64_t B, int64_t K, int64_t d,
                   int64_t F, bool deterministic) {
  std::unique_ptr<std::atomic<uint8_t>[]> locks(new std::atomic<uint8_t>[F]);
  for (int64_t f = 0; f < F; ++f) locks[f].store(0);
  // Deterministic mode runs the rows in order on one thread, so decoder-row sums are always added in the same order.
  at::parallel_for(0, B, deterministic ? B : 16, [&](int64_t begin, int64_t end) {
    std::vector<T> r(d), S(d);
    for (int64_t b = begin; b < end; ++b) {
      const T* rK = residual + b * d;
      for (int64_t c = 0; c < d; ++c) { r[c] = rK[c]; S[c] = 0; }
      for (int64_t t = K - 1; t >= 0; --t) {
        const T w = weights[t];
        const T v = values[b * K + t];
        const int64_t f = indices[b * K + t];
        const T* e = W + f * d;
        T dot = 0;
        if (w != T(0)) {
          for (int64_t c = 0; c < d; ++c) {
            const T s = S[c] + w * r[c];
            S[c] = s;
            dot += e[c] * s;
            r[c] += v * e[c];
          }
        } else {
          for (int64_t c = 0; c < d; ++c) {
            dot += e[c] * S[c];
            r[c] += v * e[c];
          }
        }
        grad_values[b * K + t] = -scale * dot;
        const T coef = -scale * v;
        if (coef != T(0)) {
          T* g = grad_W + f * d;
          lock(locks[f]);
          for (int64_t c = 0; c < d; ++c) g[c] += coef * S[c];
          unlock(locks[f]);
        }
      }
      T* out = suffix_out + b * d;
      for (int64_t c = 0; c < d; ++c) out[c] = S[c];
    }
  });
}

template <typename T>
void segment_rows(const int64_t* crow, const int64_t* row_ids, const T* coef, const T* rows, T* out, int64_t F,
                  int64_t d) {
  at::parallel_for(0, F, 64, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      T* o = out + f * d;
      for (int64_t c = 0; c < d; ++c) o[c] = 0;
      for (int64_t p = crow[f]; p < crow[f + 1]; ++p) {
        const T a = coef[p];
        const T* r = rows + row_ids[p] * d;
        for (int64_t c = 0; c < d; ++c) o[c] += a * r[c];
      }
    }
  });
}

}  // namespace

// out[f] = sum_{p in [crow[f], crow[f+1])} coef[p] * rows[row_ids[p]]: the transposed sparse-dense product of TopK
// gradients, computed per latent (no atomics, deterministic order).
torch::Tensor segment_scatter_rows(torch::Tensor crow, torch::Tensor row_ids, torch::Tensor coef, torch::Tensor rows,
                                   int64_t F) {
  const int64_t d = rows.size(1);
  auto out = torch::empty({F, d}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "segment_scatter_rows", [&] {
    segment_rows<scalar_t>(crow.data_ptr<int64_t>(), row_ids.data_ptr<int64_t>(), coef.data_ptr<scalar_t>(),
                           rows.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), F, d);
  });
  return out;
}

std::vector<torch::Tensor> hierarchical_forward(torch::Tensor x, torch::Tensor values, torch::Tensor indices,
                                                torch::Tensor W, torch::Tensor b_dec, torch::Tensor weights) {
  const int64_t B = x.size(0), d = x.size(1), K = values.size(1);
  auto residual = torch::empty_like(x);
  auto row_loss = torch::empty({B}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hierarchical_forward", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
                           W.data_ptr<scalar_t>(), b_dec.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                           residual.data_ptr<scalar_t>(), row_loss.data_ptr<scalar_t>(), B, K, d);
  });
  return {row_loss, residual};
}

std::vector<torch::Tensor> hierarchical_backward(torch::Tensor values, torch::Tensor indices, torch::Tensor W,
                                                 torch::Tensor weights, torch::Tensor residual, double scale,
                                                 bool deterministic) {
  const int64_t B = residual.size(0), d = residual.size(1), K = values.size(1), F = W.size(0);
  auto grad_values = torch::empty_like(values);
  auto grad_W = torch::zeros_like(W);
  auto suffix = torch::empty_like(residual);
  AT_DISPATCH_FLOATING_TYPES(residual.scalar_type(), "hierarchical_backward", [&] {
    backward_rows<scalar_t>(values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), W.data_ptr<scalar_t>(),
                            weights.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), (scalar_t)scale,
                            grad_values.data_ptr<scalar_t>(), grad_W.data_ptr<scalar_t>(),
                            suffix.data_ptr<scalar_t>(), B, K, d, F, deterministic);
  });
  return {grad_values, grad_W, suffix};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hierarchical_forward", &hierarchical_forward, "fused HierarchicalTopK decode + loss (CPU)");
  m.def("hierarchical_backward", &hierarchical_backward, "backward of hierarchical_forward (CPU)");
  m.def("segment_scatter_rows", &segment_scatter_rows, "per-latent sum of weighted rows (CPU)");
}
