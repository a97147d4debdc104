// CUDA kernels of the egnn halo ops (tensor glue and registration: halo_cuda.cpp).
//
// pack / unpack are flat copies: thread t moves vector word t of the output (the widest of 16/8/4/2/1
// bytes that divides the row size and the pointers' alignment, i.e. 16 bytes for embedding rows), so
// every warp reads and writes consecutive 16-byte words; one launch covers all neighbours (the send
// index is one concatenated list). Scatter-add uses one thread block per distinct target row with the
// CSR of its sources: no atomics, a fixed summation order (deterministic), fp32 accumulation for
// half types, fp64 for fp64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "halo_cuda.h"

namespace egnn::cuda {

namespace {

constexpr int kThreads = 256;

int vec_bytes(int64_t row_bytes, const void* a, const void* b, const void* c = nullptr) {
  for (int w : {16, 8, 4, 2}) {
    const bool ok = row_bytes % w == 0 && reinterpret_cast<uintptr_t>(a) % w == 0 &&
                    reinterpret_cast<uintptr_t>(b) % w == 0 && reinterpret_cast<uintptr_t>(c) % w == 0;
    if (ok) return w;
  }
  return 1;
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > (int64_t(1) << 20) ? (int64_t(1) << 20) : b));  // grid-stride beyond
}

template <typename V>
__global__ void pack_kernel(const V* __restrict__ src, const int64_t* __restrict__ idx, V* __restrict__ out,
                            int64_t total, int64_t row_vec, int64_t rows) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = t / row_vec;
    const int64_t r = __ldg(idx + k);
    assert(r >= 0 && r < rows);
    out[t] = src[r * row_vec + (t - k * row_vec)];
  }
}

template <typename V>
__global__ void unpack_kernel(const V* __restrict__ x, const V* __restrict__ recv, V* __restrict__ out, int64_t total,
                              int64_t lo, int64_t hi) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x)
    out[t] = (t >= lo && t < hi) ? recv[t - lo] : x[t];
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Block u owns target row rows[u]; each thread owns N consecutive columns at a time and sums the
// sources in CSR order (all threads of the block read one source row together: coalesced).
template <typename T, int N>
__global__ void scatter_add_csr_kernel(const T* __restrict__ g, const T* __restrict__ buf, T* __restrict__ out,
                                       const int64_t* __restrict__ rows, const int64_t* __restrict__ ptr,
                                       const int64_t* __restrict__ order, int64_t D) {
  using A = typename Acc<T>::type;
  using P = Vec<T, N>;
  const int64_t u = blockIdx.x;
  const int64_t r = rows[u], j0 = ptr[u], j1 = ptr[u + 1];
  for (int64_t c = int64_t(threadIdx.x) * N; c < D; c += int64_t(blockDim.x) * N) {
    A acc[N];
    P p = *reinterpret_cast<const P*>(g + r * D + c);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = to_acc(p.v[i]);
    for (int64_t j = j0; j < j1; ++j) {
      const P q = *reinterpret_cast<const P*>(buf + __ldg(order + j) * D + c);
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] += to_acc(q.v[i]);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = from_acc<T>(acc[i]);
    *reinterpret_cast<P*>(out + r * D + c) = p;
  }
}

template <typename T>
cudaError_t launch_scatter(const void* g, const void* buf, void* out, const int64_t* rows, const int64_t* ptr,
                           const int64_t* order, int64_t U, int64_t D, cudaStream_t s) {
  constexpr int kVec = 16 / sizeof(T);
  const bool wide = vec_bytes(D * int64_t(sizeof(T)), g, buf, out) == 16;
  const int64_t chunks = wide ? (D + kVec - 1) / kVec : D;
  const int64_t threads = chunks >= kThreads ? kThreads : (chunks + 31) / 32 * 32;
  const T* gt = static_cast<const T*>(g);
  const T* bt = static_cast<const T*>(buf);
  T* ot = static_cast<T*>(out);
  if (wide)
    scatter_add_csr_kernel<T, kVec><<<unsigned(U), unsigned(threads), 0, s>>>(gt, bt, ot, rows, ptr, order, D);
  else
    scatter_add_csr_kernel<T, 1><<<unsigned(U), unsigned(threads), 0, s>>>(gt, bt, ot, rows, ptr, order, D);
  return cudaGetLastError();
}

template <typename V>
cudaError_t launch_pack(const void* x, const int64_t* idx, void* out, int64_t n, int64_t rows, int64_t row_bytes,
                        cudaStream_t s) {
  const int64_t row_vec = row_bytes / int64_t(sizeof(V)), total = n * row_vec;
  pack_kernel<V><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const V*>(x), idx, static_cast<V*>(out), total,
                                                        row_vec, rows);
  return cudaGetLastError();
}

template <typename V>
cudaError_t launch_unpack(const void* x, const void* recv, void* out, int64_t rows, int64_t offset, int64_t m,
                          int64_t row_bytes, cudaStream_t s) {
  const int64_t row_vec = row_bytes / int64_t(sizeof(V)), total = rows * row_vec;
  unpack_kernel<V><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const V*>(x), static_cast<const V*>(recv),
                                                          static_cast<V*>(out), total, offset * row_vec,
                                                          (offset + m) * row_vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack(const void* x, const int64_t* idx, void* out, int64_t n, int64_t rows, int64_t row_bytes,
                 cudaStream_t s) {
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  switch (vec_bytes(row_bytes, x, out)) {
    case 16: return launch_pack<int4>(x, idx, out, n, rows, row_bytes, s);
    case 8: return launch_pack<int2>(x, idx, out, n, rows, row_bytes, s);
    case 4: return launch_pack<int>(x, idx, out, n, rows, row_bytes, s);
    case 2: return launch_pack<short>(x, idx, out, n, rows, row_bytes, s);
    default: return launch_pack<char>(x, idx, out, n, rows, row_bytes, s);
  }
}

cudaError_t unpack(const void* x, const void* recv, void* out, int64_t rows, int64_t offset, int64_t m,
                   int64_t row_bytes, cudaStream_t s) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  switch (vec_bytes(row_bytes, x, recv, out)) {
    case 16: return launch_unpack<int4>(x, recv, out, rows, offset, m, row_bytes, s);
    case 8: return launch_unpack<int2>(x, recv, out, rows, offset, m, row_bytes, s);
    case 4: return launch_unpack<int>(x, recv, out, rows, offset, m, row_bytes, s);
    case 2: return launch_unpack<short>(x, recv, out, rows, offset, m, row_bytes, s);
    default: return launch_unpack<char>(x, recv, out, rows, offset, m, row_bytes, s);
  }
}

cudaError_t scatter_add_csr(DType dtype, const void* g, const void* buf, void* out, const int64_t* rows,
                            const int64_t* ptr, const int64_t* order, int64_t U, int64_t D, cudaStream_t s) {
  if (U == 0 || D == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return launch_scatter<float>(g, buf, out, rows, ptr, order, U, D, s);
    case DType::kFloat64: return launch_scatter<double>(g, buf, out, rows, ptr, order, U, D, s);
    case DType::kFloat16: return launch_scatter<__half>(g, buf, out, rows, ptr, order, U, D, s);
    case DType::kBFloat16: return launch_scatter<__nv_bfloat16>(g, buf, out, rows, ptr, order, U, D, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace egnn::cuda
