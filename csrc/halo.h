// Shared declarations of the egnn halo ops (CPU in halo.cpp, CUDA in halo_kernels.cu).
//
// Row layout: every tensor is viewed as [rows, D] with D = product of the trailing sizes; a "row"
// is one node's embedding (e.g. 25 x 16 values). Index lists are 1-D int64.
//
// Scatter-add CSR ("scatter plan"): for a list index[0..M) of target rows,
//   rows  [U]   the distinct targets, ascending,
//   ptr   [U+1] rows[u] receives sources order[ptr[u] .. ptr[u+1]),
//   order [M]   positions into index / buf, stably sorted by target (ascending position per row).
// Each target row is summed by exactly one worker in a fixed order: deterministic, no atomics.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <vector>

namespace egnn {

inline int64_t row_numel(const at::Tensor& t) {
  int64_t d = 1;
  for (int64_t i = 1; i < t.dim(); ++i) d *= t.size(i);
  return d;
}

inline std::vector<int64_t> with_rows(const at::Tensor& t, int64_t rows) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s[0] = rows;
  return s;
}

inline void check_index(const at::Tensor& index, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "egnn::", op, ": ", name,
              " must be a 1-D int64 tensor, got dim ", index.dim(), " dtype ", index.scalar_type());
  TORCH_CHECK(index.device() == like.device(), "egnn::", op, ": ", name, " is on ", index.device(),
              " but the data is on ", like.device());
}

inline void check_rows_like(const at::Tensor& a, const at::Tensor& b, const char* op, const char* an,
                            const char* bn) {
  TORCH_CHECK(a.dim() >= 1 && b.dim() == a.dim() && a.sizes().slice(1) == b.sizes().slice(1), "egnn::", op,
              ": ", bn, " rows must have the shape of ", an, " rows; got ", an, " ", a.sizes(), " and ", bn,
              " ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "egnn::", op, ": ", an, " is ", a.scalar_type(), " but ", bn,
              " is ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "egnn::", op, ": ", an, " and ", bn, " are on different devices");
}

// Device-agnostic CSR of `index` built from ATen ops (stable argsort + unique_consecutive); used by
// the CUDA halo_unpack_add when the caller passes no precomputed plan.
std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_from_index(const at::Tensor& index);

}  // namespace egnn
