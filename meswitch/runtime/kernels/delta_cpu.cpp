// meswitch CPU delta kernels: y[seg] += x[seg] @ D_e^T for every expert segment of a batch, read
// straight from the stored b-bit codes (docs/FORMAT.md). Built at first use by
// meswitch/runtime/cpu_kernel.py (torch.utils.cpp_extension) and registered as torch ops:
//
//   meswitch::segmented_delta_mm(x, y, table, bounds, layer, max_tokens)
//       x [N, in], y [N, out] (float32 / bfloat16 / float16, contiguous, same dtype);
//       table int64 [S, L]: descriptor address of expert s's delta for layer l (0: none);
//       bounds int64 [S, 2]: token range [a, b) of segment s. Segments of max_tokens tokens or
//       more are left to the caller (a dense GEMM is faster there).
//   meswitch::dequantize(desc, rows, dtype, base=None, out=None) -> [len(rows) or out, in]: the
//       delta's rows, or with base ([out, in], dtype) base + the delta, added in float32 and
//       rounded once; written into `out` when given (a buffer the caller reuses)
//   meswitch::select_isa(name) -> the instruction set now in use ("" = keep; "auto", "avx512_bf16",
//       "avx512", "avx2", "generic": the best one this CPU supports, capped at the one named)
//
// A descriptor is an int64 tensor of DESC_FIELDS values written by cpu_kernel.py (field order
// below). It holds the addresses of the delta's own tensors, which the Python side keeps alive
// for as long as the descriptor can be used: the kernel reads the stored form in place.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace meswitch_cpu {

constexpr int64_t DESC_MAGIC = 0x4D45535744310001LL;  // "MESWD1" + version 1
constexpr int64_t DESC_FIELDS = 16;

#include "delta_cpu_desc.h"

static Desc read_desc(int64_t address) {
  const int64_t* f = reinterpret_cast<const int64_t*>(address);
  TORCH_CHECK(f[0] == DESC_MAGIC, "meswitch: not a delta descriptor (bad magic)");
  Desc d;
  d.out = f[1];
  d.in = f[2];
  d.bits = f[3];
  d.n = f[4];
  d.group_size = f[5];
  d.n_groups = f[6];
  d.param_stride = f[7];
  d.k = f[8];
  d.row_bytes = f[9];
  d.codes = reinterpret_cast<const uint8_t*>(f[10]);
  d.scale = reinterpret_cast<const c10::Half*>(f[11]);
  d.offset = reinterpret_cast<const c10::Half*>(f[12]);
  d.salient_idx = reinterpret_cast<const int32_t*>(f[13]);
  d.salient_values = reinterpret_cast<const c10::Half*>(f[14]);
  TORCH_CHECK(d.bits == 1 || d.bits == 2 || d.bits == 3 || d.bits == 4 || d.bits == 8,
              "meswitch: unsupported bit width ", d.bits);
  TORCH_CHECK(d.n + d.k == d.in && d.group_size > 0 && d.n_groups >= 1, "meswitch: inconsistent descriptor");
  return d;
}

// ---- the kernels, once per instruction set ---------------------------------------------------
#if defined(__x86_64__) || defined(_M_X64)
#define MESWITCH_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi2")
namespace isa_avx512_bf16 {
#define MESWITCH_ISA 3
#include "delta_cpu_impl.h"
#define HOT inline __attribute__((always_inline))
#include "delta_cpu_bf16.h"
#undef HOT
#undef MESWITCH_ISA
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")
namespace isa_avx512 {
#define MESWITCH_ISA 2
#include "delta_cpu_impl.h"
#undef MESWITCH_ISA
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
namespace isa_avx2 {
#define MESWITCH_ISA 1
#include "delta_cpu_impl.h"
#undef MESWITCH_ISA
}
#pragma GCC pop_options
#endif
namespace isa_generic {
#define MESWITCH_ISA 0
#include "delta_cpu_impl.h"
#undef MESWITCH_ISA
}

enum Isa : int { GENERIC = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };
static const char* ISA_NAMES[] = {"generic", "avx2", "avx512", "avx512_bf16"};

static int cpu_best_isa() {
#ifdef MESWITCH_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return __builtin_cpu_supports("avx512bf16") ? AVX512_BF16 : AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
#endif
  return GENERIC;
}

// PyTorch's ATEN_CPU_CAPABILITY names its top x86 level "avx512" (which does not stop oneDNN's
// bf16 instructions), so from that variable "avx512" caps nothing; meswitch's own names tell the
// two AVX-512 levels apart.
static int isa_from_name(const std::string& s, bool aten = false) {
  if (s == "avx512_bf16" || s == "amx" || (aten && s.rfind("avx512", 0) == 0)) return AVX512_BF16;
  if (s == "avx512" || s == "avx512_vnni" || s == "zen") return AVX512;
  if (s == "avx2") return AVX2;
  if (s == "generic" || s == "default") return GENERIC;
  return -1;
}

// The ISA in use: the best this CPU has, capped by ATEN_CPU_CAPABILITY (so that one variable
// makes PyTorch and meswitch behave as on an older CPU) and by MESWITCH_CPU_ISA.
static int default_isa() {
  int isa = cpu_best_isa();
  for (const char* var : {"ATEN_CPU_CAPABILITY", "MESWITCH_CPU_ISA"}) {
    const char* v = std::getenv(var);
    if (v && *v) {
      int cap = isa_from_name(v, var[0] == 'A');
      if (cap >= 0) isa = std::min(isa, cap);
    }
  }
  return isa;
}

static std::atomic<int> g_isa{-1};

static int current_isa() {
  int isa = g_isa.load();
  if (isa < 0) {
    isa = default_isa();
    g_isa.store(isa);
  }
  return isa;
}

std::string select_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(default_isa());
  } else if (!name.empty()) {
    int cap = isa_from_name(name);
    TORCH_CHECK(cap >= 0, "meswitch: unknown instruction set '", name,
                "' (auto, avx512_bf16, avx512, avx2, generic)");
    g_isa.store(std::min(cap, cpu_best_isa()));
  }
  return ISA_NAMES[current_isa()];
}

using RowsFn = void (*)(const Desc&, int64_t, int64_t, int64_t, const float*, const float*, const float*, float*,
                       int64_t, float*, float*);

static RowsFn rows_fn() {
  switch (current_isa()) {
#ifdef MESWITCH_X86
    case AVX512_BF16: return isa_avx512_bf16::segment_rows;
    case AVX512: return isa_avx512::segment_rows;
    case AVX2: return isa_avx2::segment_rows;
#endif
    default: return isa_generic::segment_rows;
  }
}

// Into o (dtype T); base, when given, has o's dtype (checked by the caller).
template <typename T>
static void dequantize_dispatch(const Desc& d, const int64_t* rows, int64_t n_rows, at::Tensor& o,
                                const c10::optional<at::Tensor>& b) {
  T* out = o.data_ptr<T>();
  const T* base = b.has_value() ? b->data_ptr<T>() : nullptr;
  switch (current_isa()) {
#ifdef MESWITCH_X86
    case AVX512_BF16: return isa_avx512_bf16::dequantize_rows<T>(d, rows, n_rows, out, base);
    case AVX512: return isa_avx512::dequantize_rows<T>(d, rows, n_rows, out, base);
    case AVX2: return isa_avx2::dequantize_rows<T>(d, rows, n_rows, out, base);
#endif
    default: return isa_generic::dequantize_rows<T>(d, rows, n_rows, out, base);
  }
}

constexpr int64_t ROW_BLOCK = 16;  // output rows per work item
static_assert(ROW_BLOCK == 16, "the bf16 kernel finishes 16 rows per vector (bf_segment_rows)");

struct Segment {
  Desc d;
  int64_t a, tokens;
  size_t x_off;  // offset of its gathered activations in the scratch buffer
  bool bf16;     // computed by the AVX-512 BF16 kernel (delta_cpu_bf16.h), gathered its way
};

// Whether a segment goes to the bf16 dot-product kernel: bf16 activations, a CPU (and selected
// instruction set) with AVX-512 BF16, and a delta that kernel takes (1, 2 or 4 bits, ...).
template <typename T>
static bool use_bf16_kernel(const Desc& d) {
#ifdef MESWITCH_X86
  return std::is_same_v<T, c10::BFloat16> && current_isa() == AVX512_BF16 && d.n > 0 &&
         isa_avx512_bf16::bf16_eligible(d);
#else
  (void)d;
  return false;
#endif
}

// Floats of gathered activations per token of a segment.
static int64_t gathered_floats(const Desc& d, bool bf16) {
#ifdef MESWITCH_X86
  if (bf16) return isa_avx512_bf16::bf_layout(d).stride;
#endif
  (void)bf16;
  return isa_generic::padded(d.n) + d.k + 1;  // xq, xs, xsum
}

template <typename T>
static void segmented_impl(const at::Tensor& x, at::Tensor& y, const at::Tensor& table, const at::Tensor& bounds,
                           int64_t layer, int64_t max_tokens) {
  const int64_t S = table.size(0), L = table.size(1), in = x.size(1), out = y.size(1);
  TORCH_CHECK(layer >= 0 && layer < L, "meswitch: layer index out of range");
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t* bnd = bounds.data_ptr<int64_t>();
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();

  std::vector<Segment> segs;
  size_t scratch = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t addr = tab[s * L + layer], a = bnd[2 * s], b = bnd[2 * s + 1];
    if (!addr || b <= a || b - a >= max_tokens) continue;
    TORCH_CHECK(a >= 0 && b <= x.size(0), "meswitch: segment [", a, ", ", b, ") outside the batch");
    Desc d = read_desc(addr);
    TORCH_CHECK(d.in == in && d.out == out, "meswitch: delta of shape [", d.out, ", ", d.in,
                "] applied to a layer of shape [", out, ", ", in, "]");
    const bool bf = use_bf16_kernel<T>(d);
    segs.push_back({d, a, b - a, scratch, bf});
    scratch += static_cast<size_t>((b - a) * gathered_floats(d, bf));
  }
  if (segs.empty()) return;

  std::vector<float> xg(scratch), tmp(static_cast<size_t>(isa_generic::padded(in)));
  for (const Segment& sg : segs) {
    float* xq = xg.data() + sg.x_off;
#ifdef MESWITCH_X86
    if (sg.bf16) {
      const auto L = isa_avx512_bf16::bf_layout(sg.d);
      std::vector<uint16_t> q(static_cast<size_t>(L.nb));
      for (int64_t t = 0; t < sg.tokens; ++t)
        isa_avx512_bf16::bf_gather_row(reinterpret_cast<const uint16_t*>(xp + (sg.a + t) * in), sg.d, L,
                                       xq + t * L.stride, q.data());
      continue;
    }
#endif
    const int64_t n16 = isa_generic::padded(sg.d.n);
    float* xs = xq + sg.tokens * n16;
    float* xsum = xs + sg.tokens * sg.d.k;
    for (int64_t t = 0; t < sg.tokens; ++t)
      isa_generic::gather_row<T>(xp + (sg.a + t) * in, sg.d, xq + t * n16, xs + t * sg.d.k, xsum + t, tmp.data());
  }

  // Work items: (segment, block of ROW_BLOCK output rows).
  std::vector<int64_t> first_item(segs.size() + 1, 0);
  for (size_t i = 0; i < segs.size(); ++i)
    first_item[i + 1] = first_item[i] + (segs[i].d.out + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t n_items = first_item.back();
  int64_t work_per_item = 0;
  for (const Segment& sg : segs) work_per_item = std::max(work_per_item, ROW_BLOCK * in * ((sg.tokens + 3) / 4));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, work_per_item));
  const RowsFn rows = rows_fn();

  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> wbuf(static_cast<size_t>(isa_generic::padded(in)));
    std::vector<float> acc, sal, bfbuf;
    size_t si = std::upper_bound(first_item.begin(), first_item.end(), begin) - first_item.begin() - 1;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= first_item[si + 1]) ++si;
      const Segment& sg = segs[si];
      const int64_t r0 = (item - first_item[si]) * ROW_BLOCK, r1 = std::min(sg.d.out, r0 + ROW_BLOCK);
      acc.resize(static_cast<size_t>(sg.tokens * (r1 - r0)));
      sal.resize(static_cast<size_t>(sg.d.k * (r1 - r0)));
      const float* xq = xg.data() + sg.x_off;
#ifdef MESWITCH_X86
      if (sg.bf16) {  // adds into y itself (T is BFloat16 here)
        bfbuf.resize(static_cast<size_t>(isa_avx512_bf16::bf_scratch_floats(sg.d)));
        isa_avx512_bf16::bf_segment_rows(sg.d, r0, r1, sg.tokens, xq,
                                         reinterpret_cast<c10::BFloat16*>(yp) + sg.a * out, out, bfbuf.data());
        continue;
      }
#endif
      const float* xs = xq + sg.tokens * isa_generic::padded(sg.d.n);
      rows(sg.d, r0, r1, sg.tokens, xq, xs, xs + sg.tokens * sg.d.k, acc.data(), r1 - r0, wbuf.data(), sal.data());
      for (int64_t t = 0; t < sg.tokens; ++t) {
        T* yr = yp + (sg.a + t) * out;
        const float* ar = acc.data() + t * (r1 - r0);
        for (int64_t o = r0; o < r1; ++o) yr[o] = static_cast<T>(static_cast<float>(yr[o]) + ar[o - r0]);
      }
    }
  });
}

void segmented_delta_mm(const at::Tensor& x, at::Tensor& y, const at::Tensor& table, const at::Tensor& bounds,
                        int64_t layer, int64_t max_tokens) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "meswitch: the CPU kernel takes CPU tensors");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "meswitch: x [N, in] and y [N, out] expected");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "meswitch: x and y must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "meswitch: x and y must have the same dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.is_contiguous(), "meswitch: bad table");
  TORCH_CHECK(bounds.scalar_type() == at::kLong && bounds.dim() == 2 && bounds.size(1) == 2 &&
                  bounds.size(0) == table.size(0) && bounds.is_contiguous(),
              "meswitch: bad segment bounds");
  switch (x.scalar_type()) {
    case at::kFloat: return segmented_impl<float>(x, y, table, bounds, layer, max_tokens);
    case at::kBFloat16: return segmented_impl<c10::BFloat16>(x, y, table, bounds, layer, max_tokens);
    case at::kHalf: return segmented_impl<c10::Half>(x, y, table, bounds, layer, max_tokens);
    default: TORCH_CHECK(false, "meswitch: unsupported activation dtype ", x.scalar_type());
  }
}

at::Tensor dequantize(const at::Tensor& desc, const c10::optional<at::Tensor>& rows, at::ScalarType dtype,
                      const c10::optional<at::Tensor>& base, const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(desc.scalar_type() == at::kLong && desc.numel() == DESC_FIELDS && desc.is_contiguous(),
              "meswitch: bad descriptor tensor");
  const Desc d = read_desc(reinterpret_cast<int64_t>(desc.data_ptr<int64_t>()));
  const int64_t* rp = nullptr;
  int64_t n_rows = d.out;
  at::Tensor r;
  if (rows.has_value()) {
    r = rows->to(at::kLong).contiguous();
    rp = r.data_ptr<int64_t>();
    n_rows = r.numel();
    for (int64_t i = 0; i < n_rows; ++i)
      TORCH_CHECK(rp[i] >= 0 && rp[i] < d.out, "meswitch: row ", rp[i], " out of range");
  }
  if (base.has_value()) {
    TORCH_CHECK(base->device().is_cpu() && base->scalar_type() == dtype && base->dim() == 2 &&
                    base->size(0) == d.out && base->size(1) == d.in && base->is_contiguous(),
                "meswitch: base must be a contiguous CPU [", d.out, ", ", d.in, "] tensor of the output dtype");
  }
  at::Tensor o;
  if (out.has_value()) {  // a buffer the caller reuses: fresh pages of a large new tensor cost more than the work
    TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == dtype && out->dim() == 2 && out->size(0) == n_rows &&
                    out->size(1) == d.in && out->is_contiguous(),
                "meswitch: out must be a contiguous CPU [", n_rows, ", ", d.in, "] tensor of the output dtype");
    o = *out;
  } else {
    o = at::empty({n_rows, d.in}, desc.options().dtype(dtype));
  }
  switch (dtype) {
    case at::kFloat: dequantize_dispatch<float>(d, rp, n_rows, o, base); break;
    case at::kBFloat16: dequantize_dispatch<c10::BFloat16>(d, rp, n_rows, o, base); break;
    case at::kHalf: dequantize_dispatch<c10::Half>(d, rp, n_rows, o, base); break;
    default: TORCH_CHECK(false, "meswitch: unsupported output dtype ", dtype);
  }
  return o;
}

}  // namespace meswitch_cpu

TORCH_LIBRARY(meswitch, m) {
  m.def("segmented_delta_mm(Tensor x, Tensor(a!) y, Tensor table, Tensor bounds, int layer, int max_tokens) -> ()",
        &meswitch_cpu::segmented_delta_mm);
  m.def("dequantize(Tensor desc, Tensor? rows, ScalarType dtype, Tensor? base=None, Tensor(a!)? out=None) -> Tensor",
        &meswitch_cpu::dequantize);
  m.def("select_isa(str name) -> str", &meswitch_cpu::select_isa);
}
