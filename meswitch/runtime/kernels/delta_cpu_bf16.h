// bfloat16 activations on CPUs with AVX-512 BF16 (vdpbf16ps): two multiply-adds per lane per
// instruction instead of one. delta_cpu.cpp includes this file once, in the namespace compiled
// for AVX-512 BF16 (MESWITCH_ISA 3), after delta_cpu_impl.h.
//
// What is computed is the same as delta_cpu_impl.h's (docs/FORMAT.md, "Reconstruction"), factored
// per step-size group g of row o:
//     sum_j x_j * (q_j * s_g + z_g) = s_g * sum_j q_j * x_j  +  z_g * sum_j x_j.
// The codes q_j (0 .. 15) and bf16 activations x_j are exact in bf16, so each product q_j * x_j
// is exact in float32; vdpbf16ps adds them into float32 lanes. The only rounding is float32
// accumulation (as in the float path, in another order), far below the bf16 output rounding.
// sum_j x_j is computed once per token and group when the activations are gathered.
//
// Which deltas: b in {1, 2, 4}, with one step size per row or groups of whole blocks (below);
// anything else (3 and 8 bits, groups that straddle blocks) takes the float path.
//
// Reading codes. A block is 32 bytes = 256/b codes, widened to 32 16-bit lanes (vpmovzxbw):
// lane i holds byte i, whose bits [p*b, p*b + b) are code i*(8/b) + p ("plane" p). vpermw looks
// up the low 5 bits of each lane in a 32-entry table; table r's entry e is bf16((e >> r) & (2^b-1)),
// which picks one code out of those 5 bits and turns it into a bf16 number in one instruction.
// The planes within bits 0-4 are read from the widened bytes directly, the others from the bytes
// shifted right once (by 4, or 5 for 1-bit codes). Per 32 codes: a lookup (plus one shift per
// block) and one vdpbf16ps per token. The activations are gathered in the same
// plane order (BF layout below). A row's last block may be partial: only the row's own bytes are
// loaded (a masked load, the rest read as 0), and the activations past the row's n codes are 0.
//
// Gathered activations of one token, in float-sized slots (`BfLayout`):
//   [0, nb/2)                 activations of the nb = n rounded up to a block, bf16, plane order
//   [nb/2, + k)               the salient columns' activations, float32
//   [.., + n_groups)          sum of the quantized columns' activations per group, float32

struct BfLayout {
  int64_t blk, nb, k, groups, stride;  // stride: floats per token
  int64_t xs() const { return nb / 2; }
  int64_t sums() const { return nb / 2 + k; }
};

static inline bool bf16_eligible(const Desc& d) {
  if (d.bits != 1 && d.bits != 2 && d.bits != 4) return false;
  return d.n_groups == 1 || d.group_size % (256 / d.bits) == 0;
}

static inline BfLayout bf_layout(const Desc& d) {
  BfLayout L;
  L.blk = 256 / d.bits;
  L.nb = (d.n + L.blk - 1) / L.blk * L.blk;
  L.k = d.k;
  L.groups = d.n_groups;
  L.stride = L.nb / 2 + L.k + L.groups;
  return L;
}

static inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The planes of one block of 32 * P codes' activations v[0 .. P) (in column order): out[p] holds
// columns p, p + P, p + 2P, ... Deinterleaving halves the plane count: the even columns of the
// block are planes 0, 2, 4, ... of it and the odd ones planes 1, 3, 5, ..., each of those a
// block of 32 * P / 2 columns with P / 2 planes (two vpermt2w per pair of vectors and level).
template <int P>
static HOT void bf_planes(const __m512i* v, __m512i* out) {
  if constexpr (P == 1) {
    out[0] = v[0];
  } else {
    alignas(64) static constexpr uint16_t EVEN[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                      22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                      44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
    const __m512i even = _mm512_load_si512(EVEN), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    __m512i e[P / 2], o[P / 2], pe[P / 2], po[P / 2];
    for (int k = 0; k < P / 2; ++k) {
      e[k] = _mm512_permutex2var_epi16(v[2 * k], even, v[2 * k + 1]);
      o[k] = _mm512_permutex2var_epi16(v[2 * k], odd, v[2 * k + 1]);
    }
    bf_planes<P / 2>(e, pe);
    bf_planes<P / 2>(o, po);
    for (int k = 0; k < P / 2; ++k) {
      out[2 * k] = pe[k];
      out[2 * k + 1] = po[k];
    }
  }
}

// sum_i x_i over n bf16 values (bits) at q, in float32.
static HOT float bf_sum(const uint16_t* q, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(
                                 _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i))), 16)));
  if (i < n) {
    const __m256i tail = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (n - i)) - 1), q + i);
    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(tail), 16)));
  }
  return _mm512_reduce_add_ps(acc);
}

// One token's row x (bf16 bits, `in` columns) into dst (L.stride floats). `q`: scratch of L.nb
// codes' activations: the quantized columns in order (runs between salient columns copied
// whole), zero padded to the last block, then each block's planes (bf_planes) written to dst.
template <int B>
static void bf_gather_row_b(const uint16_t* x, const Desc& d, const BfLayout& L, float* dst, uint16_t* q) {
  constexpr int P = 8 / B;
  int64_t col = 0, j = 0;
  float* xs = dst + L.xs();
  for (int64_t s = 0; s <= d.k; ++s) {
    const int64_t stop = s < d.k ? d.salient_idx[s] : d.in;
    std::memcpy(q + j, x + col, sizeof(uint16_t) * static_cast<size_t>(stop - col));
    j += stop - col;
    col = stop;
    if (s < d.k) xs[s] = bf16_bits_to_float(x[col++]);
  }
  std::memset(q + d.n, 0, sizeof(uint16_t) * static_cast<size_t>(L.nb - d.n));
  float* sums = dst + L.sums();
  for (int64_t g = 0; g < d.n_groups; ++g) {
    const int64_t a = g * d.group_size, b = g + 1 == d.n_groups ? d.n : std::min(d.n, a + d.group_size);
    sums[g] = bf_sum(q + a, b - a);
  }
  uint16_t* xb = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j0 = 0; j0 < L.nb; j0 += 32 * P) {
    __m512i v[P], out[P];
    for (int p = 0; p < P; ++p) v[p] = _mm512_loadu_si512(q + j0 + 32 * p);
    bf_planes<P>(v, out);
    for (int p = 0; p < P; ++p) _mm512_storeu_si512(xb + j0 + 32 * p, out[p]);
  }
}

static void bf_gather_row(const uint16_t* x, const Desc& d, const BfLayout& L, float* dst, uint16_t* q) {
  switch (d.bits) {
    case 1: return bf_gather_row_b<1>(x, d, L, dst, q);
    case 2: return bf_gather_row_b<2>(x, d, L, dst, q);
    default: return bf_gather_row_b<4>(x, d, L, dst, q);
  }
}

// Accumulators of NT tokens (named, so that GCC keeps them in registers; see Acc in
// delta_cpu_impl.h). vdpbf16ps has a latency of several cycles: with fewer than 4 tokens each
// token gets SLOTS = 4 / NT chains.
template <int NT>
struct BfAcc {
  static constexpr int SLOTS = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  // (zeroed with {} rather than _mm512_setzero_ps: GCC compiles the implicit constructor without
  // the enclosing `#pragma GCC target`, and an intrinsic there fails to inline)
  __m512 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};

  static HOT __m512 dp(__m512 acc, __m512i w, const float* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
  }

  // 32 bf16 weights w against 32 bf16 activations at x (token t at x + t * stride, in floats).
  template <int SLOT>
  HOT void add(__m512i w, const float* x, int64_t stride) {
    if constexpr (NT == 1) {
      if constexpr (SLOT == 0) a0 = dp(a0, w, x);
      if constexpr (SLOT == 1) a1 = dp(a1, w, x);
      if constexpr (SLOT == 2) a2 = dp(a2, w, x);
      if constexpr (SLOT == 3) a3 = dp(a3, w, x);
    } else if constexpr (NT == 2) {
      if constexpr (SLOT == 0) {
        a0 = dp(a0, w, x);
        a1 = dp(a1, w, x + stride);
      } else {
        a2 = dp(a2, w, x);
        a3 = dp(a3, w, x + stride);
      }
    } else {
      a0 = dp(a0, w, x);
      a1 = dp(a1, w, x + stride);
      a2 = dp(a2, w, x + 2 * stride);
      if constexpr (NT > 3) a3 = dp(a3, w, x + 3 * stride);
      if constexpr (NT > 4) a4 = dp(a4, w, x + 4 * stride);
      if constexpr (NT > 5) a5 = dp(a5, w, x + 5 * stride);
      if constexpr (NT > 6) a6 = dp(a6, w, x + 6 * stride);
      if constexpr (NT > 7) a7 = dp(a7, w, x + 7 * stride);
    }
  }

  // Two rows at once: w for this row, w2 for the next one (accumulators in `b`), against the same
  // activations: each activation vector is loaded once for both (loads, not multiply-adds, are
  // what one row at a time runs out of with several tokens).
  template <int SLOT>
  HOT void add2(BfAcc& b, __m512i w, __m512i w2, const float* x, int64_t stride) {
#define MESWITCH_DP2(A, T)                                          \
  {                                                                 \
    const __m512i xv = _mm512_loadu_si512(x + (T) * stride);        \
    A = _mm512_dpbf16_ps(A, (__m512bh)w, (__m512bh)xv);             \
    b.A = _mm512_dpbf16_ps(b.A, (__m512bh)w2, (__m512bh)xv);        \
  }
    if constexpr (NT == 1) {
      if constexpr (SLOT == 0) MESWITCH_DP2(a0, 0)
      if constexpr (SLOT == 1) MESWITCH_DP2(a1, 0)
      if constexpr (SLOT == 2) MESWITCH_DP2(a2, 0)
      if constexpr (SLOT == 3) MESWITCH_DP2(a3, 0)
    } else if constexpr (NT == 2) {
      if constexpr (SLOT == 0) {
        MESWITCH_DP2(a0, 0)
        MESWITCH_DP2(a1, 1)
      } else {
        MESWITCH_DP2(a2, 0)
        MESWITCH_DP2(a3, 1)
      }
    } else {
      MESWITCH_DP2(a0, 0)
      MESWITCH_DP2(a1, 1)
      MESWITCH_DP2(a2, 2)
      if constexpr (NT > 3) MESWITCH_DP2(a3, 3)
      if constexpr (NT > 4) MESWITCH_DP2(a4, 4)
      if constexpr (NT > 5) MESWITCH_DP2(a5, 5)
      if constexpr (NT > 6) MESWITCH_DP2(a6, 6)
      if constexpr (NT > 7) MESWITCH_DP2(a7, 7)
    }
#undef MESWITCH_DP2
  }

  // Per token t: its 16 lanes (the chains added together) stored at v + t * tstride.
  HOT void store_lanes(float* v, int64_t tstride) const {
    if constexpr (NT == 1) {
      _mm512_storeu_ps(v, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    } else if constexpr (NT == 2) {
      _mm512_storeu_ps(v, _mm512_add_ps(a0, a2));
      _mm512_storeu_ps(v + tstride, _mm512_add_ps(a1, a3));
    } else {
      _mm512_storeu_ps(v, a0);
      _mm512_storeu_ps(v + tstride, a1);
      _mm512_storeu_ps(v + 2 * tstride, a2);
      if constexpr (NT > 3) _mm512_storeu_ps(v + 3 * tstride, a3);
      if constexpr (NT > 4) _mm512_storeu_ps(v + 4 * tstride, a4);
      if constexpr (NT > 5) _mm512_storeu_ps(v + 5 * tstride, a5);
      if constexpr (NT > 6) _mm512_storeu_ps(v + 6 * tstride, a6);
      if constexpr (NT > 7) _mm512_storeu_ps(v + 7 * tstride, a7);
    }
  }

  // Per token: the dot product so far; the accumulators restart from zero.
  HOT void take(float* d) {
    const __m512 z = {};
    if constexpr (NT == 1) {
      d[0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      a0 = a1 = a2 = a3 = z;
    } else if constexpr (NT == 2) {
      d[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a2));
      d[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, a3));
      a0 = a1 = a2 = a3 = z;
    } else {
      d[0] = _mm512_reduce_add_ps(a0);
      d[1] = _mm512_reduce_add_ps(a1);
      d[2] = _mm512_reduce_add_ps(a2);
      if constexpr (NT > 3) d[3] = _mm512_reduce_add_ps(a3);
      if constexpr (NT > 4) d[4] = _mm512_reduce_add_ps(a4);
      if constexpr (NT > 5) d[5] = _mm512_reduce_add_ps(a5);
      if constexpr (NT > 6) d[6] = _mm512_reduce_add_ps(a6);
      if constexpr (NT > 7) d[7] = _mm512_reduce_add_ps(a7);
      a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z;
    }
  }
};

// The vpermw tables: t[r] entry e = bf16((e >> r) & (2^B - 1)), a small integer's bf16 bits.
template <int B>
struct BfTables {
  __m512i t[5];
  BfTables() {
    for (int r = 0; r < 5; ++r) {
      alignas(64) uint16_t v[32];
      for (int e = 0; e < 32; ++e) {
        const float f = static_cast<float>((e >> r) & ((1 << B) - 1));
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        v[e] = static_cast<uint16_t>(u >> 16);  // exact: small integers need few mantissa bits
      }
      t[r] = _mm512_load_si512(v);
    }
  }
};

// Plane P of a block as 32 bf16 weights: `lo` = the widened bytes, `hi` = them shifted by HI.
template <int B>
constexpr int BF_HI = B == 1 ? 5 : 4;

template <int B, int P>
static HOT __m512i bf_plane(__m512i lo, __m512i hi, const __m512i* t) {
  constexpr bool low = (P + 1) * B <= 5;  // all of the plane's bits among bits 0-4
  return _mm512_permutexvar_epi16(low ? lo : hi, t[low ? P * B : P * B - BF_HI<B>]);
}

// The 32 bytes of codes at j of a row (only the row's own bytes: a masked load at its end),
// widened to 16-bit lanes.
template <int B>
static HOT __m512i bf_block_bytes(const Desc& d, const uint8_t* row, int64_t j) {
  const uint8_t* p = row + j * B / 8;
  const int64_t left = d.row_bytes - j * B / 8;
  const __m256i raw = __builtin_expect(left >= 32, 1)
                          ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                          : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t{1} << left) - 1), p);
  return _mm512_cvtepu8_epi16(raw);
}

// Row o (the ro-th of its block of 16) against NT tokens whose gathered rows start at x, quantized
// columns only. One step size per row: token t's 16 float32 lanes of sum_j q_j x_j go to
// lanes[t * 256 + ro * 16 ..] (scaled later, 16 rows at once). Groups: the row's dot product
// sum_g s_g * sum_j q_j x_j + z_g * sum_j x_j goes to fin[t * 16 + ro].
template <int B, int NT>
static HOT void bf_row(const Desc& d, const BfLayout& L, int64_t o, int64_t ro, const float* x, const __m512i* t,
                       float* lanes, float* fin) {
  const uint8_t* row = d.codes + o * d.row_bytes;
  const c10::Half* sr = d.scale + o * d.param_stride;
  const c10::Half* zr = d.offset + o * d.param_stride;
  constexpr int64_t BLK = 256 / B;
  constexpr int SL = BfAcc<NT>::SLOTS;
  const int64_t stride = L.stride;
  BfAcc<NT> a;
  float dot[8], acc[8] = {};
  int64_t j = 0;
  for (int64_t g = 0; g < d.n_groups; ++g) {
    const int64_t end = g + 1 == d.n_groups ? d.n : (g + 1) * d.group_size;
    for (; j < end; j += BLK) {
      const __m512i bytes = bf_block_bytes<B>(d, row, j);
      const __m512i hi = _mm512_srli_epi16(bytes, BF_HI<B>);
      const float* xj = x + j / 2;
      a.template add<0>(bf_plane<B, 0>(bytes, hi, t), xj, stride);
      a.template add<1 % SL>(bf_plane<B, 1>(bytes, hi, t), xj + 16, stride);
      if constexpr (B <= 2) {
        a.template add<2 % SL>(bf_plane<B, 2>(bytes, hi, t), xj + 32, stride);
        a.template add<3 % SL>(bf_plane<B, 3>(bytes, hi, t), xj + 48, stride);
      }
      if constexpr (B == 1) {
        a.template add<4 % SL>(bf_plane<B, 4>(bytes, hi, t), xj + 64, stride);
        a.template add<5 % SL>(bf_plane<B, 5>(bytes, hi, t), xj + 80, stride);
        a.template add<6 % SL>(bf_plane<B, 6>(bytes, hi, t), xj + 96, stride);
        a.template add<7 % SL>(bf_plane<B, 7>(bytes, hi, t), xj + 112, stride);
      }
    }
    if (d.n_groups == 1) return a.store_lanes(lanes + ro * 16, 256);
    a.take(dot);
    const float s = h2f(sr[g]), z = h2f(zr[g]);
    const float* sums = x + L.sums() + g;
    for (int t = 0; t < NT; ++t) acc[t] += s * dot[t] + z * sums[t * stride];
  }
  for (int t = 0; t < NT; ++t) fin[t * 16 + ro] = acc[t];
}

// Rows o and o + 1 (the ro-th and next of their block), one step size per row: as bf_row, with
// every activation vector shared by the two rows (BfAcc::add2).
template <int B, int NT>
static HOT void bf_row_pair(const Desc& d, const BfLayout& L, int64_t o, int64_t ro, const float* x,
                            const __m512i* t, float* lanes) {
  const uint8_t* ra = d.codes + o * d.row_bytes;
  const uint8_t* rb = ra + d.row_bytes;
  constexpr int64_t BLK = 256 / B;
  constexpr int SL = BfAcc<NT>::SLOTS;
  const int64_t stride = L.stride;
  BfAcc<NT> a, b;
  for (int64_t j = 0; j < d.n; j += BLK) {
    const __m512i la = bf_block_bytes<B>(d, ra, j), lb = bf_block_bytes<B>(d, rb, j);
    const __m512i ha = _mm512_srli_epi16(la, BF_HI<B>), hb = _mm512_srli_epi16(lb, BF_HI<B>);
    const float* xj = x + j / 2;
    a.template add2<0>(b, bf_plane<B, 0>(la, ha, t), bf_plane<B, 0>(lb, hb, t), xj, stride);
    a.template add2<1 % SL>(b, bf_plane<B, 1>(la, ha, t), bf_plane<B, 1>(lb, hb, t), xj + 16, stride);
    if constexpr (B <= 2) {
      a.template add2<2 % SL>(b, bf_plane<B, 2>(la, ha, t), bf_plane<B, 2>(lb, hb, t), xj + 32, stride);
      a.template add2<3 % SL>(b, bf_plane<B, 3>(la, ha, t), bf_plane<B, 3>(lb, hb, t), xj + 48, stride);
    }
    if constexpr (B == 1) {
      a.template add2<4 % SL>(b, bf_plane<B, 4>(la, ha, t), bf_plane<B, 4>(lb, hb, t), xj + 64, stride);
      a.template add2<5 % SL>(b, bf_plane<B, 5>(la, ha, t), bf_plane<B, 5>(lb, hb, t), xj + 80, stride);
      a.template add2<6 % SL>(b, bf_plane<B, 6>(la, ha, t), bf_plane<B, 6>(lb, hb, t), xj + 96, stride);
      a.template add2<7 % SL>(b, bf_plane<B, 7>(la, ha, t), bf_plane<B, 7>(lb, hb, t), xj + 112, stride);
    }
  }
  a.store_lanes(lanes + ro * 16, 256);
  b.store_lanes(lanes + (ro + 1) * 16, 256);
}

// Rows [r0, r1) against NT tokens (bf_row, inlined: one call per block of rows).
template <int B, int NT>
static void bf_rows(const Desc& d, const BfLayout& L, int64_t r0, int64_t r1, const float* x, float* lanes,
                    float* fin) {
  static const BfTables<B> tb;
  __m512i t[5];
  for (int r = 0; r < 5; ++r) t[r] = tb.t[r];
  int64_t o = r0;
  if (d.n_groups == 1)
    for (; o + 1 < r1; o += 2) bf_row_pair<B, NT>(d, L, o, o - r0, x, t, lanes);
  for (; o < r1; ++o) bf_row<B, NT>(d, L, o, o - r0, x, t, lanes, fin);
}

template <int B>
static void bf_rows_t(const Desc& d, const BfLayout& L, int64_t r0, int64_t r1, int nt, const float* x, float* lanes,
                      float* fin) {
  switch (nt) {
    case 1: return bf_rows<B, 1>(d, L, r0, r1, x, lanes, fin);
    case 2: return bf_rows<B, 2>(d, L, r0, r1, x, lanes, fin);
    case 3: return bf_rows<B, 3>(d, L, r0, r1, x, lanes, fin);
    case 4: return bf_rows<B, 4>(d, L, r0, r1, x, lanes, fin);
    case 5: return bf_rows<B, 5>(d, L, r0, r1, x, lanes, fin);
    case 6: return bf_rows<B, 6>(d, L, r0, r1, x, lanes, fin);
    case 7: return bf_rows<B, 7>(d, L, r0, r1, x, lanes, fin);
    default: return bf_rows<B, 8>(d, L, r0, r1, x, lanes, fin);
  }
}

// Lane r of the result: the sum of the 16 lanes of v[r] (16 vectors of 16 floats at v): a tree
// of pairwise sums, each step adding the even and the odd lanes of two vectors, so that lanes
// of different rows never mix (3 instructions per pair: 15 pairs for 16 rows).
static HOT __m512 sum_rows16(const float* v) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  __m512 a[16];
  for (int r = 0; r < 16; ++r) a[r] = _mm512_loadu_ps(v + 16 * r);
  for (int n = 16; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i)
      a[i] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * i], even, a[2 * i + 1]),
                           _mm512_permutex2var_ps(a[2 * i], odd, a[2 * i + 1]));
  return a[0];
}

// Floats of scratch bf_segment_rows needs for a delta with k salient columns.
static inline int64_t bf_scratch_floats(const Desc& d) { return 8 * 256 + 8 * 16 + 16 * d.k; }

// Output rows [r0, r1) (at most 16) of one segment of `tokens` tokens whose gathered activations
// (bf_gather_row) start at xg, added into y in place: y[t * y_stride + o] += x_t . D[o], rounded
// once to bf16. Rows are finished 16 at a time in vector registers: step sizes, offsets, the
// salient columns and the addition into y. `buf`: bf_scratch_floats(d) floats.
static void bf_segment_rows(const Desc& d, int64_t r0, int64_t r1, int64_t tokens, const float* xg,
                            c10::BFloat16* y, int64_t y_stride, float* buf) {
  const BfLayout L = bf_layout(d);
  const int64_t R = r1 - r0;
  const __mmask16 m = static_cast<__mmask16>((1u << R) - 1);
  float* lanes = buf;              // [8 tokens][16 rows][16 lanes]
  float* fin = buf + 8 * 256;      // [8 tokens][16 rows]
  float* salT = fin + 8 * 16;      // [k][16 rows]: salient values, transposed
  if (R < 16) std::memset(lanes, 0, sizeof(float) * 8 * 256);
  for (int64_t i = 0; i < d.k; ++i)
    for (int64_t r = 0; r < 16; ++r) salT[i * 16 + r] = r < R ? h2f(d.salient_values[(r0 + r) * d.k + i]) : 0.f;
  __m512 s = _mm512_set1_ps(h2f(d.scale[0])), z = _mm512_set1_ps(h2f(d.offset[0]));
  if (d.n_groups == 1 && d.param_stride) {  // one step size per row: rows r0 .. r1
    s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, d.scale + r0));
    z = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, d.offset + r0));
  }
  for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
    const int nt = static_cast<int>(std::min<int64_t>(8, tokens - t0));
    const float* x = xg + t0 * L.stride;
    switch (d.bits) {
      case 1: bf_rows_t<1>(d, L, r0, r1, nt, x, lanes, fin); break;
      case 2: bf_rows_t<2>(d, L, r0, r1, nt, x, lanes, fin); break;
      default: bf_rows_t<4>(d, L, r0, r1, nt, x, lanes, fin); break;
    }
    for (int t = 0; t < nt; ++t) {
      const float* xt = x + t * L.stride;
      __m512 v;
      if (d.n_groups == 1)
        v = _mm512_fmadd_ps(s, sum_rows16(lanes + t * 256), _mm512_mul_ps(z, _mm512_set1_ps(xt[L.sums()])));
      else
        v = _mm512_loadu_ps(fin + t * 16);
      for (int64_t i = 0; i < d.k; ++i)
        v = _mm512_fmadd_ps(_mm512_loadu_ps(salT + i * 16), _mm512_set1_ps(xt[L.xs() + i]), v);
      c10::BFloat16* yr = y + (t0 + t) * y_stride + r0;
      const __m512 old = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, yr)), 16));
      _mm256_mask_storeu_epi16(yr, m, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(old, v)));
    }
  }
}
