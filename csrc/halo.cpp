// egnn halo ops: schemas and CPU kernels. The Python side (fake tensors, autograd, the pure-PyTorch
// twin used without this extension) is egnn/ops.py; the CUDA kernels are halo_kernels.cu.
//
//   halo_pack(x, send_index, rows?, ptr?, order?)   out[k] = x[send_index[k]]; one contiguous send
//       buffer for all neighbours. rows/ptr/order (the scatter CSR of send_index) are not read by the
//       forward: they only let the backward skip its sort.
//   halo_unpack(x, recv, offset)    out = x with rows offset..offset+len(recv) replaced by recv
//       (out-of-place, so it composes with autograd; halo_unpack_ is the in-place inference twin).
//   halo_unpack_add(grad_x, index, buf)    out = grad_x; out[index[k]] += buf[k]  (pack's backward)
//   halo_unpack_add_csr(grad_x, rows, ptr, order, buf)   the same with a precomputed CSR.
//
// CPU: at::parallel_for (OpenMP inside PyTorch, honours torch.set_num_threads; linking our own
// libgomp would load a second OpenMP runtime next to torch's) over rows; rows are copied with
// memcpy, and the scatter-add inner loops run over one contiguous embedding row (vectorised: see
// RowIO for the fp16/bf16 conversions).
// Scatter-add sums every target row in one task, in ascending source order, into an opmath (fp32
// for half types) accumulator: deterministic, bit-equal to a serial index_add_ for fp32/fp64.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EGNN_X86 1
#endif

#include "halo.h"

namespace egnn {

namespace {

constexpr int64_t kGrainBytes = 1 << 15;  // ~32 KiB of rows per parallel task

int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, row_bytes)); }

void check_range(const at::Tensor& index, int64_t rows, const char* op, const char* name) {
  const int64_t* ip = index.data_ptr<int64_t>();
  const int64_t n = index.numel();
  int64_t bad = -1;
  for (int64_t k = 0; k < n && bad < 0; ++k)
    if (ip[k] < 0 || ip[k] >= rows) bad = k;
  TORCH_CHECK(bad < 0, "egnn::", op, ": ", name, "[", bad, "] = ", bad < 0 ? 0 : ip[bad], " is out of range [0, ",
              rows, ")");
}

// Row converters between the storage type and the accumulator, written so that they vectorise:
// no conversion for fp32/fp64, bit shifts for bf16 (round-to-nearest-even like c10::BFloat16), F16C
// for fp16 when the CPU has it (checked at run time; the build targets baseline x86-64), else c10's.
template <typename T>
struct RowIO {
  static void load(const T* s, T* a, int64_t n) { std::memcpy(a, s, n * sizeof(T)); }
  static void add(const T* s, T* a, int64_t n) {
    for (int64_t c = 0; c < n; ++c) a[c] += s[c];
  }
  static void store(const T* a, T* d, int64_t n) { std::memcpy(d, a, n * sizeof(T)); }
};

template <>
struct RowIO<c10::BFloat16> {
  static float to_float(uint16_t b) {
    const uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static void load(const c10::BFloat16* s, float* a, int64_t n) {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(s);
    for (int64_t c = 0; c < n; ++c) a[c] = to_float(b[c]);
  }
  static void add(const c10::BFloat16* s, float* a, int64_t n) {
    const uint16_t* b = reinterpret_cast<const uint16_t*>(s);
    for (int64_t c = 0; c < n; ++c) a[c] += to_float(b[c]);
  }
  static void store(const float* a, c10::BFloat16* d, int64_t n) {
    uint16_t* b = reinterpret_cast<uint16_t*>(d);
    for (int64_t c = 0; c < n; ++c) {
      uint32_t u;
      std::memcpy(&u, a + c, 4);
      b[c] = std::isnan(a[c]) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
};

#ifdef EGNN_X86
__attribute__((target("avx,f16c"))) void f16_load(const c10::Half* s, float* a, int64_t n, bool accumulate) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + c)));
    if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(a + c));
    _mm256_storeu_ps(a + c, v);
  }
  for (; c < n; ++c) a[c] = accumulate ? a[c] + static_cast<float>(s[c]) : static_cast<float>(s[c]);
}

__attribute__((target("avx,f16c"))) void f16_store(const float* a, c10::Half* d, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + c), _mm256_cvtps_ph(_mm256_loadu_ps(a + c), _MM_FROUND_TO_NEAREST_INT));
  for (; c < n; ++c) d[c] = static_cast<c10::Half>(a[c]);
}

bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <>
struct RowIO<c10::Half> {
  static void load(const c10::Half* s, float* a, int64_t n) {
#ifdef EGNN_X86
    if (has_f16c()) return f16_load(s, a, n, false);
#endif
    for (int64_t c = 0; c < n; ++c) a[c] = static_cast<float>(s[c]);
  }
  static void add(const c10::Half* s, float* a, int64_t n) {
#ifdef EGNN_X86
    if (has_f16c()) return f16_load(s, a, n, true);
#endif
    for (int64_t c = 0; c < n; ++c) a[c] += static_cast<float>(s[c]);
  }
  static void store(const float* a, c10::Half* d, int64_t n) {
#ifdef EGNN_X86
    if (has_f16c()) return f16_store(a, d, n);
#endif
    for (int64_t c = 0; c < n; ++c) d[c] = static_cast<c10::Half>(a[c]);
  }
};

// Writes every row of out exactly once: task u copies the untouched rows between the previous
// target and rows[u] (one memcpy), then sums row rows[u]; the last task also copies the tail.
template <typename scalar_t>
void scatter_add_rows(const scalar_t* g, const scalar_t* b, scalar_t* out, const int64_t* rows, const int64_t* ptr,
                      const int64_t* order, int64_t U, int64_t N, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t per_task = (N + ptr[U]) / std::max<int64_t>(1, U) + 1;  // rows touched per target, on average
  at::parallel_for(0, U, grain_rows(D * sizeof(scalar_t) * per_task), [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> acc(D);
    acc_t* a = acc.data();
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = rows[u], prev = u ? rows[u - 1] + 1 : 0;
      if (r > prev) std::memcpy(out + prev * D, g + prev * D, (r - prev) * D * sizeof(scalar_t));
      if (u == U - 1 && r + 1 < N) std::memcpy(out + (r + 1) * D, g + (r + 1) * D, (N - r - 1) * D * sizeof(scalar_t));
      RowIO<scalar_t>::load(g + r * D, a, D);
      for (int64_t j = ptr[u]; j < ptr[u + 1]; ++j) RowIO<scalar_t>::add(b + order[j] * D, a, D);
      RowIO<scalar_t>::store(a, out + r * D, D);
    }
  });
}

}  // namespace

at::Tensor halo_pack_cpu(const at::Tensor& x, const at::Tensor& send_index, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  TORCH_CHECK(x.dim() >= 1, "egnn::halo_pack: x must have a row dimension");
  check_index(send_index, "halo_pack", "send_index", x);
  auto xc = x.contiguous();
  auto idx = send_index.contiguous();
  const int64_t n = idx.numel(), rows = xc.size(0);
  check_range(idx, rows, "halo_pack", "send_index");
  auto out = at::empty(with_rows(xc, n), xc.options());
  const int64_t row_bytes = row_numel(xc) * xc.element_size();
  if (n == 0 || row_bytes == 0) return out;
  const int64_t* ip = idx.data_ptr<int64_t>();
  const char* s = static_cast<const char*>(xc.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n, grain_rows(row_bytes), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) std::memcpy(d + k * row_bytes, s + ip[k] * row_bytes, row_bytes);
  });
  return out;
}

at::Tensor halo_unpack_cpu(const at::Tensor& x, const at::Tensor& recv, int64_t offset) {
  check_rows_like(x, recv, "halo_unpack", "x", "recv");
  const int64_t rows = x.size(0), m = recv.size(0);
  TORCH_CHECK(offset >= 0 && offset + m <= rows, "egnn::halo_unpack: rows [", offset, ", ", offset + m,
              ") of the receive buffer do not fit in x with ", rows, " rows");
  auto xc = x.contiguous();
  auto rc = recv.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  const int64_t row_bytes = row_numel(xc) * xc.element_size();
  if (rows == 0 || row_bytes == 0) return out;
  const char* xs = static_cast<const char*>(xc.data_ptr());
  const char* rs = static_cast<const char*>(rc.data_ptr());
  char* d = static_cast<char*>(out.data_ptr());
  // Each output row is written once, from x or from recv.
  at::parallel_for(0, rows, grain_rows(row_bytes), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const char* src = (r >= offset && r < offset + m) ? rs + (r - offset) * row_bytes : xs + r * row_bytes;
      std::memcpy(d + r * row_bytes, src, row_bytes);
    }
  });
  return out;
}

// In place: the halo rows of x are one contiguous slab, so this is a single (parallel) copy.
void halo_unpack_inplace(at::Tensor x, const at::Tensor& recv, int64_t offset) {
  check_rows_like(x, recv, "halo_unpack_", "x", "recv");
  const int64_t m = recv.size(0);
  TORCH_CHECK(offset >= 0 && offset + m <= x.size(0), "egnn::halo_unpack_: rows [", offset, ", ", offset + m,
              ") of the receive buffer do not fit in x with ", x.size(0), " rows");
  x.narrow(0, offset, m).copy_(recv);
}

at::Tensor halo_unpack_add_csr_cpu(const at::Tensor& grad_x, const at::Tensor& rows, const at::Tensor& ptr,
                                   const at::Tensor& order, const at::Tensor& buf) {
  check_rows_like(grad_x, buf, "halo_unpack_add_csr", "grad_x", "buf");
  check_index(rows, "halo_unpack_add_csr", "rows", grad_x);
  check_index(ptr, "halo_unpack_add_csr", "ptr", grad_x);
  check_index(order, "halo_unpack_add_csr", "order", grad_x);
  const int64_t N = grad_x.size(0), M = buf.size(0), U = rows.numel();
  TORCH_CHECK(ptr.numel() == U + 1 && order.numel() == M, "egnn::halo_unpack_add_csr: need ptr of length len(rows)+1 = ",
              U + 1, " and order of length len(buf) = ", M, "; got ", ptr.numel(), " and ", order.numel());
  auto rw = rows.contiguous(), pt = ptr.contiguous(), od = order.contiguous();
  const int64_t *rp = rw.data_ptr<int64_t>(), *pp = pt.data_ptr<int64_t>(), *op = od.data_ptr<int64_t>();
  // A malformed CSR would race or read out of bounds: check it fully (O(U + M), cheap next to the copy).
  TORCH_CHECK(pp[0] == 0 && pp[U] == M, "egnn::halo_unpack_add_csr: ptr must start at 0 and end at len(buf)");
  for (int64_t u = 0; u < U; ++u) {
    TORCH_CHECK(pp[u] <= pp[u + 1], "egnn::halo_unpack_add_csr: ptr must be non-decreasing");
    TORCH_CHECK(rp[u] >= 0 && rp[u] < N && (u == 0 || rp[u] > rp[u - 1]),
                "egnn::halo_unpack_add_csr: rows must be strictly increasing within [0, ", N, ")");
  }
  std::vector<char> seen(M, 0);
  for (int64_t j = 0; j < M; ++j) {
    TORCH_CHECK(op[j] >= 0 && op[j] < M && !seen[op[j]], "egnn::halo_unpack_add_csr: order must be a permutation of [0, ",
                M, ")");
    seen[op[j]] = 1;
  }
  auto g = grad_x.contiguous();
  auto b = buf.contiguous();
  const int64_t D = row_numel(g);
  if (U == 0 || D == 0) return g.clone(at::MemoryFormat::Contiguous);
  auto out = at::empty_like(g, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "halo_unpack_add_cpu", [&] {
    scatter_add_rows<scalar_t>(g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rp, pp, op,
                               U, N, D);
  });
  return out;
}

at::Tensor halo_unpack_add_cpu(const at::Tensor& grad_x, const at::Tensor& index, const at::Tensor& buf) {
  check_rows_like(grad_x, buf, "halo_unpack_add", "grad_x", "buf");
  check_index(index, "halo_unpack_add", "index", grad_x);
  const int64_t N = grad_x.size(0), M = index.numel();
  TORCH_CHECK(buf.size(0) == M, "egnn::halo_unpack_add: buf has ", buf.size(0), " rows but index has ", M, " entries");
  auto idx = index.contiguous();
  check_range(idx, N, "halo_unpack_add", "index");
  const int64_t* ip = idx.data_ptr<int64_t>();
  // Stable counting sort by target row: O(M + N), serial (index work is tiny next to the row data).
  std::vector<int64_t> start(N + 1, 0);
  for (int64_t k = 0; k < M; ++k) ++start[ip[k] + 1];
  int64_t U = 0;
  for (int64_t r = 0; r < N; ++r) {
    U += start[r + 1] > 0;
    start[r + 1] += start[r];
  }
  auto opts = idx.options();
  auto rows = at::empty({U}, opts), ptr = at::empty({U + 1}, opts), order = at::empty({M}, opts);
  int64_t *rp = rows.data_ptr<int64_t>(), *pp = ptr.data_ptr<int64_t>(), *op = order.data_ptr<int64_t>();
  std::vector<int64_t> pos(start.begin(), start.end() - 1);
  for (int64_t k = 0; k < M; ++k) op[pos[ip[k]]++] = k;
  int64_t u = 0;
  pp[0] = 0;
  for (int64_t r = 0; r < N; ++r)
    if (start[r + 1] > start[r]) {
      rp[u] = r;
      pp[++u] = start[r + 1];
    }
  return halo_unpack_add_csr_cpu(grad_x, rows, ptr, order, buf);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_from_index(const at::Tensor& index) {
  auto order = at::argsort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto sorted = index.index_select(0, order);
  auto uniq = at::unique_consecutive(sorted, /*return_inverse=*/false, /*return_counts=*/true, 0);
  auto rows = std::get<0>(uniq);
  auto ptr = at::zeros({rows.numel() + 1}, index.options());
  if (rows.numel()) ptr.narrow(0, 1, rows.numel()).copy_(std::get<2>(uniq).cumsum(0));
  return {rows, ptr, order};
}

}  // namespace egnn

TORCH_LIBRARY_FRAGMENT(egnn, m) {
  // Fake (meta) kernels and autograd rules live in egnn/ops.py.
  m.set_python_module("egnn.ops");
  m.def("halo_pack(Tensor x, Tensor send_index, Tensor? rows=None, Tensor? ptr=None, Tensor? order=None) -> Tensor");
  m.def("halo_unpack(Tensor x, Tensor recv, int offset) -> Tensor");
  m.def("halo_unpack_(Tensor(a!) x, Tensor recv, int offset) -> ()");
  m.def("halo_unpack_add(Tensor grad_x, Tensor index, Tensor buf) -> Tensor");
  m.def("halo_unpack_add_csr(Tensor grad_x, Tensor rows, Tensor ptr, Tensor order, Tensor buf) -> Tensor");
}

TORCH_LIBRARY_IMPL(egnn, CPU, m) {
  m.impl("halo_pack", &egnn::halo_pack_cpu);
  m.impl("halo_unpack", &egnn::halo_unpack_cpu);
  m.impl("halo_unpack_add", &egnn::halo_unpack_add_cpu);
  m.impl("halo_unpack_add_csr", &egnn::halo_unpack_add_csr_cpu);
}

// One slab copy: the same code for every device.
TORCH_LIBRARY_IMPL(egnn, CompositeExplicitAutograd, m) { m.impl("halo_unpack_", &egnn::halo_unpack_inplace); }

PYBIND11_MODULE(_C, m) { m.doc() = "egnn C++/CUDA ops, registered under torch.ops.egnn (see egnn/ops.py)"; }
