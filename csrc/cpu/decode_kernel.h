/*
 * decode_kernel.h - the inner loop of CPU decode attention (cpu/cache.c),
 * written once and compiled once per instruction set. cache.c includes
 * this file several times, with DK_ISA set to DK_BASELINE, DK_AVX2,
 * DK_AVX512 or DK_AVX512BF16 and DK_SUFFIX to a name, and gets
 * decode_range_<suffix>; it picks one at run time (cpuid), so one binary
 * runs everywhere and a test can run every variant on one machine.
 *
 * Decode reads every stored K and V byte of a row once and is bound by
 * memory, so the kernel works straight from the pages: K and V rows are
 * converted to float32 in registers as they are loaded, never gathered
 * into a float tile first. A row's slots go DK_BLOCK = 64 at a time; the
 * query heads go 4 at a time (a head group) through register tiles:
 *   scores  4 heads x S slots of W-lane partial dot products (S = W / 4:
 *           16 accumulators with AVX-512), so each key byte is loaded once
 *           for the whole group; a transpose-and-add network then turns
 *           those W partial vectors into one vector of W scores, lane
 *           h * S + s for head h and slot s (no horizontal sum per slot);
 *   softmax online, on those vectors: the block max of each head is a max
 *           over the block's vectors and then over the S lanes of the
 *           head, and likewise the sums, so the 4 heads share every
 *           instruction (at decode every stored slot is visible, SPEC
 *           section 5);
 *   P.V     4 heads x 64 columns (16 below AVX-512) of accumulators, each
 *           value row loaded once per head group.
 * Page-table lookups are incremental (no division per slot) and rows
 * AHEAD slots ahead are prefetched: the hardware prefetcher stops at every
 * 4 KiB page and loses the stream where a cache page ends.
 *
 * bfloat16 costs one instruction per 16 floats: a 32-bit lane holding two
 * bfloat16 is the odd element's float32 with the low half cleared (an AND)
 * and the even element's float32 shifted (a shift). So the kernel works on
 * "pairs" of 2W columns in the order [even columns, odd columns]: the
 * query and the output accumulators are kept in that order (dot products
 * do not care) and the output is put back in column order at the end.
 * With AVX512-BF16 (DK_AVX512BF16) the scores use vdpbf16ps on the raw
 * bfloat16 query and keys instead: products of two bfloat16 are exact in
 * float32, so this loses nothing against converting first.
 *
 * FP8 pages (dms_kv_format) are widened through float16 (load_fp8: a few
 * integer operations, then the float16 conversion) and their scales
 * applied to the block's score and probability vectors, once per slot: a
 * score is s_k (q . fp8(k)) and a value weight p s_v.
 *
 * Vectors are GCC/clang vector extensions of W floats (16 for AVX-512, 8
 * for AVX2, 4 = SSE2/NEON for the baseline); only the float16 conversion
 * and vdpbf16ps use intrinsics.
 */

#define DK_CAT2(a, b) a##_##b
#define DK_CAT(a, b) DK_CAT2(a, b)
#define DK(name) DK_CAT(name, DK_SUFFIX)

#if DK_ISA == DK_AVX512BF16
#define DK_TARGET                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,"           \
                          "avx512bf16,avx512vbmi,avx2,fma,f16c")))
#elif DK_ISA == DK_AVX512
#define DK_TARGET                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,"  \
                          "f16c")))
#elif DK_ISA == DK_AVX2
#define DK_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define DK_TARGET
#endif

#define DK_INLINE static inline __attribute__((always_inline)) DK_TARGET

/* Lanes W, and pairs (2W columns) per P.V tile: tiles that fit the
 * register file (32 zmm; 16 ymm / xmm). A score tile is 4 heads x
 * DK_SLOTS = W / 4 slots: one score vector. */
#if DK_ISA >= DK_AVX512
#define DK_W 16
#define DK_PAIRS 2
#elif DK_ISA == DK_AVX2
#define DK_W 8
#define DK_PAIRS 1
#else
#define DK_W 4
#define DK_PAIRS 1
#endif
#define DK_SLOTS (DK_W / 4)
/* Slots per block: the unit of the online softmax (its max, sum and
 * rescale are paid once per block and head group). */
#define DK_BLOCK 64
#define DK_TILES (DK_BLOCK / DK_SLOTS) /* score vectors per block */
/* Blocks between a row's prefetch and its use. */
#define DK_PF_BLOCKS 3
#define VF DK_CAT(dk_vf, DK_W)
#define VI DK_CAT(dk_vi, DK_W)
#define VU DK_CAT(dk_vu, DK_W)

DK_INLINE VF DK(splat)(float x)
{
    return (VF){0} + x;
}

DK_INLINE VF DK(select)(VI mask, VF a, VF b)
{
    return (VF)(((VI)a & mask) | ((VI)b & ~mask));
}

/* What a page element is: a dms_dtype (float32, float16, bfloat16) or one
 * of the FP8 formats. */
#ifndef DK_FP8_E4M3
#define DK_FP8_E4M3 (DMS_NUM_DTYPES + 1)
#define DK_FP8_E5M2 (DMS_NUM_DTYPES + 2)
#define DK_IS_FP8(kind) ((kind) >= DK_FP8_E4M3)
#define DK_ESIZE(kind)                                                    \
    ((kind) == DMS_FLOAT32 ? 4 : DK_IS_FP8(kind) ? 1 : 2)
#endif

/* W float16 bit patterns as float32. */
DK_INLINE VF DK(f16_bits_to_f32)(DK_CAT(dk_vh, DK_W) bits)
{
#if DK_W == 16
    __m256i b;
    memcpy(&b, &bits, sizeof b);
    return (VF)_mm512_cvtph_ps(b);
#elif DK_W == 8
    __m128i b;
    memcpy(&b, &bits, sizeof b);
    return (VF)_mm256_cvtph_ps(b);
#else
    /* No F16C: the bits moved into place and rebiased in integer vector
     * code (exact for all 65536 patterns; subnormals by a float
     * subtraction, infinity and NaN by a second rebias). */
    const VU h = __builtin_convertvector(bits, VU);
    const VU sign = (h & 0x8000u) << 16;
    VU mag = (h & 0x7fffu) << 13;
    const VU exponent = mag & (0x7c00u << 13);
    mag += (127u - 15u) << 23;
    mag += (VU)(exponent == (0x7c00u << 13)) & ((128u - 16u) << 23);
    const VI subnormal = (VI)(exponent == 0);
    const VF scaled =
        (VF)(mag + (1u << 23)) - (VF)((VU){0} + (113u << 23));
    return (VF)((VU)DK(select)(subnormal, scaled, (VF)mag) | sign);
#endif
}

/* W float16 at src as float32. */
DK_INLINE VF DK(load_f16)(const char *src)
{
    DK_CAT(dk_vh, DK_W) bits;
    memcpy(&bits, src, sizeof bits);
    return DK(f16_bits_to_f32)(bits);
}

/*
 * W FP8 codes at src as float32, through float16: an E5M2 code is the top
 * byte of the float16 of its value; an E4M3 code's sign and 7 other bits
 * moved to float16's places give its value / 256 (float16's exponent bias
 * is 8 more; subnormals included), and DK_FP8_FACTOR puts the 256 back
 * into the slot's scale (exact: a power of two). So a code costs what a
 * float16 element does plus a few integer operations per W. Code 0x7f
 * (E4M3's NaN) reads as 480 / 256: it only comes from a NaN row, whose
 * scale is NaN.
 */
DK_INLINE float DK(fp8_factor)(const int kind)
{
#if DK_W == 16
    (void)kind; /* fp8_bf16 below: exact values */
    return 1.0f;
#else
    return kind == DK_FP8_E4M3 ? 256.0f : 1.0f;
#endif
}

/* Whether the kernel keeps queries and accumulators in pair order (see
 * the top of this file) for pages of `kind`: bfloat16, and FP8 with
 * AVX-512, which widens codes to bfloat16 pairs (fp8_bf16). */
#define DK_PAIRED(kind)                                                   \
    ((kind) == DMS_BFLOAT16 || (DK_W == 16 && DK_IS_FP8(kind)))

#if DK_W == 16
/*
 * 32 FP8 codes at src as 32 bfloat16 (16 lanes of pairs, as bfloat16 pages
 * hold them), exact: every E4M3 and E5M2 value is a normal bfloat16. A
 * code's magnitude looks its bfloat16 up in dk_fp8_bf16 (128 entries: two
 * vpermi2w of 64 and a blend on bit 6); its sign moves to bit 15.
 */
DK_INLINE VU DK(fp8_bf16)(const char *src, const int kind)
{
#if DK_ISA == DK_AVX512BF16
    /* With AVX512-VBMI: the low and the high bytes of the bfloat16 looked
     * up with one vpermi2b each (128-byte tables), then interleaved into
     * words by a third: 4 instructions per 32 codes. */
    const uint8_t *lo = dk_fp8_bf16_bytes[kind == DK_FP8_E5M2][0];
    const uint8_t *hi = dk_fp8_bf16_bytes[kind == DK_FP8_E5M2][1];
    const __m512i c = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)src));
    const __m512i l = _mm512_permutex2var_epi8(_mm512_loadu_si512(lo), c, _mm512_loadu_si512(lo + 64));
    __m512i h = _mm512_permutex2var_epi8(_mm512_loadu_si512(hi), c, _mm512_loadu_si512(hi + 64));
    h = _mm512_ternarylogic_epi32(h, c, _mm512_set1_epi8((char)0x80), 0xf8); /* h | (c & 0x80) */
    const __m512i v = _mm512_permutex2var_epi8(l, _mm512_loadu_si512(dk_interleave_bytes), h);
    VU out;
    memcpy(&out, &v, sizeof out);
    return out;
#else
    const uint16_t *t = dk_fp8_bf16[kind == DK_FP8_E5M2];
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    const __m512i low = _mm512_permutex2var_epi16(_mm512_loadu_si512(t), w, _mm512_loadu_si512(t + 32));
    const __m512i high = _mm512_permutex2var_epi16(_mm512_loadu_si512(t + 64), w, _mm512_loadu_si512(t + 96));
    const __mmask32 upper = _mm512_test_epi16_mask(w, _mm512_set1_epi16(0x40));
    const __m512i sign = _mm512_and_si512(_mm512_slli_epi16(w, 8), _mm512_set1_epi16((short)0x8000));
    const __m512i v = _mm512_or_si512(_mm512_mask_blend_epi16(upper, low, high), sign);
    VU out;
    memcpy(&out, &v, sizeof out);
    return out;
#endif
}
#endif

DK_INLINE VF DK(load_fp8)(const char *src, const int kind)
{
    typedef DK_CAT(dk_vh, DK_W) VH;
    DK_CAT(dk_vb, DK_W) bytes;
    memcpy(&bytes, src, sizeof bytes);
    VH h = __builtin_convertvector(bytes, VH);
    if (kind == DK_FP8_E5M2)
        h <<= 8;
    else
        h = ((h & 0x80) << 8) | ((h & 0x7f) << 7);
    return DK(f16_bits_to_f32)(h);
}

/* The pair of 2W elements at src as float32: columns [0, W) and [W, 2W),
 * or (DK_PAIRED) the even and the odd columns. */
DK_INLINE void DK(load_pair)(const char *src, const int dtype, VF *lo,
                             VF *hi)
{
    if (DK_IS_FP8(dtype) && !DK_PAIRED(dtype)) {
        *lo = DK(load_fp8)(src, dtype);
        *hi = DK(load_fp8)(src + DK_W, dtype);
    } else if (dtype == DMS_FLOAT32) {
        memcpy(lo, src, sizeof *lo);
        memcpy(hi, src + sizeof *lo, sizeof *hi);
    } else if (DK_PAIRED(dtype)) {
        VU w;
#if DK_W == 16
        if (DK_IS_FP8(dtype))
            w = DK(fp8_bf16)(src, dtype);
        else
#endif
            memcpy(&w, src, sizeof w);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        *lo = (VF)(w & 0xffff0000u); /* the even element is the high half */
        *hi = (VF)(w << 16);
#else
        *lo = (VF)(w << 16);
        *hi = (VF)(w & 0xffff0000u);
#endif
    } else {
        *lo = DK(load_f16)(src);
        *hi = DK(load_f16)(src + 2 * DK_W);
    }
}

/* The same for the last, partial pair of a row: n < 2W elements, zeros
 * after (a head dim that is not a multiple of 2W). */
DK_INLINE void DK(load_pair_tail)(const char *src, const int dtype,
                                  int64_t n, VF *lo, VF *hi)
{
    _Alignas(64) char buf[8 * DK_W] = {0};
    memcpy(buf, src, (size_t)(n * DK_ESIZE(dtype)));
    DK(load_pair)(buf, dtype, lo, hi);
}

/*
 * Asks for the `bytes` at row (one K or V row), several blocks ahead of its
 * use, into L2 (prefetcht2: a few blocks of rows are too much for L1). A
 * software prefetch that misses the TLB is dropped on some CPUs (AMD Zen 4
 * here), so the line where a 4 KiB page begins is loaded instead, which
 * walks the page table for the prefetches after it: on 4 KiB pages that
 * lifts decode from about 60% to about 75% of the copy bandwidth of one
 * core (Zen 4). Rows need not be aligned; every cache line they touch is
 * covered, and nothing outside [row, row + bytes) is read.
 */
DK_INLINE void DK(prefetch_row)(const char *row, int64_t bytes)
{
    const uintptr_t start = (uintptr_t)row, end = start + (uintptr_t)bytes;
    for (uintptr_t line = start & ~(uintptr_t)63; line < end; line += 64) {
        const char *at = line < start ? row : row + (line - start);
        if ((line & 4095) == 0) {
            const char touched = *(const volatile char *)at;
            (void)touched;
        } else {
            __builtin_prefetch(at, 0, 1);
        }
    }
}

DK_INLINE VF DK(vmax)(VF a, VF b)
{
    return DK(select)(a > b, a, b);
}

#if DK_W == 16
#define DK_SWAP2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define DK_SWAP1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#elif DK_W == 8
#define DK_SWAP2 2, 3, 0, 1, 6, 7, 4, 5
#define DK_SWAP1 1, 0, 3, 2, 5, 4, 7, 6
#else
#define DK_SWAP2 2, 3, 0, 1
#define DK_SWAP1 1, 0, 3, 2
#endif

/* Every lane gets the max / the sum over the DK_SLOTS lanes of its head
 * (a butterfly over the low lane bits). */
DK_INLINE VF DK(head_max)(VF v)
{
#if DK_SLOTS == 4
    v = DK(vmax)(v, __builtin_shufflevector(v, v, DK_SWAP2));
#endif
#if DK_SLOTS >= 2
    v = DK(vmax)(v, __builtin_shufflevector(v, v, DK_SWAP1));
#endif
    return v;
}

DK_INLINE VF DK(head_sum)(VF v)
{
#if DK_SLOTS == 4
    v += __builtin_shufflevector(v, v, DK_SWAP2);
#endif
#if DK_SLOTS >= 2
    v += __builtin_shufflevector(v, v, DK_SWAP1);
#endif
    return v;
}

/*
 * out[i] = sum of the W lanes of v[i], i < W (v is clobbered): log2(W)
 * levels that each add the two halves of every lane block of two vectors
 * and interleave the results, W - 1 adds for W sums instead of W
 * horizontal reductions.
 */
DK_INLINE VF DK(sum_lanes)(VF v[DK_W])
{
#if DK_W == 16
    for (int i = 0; i < 8; ++i)
        v[i] = __builtin_shufflevector(v[i], v[i + 8], 0, 1, 2, 3, 4, 5, 6, 7,
                                       16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[i], v[i + 8], 8, 9, 10, 11, 12, 13,
                                       14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; ++i)
        v[i] = __builtin_shufflevector(v[i], v[i + 4], 0, 1, 2, 3, 16, 17, 18,
                                       19, 8, 9, 10, 11, 24, 25, 26, 27) +
               __builtin_shufflevector(v[i], v[i + 4], 4, 5, 6, 7, 20, 21, 22,
                                       23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; ++i)
        v[i] = __builtin_shufflevector(v[i], v[i + 2], 0, 1, 16, 17, 4, 5, 20,
                                       21, 8, 9, 24, 25, 12, 13, 28, 29) +
               __builtin_shufflevector(v[i], v[i + 2], 2, 3, 18, 19, 6, 7, 22,
                                       23, 10, 11, 26, 27, 14, 15, 30, 31);
    return __builtin_shufflevector(v[0], v[1], 0, 16, 2, 18, 4, 20, 6, 22, 8,
                                   24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(v[0], v[1], 1, 17, 3, 19, 5, 21, 7, 23, 9,
                                   25, 11, 27, 13, 29, 15, 31);
#elif DK_W == 8
    for (int i = 0; i < 4; ++i)
        v[i] = __builtin_shufflevector(v[i], v[i + 4], 0, 1, 2, 3, 8, 9, 10,
                                       11) +
               __builtin_shufflevector(v[i], v[i + 4], 4, 5, 6, 7, 12, 13, 14,
                                       15);
    for (int i = 0; i < 2; ++i)
        v[i] = __builtin_shufflevector(v[i], v[i + 2], 0, 1, 8, 9, 4, 5, 12,
                                       13) +
               __builtin_shufflevector(v[i], v[i + 2], 2, 3, 10, 11, 6, 7, 14,
                                       15);
    return __builtin_shufflevector(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
#else
    for (int i = 0; i < 2; ++i)
        v[i] = __builtin_shufflevector(v[i], v[i + 2], 0, 1, 4, 5) +
               __builtin_shufflevector(v[i], v[i + 2], 2, 3, 6, 7);
    return __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6) +
           __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
#endif
}

/* exp_nonpositive (simd_math.h), W lanes at once: the same steps. */
DK_INLINE VF DK(exp_nonpositive)(VF x)
{
    const VI below = x < DK(splat)(-87.0f);
    x = DK(select)(below, DK(splat)(-87.0f), x);
    const VF magic = DK(splat)(12582912.0f);
    const VF k = (x * 1.44269504088896341f + magic) - magic;
    const VF r = x - k * 0.693359375f + k * 2.12194440e-4f;
    VF poly = DK(splat)(1.9875691500e-4f);
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const VF e = poly * r * r + r + 1.0f;
    const VI bits = (__builtin_convertvector(k, VI) + 127) << 23;
    return (VF)((VI)(e * (VF)bits) & ~below);
}

/*
 * One pair (columns [d, d + 2W)) of a score tile: acc[h][s] += q_h . k_s
 * for HG heads (q: stride ld, in pair order) and DK_SLOTS key rows.
 */
DK_INLINE void DK(dot_pair)(const float *q, int64_t ld,
                            const char *const *krow, int64_t d,
                            int64_t tail, const int dtype, const int HG,
                            VF acc[4 * DK_SLOTS])
{
    const int64_t esize = DK_ESIZE(dtype);
    VF klo[DK_SLOTS], khi[DK_SLOTS];
    for (int s = 0; s < DK_SLOTS; ++s) {
        if (tail)
            DK(load_pair_tail)(krow[s] + d * esize, dtype, tail, &klo[s],
                               &khi[s]);
        else
            DK(load_pair)(krow[s] + d * esize, dtype, &klo[s], &khi[s]);
    }
    for (int h = 0; h < HG; ++h) {
        VF qlo, qhi;
        memcpy(&qlo, q + h * ld + d, sizeof qlo);
        memcpy(&qhi, q + h * ld + d + DK_W, sizeof qhi);
        for (int s = 0; s < DK_SLOTS; ++s) {
            acc[h * DK_SLOTS + s] += qlo * klo[s];
            acc[h * DK_SLOTS + s] += qhi * khi[s];
        }
    }
}

/*
 * The score vector of HG heads (HG <= 4) and the DK_SLOTS key rows krow:
 * lane h * DK_SLOTS + s is q_h . k_s (0 for h >= HG).
 */
DK_INLINE VF DK(dot_tile)(const float *q, int64_t ld,
                          const char *const *krow, int64_t D,
                          const int dtype, const int HG)
{
    VF acc[4 * DK_SLOTS];
    for (int i = 0; i < 4 * DK_SLOTS; ++i)
        acc[i] = (VF){0};
    int64_t d = 0;
    for (; d + 2 * DK_W <= D; d += 2 * DK_W)
        DK(dot_pair)(q, ld, krow, d, 0, dtype, HG, acc);
    if (d < D) /* q is zero past D */
        DK(dot_pair)(q, ld, krow, d, D - d, dtype, HG, acc);
    return DK(sum_lanes)(acc);
}

#if DK_ISA == DK_AVX512BF16
/*
 * The same for bfloat16 keys and the raw bfloat16 query (q16: stride ld,
 * column order, zero past D): vdpbf16ps, 32 products per instruction.
 */
DK_INLINE VF DK(dot_tile_bf16)(const uint16_t *q16, int64_t ld,
                               const char *const *krow, int64_t D,
                               const int kind, const int HG)
{
    VF acc[4 * DK_SLOTS];
    for (int i = 0; i < 4 * DK_SLOTS; ++i)
        acc[i] = (VF){0};
    const int64_t esize = DK_ESIZE(kind);
    for (int64_t d = 0; d < D; d += 32) {
        __m512bh k[DK_SLOTS];
        for (int s = 0; s < DK_SLOTS; ++s) {
            _Alignas(64) uint16_t buf[32] = {0};
            const char *src = krow[s] + d * esize;
            if (d + 32 > D) { /* the row's tail, zeros after */
                memcpy(buf, src, (size_t)((D - d) * esize));
                src = (const char *)buf;
            }
            if (DK_IS_FP8(kind)) {
                const VU w = DK(fp8_bf16)(src, kind);
                memcpy(&k[s], &w, sizeof k[s]);
            } else {
                memcpy(&k[s], src, sizeof k[s]);
            }
        }
        for (int h = 0; h < HG; ++h) {
            __m512bh qv;
            memcpy(&qv, q16 + h * ld + d, sizeof qv);
            for (int s = 0; s < DK_SLOTS; ++s)
                acc[h * DK_SLOTS + s] = (VF)_mm512_dpbf16_ps(
                    (__m512)acc[h * DK_SLOTS + s], qv, k[s]);
        }
    }
    return DK(sum_lanes)(acc);
}
#endif

/*
 * acc[h][d0 .. d0 + 2W NP) += sum_{c < kn} p[h][c] v_c[...] for HG heads
 * (p: the block's probability vectors, p[h][c] in lane h * DK_SLOTS +
 * c % DK_SLOTS of vector c / DK_SLOTS; acc: stride ld, pair order).
 * tail > 0: the last pair has only `tail` columns in the row (acc is
 * padded, so whole vectors are stored). Prefetches the value rows vnext[c]
 * (c < nnext) of the next block on the way.
 */
DK_INLINE void DK(pv_tile)(const float *p, const char *const *vrow,
                           int64_t kn, int64_t d0, const int dtype,
                           const int HG, const int NP, int64_t tail,
                           float *acc, int64_t ld, const char *const *vnext,
                           int64_t nnext, int64_t row_bytes)
{
    const int64_t esize = DK_ESIZE(dtype);
    VF a[4][2 * DK_PAIRS];
    for (int h = 0; h < HG; ++h)
        for (int j = 0; j < 2 * NP; ++j)
            memcpy(&a[h][j], acc + h * ld + d0 + DK_W * j, sizeof(VF));
    for (int64_t c = 0; c < kn; ++c) {
        if (c < nnext)
            DK(prefetch_row)(vnext[c], row_bytes);
        VF v[2 * DK_PAIRS];
        for (int j = 0; j < NP; ++j) {
            const char *src = vrow[c] + (d0 + 2 * DK_W * j) * esize;
            if (tail && j == NP - 1)
                DK(load_pair_tail)(src, dtype, tail, &v[2 * j], &v[2 * j + 1]);
            else
                DK(load_pair)(src, dtype, &v[2 * j], &v[2 * j + 1]);
        }
        for (int h = 0; h < HG; ++h) {
            const float w =
                p[c / DK_SLOTS * DK_W + h * DK_SLOTS + c % DK_SLOTS];
            for (int j = 0; j < 2 * NP; ++j)
                a[h][j] += w * v[j];
        }
    }
    for (int h = 0; h < HG; ++h)
        for (int j = 0; j < 2 * NP; ++j)
            memcpy(acc + h * ld + d0 + DK_W * j, &a[h][j], sizeof(VF));
}

/* P.V of one block for HG heads (p as for pv_tile, acc: HG x ld); the
 * first pass over the block prefetches the next block's nnext value rows. */
DK_INLINE void DK(pv_block)(const float *p, const char *const *vrow,
                            int64_t kn, int64_t D, const int dtype,
                            const int HG, float *acc, int64_t ld,
                            const char *const *vnext, int64_t nnext)
{
    const int64_t row_bytes = D * DK_ESIZE(dtype);
    int64_t d0 = 0;
    for (; d0 + 2 * DK_W * DK_PAIRS <= D; d0 += 2 * DK_W * DK_PAIRS) {
        DK(pv_tile)(p, vrow, kn, d0, dtype, HG, DK_PAIRS, 0, acc, ld, vnext,
                    nnext, row_bytes);
        nnext = 0;
    }
    for (; d0 + 2 * DK_W <= D; d0 += 2 * DK_W) {
        DK(pv_tile)(p, vrow, kn, d0, dtype, HG, 1, 0, acc, ld, vnext, nnext,
                    row_bytes);
        nnext = 0;
    }
    if (d0 < D)
        DK(pv_tile)(p, vrow, kn, d0, dtype, HG, 1, D - d0, acc, ld, vnext,
                    nnext, row_bytes);
}

/* Pair order <-> column order of the 2W columns at x (bfloat16 only). */
DK_INLINE void DK(to_pair_order)(float *x, int64_t ld)
{
    float t[2 * DK_W];
    for (int64_t d0 = 0; d0 < ld; d0 += 2 * DK_W) {
        for (int j = 0; j < DK_W; ++j) {
            t[j] = x[d0 + 2 * j];
            t[DK_W + j] = x[d0 + 2 * j + 1];
        }
        memcpy(x + d0, t, sizeof t);
    }
}

DK_INLINE void DK(to_column_order)(float *x, int64_t ld)
{
    float t[2 * DK_W];
    for (int64_t d0 = 0; d0 < ld; d0 += 2 * DK_W) {
        for (int j = 0; j < DK_W; ++j) {
            t[2 * j] = x[d0 + j];
            t[2 * j + 1] = x[d0 + DK_W + j];
        }
        memcpy(x + d0, t, sizeof t);
    }
}

/*
 * The K and V rows of the next n (<= DK_BLOCK) slots of a row, from the
 * cursor (page: index into the row's page table, off: slot in that page),
 * which moves past them, and their slot ids; entries n .. DK_BLOCK - 1
 * repeat row 0 (they fill the last score tile and are masked).
 */
DK_INLINE void DK(walk_rows)(const int32_t *pages, int64_t P, int64_t *page,
                             int64_t *off, const char *kp, const char *vp,
                             int64_t row_bytes, int64_t n, const char **krow,
                             const char **vrow, int64_t *slot)
{
    for (int64_t i = 0; i < n; ++i) {
        slot[i] = (int64_t)pages[*page] * P + *off;
        const int64_t at = slot[i] * row_bytes;
        krow[i] = kp + at;
        vrow[i] = vp + at;
        if (++*off == P) {
            *off = 0;
            ++*page;
        }
    }
    for (int64_t i = n; i < DK_BLOCK && n > 0; ++i) {
        krow[i] = krow[0];
        vrow[i] = vrow[0];
        slot[i] = slot[0];
    }
}

/* Tile t's score or probability vector times the scales of its slots
 * times `factor` (lane h * DK_SLOTS + s: slot t * DK_SLOTS + s of the
 * block). */
DK_INLINE void DK(scale_tile)(float *vec, const float *scales,
                              const int64_t *slot, int64_t t, float factor)
{
    VF v, f;
    memcpy(&v, vec, sizeof v);
    for (int e = 0; e < DK_SLOTS; ++e)
        f[e] = scales[slot[t * DK_SLOTS + e]] * factor;
    for (int e = DK_SLOTS; e < DK_W; ++e)
        f[e] = f[e % DK_SLOTS];
    v *= f;
    memcpy(vec, &v, sizeof v);
}

DK_INLINE void DK(decode_range_impl)(const dms_cache_view *c, int64_t r,
                                     int64_t i0, int64_t i1, int64_t G,
                                     float scale, const void *q_data,
                                     int64_t q_off, int64_t q_stride,
                                     float *scratch, float *acc, float *m,
                                     float *l, const int dtype,
                                     const int bf16_dots)
{
    const int64_t D = c->D, ld = padded_dim(D), P = c->P;
    const int64_t groups = (G + 3) / 4;
    const int64_t row_bytes = D * DK_ESIZE(dtype);
    const int32_t *pages = c->page_table + r * c->max_pages;
    const char *kp = (const char *)c->k_pages, *vp = (const char *)c->v_pages;
    /* Scratch (decode_scratch_floats): the queries, then per head group
     * the block's score / probability vectors and the running max and sum
     * (lane h * DK_SLOTS + s holds head h's). */
    float *q = scratch;
    float *prob = q + G * ld;
    VF *m_run = (VF *)(prob + groups * DK_TILES * DK_W);
    VF *l_run = m_run + groups;

    /* The queries: raw bfloat16 for vdpbf16ps, else float32 in the order
     * the keys are loaded in; zero past D. */
    for (int64_t g = 0; g < G; ++g) {
        const int64_t off = q_off + g * q_stride;
        if (bf16_dots) {
            uint16_t *q16 = (uint16_t *)q + g * ld;
            memcpy(q16, (const uint16_t *)q_data + off,
                   sizeof(uint16_t) * (size_t)D);
            memset(q16 + D, 0, sizeof(uint16_t) * (size_t)(ld - D));
            continue;
        }
        for (int64_t d = 0; d < ld; ++d)
            q[g * ld + d] = d < D ? dms_load(q_data, c->dtype, off + d) : 0.0f;
        if (DK_PAIRED(dtype))
            DK(to_pair_order)(q + g * ld, ld);
    }
    for (int64_t gr = 0; gr < groups; ++gr) {
        m_run[gr] = DK(splat)(-INFINITY);
        l_run[gr] = (VF){0};
    }
    memset(acc, 0, sizeof(float) * (size_t)(G * ld));
    VI lane_slot, lane_head; /* the slot and head of each lane of a tile */
    for (int e = 0; e < DK_W; ++e) {
        lane_slot[e] = e % DK_SLOTS;
        lane_head[e] = e / DK_SLOTS;
    }

    /* The K and V rows of a block and of the DK_PF_BLOCKS after it, in a
     * ring (the page walk is incremental: no division per slot). The rows
     * DK_PF_BLOCKS blocks ahead are prefetched, K while this block's
     * scores are computed and V during its P.V, so the memory system
     * always has requests; the first blocks are asked for at once. */
    enum { RING = DK_PF_BLOCKS + 1 };
    int64_t page = i0 / P, off = i0 % P;
    const char *rows[RING][2][DK_BLOCK]; /* [block % RING][K, V][slot] */
    int64_t slots[RING][DK_BLOCK];
    for (int64_t j = 0; j < DK_PF_BLOCKS; ++j) {
        const int64_t n0 = i1 - i0 - j * DK_BLOCK;
        const int64_t n = n0 < DK_BLOCK ? n0 : DK_BLOCK;
        DK(walk_rows)(pages, P, &page, &off, kp, vp, row_bytes, n,
                      rows[j][0], rows[j][1], slots[j]);
        for (int64_t i = 0; i < n; ++i) {
            DK(prefetch_row)(rows[j][0][i], row_bytes);
            DK(prefetch_row)(rows[j][1][i], row_bytes);
        }
    }
    for (int64_t k0 = i0, b = 0; k0 < i1; k0 += DK_BLOCK, ++b) {
        const int64_t kn = i1 - k0 < DK_BLOCK ? i1 - k0 : DK_BLOCK;
        const int64_t tiles = (kn + DK_SLOTS - 1) / DK_SLOTS;
        const int cur = (int)(b % RING), ahead = (int)((b + DK_PF_BLOCKS) % RING);
        const int64_t left = i1 - k0 - DK_PF_BLOCKS * DK_BLOCK;
        const int64_t nnext = left < 0 ? 0 : left < DK_BLOCK ? left : DK_BLOCK;
        DK(walk_rows)(pages, P, &page, &off, kp, vp, row_bytes, nnext,
                      rows[ahead][0], rows[ahead][1], slots[ahead]);
        const char *const *krow = rows[cur][0], *const *vrow = rows[cur][1];
        const char *const *knext = rows[ahead][0];
        const char *const *vnext = rows[ahead][1];

        /* Scores, one DK_SLOTS-slot tile of every head group at a time. */
        for (int64_t t = 0; t < tiles; ++t) {
            for (int64_t i = t * DK_SLOTS; i < (t + 1) * DK_SLOTS; ++i)
                if (i < nnext)
                    DK(prefetch_row)(knext[i], row_bytes);
            const char *const *kt = krow + t * DK_SLOTS;
            for (int64_t gr = 0; gr < groups; ++gr) {
                const int hg = G - 4 * gr < 4 ? (int)(G - 4 * gr) : 4;
                VF sv;
#if DK_ISA == DK_AVX512BF16
                if (bf16_dots) {
                    const uint16_t *q16 = (const uint16_t *)q + 4 * gr * ld;
                    switch (hg) {
                    case 1: sv = DK(dot_tile_bf16)(q16, ld, kt, D, dtype, 1); break;
                    case 2: sv = DK(dot_tile_bf16)(q16, ld, kt, D, dtype, 2); break;
                    case 3: sv = DK(dot_tile_bf16)(q16, ld, kt, D, dtype, 3); break;
                    default: sv = DK(dot_tile_bf16)(q16, ld, kt, D, dtype, 4); break;
                    }
                    memcpy(prob + (gr * DK_TILES + t) * DK_W, &sv, sizeof sv);
                    if (DK_IS_FP8(dtype))
                        DK(scale_tile)(prob + (gr * DK_TILES + t) * DK_W,
                                       c->k_scales, slots[cur], t, 1.0f);
                    continue;
                }
#endif
                const float *qg = q + 4 * gr * ld;
                switch (hg) {
                case 1: sv = DK(dot_tile)(qg, ld, kt, D, dtype, 1); break;
                case 2: sv = DK(dot_tile)(qg, ld, kt, D, dtype, 2); break;
                case 3: sv = DK(dot_tile)(qg, ld, kt, D, dtype, 3); break;
                default: sv = DK(dot_tile)(qg, ld, kt, D, dtype, 4); break;
                }
                memcpy(prob + (gr * DK_TILES + t) * DK_W, &sv, sizeof sv);
                if (DK_IS_FP8(dtype))
                    DK(scale_tile)(prob + (gr * DK_TILES + t) * DK_W,
                                   c->k_scales, slots[cur], t,
                                   DK(fp8_factor)(dtype));
            }
        }

        /* Online softmax per head group, all its heads in each vector:
         * lanes of slots past kn or of heads past G get -inf. */
        for (int64_t gr = 0; gr < groups; ++gr) {
            const int hg = G - 4 * gr < 4 ? (int)(G - 4 * gr) : 4;
            const VI head_ok = lane_head < (VI){0} + hg;
            float *pg = prob + gr * DK_TILES * DK_W;
            VF bmax = DK(splat)(-INFINITY);
            for (int64_t t = 0; t < tiles; ++t) {
                VF sv;
                memcpy(&sv, pg + t * DK_W, sizeof sv);
                const VI ok = head_ok & (lane_slot < (VI){0} +
                                         (int32_t)(kn - t * DK_SLOTS));
                sv = DK(select)(ok, sv * scale, DK(splat)(-INFINITY));
                memcpy(pg + t * DK_W, &sv, sizeof sv);
                bmax = DK(vmax)(bmax, sv);
            }
            const VF m_new = DK(vmax)(m_run[gr], DK(head_max)(bmax));
            /* A head with nothing finite yet subtracts 0: all its
             * probabilities are exp(-inf) = 0. */
            const VF m_sub = DK(select)(m_new == DK(splat)(-INFINITY),
                                        (VF){0}, m_new);
            VF sum = (VF){0};
            for (int64_t t = 0; t < tiles; ++t) {
                VF sv;
                memcpy(&sv, pg + t * DK_W, sizeof sv);
                const VF p = DK(exp_nonpositive)(sv - m_sub);
                memcpy(pg + t * DK_W, &p, sizeof p);
                sum += p;
            }
            const VF corr = DK(exp_nonpositive)(m_run[gr] - m_sub);
            l_run[gr] = l_run[gr] * corr + DK(head_sum)(sum);
            m_run[gr] = m_new;
            for (int64_t t = 0; t < tiles && DK_IS_FP8(dtype); ++t)
                DK(scale_tile)(pg + t * DK_W, c->v_scales, slots[cur], t,
                               DK(fp8_factor)(dtype));
            for (int h = 0; h < hg; ++h) {
                const float ch = corr[h * DK_SLOTS];
                if (ch == 1.0f)
                    continue;
                float *ag = acc + (4 * gr + h) * ld;
                for (int64_t d = 0; d < ld; ++d)
                    ag[d] *= ch;
            }
        }

        /* P.V, one head group at a time; the first prefetches. */
        for (int64_t gr = 0; gr < groups; ++gr) {
            const int hg = G - 4 * gr < 4 ? (int)(G - 4 * gr) : 4;
            const float *pg = prob + gr * DK_TILES * DK_W;
            float *ag = acc + 4 * gr * ld;
            const int64_t pf = gr == 0 ? nnext : 0;
            switch (hg) {
            case 1: DK(pv_block)(pg, vrow, kn, D, dtype, 1, ag, ld, vnext, pf); break;
            case 2: DK(pv_block)(pg, vrow, kn, D, dtype, 2, ag, ld, vnext, pf); break;
            case 3: DK(pv_block)(pg, vrow, kn, D, dtype, 3, ag, ld, vnext, pf); break;
            default: DK(pv_block)(pg, vrow, kn, D, dtype, 4, ag, ld, vnext, pf); break;
            }
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        m[g] = m_run[g / 4][g % 4 * DK_SLOTS];
        l[g] = l_run[g / 4][g % 4 * DK_SLOTS];
    }
    if (DK_PAIRED(dtype))
        for (int64_t g = 0; g < G; ++g)
            DK(to_column_order)(acc + g * ld, ld);
}

/*
 * Slots [i0, i1) of row r for its G query heads: the unnormalised output
 * acc (G x ld, column order), running max m and sum l per head. The
 * queries are G rows of q_data (the pages' dtype) at element offset q_off,
 * q_stride apart; scratch: decode_scratch_floats(G, ld) floats.
 */
DK_TARGET static void DK(decode_range)(const dms_cache_view *c, int64_t r,
                                       int64_t i0, int64_t i1, int64_t G,
                                       float scale, const void *q_data,
                                       int64_t q_off, int64_t q_stride,
                                       float *scratch, float *acc, float *m,
                                       float *l)
{
    if (c->fmt != DMS_KV_NATIVE) {
        /* bfloat16 queries multiply the codes' bfloat16 with vdpbf16ps
         * (exact products, as for bfloat16 pages); others convert. */
        const int dots = DK_ISA == DK_AVX512BF16 && c->dtype == DMS_BFLOAT16;
        if (c->fmt == DMS_KV_FP8_E5M2)
            DK(decode_range_impl)(c, r, i0, i1, G, scale, q_data, q_off,
                                  q_stride, scratch, acc, m, l, DK_FP8_E5M2,
                                  dots);
        else
            DK(decode_range_impl)(c, r, i0, i1, G, scale, q_data, q_off,
                                  q_stride, scratch, acc, m, l, DK_FP8_E4M3,
                                  dots);
        return;
    }
    switch (c->dtype) {
    case DMS_FLOAT32:
        DK(decode_range_impl)(c, r, i0, i1, G, scale, q_data, q_off,
                              q_stride, scratch, acc, m, l, DMS_FLOAT32, 0);
        break;
    case DMS_BFLOAT16:
        DK(decode_range_impl)(c, r, i0, i1, G, scale, q_data, q_off,
                              q_stride, scratch, acc, m, l, DMS_BFLOAT16,
                              DK_ISA == DK_AVX512BF16);
        break;
    default:
        DK(decode_range_impl)(c, r, i0, i1, G, scale, q_data, q_off,
                              q_stride, scratch, acc, m, l, DMS_FLOAT16, 0);
        break;
    }
}

#undef DK_TARGET
#undef DK_INLINE
#undef DK_W
#undef DK_SLOTS
#undef DK_PAIRS
#undef DK_BLOCK
#undef VF
#undef VI
#undef VU
#undef DK_TILES
#undef DK_SWAP2
#undef DK_SWAP1
