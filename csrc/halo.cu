// CUDA kernels of the egnn halo ops (schemas and CPU kernels: halo.cpp).
//
// pack / unpack are flat copies: thread t moves 16-byte vector t of the output (the widest of
// 16/8/4/2/1 bytes that divides the row size and the pointers' alignment), so every warp reads and
// writes consecutive 16-byte words of a row; one launch covers all neighbours (the send index is one
// concatenated list). Scatter-add uses one thread block per distinct target row with the CSR of its
// sources (no atomics, fixed order: deterministic), accumulating in fp32 for half types.
//
// Only light headers (no ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE headers), so the file
// also compiles with a bare `nvcc -arch=sm_90a -c` against the headers of a CPU-only torch.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE  // CPU-only torch wheels do not ship this generated header
#endif
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "halo.h"

namespace egnn {

namespace {

constexpr int kThreads = 256;

int vec_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = row_bytes % w == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % w == 0;
    if (ok) return w;
  }
  return 1;
}

unsigned blocks_for(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), int64_t(1) << 20));  // grid-stride beyond
}

template <typename V>
__global__ void pack_kernel(const V* __restrict__ src, const int64_t* __restrict__ idx, V* __restrict__ out,
                            int64_t total, int64_t row_vec, int64_t rows) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = t / row_vec;
    const int64_t r = __ldg(idx + k);
    CUDA_KERNEL_ASSERT(r >= 0 && r < rows);
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
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Block u sums the sources of target row rows[u]; each thread owns VEC consecutive columns at a time.
template <typename scalar_t, int VEC>
__global__ void scatter_add_csr_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ buf,
                                       scalar_t* __restrict__ out, const int64_t* __restrict__ rows,
                                       const int64_t* __restrict__ ptr, const int64_t* __restrict__ order, int64_t D,
                                       int64_t n_grad, int64_t n_buf) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t u = blockIdx.x;
  const int64_t r = rows[u];
  CUDA_KERNEL_ASSERT(r >= 0 && r < n_grad);
  const int64_t j0 = ptr[u], j1 = ptr[u + 1];
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < D; c += int64_t(blockDim.x) * VEC) {
    acc_t acc[VEC];
    P p = *reinterpret_cast<const P*>(g + r * D + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = static_cast<acc_t>(p.v[i]);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t s = __ldg(order + j);
      CUDA_KERNEL_ASSERT(s >= 0 && s < n_buf);
      P q = *reinterpret_cast<const P*>(buf + s * D + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] += static_cast<acc_t>(q.v[i]);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) p.v[i] = static_cast<scalar_t>(acc[i]);
    *reinterpret_cast<P*>(out + r * D + c) = p;
  }
}

template <typename V>
void launch_pack(const at::Tensor& x, const at::Tensor& idx, at::Tensor& out, int64_t row_bytes, cudaStream_t s) {
  const int64_t row_vec = row_bytes / sizeof(V), total = idx.numel() * row_vec;
  pack_kernel<V><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const V*>(x.data_ptr()), idx.data_ptr<int64_t>(),
                                                        static_cast<V*>(out.data_ptr()), total, row_vec, x.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename V>
void launch_unpack(const at::Tensor& x, const at::Tensor& recv, at::Tensor& out, int64_t row_bytes, int64_t offset,
                   cudaStream_t s) {
  const int64_t row_vec = row_bytes / sizeof(V), total = x.size(0) * row_vec;
  const int64_t lo = offset * row_vec, hi = lo + recv.size(0) * row_vec;
  unpack_kernel<V><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const V*>(x.data_ptr()),
                                                          static_cast<const V*>(recv.data_ptr()),
                                                          static_cast<V*>(out.data_ptr()), total, lo, hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define EGNN_VEC_SWITCH(W, ...)                 \
  switch (W) {                                  \
    case 16: { using V = int4; __VA_ARGS__; break; }  \
    case 8: { using V = int2; __VA_ARGS__; break; }   \
    case 4: { using V = int; __VA_ARGS__; break; }    \
    case 2: { using V = short; __VA_ARGS__; break; }  \
    default: { using V = char; __VA_ARGS__; break; }  \
  }

}  // namespace

at::Tensor halo_pack_cuda(const at::Tensor& x, const at::Tensor& send_index, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(x.dim() >= 1, "egnn::halo_pack: x must have a row dimension");
  check_index(send_index, "halo_pack", "send_index", x);
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto idx = send_index.contiguous();
  auto out = at::empty(with_rows(xc, idx.numel()), xc.options());
  const int64_t row_bytes = row_numel(xc) * xc.element_size();
  if (idx.numel() == 0 || row_bytes == 0) return out;
  const int w = vec_bytes(row_bytes, {xc.data_ptr(), out.data_ptr()});
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  EGNN_VEC_SWITCH(w, launch_pack<V>(xc, idx, out, row_bytes, stream));
  return out;
}

at::Tensor halo_unpack_cuda(const at::Tensor& x, const at::Tensor& recv, int64_t offset) {
  check_rows_like(x, recv, "halo_unpack", "x", "recv");
  TORCH_CHECK(offset >= 0 && offset + recv.size(0) <= x.size(0), "egnn::halo_unpack: rows [", offset, ", ",
              offset + recv.size(0), ") of the receive buffer do not fit in x with ", x.size(0), " rows");
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto rc = recv.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t row_bytes = row_numel(xc) * xc.element_size();
  if (xc.size(0) == 0 || row_bytes == 0) return out;
  const int w = vec_bytes(row_bytes, {xc.data_ptr(), rc.data_ptr(), out.data_ptr()});
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  EGNN_VEC_SWITCH(w, launch_unpack<V>(xc, rc, out, row_bytes, offset, stream));
  return out;
}

at::Tensor halo_unpack_add_csr_cuda(const at::Tensor& grad_x, const at::Tensor& rows, const at::Tensor& ptr,
                                    const at::Tensor& order, const at::Tensor& buf) {
  check_rows_like(grad_x, buf, "halo_unpack_add_csr", "grad_x", "buf");
  check_index(rows, "halo_unpack_add_csr", "rows", grad_x);
  check_index(ptr, "halo_unpack_add_csr", "ptr", grad_x);
  check_index(order, "halo_unpack_add_csr", "order", grad_x);
  const int64_t U = rows.numel();
  TORCH_CHECK(ptr.numel() == U + 1 && order.numel() == buf.size(0),
              "egnn::halo_unpack_add_csr: need ptr of length len(rows)+1 and order of length len(buf)");
  c10::cuda::CUDAGuard guard(grad_x.device());
  auto g = grad_x.contiguous();
  auto b = buf.contiguous();
  auto rw = rows.contiguous(), pt = ptr.contiguous(), od = order.contiguous();
  auto out = g.clone(at::MemoryFormat::Contiguous);
  const int64_t D = row_numel(g);
  if (U == 0 || D == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "halo_unpack_add_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool wide = vec_bytes(D * sizeof(scalar_t), {g.data_ptr(), b.data_ptr(), out.data_ptr()}) == 16;
    const int vec = wide ? kVec : 1;
    const int64_t chunks = (D + vec - 1) / vec;
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
    const unsigned grid = static_cast<unsigned>(U);
    if (wide)
      scatter_add_csr_kernel<scalar_t, kVec><<<grid, threads, 0, stream>>>(
          g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rw.data_ptr<int64_t>(),
          pt.data_ptr<int64_t>(), od.data_ptr<int64_t>(), D, g.size(0), b.size(0));
    else
      scatter_add_csr_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(
          g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rw.data_ptr<int64_t>(),
          pt.data_ptr<int64_t>(), od.data_ptr<int64_t>(), D, g.size(0), b.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor halo_unpack_add_cuda(const at::Tensor& grad_x, const at::Tensor& index, const at::Tensor& buf) {
  check_rows_like(grad_x, buf, "halo_unpack_add", "grad_x", "buf");
  check_index(index, "halo_unpack_add", "index", grad_x);
  TORCH_CHECK(buf.size(0) == index.numel(), "egnn::halo_unpack_add: buf has ", buf.size(0), " rows but index has ",
              index.numel(), " entries");
  c10::cuda::CUDAGuard guard(grad_x.device());
  auto [rows, ptr, order] = csr_from_index(index.contiguous());  // a stable device sort; pass a plan to skip it
  return halo_unpack_add_csr_cuda(grad_x, rows, ptr, order, buf);
}

}  // namespace egnn

TORCH_LIBRARY_IMPL(egnn, CUDA, m) {
  m.impl("halo_pack", &egnn::halo_pack_cuda);
  m.impl("halo_unpack", &egnn::halo_unpack_cuda);
  m.impl("halo_unpack_add", &egnn::halo_unpack_add_cuda);
  m.impl("halo_unpack_add_csr", &egnn::halo_unpack_add_csr_cuda);
}
