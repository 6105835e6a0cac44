/* Native kernels of the head (dkd/head/native.py): plain C, no torch headers.
 *
 * 1. dkd_row_adam: lazy row-sparse Adam / AdamW in one pass over each touched row.
 * 2. dkd_gather_dot / dkd_gather_axpy / dkd_scale_rows: the per-row part of the hybrid
 *    logits (logits[b, j] = x_b . W[idx[b, j]]) and its two backward products, reading the
 *    weight rows in place instead of gathering a (B, k, d) copy first.
 *
 * --- 1. dkd_row_adam ---
 *
 * For each i < u, row r = rows[i] (rows == NULL: r = i, a dense step) of the (C, d)
 * float32 weight w and its moments m, v is updated in place with gradient row g[i]:
 *   t = ++step[r];  a = bc1 / sqrt(bc2),  e = bc1 * eps  (bc = 1 - beta^t, in double)
 *   g' = g + wd * p            (Adam, L2)      or   p *= 1 - lr * wd   (AdamW)
 *   m = lerp(m, g', 1 - b1);  v = b2 * v + (1 - b2) * g'^2;  p += -lr * (m / (sqrt(v) * a + e))
 * which is SparseRowOptimizer's torch path operation for operation (same rounding order,
 * no FMA contraction). Rows may repeat when a slot map is given: each duplicate's gradient
 * is first summed into its first occurrence's row of g (g is scratch then), in order of
 * occurrence, as the torch path's index_add does. No gather, no scatter, no scratch: every
 * element of w, m, v, g is read once and w, m, v written once, which is the whole point:
 * the torch path needs ~15 passes (gathers, lerp, addcmul, sqrt, ..., index_copy back).
 * nthreads > 1 splits the rows over pthreads when the step is large enough to pay.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

typedef struct {
    float *w, *m, *v, *step;
    const int64_t *rows, *lead;     /* lead: positions i to update (NULL: every i) */
    const float *g;
    int64_t lo, hi, d;
    double lr, b1, b2, eps, wd;
    int decoupled;
} job_t;

static void adam_rows(const job_t *j)
{
    const float lr = (float)j->lr, nlr = -(float)j->lr, wd = (float)j->wd;
    const float omb1 = (float)(1.0 - j->b1), b1 = (float)j->b1;
    const float b2 = (float)j->b2, omb2 = (float)(1.0 - j->b2);
    const float decay = (float)(1.0 - j->lr * j->wd);
    const int64_t d = j->d;
    (void)lr;
    for (int64_t q = j->lo; q < j->hi; ++q) {
        const int64_t i = j->lead ? j->lead[q] : q;
        const int64_t r = j->rows ? j->rows[i] : i;
        const float t = j->step[r] + 1.0f;
        j->step[r] = t;
        const double bc1 = 1.0 - pow(j->b1, (double)t), bc2 = 1.0 - pow(j->b2, (double)t);
        const float a = (float)(bc1 / sqrt(bc2)), e = (float)(bc1 * j->eps);
        float *restrict p = j->w + r * d, *restrict mr = j->m + r * d, *restrict vr = j->v + r * d;
        const float *restrict gr = j->g + i * d;
        if (j->decoupled && wd != 0.0f)
            for (int64_t k = 0; k < d; ++k) p[k] *= decay;
        for (int64_t k = 0; k < d; ++k) {
            float gk = gr[k];
            if (!j->decoupled) gk = gk + wd * p[k];
            /* torch.lerp: start + w * (end - start) for w < 0.5, else end - (end - start) * (1 - w) */
            const float mk = omb1 < 0.5f ? mr[k] + omb1 * (gk - mr[k]) : gk - (gk - mr[k]) * b1;
            const float vk = vr[k] * b2 + omb2 * gk * gk;
            mr[k] = mk;
            vr[k] = vk;
            p[k] = p[k] + nlr * (mk / (sqrtf(vk) * a + e));
        }
    }
}

static void *adam_thread(void *arg) { adam_rows((const job_t *)arg); return 0; }

/* Sum the gradient rows of repeated ids into their first occurrence; write the positions
 * of first occurrences to lead and return their count. slot: (C,) scratch. */
static int64_t coalesce(const int64_t *rows, int64_t n, float *g, int64_t d, int64_t *slot,
                        int64_t *lead)
{
    int64_t u = 0;
    for (int64_t i = 0; i < n; ++i) slot[rows[i]] = -1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = slot[rows[i]];
        if (s < 0) {
            slot[rows[i]] = i;
            lead[u++] = i;
            continue;
        }
        float *restrict dst = g + s * d;
        const float *restrict src = g + i * d;
        for (int64_t k = 0; k < d; ++k) dst[k] += src[k];
    }
    return u;
}

#define MAX_THREADS 64

/* n gradient rows; slot/lead non-NULL: rows may repeat (g is then overwritten). Returns the
 * number of distinct rows updated. */
int64_t dkd_row_adam(float *w, float *m, float *v, float *step, const int64_t *rows, int64_t n,
                     float *g, int64_t d, double lr, double b1, double b2, double eps,
                     double wd, int decoupled, int nthreads, int64_t *slot, int64_t *lead)
{
    const int64_t u = (rows && slot && lead) ? coalesce(rows, n, g, d, slot, lead) : n;
    if (!(rows && slot && lead)) lead = 0;
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > u) nthreads = (int)u;
    if (nthreads < 1) nthreads = 1;
    int started = 0;
    for (int k = 0; k < nthreads; ++k) {
        job_t j = {w, m, v, step, rows, lead, g, u * k / nthreads, u * (k + 1) / nthreads, d,
                   lr, b1, b2, eps, wd, decoupled};
        jobs[k] = j;
    }
    for (int k = 1; k < nthreads; ++k)
        if (pthread_create(&tid[k], 0, adam_thread, &jobs[k]) == 0) started = k;
        else break;
    adam_rows(&jobs[0]);
    for (int k = started + 1; k < nthreads; ++k) adam_rows(&jobs[k]);  /* not started: inline */
    for (int k = 1; k <= started; ++k) pthread_join(tid[k], 0);
    return u;
}

/* --- 2. per-row gathered products (idx: (B, k) row ids into w (C, d); x: (B, d)) --- */

/* out[b * ld + j] = x_b . w[idx[b, j]]. Sixteen partial sums: vectorisable without
 * reassociation flags (the order differs from torch's, within float rounding). */
void dkd_gather_dot(float *out, int64_t ld, const float *x, const float *w, const int64_t *idx,
                    int64_t B, int64_t k, int64_t d)
{
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
}

/* out[b] += sum_j coef[b * ldc + j] * w[idx[b, j]]   (out: (B, d), the features' gradient) */
void dkd_gather_axpy(float *out, const float *coef, int64_t ldc, const float *w,
                     const int64_t *idx, int64_t B, int64_t k, int64_t d)
{
    for (int64_t b = 0; b < B; ++b) {
        float *restrict ob = out + b * d;
        for (int64_t j = 0; j < k; ++j) {
            const float c = coef[b * ldc + j];
            const float *restrict wr = w + idx[b * k + j] * d;
            for (int64_t t = 0; t < d; ++t) ob[t] += c * wr[t];
        }
    }
}

/* out[b * k + j] = coef[b * ldc + j] * x_b   (out: (B * k, d), the rows' gradients) */
void dkd_scale_rows(float *out, const float *coef, int64_t ldc, const float *x, int64_t B,
                    int64_t k, int64_t d)
{
    for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < k; ++j) {
            const float c = coef[b * ldc + j];
            float *restrict o = out + (b * k + j) * d;
            const float *restrict xb = x + b * d;
            for (int64_t t = 0; t < d; ++t) o[t] = c * xb[t];
        }
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
