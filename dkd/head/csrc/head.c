/* Native kernels of the head (dkd/head/native.py): plain C, no torch headers.
 *
 * 1. dkd_row_adam: lazy row-sparse Adam / AdamW in one pass over each touched row.
 * 2. dkd_gather_dot / dkd_gather_axpy: the per-row part of the hybrid logits
 *    (logits[b, j] = x_b . W[idx[b, j]]) and its features' gradient, reading the weight
 *    rows in place instead of gathering a (B, k, d) copy first.
 * 3. dkd_sampled_loss: the one-process sampled KD + CE loss and its gradient in one pass.
 * 4. dkd_topk_block / dkd_topk_finish: a running per-row top-k over column blocks of the
 *    teacher's wide logits, which are then never materialised at (B, C).
 * 5. dkd_outside: the classes of per-sample tail draws (rank inversion outside the top-K);
 *    dkd_rank_draw: a rank proposal's whole per-sample draw (classes and corrections).
 *
 * --- 1. dkd_row_adam ---
 *
 * Each touched row r of the (C, d) float32 weight w and its moments m, v is updated in
 * place with its gradient g (rows NULL: every row, a dense step):
 *   t = ++step[r];  a = bc1 / sqrt(bc2),  e = bc1 * eps  (bc = 1 - beta^t, in double)
 *   g' = g + wd * p            (Adam, L2)      or   p *= 1 - lr * wd   (AdamW)
 *   m = lerp(m, g', 1 - b1);  v = b2 * v + (1 - b2) * g'^2;  p += -lr * (m / (sqrt(v) * a + e))
 * With a catch-up clock (last != NULL) lr is lr * min(clock - last[r], cap) for this row
 * and last[r] = clock: a row's step counts the steps it was not updated (see
 * SparseRowOptimizer, "catch-up").
 * the same operations as SparseRowOptimizer's torch path (no FMA contraction here; torch's
 * vectorised kernels may contract, so results agree to float rounding, not bit for bit).
 * Rows must be unique unless a slot map is given (repeated rows on the ungrouped path
 * would be updated by two threads at once). With a slot map a row's gradients are summed
 * in order of occurrence (as the torch path's index_add does) into a row buffer,
 * and some may be given factored, coef * x[src] (the hybrid kernel's per-sample rows:
 * never materialised as a (B, d) tensor). No gather, no scatter: every element of w, m,
 * v, g is read once and w, m, v written once, which is the whole point:
 * the torch path needs ~15 passes (gathers, lerp, addcmul, sqrt, ..., index_copy back).
 * nthreads > 1 splits the rows over pthreads when the step is large enough to pay.
 */
#include <math.h>
#include <pthread.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Every kernel that indexes by an id checks all ids first and returns -1, writing
 * nothing, when one is outside [0, hi): the caller raises (an out-of-range id must be an
 * error, as in torch's index_select, not a write past the end of a buffer). */
static int ids_ok(const int64_t *v, int64_t n, int64_t hi)
{
    for (int64_t i = 0; i < n; ++i)
        if (v[i] < 0 || v[i] >= hi) return 0;
    return 1;
}

typedef struct {
    float *w, *m, *v, *step, *last;
    int64_t d;
    double lr, b1, b2, eps, wd;
    int decoupled;
    float clock, cap;                      /* catch-up (last != NULL) */
} adam_t;

/* One Adam step of row r with gradient gr (d,). */
static void adam_row(const adam_t *o, int64_t r, const float *restrict gr)
{
    double lr = o->lr;
    if (o->last) {
        float gap = o->clock - o->last[r];
        lr *= (double)(gap < o->cap ? gap : o->cap);
        o->last[r] = o->clock;
    }
    const float nlr = -(float)lr, wd = (float)o->wd;
    const float omb1 = (float)(1.0 - o->b1), b1 = (float)o->b1;
    const float b2 = (float)o->b2, omb2 = (float)(1.0 - o->b2);
    const float decay = (float)(1.0 - lr * o->wd);
    const int64_t d = o->d;
    const float t = o->step[r] + 1.0f;
    o->step[r] = t;
    const double bc1 = 1.0 - pow(o->b1, (double)t), bc2 = 1.0 - pow(o->b2, (double)t);
    const float a = (float)(bc1 / sqrt(bc2)), e = (float)(bc1 * o->eps);
    float *restrict p = o->w + r * d, *restrict mr = o->m + r * d, *restrict vr = o->v + r * d;
    if (o->decoupled && wd != 0.0f)
        for (int64_t k = 0; k < d; ++k) p[k] *= decay;
    for (int64_t k = 0; k < d; ++k) {
        float gk = gr[k];
        if (!o->decoupled) gk = gk + wd * p[k];
        /* torch.lerp: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w) */
        const float mk = omb1 < 0.5f ? mr[k] + omb1 * (gk - mr[k]) : gk - (gk - mr[k]) * b1;
        const float vk = vr[k] * b2 + omb2 * gk * gk;
        mr[k] = mk;
        vr[k] = vk;
        p[k] = p[k] + nlr * (mk / (sqrtf(vk) * a + e));
    }
}

/* Gradient sources: entries e < n_f are factored, gradient coef[e] * x[src[e]], of row
 * rows_f[e]; entries e >= n_f are dense, gradient g[e - n_f], of row rows_d[e - n_f]
 * (rows_d NULL: row e - n_f). Grouped (urow != NULL): distinct row k = urow[k] gets the
 * sum of entries list[start[k] .. start[k + 1]) in order of occurrence. */
typedef struct {
    const adam_t *o;
    const int64_t *rows_f, *src, *rows_d;
    const float *coef, *x, *g;
    int64_t n_f;
    const int64_t *urow, *start, *list;
    int64_t lo, hi;
    float *buf;                            /* grouped: this job's (d,) gradient row */
} job_t;

static void run_job(const job_t *j)
{
    const int64_t d = j->o->d;
    if (!j->urow) {                        /* unique dense rows: no summing */
        for (int64_t q = j->lo; q < j->hi; ++q)
            adam_row(j->o, j->rows_d ? j->rows_d[q] : q, j->g + q * d);
        return;
    }
    float *restrict buf = j->buf;
    for (int64_t k = j->lo; k < j->hi; ++k) {
        for (int64_t t = 0; t < d; ++t) buf[t] = 0.0f;
        for (int64_t q = j->start[k]; q < j->start[k + 1]; ++q) {
            const int64_t e = j->list[q];
            if (e < j->n_f) {
                const float c = j->coef[e];
                const float *restrict xs = j->x + j->src[e] * d;
                for (int64_t t = 0; t < d; ++t) buf[t] += c * xs[t];
            } else {
                const float *restrict gs = j->g + (e - j->n_f) * d;
                for (int64_t t = 0; t < d; ++t) buf[t] += gs[t];
            }
        }
        adam_row(j->o, j->urow[k], buf);
    }
}

static void *job_thread(void *arg) { run_job((const job_t *)arg); return 0; }

/* Group the n = n_f + n_d entries by row: returns the number u of distinct rows and fills
 * urow (u), start (u + 1), list (n) in scratch (5n + 2 int64); slot: (C,) scratch. */
static int64_t group_rows(const job_t *j, int64_t n, int64_t *slot, int64_t *scratch,
                          const int64_t **urow, const int64_t **start, const int64_t **list)
{
    int64_t *lead_of = scratch, *ur = scratch + n, *st = scratch + 2 * n;
    int64_t *pos = scratch + 3 * n + 1, *ls = scratch + 4 * n + 2;
#define ROW(e) ((e) < j->n_f ? j->rows_f[e] : (j->rows_d ? j->rows_d[(e) - j->n_f] : (e) - j->n_f))
    for (int64_t e = 0; e < n; ++e) slot[ROW(e)] = -1;
    int64_t u = 0;
    for (int64_t e = 0; e < n; ++e) {
        const int64_t r = ROW(e);
        if (slot[r] < 0) {
            slot[r] = u;
            ur[u] = r;
            pos[u++] = 0;
        }
        lead_of[e] = slot[r];
        pos[slot[r]]++;
    }
#undef ROW
    st[0] = 0;
    for (int64_t k = 0; k < u; ++k) {
        st[k + 1] = st[k] + pos[k];
        pos[k] = st[k];
    }
    for (int64_t e = 0; e < n; ++e) ls[pos[lead_of[e]]++] = e;
    *urow = ur;
    *start = st;
    *list = ls;
    return u;
}

#define MAX_THREADS 64

/* Lazy Adam / AdamW over the rows of n_d dense gradient rows (rows_d, g) and n_f factored
 * ones (rows_f, coef, src, x); see job_t. slot == NULL: the dense rows are unique and there
 * are no factored ones (no grouping). Returns the number of distinct rows updated (-1: an
 * id out of range, -2: out of memory; nothing written then). */
int64_t dkd_row_adam(float *w, float *m, float *v, float *step, int64_t C, int64_t d,
                     const int64_t *rows_d, int64_t n_d, const float *g,
                     const int64_t *rows_f, int64_t n_f, const float *coef,
                     const int64_t *src, const float *x, int64_t nx,
                     double lr, double b1, double b2, double eps, double wd, int decoupled,
                     int nthreads, int64_t *slot, int64_t *scratch,
                     float *last, float clock, float cap)
{
    if ((rows_d && !ids_ok(rows_d, n_d, C)) || (!rows_d && n_d > C) ||
        (n_f && (!ids_ok(rows_f, n_f, C) || !ids_ok(src, n_f, nx))))
        return -1;
    adam_t o = {w, m, v, step, last, d, lr, b1, b2, eps, wd, decoupled, clock, cap};
    job_t base = {&o, rows_f, src, rows_d, coef, x, g, n_f, 0, 0, 0, 0, 0, 0};
    int64_t u = n_d;
    if (slot) u = group_rows(&base, n_f + n_d, slot, scratch, &base.urow, &base.start, &base.list);
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > u) nthreads = (int)u;
    if (nthreads < 1) nthreads = 1;
    float *bufs = 0;
    if (base.urow && !(bufs = malloc((size_t)nthreads * (size_t)(d > 0 ? d : 1) * sizeof(float))))
        return -2;
    for (int k = 0; k < nthreads; ++k) {
        jobs[k] = base;
        jobs[k].lo = u * k / nthreads;
        jobs[k].hi = u * (k + 1) / nthreads;
        jobs[k].buf = bufs ? bufs + (size_t)k * (size_t)d : 0;
    }
    int started = 0;
    for (int k = 1; k < nthreads; ++k) {
        if (pthread_create(&tid[k], 0, job_thread, &jobs[k]) != 0) break;
        started = k;
    }
    run_job(&jobs[0]);
    for (int k = started + 1; k < nthreads; ++k) run_job(&jobs[k]);   /* not started: inline */
    for (int k = 1; k <= started; ++k) pthread_join(tid[k], 0);
    free(bufs);
    return u;
}

/* --- 2. per-row gathered products (idx: (B, k) row ids into w (C, d); x: (B, d)) --- */

/* out[b * ld + j] = x_b . w[idx[b, j]]. Sixteen partial sums: vectorisable without
 * reassociation flags (the order differs from torch's, within float rounding). */
int dkd_gather_dot(float *out, int64_t ld, const float *x, const float *w, int64_t C,
                   const int64_t *idx, int64_t B, int64_t k, int64_t d)
{
    if (!ids_ok(idx, B * k, C)) return -1;
    for (int64_t b = 0; b < B; ++b) {
        const float *restrict xb = x + b * d;
        for (int64_t j = 0; j < k; ++j) {
            const float *restrict wr = w + idx[b * k + j] * d;
            float acc[16] = {0};
            int64_t t = 0;
            for (; t + 16 <= d; t += 16)
                for (int l = 0; l < 16; ++l) acc[l] += xb[t + l] * wr[t + l];
            float s = 0.0f;
            for (; t < d; ++t) s += xb[t] * wr[t];
            for (int l = 0; l < 16; ++l) s += acc[l];
            out[b * ld + j] = s;
        }
    }
    return 0;
}

/* out[b] += sum_j coef[b * ldc + j] * w[idx[b, j]]   (out: (B, d), the features' gradient) */
int dkd_gather_axpy(float *out, const float *coef, int64_t ldc, const float *w, int64_t C,
                    const int64_t *idx, int64_t B, int64_t k, int64_t d)
{
    if (!ids_ok(idx, B * k, C)) return -1;
    for (int64_t b = 0; b < B; ++b) {
        float *restrict ob = out + b * d;
        for (int64_t j = 0; j < k; ++j) {
            const float c = coef[b * ldc + j];
            const float *restrict wr = w + idx[b * k + j] * d;
            for (int64_t t = 0; t < d; ++t) ob[t] += c * wr[t];
        }
    }
    return 0;
}

/* --- 3. the sampled mixed KD + CE loss on one process (dkd/losses/sampled.py) ---
 *
 * Row b of z, a (B, n) row-major; o, keep, tgt rows at strides ldo, ldk, ldt (0: one row
 * broadcast); keep / tgt NULL: every column kept / no CE term. With s = z/T - o,
 * t = a/T - o, c = z - o over the kept columns:
 *   kd_b = LSE(s) - sum softmax(t) s,   ce_b = LSE(c) - sum_{tgt} c,
 * and the gradient of lam T^2 mean_b kd_b + (1 - lam) mean_b ce_b w.r.t. z is written to
 * grad: lam T (q - p) / B + (1 - lam) (softmax(c) - onehot) / B (0 on dropped columns).
 * out[0], out[1]: the batch means of kd and ce. Same arithmetic as the torch
 * _SampledMixedLoss (float32, shifts by the row maxima; a row with no column gets 0). */
void dkd_sampled_loss(const float *z, const float *a, const float *o, int64_t ldo,
                      const uint8_t *keep, int64_t ldk, const uint8_t *tgt, int64_t ldt,
                      int64_t B, int64_t n, double T, double lam, float *grad, double *out)
{
    const float inv_t = (float)(1.0 / T);
    const float w_kd = (float)(lam * T / B), w_ce = (float)((1.0 - lam) / B);
    double kd_sum = 0.0, ce_sum = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        const float *zb = z + b * n, *ab = a + b * n, *ob = o + b * ldo;
        const uint8_t *kb = keep ? keep + b * ldk : 0, *yb = tgt ? tgt + b * ldt : 0;
        float *gb = grad + b * n;
        float ms = -INFINITY, mt = -INFINITY, mc = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
            if (kb && !kb[j]) continue;
            const float s = zb[j] * inv_t - ob[j], t = ab[j] * inv_t - ob[j], c = zb[j] - ob[j];
            ms = s > ms ? s : ms;
            mt = t > mt ? t : mt;
            mc = c > mc ? c : mc;
        }
        if (ms == -INFINITY) ms = 0.0f;
        if (mt == -INFINITY) mt = 0.0f;
        if (mc == -INFINITY) mc = 0.0f;
        float ss = 0.0f, st = 0.0f, sc = 0.0f, dts = 0.0f, cy = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            if (kb && !kb[j]) continue;
            const float s = zb[j] * inv_t - ob[j], t = ab[j] * inv_t - ob[j], c = zb[j] - ob[j];
            const float et = expf(t - mt);
            ss += expf(s - ms);
            st += et;
            dts += et * s;
            if (yb) {
                sc += expf(c - mc);
                if (yb[j]) cy += c;
            }
        }
        kd_sum += (double)(ms + logf(ss)) - (double)(dts / st);
        if (yb) ce_sum += (double)(mc + logf(sc)) - (double)cy;
        for (int64_t j = 0; j < n; ++j) {
            if (kb && !kb[j]) { gb[j] = 0.0f; continue; }
            const float s = zb[j] * inv_t - ob[j], t = ab[j] * inv_t - ob[j];
            float g = w_kd * (expf(s - ms) / ss - expf(t - mt) / st);
            if (yb) g += w_ce * (expf(zb[j] - ob[j] - mc) / sc - (yb[j] ? 1.0f : 0.0f));
            gb[j] = g;
        }
    }
    out[0] = kd_sum / (double)B;
    out[1] = tgt ? ce_sum / (double)B : NAN;
}

/* --- 4. running top-k over column blocks (the teacher's top-K, dkd/teacher/select.py) ---
 *
 * The teacher's (B, C) logits are produced a cache-sized block of columns at a time; each
 * block updates, per row, a buffer of up to 2k candidates above the row's threshold thr
 * (B,), and writes the block's row maxima (rowmax, for the streamed log-sum-exp). When a
 * buffer fills, a selection keeps its k best and thr becomes the worst kept value: later
 * values must beat it (strict >). So a value costs a vectorised compare, an append when it
 * passes (about k ln(C / k) per row for logits in no particular order) and a share of a
 * selection per k appends; a heap would sift on every entry. A candidate is one uint64
 * key, (~ord(value) << 32) | id with ord the order-preserving map of float bits to uint32:
 * a smaller key is a larger value, equal values ranked by the smaller id (seen first), so
 * selection and sort compare integers without branches. The row's log-sum-exp streams
 * along: m (B,) the running max, s (B,) Σ exp(z − m) in double, rescaled when m grows;
 * each block row is read again for its exponentials while it is still in L1. */
static inline uint32_t tk_ord(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

static inline float tk_value(uint64_t key)
{
    uint32_t o = ~(uint32_t)(key >> 32);
    uint32_t u = o ^ ((o & 0x80000000u) ? 0x80000000u : 0xFFFFFFFFu);
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static inline uint64_t tk_key(float x, int64_t id)
{
    return ((uint64_t)~tk_ord(x) << 32) | (uint32_t)id;
}

/* Rearrange keys[0, n) so that the k smallest come first (in no order); 0 < k < n.
 * Quickselect with a branch-free Lomuto partition (swap always, advance past a smaller
 * key): random compares would mispredict half the time. */
static void tk_select(uint64_t *a, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;    /* median of three as the pivot, at hi */
        uint64_t x = a[lo], y = a[mid], z = a[hi];
        uint64_t med = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t at = med == x ? lo : (med == y ? mid : hi);
        a[at] = z; a[hi] = med;
        int64_t st = lo;
        for (int64_t j = lo; j < hi; ++j) {
            uint64_t v = a[j];
            a[j] = a[st]; a[st] = v;
            st += v < med;
        }
        a[hi] = a[st]; a[st] = med;          /* [lo, st) smaller than the pivot at st */
        if (st == k - 1 || st == k) return;
        if (st > k) hi = st - 1; else lo = st + 1;
    }
}

/* Keep the k best of a row buffer; returns the new threshold (the worst kept value). */
static float tk_compact(uint64_t *a, int64_t n, int64_t k)
{
    tk_select(a, n, k);
    uint64_t w = a[0];
    for (int64_t j = 1; j < k; ++j) w = a[j] > w ? a[j] : w;
    return tk_value(w);
}

#if defined(__AVX512F__)
/* exp(x) for x <= 0, 16 lanes: 2^n · P(r), n = round(x / ln 2), r = x − n ln 2 (two-part
 * ln 2), P the degree-7 minimax polynomial of the single-precision exp (within 2 ulp);
 * scalef applies 2^n and flushes x < −104 to 0. */
static inline __m512 tk_exp16(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

/* Σ exp(row[j] − m) over the block row, for the streamed log-sum-exp. */
static double tk_expsum(const float *row, int64_t n, float m)
{
    int64_t j = 0;
    double s = 0.0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), vm = _mm512_set1_ps(m);
    for (; j + 16 <= n; j += 16)
        acc = _mm512_add_ps(acc, tk_exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm)));
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; j < n; ++j) s += expf(row[j] - m);
    return s;
}

static void tk_row(const float *row, int64_t n, int64_t col0, int64_t k, uint64_t *a,
                   int64_t *cnt, float *thr, float *lse_m, double *lse_s)
{
    float t = *thr, mx = -INFINITY;
    int64_t c = *cnt, j = 0;
#if defined(__AVX512F__)
    /* 16 at a time: one compare gives the mask of the values that beat t; they are packed
     * in registers, turned into keys and stored whole (the buffer has 16 spare slots), so
     * no branch depends on a value. (A compress straight to memory is microcoded on some
     * CPUs.) */
    __m512 vmx = _mm512_set1_ps(-INFINITY);
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                            14, 15);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), ones = _mm512_set1_epi32(-1);
    for (; j + 16 <= n; j += 16) {
        __m512 x = _mm512_loadu_ps(row + j);
        vmx = _mm512_max_ps(x, vmx);
        __mmask16 m = _mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_GT_OQ);
        if (!m) continue;
        __m512i u = _mm512_castps_si512(_mm512_maskz_compress_ps(m, x));
        __m512i ids = _mm512_maskz_compress_epi32(
            m, _mm512_add_epi32(_mm512_set1_epi32((int)(col0 + j)), lanes));
        __m512i hi = _mm512_xor_si512(
            _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign)), ones);
        for (int h = 0; h < 2; ++h) {        /* keys of lanes 8h .. 8h + 7 */
            __m256i hh = h ? _mm512_extracti64x4_epi64(hi, 1) : _mm512_castsi512_si256(hi);
            __m256i ii = h ? _mm512_extracti64x4_epi64(ids, 1) : _mm512_castsi512_si256(ids);
            _mm512_storeu_si512(a + c + 8 * h, _mm512_or_si512(
                _mm512_slli_epi64(_mm512_cvtepu32_epi64(hh), 32), _mm512_cvtepu32_epi64(ii)));
        }
        c += __builtin_popcount(m);
        if (c >= 2 * k) { t = tk_compact(a, c, k); c = k; }
    }
    mx = _mm512_reduce_max_ps(vmx);
#endif
    for (; j < n; ++j) {
        mx = row[j] > mx ? row[j] : mx;
        if (!(row[j] > t)) continue;
        a[c] = tk_key(row[j], col0 + j);
        if (++c >= 2 * k) { t = tk_compact(a, c, k); c = k; }
    }
    *cnt = c; *thr = t;
    float m = mx > *lse_m ? mx : *lse_m;        /* the running max; rescale the old sum */
    *lse_s = (*lse_s > 0.0 ? *lse_s * exp((double)*lse_m - m) : 0.0) + tk_expsum(row, n, m);
    *lse_m = m;
}

/* keys: (B, 2k + 16) candidate buffers (16 spare slots for whole-vector stores). */
void dkd_topk_block(const float *z, int64_t ld, int64_t B, int64_t n, int64_t col0,
                    int64_t k, uint64_t *keys, int64_t *cnt, float *thr, float *lse_m,
                    double *lse_s)
{
    for (int64_t b = 0; b < B; ++b)
        tk_row(z + b * ld, n, col0, k, keys + b * (2 * k + 16), cnt + b, thr + b, lse_m + b,
               lse_s + b);
}

/* LSD radix sort of a[0, n) on its low nbits bits, 8 at a time (a pass whose digit is the
 * same for all is skipped); tmp: n scratch. Returns the buffer that holds the result. */
static uint64_t *tk_radix(uint64_t *a, uint64_t *tmp, int64_t n, int nbits)
{
    uint64_t *src = a, *dst = tmp;
    for (int shift = 0; shift < nbits && n > 1; shift += 8) {
        int64_t h[257] = {0};
        for (int64_t j = 0; j < n; ++j) ++h[((src[j] >> shift) & 255) + 1];
        if (h[((src[0] >> shift) & 255) + 1] == n) continue;
        for (int d = 0; d < 256; ++d) h[d + 1] += h[d];
        for (int64_t j = 0; j < n; ++j) dst[h[(src[j] >> shift) & 255]++] = src[j];
        uint64_t *sw = src; src = dst; dst = sw;
    }
    return src;
}

/* Each row's k best, values descending (equal values: smaller id first), into vals / ids
 * (B, k): select, then a radix sort of the k keys. */
int dkd_topk_finish(uint64_t *keys, const int64_t *cnt, int64_t B, int64_t k, float *vals,
                    int64_t *ids)
{
    uint64_t *tmp = malloc(sizeof(uint64_t) * (size_t)k);
    if (!tmp) return -2;
    for (int64_t b = 0; b < B; ++b) {
        uint64_t *a = keys + b * (2 * k + 16), *src;
        if (cnt[b] > k) tk_select(a, cnt[b], k);
        src = tk_radix(a, tmp, k, 64);
        for (int64_t j = 0; j < k; ++j) {
            vals[b * k + j] = tk_value(src[j]);
            ids[b * k + j] = (int64_t)(uint32_t)src[j];
        }
    }
    free(tmp);
    return 0;
}

/* --- 5. dkd_outside: per-sample tail draws as classes (dkd/sampling/draw.py _outside) ---
 *
 * Row b excludes the K + 1 ids ex[b], extra[b] (its top-K and its target, or C when the
 * target is already in the top-K); its i-th allowed class (0-based) is i + #{q : s_q - q <= i} with
 * s the row's excluded ids sorted. One radix sort per row and a binary search per draw,
 * where the torch path needs a (B, K + 1) sort and a batched searchsorted (~5 ms at
 * B = 256, K = 256, m = 200 on a host). ex: (B, K), extra: (B,) ids in [0, C]; i: (B, m) draws,
 * row stride ldi (0: one row shared); out: (B, m). Returns -1 (writing nothing) for an id
 * outside [0, C], -2 without memory. */
/* Bits that hold every id in [0, C] (the radix sort's passes). */
static int id_bits(int64_t C)
{
    int nbits = 1;
    while (nbits < 63 && ((uint64_t)C >> nbits)) ++nbits;
    return nbits;
}

/* Row's excluded ids [ex[0, K), extra] sorted (buf: 2 (K + 1) scratch). */
static const uint64_t *excluded_sorted(const int64_t *ex, int64_t extra, int64_t K,
                                       uint64_t *buf, int nbits)
{
    for (int64_t q = 0; q < K; ++q) buf[q] = (uint64_t)ex[q];
    buf[K] = (uint64_t)extra;
    return tk_radix(buf, buf + K + 1, K + 1, nbits);
}

/* The x-th allowed class: x + #{q : sv[q] - q <= x} (sv: n sorted excluded ids). */
static inline int64_t allowed(const uint64_t *sv, int64_t n, int64_t x)
{
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if ((int64_t)sv[mid] - mid <= x) lo = mid + 1; else hi = mid;
    }
    return x + lo;
}

int dkd_outside(const int64_t *ex, const int64_t *extra, int64_t B, int64_t K, int64_t C,
                const int64_t *i, int64_t ldi, int64_t m, int64_t *out)
{
    if (!ids_ok(ex, B * K, C + 1) || !ids_ok(extra, B, C + 1)) return -1;
    int64_t K1 = K + 1;
    uint64_t *buf = malloc(sizeof(uint64_t) * 2 * (size_t)K1);
    if (!buf) return -2;
    int nbits = id_bits(C);
    for (int64_t b = 0; b < B; ++b) {
        const uint64_t *sv = excluded_sorted(ex + b * K, extra[b], K, buf, nbits);
        const int64_t *ib = i + b * ldi;
        for (int64_t j = 0; j < m; ++j) out[b * m + j] = allowed(sv, K1, ib[j]);
    }
    free(buf);
    return 0;
}

/* A rank proposal's per-sample draw (dkd/sampling/draw.py _per_sample, rank branch), all
 * rows in one pass. The m ranks kd (m,) are shared by the batch (drawn from the bins);
 * for row b a rank below h_b = K − [target in top-K] is a top-K class (column
 * kd + [kd >= pos_y], the target's column skipped), any other a uniform class outside the
 * row's top-K and target: the floor(u_tail · n_out)-th, by the rank inversion above.
 * Density: bins[kd] for a top-K rank, the row's tail mass / n_out in the tail; o =
 * log(density) − shift (shift = log Z − log m, the same float64 arithmetic as the torch
 * path). cum: (Kb + 1,) cumulative bins; out: cls, col (B, m) int64, o (B, m) float32,
 * tail (B, m) uint8. Returns -1 for an id outside [0, C], -2 without memory. */
int dkd_rank_draw(const int64_t *ids, const int64_t *y, const int64_t *pos_y, int64_t B,
                  int64_t K, int64_t C, const double *bins, const double *cum, int64_t Kb,
                  const int64_t *kd, const double *u_tail, int64_t m, double shift,
                  int64_t *cls, int64_t *col, float *o, uint8_t *tail)
{
    if (!ids_ok(ids, B * K, C) || !ids_ok(y, B, C)) return -1;
    uint64_t *buf = malloc(sizeof(uint64_t) * 2 * (size_t)(K + 1));
    if (!buf) return -2;
    int nbits = id_bits(C);
    double Z = cum[Kb];
    for (int64_t b = 0; b < B; ++b) {
        int64_t p = pos_y[b], y_in = p < K, h = K - y_in, n_out = (C - K) - !y_in;
        double tail_mass = Z - (h > 0 ? cum[h - 1] : 0.0);
        double lp_tail = log(tail_mass / (double)(n_out > 1 ? n_out : 1));
        const uint64_t *sv = excluded_sorted(ids + b * K, y_in ? C : y[b], K, buf, nbits);
        for (int64_t j = 0; j < m; ++j) {
            int64_t k = kd[j], t = k >= h, c = k + (k >= p);
            c = c < K - 1 ? c : K - 1;
            int64_t q = (int64_t)(u_tail[j] * (double)n_out);
            int64_t r = b * m + j;
            col[r] = c;
            tail[r] = (uint8_t)t;
            cls[r] = t ? allowed(sv, K + 1, q > 0 ? q : 0) : ids[b * K + c];
            o[r] = (float)((t ? lp_tail : log(bins[k])) - shift);
        }
    }
    free(buf);
    return 0;
}
