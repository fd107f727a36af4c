// The portable CPU delta kernel (meswitch/runtime/kernels/delta_cpu_impl.h, MESWITCH_ISA 0: what
// ARM64 and other non-x86 CPUs run, vectorised by the compiler) against a plain reference, as a
// standalone program without PyTorch's libraries. tests/test_kernel_native.py builds it with the
// host compiler and, where a cross compiler and an emulator are installed, for ARM64 (run under
// qemu), so the ARM64 build is checked on an x86 machine.
//
// Only header-only parts of PyTorch are used (c10::Half); at::parallel_for is replaced by a
// serial loop. Exit status 0 when every case is within 1e-5 relative of the reference.
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace at {
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t, const F& f) {
  if (begin < end) f(begin, end);
}
}  // namespace at

namespace meswitch_cpu {
#include "delta_cpu_desc.h"
namespace isa_generic {
#define MESWITCH_ISA 0
#include "delta_cpu_impl.h"
#undef MESWITCH_ISA
}  // namespace isa_generic
}  // namespace meswitch_cpu

using meswitch_cpu::Desc;

namespace {

// Codes packed as docs/FORMAT.md says: per row a little-endian bit stream, code j at bits
// [j*b, (j+1)*b), bit 0 the least significant bit of byte 0.
std::vector<uint8_t> pack(const std::vector<int>& codes, int64_t rows, int64_t cols, int bits, int64_t row_bytes) {
  std::vector<uint8_t> out(static_cast<size_t>(rows * row_bytes), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      for (int i = 0; i < bits; ++i)
        if (codes[r * cols + j] >> i & 1) {
          const int64_t bit = j * bits + i;
          out[r * row_bytes + bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
        }
  return out;
}

struct Case {
  int64_t out, in, k, group;  // group 0: one step size per row
};

// One delta and `tokens` random activations: the kernel's rows against a double-precision
// reconstruction. Returns the largest error relative to the largest reference value.
double check(const Case& c, int bits, int64_t tokens, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::normal_distribution<float> g(0.f, 1.f);
  const int64_t n = c.in - c.k;
  const int64_t group = c.group ? c.group : std::max<int64_t>(n, 1);
  const int64_t groups = c.group ? (n + c.group - 1) / c.group : 1;
  const int64_t row_bytes = (n * bits + 7) / 8;

  std::vector<int32_t> sal(static_cast<size_t>(c.in));
  for (int64_t i = 0; i < c.in; ++i) sal[i] = static_cast<int32_t>(i);
  std::shuffle(sal.begin(), sal.end(), rng);
  sal.resize(static_cast<size_t>(c.k));
  std::sort(sal.begin(), sal.end());
  std::vector<int> codes(static_cast<size_t>(c.out * n));
  for (int& q : codes) q = static_cast<int>(rng() % (1u << bits));
  const std::vector<uint8_t> packed = pack(codes, c.out, n, bits, row_bytes);
  std::vector<c10::Half> scale(static_cast<size_t>(c.out * groups)), offset(scale.size()),
      salient(static_cast<size_t>(c.out * c.k));
  for (size_t i = 0; i < scale.size(); ++i) {
    scale[i] = c10::Half(u(rng) * 0.01f + 0.001f);
    offset[i] = c10::Half(-static_cast<float>(scale[i]) * u(rng) * static_cast<float>(1 << bits));
  }
  for (auto& v : salient) v = c10::Half(g(rng) * 0.05f);

  Desc d{c.out, c.in, bits, n, group, groups, groups, c.k, row_bytes,
         packed.data(), scale.data(), offset.data(), sal.data(), salient.data()};

  std::vector<float> x(static_cast<size_t>(tokens * c.in));
  for (float& v : x) v = g(rng);

  // The kernel, as delta_cpu.cpp drives it: gather every token, then blocks of 16 output rows.
  using namespace meswitch_cpu::isa_generic;
  const int64_t n16 = padded(n);
  std::vector<float> xq(static_cast<size_t>(tokens * n16)), xs(static_cast<size_t>(tokens * c.k + 1)),
      xsum(static_cast<size_t>(tokens)), tmp(static_cast<size_t>(padded(c.in))), wbuf(static_cast<size_t>(n16)),
      sal_buf(static_cast<size_t>(16 * c.k + 1)), acc(static_cast<size_t>(16 * tokens)),
      y(static_cast<size_t>(tokens * c.out));
  for (int64_t t = 0; t < tokens; ++t)
    gather_row<float>(x.data() + t * c.in, d, xq.data() + t * n16, xs.data() + t * c.k, xsum.data() + t, tmp.data());
  for (int64_t r0 = 0; r0 < c.out; r0 += 16) {
    const int64_t r1 = std::min(c.out, r0 + 16);
    segment_rows(d, r0, r1, tokens, xq.data(), xs.data(), xsum.data(), acc.data(), r1 - r0, wbuf.data(),
                 sal_buf.data());
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t o = r0; o < r1; ++o) y[t * c.out + o] = acc[t * (r1 - r0) + (o - r0)];
  }

  // Reference: D rebuilt column by column (docs/FORMAT.md, "Reconstruction"), in double.
  double worst = 0, biggest = 1e-30;
  for (int64_t o = 0; o < c.out; ++o) {
    std::vector<double> row(static_cast<size_t>(c.in));
    int64_t j = 0, s = 0;
    for (int64_t col = 0; col < c.in; ++col) {
      if (s < c.k && sal[s] == col) {
        row[col] = static_cast<float>(salient[o * c.k + s++]);
      } else {
        const int64_t gi = j / group;
        row[col] = codes[o * n + j] * static_cast<double>(static_cast<float>(scale[o * groups + gi])) +
                   static_cast<float>(offset[o * groups + gi]);
        ++j;
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      double want = 0;
      for (int64_t col = 0; col < c.in; ++col) want += row[col] * x[t * c.in + col];
      worst = std::max(worst, std::fabs(want - y[t * c.out + o]));
      biggest = std::max(biggest, std::fabs(want));
    }
  }
  return worst / biggest;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  // (out, in, salient, group): odd shapes, 0 / 1 / several salient columns, groups that do and do
  // not fill whole blocks of codes
  const Case cases[] = {{64, 128, 0, 0}, {37, 101, 1, 0}, {130, 577, 6, 0}, {19, 300, 0, 64},
                        {21, 513, 0, 128}, {9, 250, 0, 48}, {16, 200, 0, 100}, {33, 1100, 11, 0}};
  int failures = 0, checked = 0;
  for (int bits : {1, 2, 3, 4, 8})
    for (const Case& c : cases)
      for (int64_t tokens : {1, 2, 3, 5, 8, 17}) {
        const double err = check(c, bits, tokens, rng);
        ++checked;
        if (!(err < 1e-5)) {
          ++failures;
          std::printf("FAIL bits=%d out=%lld in=%lld salient=%lld group=%lld tokens=%lld: relative error %.3g\n",
                      bits, static_cast<long long>(c.out), static_cast<long long>(c.in),
                      static_cast<long long>(c.k), static_cast<long long>(c.group), static_cast<long long>(tokens), err);
        }
      }
  std::printf("%d of %d cases within 1e-5 relative\n", checked - failures, checked);
  return failures ? 1 : 0;
}
