/*
 * attn_decode.c - times dms_attn_decode through the C API alone (no Python,
 * no DLPack), for the per-call overhead of the Python path to be measured
 * against it: B = 1, H = 8 KV heads, G = 4, D = 128, bfloat16 pages of 256
 * slots, SLOTS stored per row, with 1 and 2 threads. Checks one query head
 * against a float64 reference first. Prints the minimum and the median of 7
 * runs of CALLS calls. Build and run from the repository root:
 */
// gcc -std=c11 -O3 -ffp-contract=fast -fopenmp -Icsrc csrc/core/*.c
//     csrc/cpu/*.c csrc/dev/attn_decode.c -lm -o /tmp/attn_decode
// /tmp/attn_decode [SLOTS=512] [CALLS=2000]
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dms.h"
#include "tests/host_view.h"

enum { B = 1, H = 8, G = 4, D = 128, P = 256, W = 512, RUNS = 7 };

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float bf16(uint16_t x)
{
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t to_bf16(float f) /* truncation is enough for test data */
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

static int by_value(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    const int64_t slots = argc > 1 ? atoll(argv[1]) : 512;
    const int calls = argc > 2 ? atoi(argv[2]) : 2000;
    if (slots < 1 || calls < 1) {
        fprintf(stderr, "usage: %s [SLOTS >= 1] [CALLS >= 1]\n", argv[0]);
        return 2;
    }
    const int64_t R = B * H, per_row = (slots + P - 1) / P;
    const int64_t n_pages = R * per_row;
    const size_t page_elems = (size_t)(n_pages * P * D);
    uint16_t *k = aligned_alloc(4096, page_elems * 2);
    uint16_t *v = aligned_alloc(4096, page_elems * 2);
    int32_t *slot_limit = malloc((size_t)(n_pages * P) * 4);
    int32_t *table = malloc((size_t)(R * per_row) * 4);
    int32_t *row_slots = malloc((size_t)R * 4), *row_seen = malloc((size_t)R * 4);
    int32_t *window = malloc((size_t)(R * (W + 1)) * 4);
    int32_t *free_pages = malloc((size_t)n_pages * 4), free_count = 0;
    if (!k || !v || !slot_limit || !table || !row_slots || !row_seen ||
        !window || !free_pages)
        return 1;
    srand(1);
    for (size_t i = 0; i < page_elems; ++i) {
        k[i] = to_bf16((float)rand() / RAND_MAX - 0.5f);
        v[i] = to_bf16((float)rand() / RAND_MAX - 0.5f);
    }
    for (int64_t i = 0; i < n_pages * P; ++i)
        slot_limit[i] = INT32_MAX;
    for (int64_t r = 0; r < R; ++r) {
        row_slots[r] = (int32_t)slots;
        row_seen[r] = (int32_t)slots;
        for (int64_t j = 0; j < per_row; ++j)
            table[r * per_row + j] = (int32_t)(r * per_row + j);
    }
    for (int64_t i = 0; i < R * (W + 1); ++i)
        window[i] = -1;
    for (int64_t i = 0; i < n_pages; ++i)
        free_pages[i] = (int32_t)i;

    host_cache hc;
    host_cache_init(&hc, k, v, DMS_BFLOAT16, n_pages, P, D, R, per_row, W,
                    slot_limit, table, row_slots, row_seen, window,
                    free_pages, &free_count);
    const int64_t s_q[4] = {B, H * G, 1, D}, s_lse[3] = {B, H * G, 1};
    static uint16_t q[H * G * D], o[H * G * D];
    static float lse[H * G];
    for (int i = 0; i < H * G * D; ++i)
        q[i] = to_bf16((float)rand() / RAND_MAX - 0.5f);
    dms_tensor tq = host_view(q, DMS_BFLOAT16, 4, s_q);
    dms_tensor to = host_view(o, DMS_BFLOAT16, 4, s_q);
    dms_tensor tlse = host_view(lse, DMS_FLOAT32, 3, s_lse);
    const dms_cache cache = hc.cache;
    const float scale = 1.0f / sqrtf((float)D);

    /* Validate query head 0 (KV row 0) against float64. */
    dms_exec one = {1, NULL};
    if (dms_attn_decode(&cache, &tq, scale, &to, &tlse, NULL, &one) != DMS_OK) {
        fprintf(stderr, "attn_decode: %s\n", dms_last_error());
        return 1;
    }
    double mx = -INFINITY, l = 0.0, acc[D] = {0};
    double *score = malloc((size_t)slots * sizeof *score);
    for (int64_t i = 0; i < slots; ++i) {
        const uint16_t *kr = k + ((size_t)table[i / P] * P + i % P) * D;
        double dot = 0.0;
        for (int d = 0; d < D; ++d)
            dot += (double)bf16(q[d]) * bf16(kr[d]);
        score[i] = dot * scale;
        mx = score[i] > mx ? score[i] : mx;
    }
    for (int64_t i = 0; i < slots; ++i) {
        const uint16_t *vr = v + ((size_t)table[i / P] * P + i % P) * D;
        const double p = exp(score[i] - mx);
        l += p;
        for (int d = 0; d < D; ++d)
            acc[d] += p * bf16(vr[d]);
    }
    double err = fabs(lse[0] - (mx + log(l)));
    for (int d = 0; d < D; ++d)
        err = fmax(err, fabs(bf16(o[d]) - acc[d] / l));
    free(score);
    if (!(err < 1e-2)) {
        fprintf(stderr, "attn_decode: off the float64 reference by %g\n", err);
        return 1;
    }

    const double bytes = 2.0 * (double)(R * slots * D) * 2;
    printf("attn_decode, C API only: B=%d H=%d G=%d D=%d bfloat16, %lld slots "
           "per row (%.2f MiB of K/V), kernel %s, max error %.1e\n",
           B, H, G, D, (long long)slots, bytes / (1 << 20),
           dms_cpu_kernel("attn_decode"), err);
    for (int threads = 1; threads <= 2; ++threads) {
        dms_exec exec = {threads, NULL};
        double t[RUNS];
        for (int i = 0; i < 200; ++i)
            dms_attn_decode(&cache, &tq, scale, &to, &tlse, NULL, &exec);
        for (int run = 0; run < RUNS; ++run) {
            const double t0 = now();
            for (int i = 0; i < calls; ++i)
                dms_attn_decode(&cache, &tq, scale, &to, &tlse, NULL, &exec);
            t[run] = (now() - t0) / calls;
        }
        qsort(t, RUNS, sizeof t[0], by_value);
        printf("%d thread%s: min %.1f us, median %.1f us (%.1f GB/s at the "
               "median)\n", threads, threads > 1 ? "s" : "", t[0] * 1e6,
               t[RUNS / 2] * 1e6, bytes / t[RUNS / 2] / 1e9);
    }
    free(k);
    free(v);
    free(slot_limit);
    free(table);
    free(row_slots);
    free(row_seen);
    free(window);
    free(free_pages);
    return 0;
}
