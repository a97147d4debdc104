// CUDA implementation of egnn::index_rows: one thread block per gathered row strip, 16-byte
// vector accesses when the row size allows it (rows of embeddings are multiples of 16 bytes for
// the shapes egnn uses), a byte loop otherwise.
#include <ATen/cuda/CUDAContext.h>
#include <torch/extension.h>

namespace egnn {

__global__ void index_rows_kernel(const char* __restrict__ src, const int64_t* __restrict__ idx,
                                  char* __restrict__ out, int64_t n, int64_t row_bytes) {
  const int64_t k = blockIdx.x;
  if (k >= n) return;
  const char* s = src + idx[k] * row_bytes;
  char* d = out + k * row_bytes;
  if (row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(s) % 16 == 0 && reinterpret_cast<uintptr_t>(d) % 16 == 0) {
    const int4* s4 = reinterpret_cast<const int4*>(s);
    int4* d4 = reinterpret_cast<int4*>(d);
    for (int64_t c = threadIdx.x; c < row_bytes / 16; c += blockDim.x) d4[c] = s4[c];
  } else {
    for (int64_t c = threadIdx.x; c < row_bytes; c += blockDim.x) d[c] = s[c];
  }
}

at::Tensor index_rows_cuda(const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, "egnn::index_rows: index must be 1-D int64");
  auto x = src.contiguous();
  auto idx = index.contiguous();
  const int64_t n = idx.size(0), rows = x.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = n;
  auto out = at::empty(shape, x.options());
  if (n == 0 || rows == 0) return out;
  const int64_t row_bytes = x.nbytes() / rows;
  auto stream = at::cuda::getCurrentCUDAStream();
  index_rows_kernel<<<n, 128, 0, stream>>>(static_cast<const char*>(x.data_ptr()), idx.data_ptr<int64_t>(),
                                           static_cast<char*>(out.data_ptr()), n, row_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace egnn

TORCH_LIBRARY_IMPL(egnn, CUDA, m) { m.impl("index_rows", &egnn::index_rows_cuda); }
