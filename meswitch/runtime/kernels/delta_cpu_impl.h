// The delta kernels themselves, written once with GCC vector extensions and compiled once per
// instruction set: delta_cpu.cpp includes this file inside a namespace, with MESWITCH_ISA set
// (3: AVX-512 with BF16, 2: AVX-512, 1: AVX2 + FMA + F16C, 0: the target's baseline; 3 compiles the
// same code as 2 here, and adds delta_cpu_bf16.h's kernel for bf16 activations) and a matching
// `#pragma GCC target`. The same source gives 16-lane AVX-512 code, 2 x 8-lane AVX2 code, SSE2
// code, or NEON code on ARM64; nothing here depends on the layout of another library.
//
// What is computed (docs/FORMAT.md, "Reconstruction"): for a quantized delta D [out, in] with
// salient columns S (sorted, k of them) and n = in - k quantized columns in increasing order,
//     D[o, q_j] = code[o, j] * scale[o, g(j)] + offset[o, g(j)]      (g(j) = j / group_size)
//     D[o, S_s] = salient[o, s]
// and for activations x [T, in]:  y[t, o] += sum_i x[t, i] * D[o, i].
//
// The kernel never expands D: per output row it reads the row's packed codes, turns them into
// floats in registers and accumulates code * x for up to 4 tokens at once (8 with AVX-512;
// ROW_TOKENS), more tokens in further passes over the row. With one step size per row the row
// ends as scale * sum(code x) + offset * sum(x) (sum(x) gathered once per token); with groups,
// w = code * scale + offset is rebuilt in registers (one FMA per 16 weights).
//
// Reading codes. For b in {1, 2, 4, 8} a row is read in blocks of 16 bytes (128/b codes): the 16
// bytes are widened to 16 lanes, and lane i of "plane" p = (byte_i >> p*b) & mask holds code
// i*(8/b) + p. One load and one widening give 8/b vectors of 16 codes, each for one shift and
// one mask. The codes of a plane are not consecutive; instead of shuffling them back, the
// activations are gathered once per call in the same order (BLOCKED layout below), which costs
// n floats per token against n codes per output row. Codes after the last whole block, and all
// 3-bit codes (8 codes in 3 bytes), are read 16 at a time: 16 codes of b bits are 2b bytes, one
// 64-bit word holding codes 0-7 in its low 8b bits and codes 8-15 in the next 8b bits; each half
// is broadcast to 8 lanes and lane i shifted right by (i % 8) * b. The last 16 codes of a row may
// run past its end: only the row's own bytes are read (the rest as 0), and the activations are
// zero-padded to n16 = n rounded up to 16, so those lanes add 0.
//
// Layouts of the gathered activations xq (and of a row rebuilt into a buffer), n16 floats:
//   BLOCKED  whole blocks in plane order, the rest in column order. Used for b in {1, 2, 4, 8}
//            when every step-size group is a whole number of blocks (one group per row, or
//            group_size % (128/b) == 0), so that a block never straddles two groups.
//   NATURAL  column order. 3-bit codes, and groups that straddle blocks.
// The activations are float32 whatever the model's dtype, so bf16 / fp16 activations are
// accumulated in float32 too. Salient columns are gathered apart (xs) and added per row.
// Rows whose groups do not start on a block (not `fusable`) are rebuilt once into a float buffer
// and dotted with ROW_TOKENS tokens at a time; for many tokens the caller rebuilds the weight
// (dequantize_rows) and uses a GEMM instead.

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint8_t vb16 __attribute__((vector_size(16)));
typedef float vh __attribute__((vector_size(32)));  // half of vf: one AVX2 register

// Everything on the hot path is forced inline: GCC otherwise leaves the 4-token accumulator
// steps as calls, one per 16 weights.
#define HOT inline __attribute__((always_inline))
#define HOT_LAMBDA __attribute__((always_inline))

constexpr int LANES = 16;
// Tokens accumulated together against one row: one accumulator vector per token stays in a
// register. AVX-512 has 32 vector registers (8 tokens: 8 accumulators + codes + step sizes);
// AVX2 has 16 of 8 lanes, so a 16-lane vector takes two and 4 tokens already use 8.
#if MESWITCH_ISA >= 2
constexpr int ROW_TOKENS = 8;
#else
constexpr int ROW_TOKENS = 4;
#endif
constexpr int BLOCK_BYTES = 16;

static inline int64_t padded(int64_t n) { return (n + LANES - 1) & ~int64_t(LANES - 1); }

static HOT vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static HOT void storef(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

static HOT vf splat(float s) { return (vf){} + s; }

static HOT float h2f(c10::Half h) {
#if MESWITCH_ISA >= 1
  return _cvtsh_ss(h.x);  // F16C
#else
  return static_cast<float>(h);
#endif
}

// Sum of the 16 lanes by halving shuffles. (Reading the halves through memcpy would make the
// accumulators addressable, and GCC then keeps them in memory across the whole loop.)
static HOT float hsum(vf v) {
  v += __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// The accumulators' type. AVX2 has no 16-lane register: GCC then keeps a 16-lane vector that
// lives across loop iterations in memory and moves it through general registers (measured:
// 3-5x slower), so there an accumulator is two 8-lane halves, each a native register.
#if MESWITCH_ISA == 1
struct va {
  vh lo, hi;
};
static HOT vh loadh(const float* p) {
  vh v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static HOT void fma_acc(va& a, vf w, const float* x) {
  a.lo += __builtin_shufflevector(w, w, 0, 1, 2, 3, 4, 5, 6, 7) * loadh(x);
  a.hi += __builtin_shufflevector(w, w, 8, 9, 10, 11, 12, 13, 14, 15) * loadh(x + 8);
}
static HOT vf val(va a) {
  return __builtin_shufflevector(a.lo, a.hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#else
typedef vf va;
static HOT void fma_acc(va& a, vf w, const float* x) { a += w * loadf(x); }
static HOT vf val(va a) { return a; }
#endif

// Accumulators for NT tokens, kept in registers (GCC keeps an array of vectors in memory, a
// store and a load per step, so they are named variables; the unused ones fold away). An FMA
// takes 4 cycles before its result can be added to again, so one chain per token would stall:
// with fewer than 4 tokens each token gets SLOTS = 4 / NT chains (on AVX2, where each
// accumulator is already two independent halves, half as many), and consecutive vectors of
// codes go to consecutive slots. NT up to ROW_TOKENS (8 on AVX-512).
template <int NT>
struct Acc {
  static constexpr int SLOTS = MESWITCH_ISA == 1 ? (NT == 1 ? 2 : 1) : NT == 1 ? 4 : NT == 2 ? 2 : 1;
  va a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};

  template <int SLOT>
  HOT void add(vf w, const float* x, int64_t stride) {
    static_assert(SLOT < SLOTS, "slot out of range");
    if constexpr (NT == 1) {
      if constexpr (SLOT == 0) fma_acc(a0, w, x);
      if constexpr (SLOT == 1) fma_acc(a1, w, x);
      if constexpr (SLOT == 2) fma_acc(a2, w, x);
      if constexpr (SLOT == 3) fma_acc(a3, w, x);
    } else if constexpr (NT == 2) {
      if constexpr (SLOT == 0) {
        fma_acc(a0, w, x);
        fma_acc(a1, w, x + stride);
      } else {
        fma_acc(a2, w, x);
        fma_acc(a3, w, x + stride);
      }
    } else {
      fma_acc(a0, w, x);
      fma_acc(a1, w, x + stride);
      fma_acc(a2, w, x + 2 * stride);
      if constexpr (NT > 3) fma_acc(a3, w, x + 3 * stride);
      if constexpr (NT > 4) fma_acc(a4, w, x + 4 * stride);
      if constexpr (NT > 5) fma_acc(a5, w, x + 5 * stride);
      if constexpr (NT > 6) fma_acc(a6, w, x + 6 * stride);
      if constexpr (NT > 7) fma_acc(a7, w, x + 7 * stride);
    }
  }

  HOT void reduce(float* acc) const {
    if constexpr (NT == 1) {
      acc[0] = hsum((val(a0) + val(a1)) + (val(a2) + val(a3)));
    } else if constexpr (NT == 2) {
      acc[0] = hsum(val(a0) + val(a2));
      acc[1] = hsum(val(a1) + val(a3));
    } else {
      acc[0] = hsum(val(a0));
      acc[1] = hsum(val(a1));
      acc[2] = hsum(val(a2));
      if constexpr (NT > 3) acc[3] = hsum(val(a3));
      if constexpr (NT > 4) acc[4] = hsum(val(a4));
      if constexpr (NT > 5) acc[5] = hsum(val(a5));
      if constexpr (NT > 6) acc[6] = hsum(val(a6));
      if constexpr (NT > 7) acc[7] = hsum(val(a7));
    }
  }
};

// ---- reading codes -------------------------------------------------------------------------------
// 16 bytes widened to 16 int32 lanes. (GCC widens a byte vector element by element, 16
// inserts, so x86 gets the widening load.)
static HOT vi widen_bytes(const uint8_t* p) {
#if MESWITCH_ISA >= 2
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vi v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#elif MESWITCH_ISA == 1
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  vi v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  vb16 b;
  std::memcpy(&b, p, BLOCK_BYTES);
  return __builtin_convertvector(b, vi);
#endif
}

// Plane P of a block's widened bytes, as floats.
template <int B, int P>
static HOT vf plane(vi bytes) {
  if constexpr (B == 8) return __builtin_convertvector(bytes, vf);
  else return __builtin_convertvector((bytes >> (P * B)) & ((1 << B) - 1), vf);
}

// The last 2b bytes of a row may be fewer than 16 codes need: copied into zeros (rare: once per row).
static __attribute__((noinline)) const uint8_t* row_tail(const uint8_t* p, int64_t left, uint8_t* tail) {
  std::memset(tail, 0, 16);
  std::memcpy(tail, p, static_cast<size_t>(left));
  return tail;
}

// Codes j .. j+15 of a row (natural order, j % 16 == 0) as floats; codes past the row's end
// read as 0 (only `left` = row_bytes - j*b/8 bytes belong to the row).
template <int B>
static HOT vf codes16(const uint8_t* p, int64_t left) {
  constexpr int BYTES = B == 8 ? 16 : 2 * B;
  uint8_t tail[16];
  if (__builtin_expect(left < BYTES, 0)) p = row_tail(p, left, tail);
  if constexpr (B == 8) {
    return __builtin_convertvector(widen_bytes(p), vf);
  } else {
    uint64_t w = 0;
    std::memcpy(&w, p, BYTES);
    const uint32_t lo = static_cast<uint32_t>(w & ((uint64_t{1} << (8 * B)) - 1));
    const uint32_t hi = static_cast<uint32_t>(w >> (8 * B));
    const vu v = {lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi};
    const vu shift = {0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B,
                      0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B};
    const vu mask = (vu){} + ((1u << B) - 1);
    return __builtin_convertvector((vi)((v >> shift) & mask), vf);
  }
}

// n halves to floats (16 at a time with F16C where there is one).
static inline void halves_to_floats(const c10::Half* h, float* f, int64_t n) {
  int64_t i = 0;
#if MESWITCH_ISA >= 2
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
#elif MESWITCH_ISA == 1
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) f[i] = h2f(h[i]);
}

// ---- layouts -------------------------------------------------------------------------------------
static inline int64_t block_codes(const Desc& d) { return 128 / d.bits; }

static inline bool blocked(const Desc& d) {
  return d.bits != 3 && (d.n_groups == 1 || d.group_size % block_codes(d) == 0);
}

// Codes covered by whole blocks in the BLOCKED layout (0 in the NATURAL layout).
static inline int64_t blocked_codes(const Desc& d) {
  return blocked(d) ? d.n / block_codes(d) * block_codes(d) : 0;
}

// Whether rows can be accumulated straight from the codes: every group starts on a block (or,
// in the natural layout, on a multiple of 16 codes).
static inline bool fusable(const Desc& d) {
  return blocked(d) || d.n_groups == 1 || d.group_size % LANES == 0;
}

// A gathered row of n16 floats (natural order) put into the BLOCKED order, using `tmp`.
static void block_order(const Desc& d, float* xq, float* tmp) {
  const int64_t nb = blocked_codes(d), planes = 8 / d.bits;
  if (nb == 0 || planes == 1) return;
  std::memcpy(tmp, xq, sizeof(float) * nb);
  for (int64_t j0 = 0; j0 < nb; j0 += 16 * planes)
    for (int64_t p = 0; p < planes; ++p)
      for (int64_t i = 0; i < 16; ++i) xq[j0 + p * 16 + i] = tmp[j0 + i * planes + p];
}

// End (exclusive, in padded positions) of group g.
static inline int64_t group_end(const Desc& d, int64_t g) {
  return g + 1 == d.n_groups ? padded(d.n) : (g + 1) * d.group_size;
}

// ---- gathering activations ---------------------------------------------------------------------
// x row (any float dtype) -> xq (the quantized columns in order, zero padded to n16, in the
// kernel's layout: block_order above), xs (the salient columns) and *xsum (the sum of the
// quantized columns), float32. The same for every instruction set (delta_cpu.cpp calls the
// portable namespace's).
template <typename T>
static void gather_row(const T* x, const Desc& d, float* xq, float* xs, float* xsum, float* tmp) {
  int64_t col = 0, j = 0;
  for (int64_t s = 0; s <= d.k; ++s) {
    const int64_t stop = s < d.k ? d.salient_idx[s] : d.in;
    for (; col < stop; ++col) xq[j++] = static_cast<float>(x[col]);
    if (s < d.k) xs[s] = static_cast<float>(x[col++]);
  }
  const int64_t n16 = padded(d.n);
  for (; j < n16; ++j) xq[j] = 0.f;
  float part[16] = {};  // 16 partial sums: n16 is a multiple of 16
  for (j = 0; j < n16; j += 16)
    for (int i = 0; i < 16; ++i) part[i] += xq[j + i];
  float sum = 0.f;
  for (int i = 0; i < 16; ++i) sum += part[i];
  *xsum = sum;
  block_order(d, xq, tmp);
}

// ---- rows rebuilt into a buffer ----------------------------------------------------------------
// Row o's codes as floats w[0 .. n16) in the BLOCKED layout where it applies (column order if
// `natural`), then w = code * scale + offset per group. Positions n .. n16 hold garbage times 0
// later (the activations are 0 there).
template <int B>
static void rebuild_row_t(const Desc& d, int64_t o, float* w, bool natural) {
  const uint8_t* row = d.codes + o * d.row_bytes;
  const int64_t nb = natural ? 0 : blocked_codes(d), n16 = padded(d.n);
  constexpr int64_t BLK = 128 / B;
  if constexpr (B != 3) {
    for (int64_t j = 0; j < nb; j += BLK) {
      const vi bytes = widen_bytes(row + j * B / 8);
      storef(w + j, plane<B, 0>(bytes));
      if constexpr (B <= 4) storef(w + j + 16, plane<B, 1>(bytes));
      if constexpr (B <= 2) {
        storef(w + j + 32, plane<B, 2>(bytes));
        storef(w + j + 48, plane<B, 3>(bytes));
      }
      if constexpr (B == 1) {
        storef(w + j + 64, plane<B, 4>(bytes));
        storef(w + j + 80, plane<B, 5>(bytes));
        storef(w + j + 96, plane<B, 6>(bytes));
        storef(w + j + 112, plane<B, 7>(bytes));
      }
    }
  }
  for (int64_t j = nb; j < n16; j += LANES) storef(w + j, codes16<B>(row + j * B / 8, d.row_bytes - j * B / 8));
  // Step sizes. In the blocked layout a block lies inside one group, so the order within blocks
  // does not change which group a position belongs to.
  const c10::Half* sr = d.scale + o * d.param_stride;
  const c10::Half* zr = d.offset + o * d.param_stride;
  for (int64_t g = 0; g < d.n_groups; ++g) {
    const float s = h2f(sr[g]), z = h2f(zr[g]);
    const int64_t a = g * d.group_size, b = std::min(d.n, a + d.group_size);
    for (int64_t j = a; j < b; ++j) w[j] = w[j] * s + z;
  }
}

static void rebuild_row(const Desc& d, int64_t o, float* w, bool natural) {
  switch (d.bits) {
    case 1: return rebuild_row_t<1>(d, o, w, natural);
    case 2: return rebuild_row_t<2>(d, o, w, natural);
    case 3: return rebuild_row_t<3>(d, o, w, natural);
    case 4: return rebuild_row_t<4>(d, o, w, natural);
    default: return rebuild_row_t<8>(d, o, w, natural);
  }
}

// acc[t] = sum_j w[j] * x_t[j] over n16 positions for NT tokens (x_t = x + t * stride).
template <int NT>
static void dot_tokens(const float* w, const float* x, int64_t stride, int64_t n16, float* acc) {
  Acc<NT> a;
  constexpr int SL = Acc<NT>::SLOTS;
  int64_t j = 0;
  for (; j + SL * LANES <= n16; j += SL * LANES) {
    a.template add<0>(loadf(w + j), x + j, stride);
    if constexpr (SL > 1) a.template add<1 % SL>(loadf(w + j + 16), x + j + 16, stride);
    if constexpr (SL > 2) {
      a.template add<2 % SL>(loadf(w + j + 32), x + j + 32, stride);
      a.template add<3 % SL>(loadf(w + j + 48), x + j + 48, stride);
    }
  }
  for (; j < n16; j += LANES) a.template add<0>(loadf(w + j), x + j, stride);
  a.reduce(acc);
}

static void dot_token_block(int nt, const float* w, const float* x, int64_t stride, int64_t n16, float* acc) {
  switch (nt) {
    case 1: return dot_tokens<1>(w, x, stride, n16, acc);
    case 2: return dot_tokens<2>(w, x, stride, n16, acc);
    case 3: return dot_tokens<3>(w, x, stride, n16, acc);
#if MESWITCH_ISA >= 2
    case 4: return dot_tokens<4>(w, x, stride, n16, acc);
    case 5: return dot_tokens<5>(w, x, stride, n16, acc);
    case 6: return dot_tokens<6>(w, x, stride, n16, acc);
    case 7: return dot_tokens<7>(w, x, stride, n16, acc);
    default: return dot_tokens<8>(w, x, stride, n16, acc);
#else
    default: return dot_tokens<4>(w, x, stride, n16, acc);
#endif
  }
}

// ---- the fused path (NT <= 4 tokens, `fusable(d)`): codes to sums without a buffer ------------
// FACTORED (one step size per row): w = the codes themselves, and the caller finishes the row
// as s * sum_j q_j x_j + z * sum_j x_j (no step size or offset in the loop: one FMA less per 16
// weights, and two vectors fewer live, which AVX2's 16 registers need). Otherwise w = q s_g + z_g.
template <int B, int NT, bool FACTORED>
static void fused_row(const Desc& d, int64_t o, const float* xq, int64_t stride, float* acc) {
  const uint8_t* row = d.codes + o * d.row_bytes;
  const c10::Half* sr = d.scale + o * d.param_stride;
  const c10::Half* zr = d.offset + o * d.param_stride;
  const int64_t nb = blocked_codes(d);
  constexpr int64_t BLK = 128 / B;
  constexpr int SL = Acc<NT>::SLOTS;
  Acc<NT> a;
  int64_t j = 0;
  for (int64_t g = 0; g < d.n_groups; ++g) {
    vf s = {}, z = {};
    if constexpr (!FACTORED) s = splat(h2f(sr[g])), z = splat(h2f(zr[g]));
    const auto wt = [&](vf q) HOT_LAMBDA {
      if constexpr (FACTORED) return q;
      else return q * s + z;
    };
    const int64_t end = group_end(d, g);
    if constexpr (B != 3) {
      for (; j + BLK <= std::min(end, nb); j += BLK) {
        const vi bytes = widen_bytes(row + j * B / 8);
        const float* x = xq + j;
        a.template add<0>(wt(plane<B, 0>(bytes)), x, stride);
        if constexpr (B <= 4) a.template add<1 % SL>(wt(plane<B, 1>(bytes)), x + 16, stride);
        if constexpr (B <= 2) {
          a.template add<2 % SL>(wt(plane<B, 2>(bytes)), x + 32, stride);
          a.template add<3 % SL>(wt(plane<B, 3>(bytes)), x + 48, stride);
        }
        if constexpr (B == 1) {
          a.template add<4 % SL>(wt(plane<B, 4>(bytes)), x + 64, stride);
          a.template add<5 % SL>(wt(plane<B, 5>(bytes)), x + 80, stride);
          a.template add<6 % SL>(wt(plane<B, 6>(bytes)), x + 96, stride);
          a.template add<7 % SL>(wt(plane<B, 7>(bytes)), x + 112, stride);
        }
      }
    }
    for (; j + 2 * LANES <= end; j += 2 * LANES) {
      a.template add<0>(wt(codes16<B>(row + j * B / 8, d.row_bytes - j * B / 8)), xq + j, stride);
      a.template add<1 % SL>(wt(codes16<B>(row + (j + 16) * B / 8, d.row_bytes - (j + 16) * B / 8)),
                             xq + j + 16, stride);
    }
    for (; j < end; j += LANES)
      a.template add<0>(wt(codes16<B>(row + j * B / 8, d.row_bytes - j * B / 8)), xq + j, stride);
  }
  a.reduce(acc);
}

template <int B, bool F>
static void fused_rows_t(const Desc& d, int64_t o, int nt, const float* xq, int64_t stride, float* acc) {
  switch (nt) {
    case 1: return fused_row<B, 1, F>(d, o, xq, stride, acc);
    case 2: return fused_row<B, 2, F>(d, o, xq, stride, acc);
    case 3: return fused_row<B, 3, F>(d, o, xq, stride, acc);
#if MESWITCH_ISA >= 2
    case 4: return fused_row<B, 4, F>(d, o, xq, stride, acc);
    case 5: return fused_row<B, 5, F>(d, o, xq, stride, acc);
    case 6: return fused_row<B, 6, F>(d, o, xq, stride, acc);
    case 7: return fused_row<B, 7, F>(d, o, xq, stride, acc);
    default: return fused_row<B, 8, F>(d, o, xq, stride, acc);
#else
    default: return fused_row<B, 4, F>(d, o, xq, stride, acc);
#endif
  }
}

template <bool F>
static void fused_rows_f(const Desc& d, int64_t o, int nt, const float* xq, int64_t stride, float* acc) {
  switch (d.bits) {
    case 1: return fused_rows_t<1, F>(d, o, nt, xq, stride, acc);
    case 2: return fused_rows_t<2, F>(d, o, nt, xq, stride, acc);
    case 3: return fused_rows_t<3, F>(d, o, nt, xq, stride, acc);
    case 4: return fused_rows_t<4, F>(d, o, nt, xq, stride, acc);
    default: return fused_rows_t<8, F>(d, o, nt, xq, stride, acc);
  }
}

// acc[t] = x_t . D[o] over the quantized columns, for nt tokens.
static void fused_rows(const Desc& d, int64_t o, int nt, const float* xq, int64_t stride, const float* xsum,
                       float* acc) {
  if (d.n_groups == 1) {  // factored: s * sum_j q_j x_j + z * sum_j x_j
    fused_rows_f<true>(d, o, nt, xq, stride, acc);
    const float s = h2f(d.scale[o * d.param_stride]), z = h2f(d.offset[o * d.param_stride]);
    for (int t = 0; t < nt; ++t) acc[t] = s * acc[t] + z * xsum[t];
  } else {
    fused_rows_f<false>(d, o, nt, xq, stride, acc);
  }
}

// ---- entry points ----------------------------------------------------------------------------------
// Output rows [r0, r1) of one segment: out[t * out_stride + (o - r0)] = x_t . D[o] for its
// `tokens` tokens. xq: [tokens, n16] gathered quantized columns (layout per `blocked(d)`, zero
// padded), xs: [tokens, k] gathered salient columns, xsum: [tokens] sums of the quantized columns,
// all float32. Scratch: `wbuf` holds one row (n16 floats), `sal` the salient values of rows
// r0..r1 ((r1 - r0) * k floats).
static void segment_rows(const Desc& d, int64_t r0, int64_t r1, int64_t tokens, const float* xq, const float* xs,
                         const float* xsum, float* out, int64_t out_stride, float* wbuf, float* sal) {
  const int64_t n16 = padded(d.n);
  const bool fused = fusable(d);
  float acc[ROW_TOKENS];
  if (d.k) halves_to_floats(d.salient_values + r0 * d.k, sal, (r1 - r0) * d.k);  // rows r0..r1
  for (int64_t o = r0; o < r1; ++o) {
    if (d.n > 0 && !fused) rebuild_row(d, o, wbuf, false);
    const float* so = sal + (o - r0) * d.k;
    for (int64_t t0 = 0; t0 < tokens; t0 += ROW_TOKENS) {
      const int nt = static_cast<int>(std::min<int64_t>(ROW_TOKENS, tokens - t0));
      if (d.n == 0) {
        for (int t = 0; t < nt; ++t) acc[t] = 0.f;
      } else if (fused) {
        fused_rows(d, o, nt, xq + t0 * n16, n16, xsum + t0, acc);
      } else {
        dot_token_block(nt, wbuf, xq + t0 * n16, n16, n16, acc);
      }
      for (int t = 0; t < nt; ++t) {
        const float* xt = xs + (t0 + t) * d.k;
        float s = 0.f;
        for (int64_t i = 0; i < d.k; ++i) s += so[i] * xt[i];
        out[(t0 + t) * out_stride + (o - r0)] = acc[t] + s;
      }
    }
  }
}

// Rows `rows` (or all rows) of D, written as [len(rows), in] in the output's dtype. With `base`
// ([out, in], the output's dtype): base + D, added in float32 and rounded once (what
// `materialize` computes).
template <typename T>
static void dequantize_rows(const Desc& d, const int64_t* rows, int64_t n_rows, T* out, const T* base = nullptr) {
  at::parallel_for(0, n_rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d.in)), [&](int64_t a, int64_t b) {
    std::vector<float> w(static_cast<size_t>(padded(d.n)) + LANES);
    for (int64_t r = a; r < b; ++r) {
      const int64_t o = rows ? rows[r] : r;
      if (d.n) rebuild_row(d, o, w.data(), true);
      T* dst = out + r * d.in;
      const T* src = base ? base + o * d.in : nullptr;
      const auto put = [&](int64_t col, float v) {
        dst[col] = static_cast<T>(src ? static_cast<float>(src[col]) + v : v);
      };
      int64_t col = 0, j = 0;
      for (int64_t s = 0; s <= d.k; ++s) {
        const int64_t stop = s < d.k ? d.salient_idx[s] : d.in;
        for (; col < stop; ++col) put(col, w[j++]);
        if (s < d.k) put(col++, h2f(d.salient_values[o * d.k + s]));
      }
    }
  });
}

#undef HOT
