// Launchers of the CUDA halo kernels (halo_kernels.cu) with plain pointer arguments. halo_kernels.cu includes only
// the CUDA runtime, so nvcc compiles it in seconds; the tensor glue and op registration is
// halo_cuda.cpp (host compiler). Each launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace egnn::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// out[k] = x[idx[k]] for k < n; rows of row_bytes bytes; x has `rows` rows.
cudaError_t pack(const void* x, const int64_t* idx, void* out, int64_t n, int64_t rows, int64_t row_bytes,
                 cudaStream_t stream);

// out = x with rows offset .. offset+m taken from recv; x and out have `rows` rows.
cudaError_t unpack(const void* x, const void* recv, void* out, int64_t rows, int64_t offset, int64_t m,
                   int64_t row_bytes, cudaStream_t stream);

// out[rows[u]] = g[rows[u]] + sum_{j in ptr[u]..ptr[u+1]} buf[order[j]] (rows of D elements), one block per u.
// Rows not in `rows` are not touched (out starts as a copy of g).
cudaError_t scatter_add_csr(DType dtype, const void* g, const void* buf, void* out, const int64_t* rows,
                            const int64_t* ptr, const int64_t* order, int64_t U, int64_t D, cudaStream_t stream);

}  // namespace egnn::cuda
