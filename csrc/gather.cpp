// egnn::index_rows — gather rows of a 2-D tensor by an index list into a new contiguous tensor.
// The building block of halo packing (send buffers are rows of the node embedding, gathered by the
// plan's send indices). CPU: OpenMP over rows, memcpy of whole rows (vectorised by libc).
#include <torch/extension.h>

#include <cstring>

namespace egnn {

at::Tensor index_rows_cpu(const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK(src.dim() >= 1, "egnn::index_rows: src must have at least one dimension");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong,
              "egnn::index_rows: index must be a 1-D int64 tensor");
  auto x = src.contiguous();
  auto idx = index.contiguous();
  const int64_t n = idx.size(0), rows = x.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  const int64_t row_bytes = rows ? x.nbytes() / rows : 0;
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k)
    TORCH_CHECK(ip[k] >= 0 && ip[k] < rows, "egnn::index_rows: index ", ip[k], " out of range [0, ", rows, ")");
  const char* s = static_cast<const char*>(x.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
#pragma omp parallel for if (n * row_bytes > (1 << 16))
  for (int64_t k = 0; k < n; ++k) std::memcpy(d + k * row_bytes, s + ip[k] * row_bytes, row_bytes);
  return out;
}

}  // namespace egnn

TORCH_LIBRARY_FRAGMENT(egnn, m) { m.def("index_rows(Tensor src, Tensor index) -> Tensor"); }

TORCH_LIBRARY_IMPL(egnn, CPU, m) { m.impl("index_rows", &egnn::index_rows_cpu); }

PYBIND11_MODULE(_C, m) { m.doc() = "egnn C++/CUDA ops, registered under torch.ops.egnn"; }
