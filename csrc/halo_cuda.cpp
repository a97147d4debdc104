// CUDA implementations of the egnn halo ops: argument checks, allocation, stream, and the launchers
// of halo_kernels.cu. Compiled only into CUDA builds (setup.py adds *_cuda.cpp with the .cu sources).
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE  // CPU-only torch wheels lack this generated header (syntax checks)
#endif
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "halo.h"
#include "halo_cuda.h"

namespace egnn {

namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

cuda::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "egnn::", op, ": unsupported dtype ", t.scalar_type(),
                         " (float32, float64, float16, bfloat16)");
  }
  return cuda::DType::kFloat32;  // unreachable
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
  C10_CUDA_CHECK(cuda::pack(xc.data_ptr(), idx.data_ptr<int64_t>(), out.data_ptr(), idx.numel(), xc.size(0),
                            row_numel(xc) * xc.element_size(), stream()));
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
  C10_CUDA_CHECK(cuda::unpack(xc.data_ptr(), rc.data_ptr(), out.data_ptr(), xc.size(0), offset, rc.size(0),
                              row_numel(xc) * xc.element_size(), stream()));
  return out;
}

at::Tensor halo_unpack_add_csr_cuda(const at::Tensor& grad_x, const at::Tensor& rows, const at::Tensor& ptr,
                                    const at::Tensor& order, const at::Tensor& buf) {
  check_rows_like(grad_x, buf, "halo_unpack_add_csr", "grad_x", "buf");
  check_index(rows, "halo_unpack_add_csr", "rows", grad_x);
  check_index(ptr, "halo_unpack_add_csr", "ptr", grad_x);
  check_index(order, "halo_unpack_add_csr", "order", grad_x);
  const int64_t U = rows.numel();
  // Validating the CSR's values would need a device sync: plans come from egnn.ops.scatter_plan.
  TORCH_CHECK(ptr.numel() == U + 1 && order.numel() == buf.size(0),
              "egnn::halo_unpack_add_csr: need ptr of length len(rows)+1 and order of length len(buf)");
  const auto dt = dtype_of(grad_x, "halo_unpack_add");
  c10::cuda::CUDAGuard guard(grad_x.device());
  auto g = grad_x.contiguous();
  auto b = buf.contiguous();
  auto rw = rows.contiguous(), pt = ptr.contiguous(), od = order.contiguous();
  auto out = g.clone(at::MemoryFormat::Contiguous);
  C10_CUDA_CHECK(cuda::scatter_add_csr(dt, g.data_ptr(), b.data_ptr(), out.data_ptr(), rw.data_ptr<int64_t>(),
                                       pt.data_ptr<int64_t>(), od.data_ptr<int64_t>(), U, row_numel(g), stream()));
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
