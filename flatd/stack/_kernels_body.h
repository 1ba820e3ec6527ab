/* The kernels of _kernels.c, included once per instruction set: every name is K(name). */

/* ------------------------------------------------------------------ networks */

/* Apply compare-exchange pairs to whole rows of s (n x w, row stride st): afterwards
 * s[k] holds the k-th smallest value of each column, for the outputs the network sorts. */
static inline void K(cmpx)(float *s, ix w, ix st, const int64_t *net, ix nnet) {
    for (ix k = 0; k < nnet; k++) {
        float *a = s + net[2 * k] * st;
        float *b = s + net[2 * k + 1] * st;
        ix c = 0;
        /* min(y, x) = y < x ? y : x and max(x, y) = x > y ? x : y, as the scalar loop */
#if defined(__AVX__)
        for (; c + 8 <= w; c += 8) {
            __m256 x = _mm256_loadu_ps(a + c), y = _mm256_loadu_ps(b + c);
            _mm256_storeu_ps(a + c, _mm256_min_ps(y, x));
            _mm256_storeu_ps(b + c, _mm256_max_ps(x, y));
        }
#elif defined(__SSE__)
        for (; c + 4 <= w; c += 4) {
            __m128 x = _mm_loadu_ps(a + c), y = _mm_loadu_ps(b + c);
            _mm_storeu_ps(a + c, _mm_min_ps(y, x));
            _mm_storeu_ps(b + c, _mm_max_ps(x, y));
        }
#endif
        for (; c < w; c++) {
            float x = a[c], y = b[c];
            a[c] = y < x ? y : x;
            b[c] = y < x ? x : y;
        }
    }
}

static inline void K(copy_tile)(const Stack *S, ix r, ix c0, ix w, float *s, ix st) {
    for (ix i = 0; i < S->n; i++) memcpy(s + i * st, S->x + (i * S->rows + r) * S->cols + c0, (size_t)w * 4);
}

static inline const float *K(row)(const Stack *S, ix i, ix r, ix c0) {
    return S->x + (i * S->rows + r) * S->cols + c0;
}

/* ------------------------------------------------------------------ estimators */

static void K(est_mean)(const Stack *S, float *orow, ix r, ix c0, ix w, Scratch *T) {
    double *restrict acc = T->da;
    for (ix c = 0; c < w; c++) acc[c] = 0.0;
    for (ix i = 0; i < S->n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        for (ix c = 0; c < w; c++) acc[c] += x[c];
    }
    for (ix c = 0; c < w; c++) orow[c] = (float)(acc[c] / (double)S->n);
}

static void K(est_median)(const Stack *S, float *orow, ix r, ix c0, ix w, const Plan *P, Scratch *T) {
    ix n = S->n, st = P->tile;
    float *s = T->s;
    K(copy_tile)(S, r, c0, w, s, st);
    K(cmpx)(s, w, st, P->enet, P->nenet);
    const float *lo = s + ((n - 1) / 2) * st, *hi = s + (n / 2) * st;
    for (ix c = 0; c < w; c++) orow[c] = (float)(((double)lo[c] + (double)hi[c]) * 0.5);
}

static void K(est_mean_kept)(const Stack *S, const uint8_t *keep, float *orow, ix r, ix c0, ix w, const Plan *P,
                             Scratch *T) {
    double *restrict acc = T->da;
    int32_t *restrict cnt = T->ib;
    for (ix c = 0; c < w; c++) { acc[c] = 0.0; cnt[c] = 0; }
    for (ix i = 0; i < S->n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        const uint8_t *restrict k = keep + i * P->tile;
        for (ix c = 0; c < w; c++) { /* loads outside the condition: gcc vectorizes only then */
            float xv = x[c], v = (k[c] & 1) ? xv : 0.0f;
            acc[c] += (double)v;
        }
        for (ix c = 0; c < w; c++) cnt[c] += k[c] & 1;
    }
    for (ix c = 0; c < w; c++) orow[c] = cnt[c] > 0 ? (float)(acc[c] / cnt[c]) : NAN;
}

/* rejected values become +inf and sort last; the network sorts the whole column */
static void K(est_median_kept)(const Stack *S, const uint8_t *keep, float *orow, ix r, ix c0, ix w,
                               const Plan *P, Scratch *T) {
    ix n = S->n, st = P->tile;
    float *s = T->s;
    int32_t *restrict cnt = T->ib;
    for (ix c = 0; c < w; c++) cnt[c] = 0;
    for (ix i = 0; i < n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        const uint8_t *restrict k = keep + i * st;
        float *restrict d = s + i * st;
        for (ix c = 0; c < w; c++) { float xv = x[c]; d[c] = (k[c] & 1) ? xv : INFINITY; }
        for (ix c = 0; c < w; c++) cnt[c] += k[c] & 1;
    }
    K(cmpx)(s, w, st, P->enet, P->nenet);
    for (ix c = 0; c < w; c++) {
        ix m = cnt[c];
        orow[c] = m > 0 ? (float)(((double)s[((m - 1) / 2) * st + c] + (double)s[(m / 2) * st + c]) * 0.5) : NAN;
    }
}

/* ------------------------------------------------------------------ min/max and sigma */

/* Min/max clip of columns c0..c0+w of row r into keep[:, k0:k0 + w] (row stride kst). */
static void K(minmax_keep)(const Stack *S, ix r, ix c0, ix w, ix passes, uint8_t *keep, ix kst, ix k0, Scratch *T) {
    ix n = S->n;
    float *restrict lo = T->fa, *restrict hi = T->fb, *restrict nlo = T->fc, *restrict nhi = T->fd;
    int64_t *restrict cnt = T->ia;
    uint8_t *restrict clipped = T->ba, *restrict written = T->bb;
    for (ix c = 0; c < w; c++) { lo[c] = -INFINITY; hi[c] = INFINITY; clipped[c] = 0; written[c] = 0; }
    for (ix p = 0; p < passes; p++) {
        for (ix c = 0; c < w; c++) { nlo[c] = INFINITY; nhi[c] = -INFINITY; cnt[c] = 0; }
        for (ix i = 0; i < n; i++) { /* the smallest value left: every copy of it goes */
            const float *restrict x = K(row)(S, i, r, c0);
            for (ix c = 0; c < w; c++) {
                float v = x[c], m = nlo[c];
                nlo[c] = ((v > lo[c]) & (v < hi[c]) & (v < m)) ? v : m;
            }
        }
        for (ix i = 0; i < n; i++) { /* the largest of what is left: every copy of it goes */
            const float *restrict x = K(row)(S, i, r, c0);
            for (ix c = 0; c < w; c++) {
                float v = x[c], m = nhi[c];
                nhi[c] = ((v > nlo[c]) & (v < hi[c]) & (v > m)) ? v : m;
            }
        }
        int last = p == passes - 1;
        for (ix i = 0; i < n; i++) {
            const float *restrict x = K(row)(S, i, r, c0);
            uint8_t *restrict k = keep + i * kst + k0;
            for (ix c = 0; c < w; c++) {
                int inside = (x[c] > nlo[c]) & (x[c] < nhi[c]);
                cnt[c] += inside;
                if (last) k[c] = (uint8_t)(inside + 2 * (x[c] >= nhi[c]));
            }
        }
        ix changed = 0;
        for (ix c = 0; c < w; c++) {
            if (cnt[c] > 0) { /* else the pass would empty the column: keep the previous one */
                lo[c] = nlo[c]; hi[c] = nhi[c]; clipped[c] = 1; written[c] = (uint8_t)last; changed++;
            }
        }
        if (changed == 0) break;
    }
    ix todo = 0;
    for (ix c = 0; c < w; c++) todo += !written[c];
    if (todo) { /* columns whose last pass was not made (few distinct values): from lo, hi */
        for (ix i = 0; i < n; i++) {
            const float *x = K(row)(S, i, r, c0);
            uint8_t *k = keep + i * kst + k0;
            for (ix c = 0; c < w; c++) {
                if (written[c]) continue;
                if (!clipped[c] || (x[c] > lo[c] && x[c] < hi[c])) k[c] = 1;
                else k[c] = x[c] <= lo[c] ? 0 : 2;
            }
        }
    }
}

/* |x - mean| / std > z  <=>  N * D^2 > z^2 * sum_j D_j^2  with D = N*x - sum(x) */
static void K(reject_sigma)(const Stack *S, ix r, ix c0, ix w, const Plan *P, uint8_t *keep, ix kst, Scratch *T) {
    ix n = S->n;
    double fn = (double)n, z2 = P->p[0] * P->p[0];
    double *restrict s = T->da, *restrict v = T->db;
    for (ix c = 0; c < w; c++) { s[c] = 0.0; v[c] = 0.0; }
    for (ix i = 0; i < n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        for (ix c = 0; c < w; c++) s[c] += x[c];
    }
    for (ix i = 0; i < n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        for (ix c = 0; c < w; c++) { double d = fn * x[c] - s[c]; v[c] += d * d; }
    }
    for (ix c = 0; c < w; c++) v[c] *= z2;
    for (ix i = 0; i < n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        uint8_t *restrict k = keep + i * kst;
        for (ix c = 0; c < w; c++) {
            double d = fn * x[c] - s[c];
            int out = fn * d * d > v[c];
            k[c] = (uint8_t)(1 - out + 2 * (out & (d > 0)));
        }
    }
    /* only z < 1 can reject a whole column: the original then falls back to min/max n=2 */
    if (z2 < 1.0001) {
        int32_t *cnt = T->ib; /* not used by minmax_keep */
        for (ix c = 0; c < w; c++) cnt[c] = 0;
        for (ix i = 0; i < n; i++)
            for (ix c = 0; c < w; c++) cnt[c] += keep[i * kst + c] == 1;
        for (ix c = 0; c < w; c++)
            if (cnt[c] == 0) K(minmax_keep)(S, r, c0 + c, 1, 2, keep, kst, c, T);
    }
}

/* ------------------------------------------------------------------ robust rejections
 * The column's N values sorted (stably) by a network; the algorithm in float64 on the
 * sorted values. sigma-iterative, winsorized, mad and percentile keep a range of the
 * sorted column (every copy of a value decided alike); linear-fit and esd decide by
 * position. A pass that would reject every value left keeps the median value(s). */

static inline double K(median_sorted)(const float *v, ix vs, ix a, ix b) {
    ix m = b - a;
    return ((double)v[(a + (m - 1) / 2) * vs] + (double)v[(a + m / 2) * vs]) * 0.5;
}

/* sample standard deviation (N - 1) of v[a..b) about `centre` (a value near the mean,
 * against cancellation): one pass of sums of d = v - centre and d^2 in four chains (the
 * adds do not wait on each other), q = sum d^2 - (sum d)^2 / m. Rounds differently from
 * a two-pass sum in the last bits only (tests/unit/test_rejection.py compares decisions
 * except within 1e-9 of a threshold). */
static inline double K(sd_about)(const float *v, ix vs, ix a, ix b, double centre) {
    ix m = b - a, j = a;
    double t1[4] = {0.0, 0.0, 0.0, 0.0}, t2[4] = {0.0, 0.0, 0.0, 0.0}, s1, s2, q;
    for (; j + 4 <= b; j += 4)
        for (int u = 0; u < 4; u++) {
            double d = (double)v[(j + u) * vs] - centre;
            t1[u] += d; t2[u] += d * d;
        }
    for (; j < b; j++) { double d = (double)v[j * vs] - centre; t1[0] += d; t2[0] += d * d; }
    s1 = (t1[0] + t1[1]) + (t1[2] + t1[3]);
    s2 = (t2[0] + t2[1]) + (t2[2] + t2[3]);
    q = s2 - s1 * (s1 / m);
    return sqrt((q > 0 ? q : 0.0) / (m - 1));
}

static inline void K(clip_range)(const float *v, ix vs, ix a, ix b, double centre, double dlow, double dhigh, ix *na,
                                 ix *nb) {
    ix x = a, y = b;
    while (x < b && centre - (double)v[(x) * vs] > dlow) x++;
    while (y > x && (double)v[(y - 1) * vs] - centre > dhigh) y--;
    *na = x; *nb = y;
}

static inline void K(middle)(ix a, ix b, ix *na, ix *nb) {
    ix m = b - a;
    *na = a + (m - 1) / 2; *nb = a + m / 2 + 1;
}

static void K(sigma_iterative_range)(const float *v, ix vs, ix n, double low, double high, ix *ra, ix *rb) {
    ix a = 0, b = n, na, nb;
    while (b - a >= 2) {
        double centre = K(median_sorted)(v, vs, a, b), sd = K(sd_about)(v, vs, a, b, centre);
        K(clip_range)(v, vs, a, b, centre, low * sd, high * sd, &na, &nb);
        if (na == nb) { K(middle)(a, b, ra, rb); return; }
        if (na == a && nb == b) break;
        a = na; b = nb;
    }
    *ra = a; *rb = b;
}

/* The k-th smallest |v - centre| over sorted v[a..b): the k values nearest the centre
 * are a window of k neighbours; a binary search finds it (shift right while the value
 * that would enter is nearer than the one that would leave), and the k-th smallest is
 * the window's wider end. The same differences as a merge outwards from the centre,
 * in log2(m - k) steps instead of k unpredictable branches. */
static inline double K(kth_deviation)(const float *v, ix vs, ix a, ix b, double centre, ix k) {
    ix lo = a, hi = b - k;
    while (lo < hi) {
        ix mid = (lo + hi) >> 1;
        int right = centre - (double)v[mid * vs] > (double)v[(mid + k) * vs] - centre;
        lo = right ? mid + 1 : lo;
        hi = right ? hi : mid;
    }
    double dl = centre - (double)v[lo * vs], dr = (double)v[(lo + k - 1) * vs] - centre;
    return dl > dr ? dl : dr;
}

static void K(mad_range)(const float *v, ix vs, ix n, double low, double high, ix *ra, ix *rb) {
    ix a = 0, b = n, na, nb;
    while (b - a >= 2) {
        ix m = b - a;
        double centre = K(median_sorted)(v, vs, a, b);
        double d1 = K(kth_deviation)(v, vs, a, b, centre, (m - 1) / 2 + 1);
        double d2 = (m & 1) ? d1 : K(kth_deviation)(v, vs, a, b, centre, m / 2 + 1);
        double sigma = 1.4826 * ((d1 + d2) * 0.5);
        K(clip_range)(v, vs, a, b, centre, low * sigma, high * sigma, &na, &nb);
        if (na == nb) { K(middle)(a, b, ra, rb); return; }
        if (na == a && nb == b) break;
        a = na; b = nb;
    }
    *ra = a; *rb = b;
}

/* Huber's winsorization on the sorted values v[a..b): w = clip(w, centre -+ 1.5 sigma)
 * repeatedly, sigma = 1.134 sd(w), until sigma moves by no more than 5e-4 of itself.
 * The winsorized values stay sorted and each clip moves whole tails, so w is always a
 * low group of kl values at one value, the values v[a+kl .. b-kh) untouched, and a high
 * group of kh values at one value: with the sums of (v - centre) and its square over the
 * untouched values (the whole range's, less each value as a group takes it), an
 * iteration costs O(1) plus the values newly clipped, instead of two passes over m.
 * The sums (and the starting sd, from the same sums) differ from two-pass sums in the
 * last bits only: a decision can differ only at a knife edge (tests/unit/test_rejection.py). */
/* One column's winsorization in progress (see winsorized_sigma). */
typedef struct {
    const float *v;
    ix vs, a, m, kl, kh;
    int it, active;
    double centre, gl, gh, m1, m2, sigma, inv_m, inv_m1;
} K(Winsor);

static inline void K(winsor_start)(K(Winsor) *W, const float *v, ix vs, ix a, ix m, double centre) {
    ix j = 0;
    double t1[4] = {0.0, 0.0, 0.0, 0.0}, t2[4] = {0.0, 0.0, 0.0, 0.0}, q;
    W->v = v; W->vs = vs; W->a = a; W->m = m; W->centre = centre;
    W->kl = W->kh = 0; W->it = 0; W->active = 1;
    W->gl = -INFINITY; W->gh = INFINITY; /* the groups' values */
    W->inv_m = 1.0 / m; W->inv_m1 = 1.0 / (m - 1); /* no division in the iterations' chain */
    for (; j + 4 <= m; j += 4) /* four chains of sums: the adds do not wait on each other */
        for (int u = 0; u < 4; u++) {
            double d = (double)v[(a + j + u) * vs] - centre;
            t1[u] += d; t2[u] += d * d;
        }
    for (; j < m; j++) { double d = (double)v[(a + j) * vs] - centre; t1[0] += d; t2[0] += d * d; }
    W->m1 = (t1[0] + t1[1]) + (t1[2] + t1[3]);
    W->m2 = (t2[0] + t2[1]) + (t2[2] + t2[3]);
    q = W->m2 - W->m1 * (W->m1 / m); /* the start: the sample sd */
    W->sigma = sqrt((q > 0 ? q : 0.0) / (m - 1));
}

/* One round: clip, new sigma; inactive once sigma moves by no more than 5e-4 of itself
 * or after WINSOR_ITERATIONS rounds. */
static inline void K(winsor_round)(K(Winsor) *W) {
    const float *v = W->v;
    ix vs = W->vs, a = W->a, m = W->m, kl = W->kl, kh = W->kh;
    double centre = W->centre, sigma = W->sigma, m1 = W->m1, m2 = W->m2;
    double lo = centre - 1.5 * sigma, hi = centre + 1.5 * sigma, s1, s2, dl, dh, q;
    if (lo > W->gl) { /* the low group and every value below lo move to lo */
        while (kl < m - kh && (double)v[(a + kl) * vs] < lo) {
            double d = (double)v[(a + kl) * vs] - centre;
            m1 -= d; m2 -= d * d; kl++;
        }
        W->gl = lo;
    }
    if (hi < W->gh) {
        while (m - kh > kl && (double)v[(a + m - kh - 1) * vs] > hi) {
            double d = (double)v[(a + m - kh - 1) * vs] - centre;
            m1 -= d; m2 -= d * d; kh++;
        }
        W->gh = hi;
    }
    if (kl + kh == m) { m1 = 0.0; m2 = 0.0; } /* nothing untouched: no rounding left over */
    dl = W->gl - centre;
    dh = W->gh - centre;
    s1 = (kl ? kl * dl : 0.0) + m1 + (kh ? kh * dh : 0.0);
    s2 = (kl ? kl * dl * dl : 0.0) + m2 + (kh ? kh * dh * dh : 0.0);
    q = s2 - s1 * (s1 * W->inv_m);
    if (q < 0) q = 0.0;
    W->sigma = 1.134 * sqrt(q * W->inv_m1);
    W->kl = kl; W->kh = kh; W->m1 = m1; W->m2 = m2;
    W->it++;
    if (!(fabs(W->sigma - sigma) > sigma * 0.0005) || W->it >= WINSOR_ITERATIONS) W->active = 0;
}

static double K(winsorized_sigma)(const float *v, ix vs, ix a, ix m, double centre) {
    K(Winsor) W;
    K(winsor_start)(&W, v, vs, a, m, centre);
    while (W.active) K(winsor_round)(&W);
    return W.sigma;
}

/* What a pass decided: 1 done (range in *ra, *rb), 0 go on from [*ra, *rb). */
static inline int K(winsor_settle)(const float *v, ix vs, ix a, ix b, double centre, double sigma, double low,
                                   double high, ix *ra, ix *rb) {
    ix na, nb;
    K(clip_range)(v, vs, a, b, centre, low * sigma, high * sigma, &na, &nb);
    if (na == nb) { K(middle)(a, b, ra, rb); return 1; }
    *ra = na; *rb = nb;
    return (na == a && nb == b) || nb - na < 2;
}

static void K(winsorized_from)(const float *v, ix vs, ix a, ix b, double low, double high, ix *ra, ix *rb) {
    while (b - a >= 2) {
        double centre = K(median_sorted)(v, vs, a, b);
        double sigma = K(winsorized_sigma)(v, vs, a, b - a, centre);
        if (K(winsor_settle)(v, vs, a, b, centre, sigma, low, high, &a, &b)) break;
    }
    *ra = a; *rb = b;
}

static void K(winsorized_range)(const float *v, ix vs, ix n, double low, double high, ix *ra, ix *rb) {
    K(winsorized_from)(v, vs, 0, n, low, high, ra, rb);
}

/* Two columns' first passes with their rounds interleaved: the two chains of dependent
 * square roots and products overlap in the CPU; a column that needs more passes goes on
 * alone. The same arithmetic per column as winsorized_range. */
static void K(winsorized_pair)(const float *v0, const float *v1, ix vs, ix n, double low, double high, ix *a0,
                               ix *b0, ix *a1, ix *b1) {
    K(Winsor) W0, W1;
    *a0 = *a1 = 0; *b0 = *b1 = n;
    if (n < 2) return;
    K(winsor_start)(&W0, v0, vs, 0, n, K(median_sorted)(v0, vs, 0, n));
    K(winsor_start)(&W1, v1, vs, 0, n, K(median_sorted)(v1, vs, 0, n));
    while (W0.active | W1.active) {
        if (W0.active) K(winsor_round)(&W0);
        if (W1.active) K(winsor_round)(&W1);
    }
    if (!K(winsor_settle)(v0, vs, 0, n, W0.centre, W0.sigma, low, high, a0, b0))
        K(winsorized_from)(v0, vs, *a0, *b0, low, high, a0, b0);
    if (!K(winsor_settle)(v1, vs, 0, n, W1.centre, W1.sigma, low, high, a1, b1))
        K(winsorized_from)(v1, vs, *a1, *b1, low, high, a1, b1);
}

/* Four columns' first passes interleaved, as winsorized_pair. */
static void K(winsorized_quad)(const float *v, ix vs, ix n, double low, double high, ix *a, ix *b) {
    K(Winsor) W0, W1, W2, W3;
    for (int u = 0; u < 4; u++) { a[u] = 0; b[u] = n; }
    if (n < 2) return;
    K(winsor_start)(&W0, v, vs, 0, n, K(median_sorted)(v, vs, 0, n));
    K(winsor_start)(&W1, v + 1, vs, 0, n, K(median_sorted)(v + 1, vs, 0, n));
    K(winsor_start)(&W2, v + 2, vs, 0, n, K(median_sorted)(v + 2, vs, 0, n));
    K(winsor_start)(&W3, v + 3, vs, 0, n, K(median_sorted)(v + 3, vs, 0, n));
    while (W0.active | W1.active | W2.active | W3.active) {
        if (W0.active) K(winsor_round)(&W0);
        if (W1.active) K(winsor_round)(&W1);
        if (W2.active) K(winsor_round)(&W2);
        if (W3.active) K(winsor_round)(&W3);
    }
#define SETTLE(u, W) if (!K(winsor_settle)(v + u, vs, 0, n, W.centre, W.sigma, low, high, &a[u], &b[u])) \
        K(winsorized_from)(v + u, vs, a[u], b[u], low, high, &a[u], &b[u]);
    SETTLE(0, W0) SETTLE(1, W1) SETTLE(2, W2) SETTLE(3, W3)
#undef SETTLE
}

static void K(percentile_range)(const float *v, ix vs, ix n, double low, double high, ix *ra, ix *rb) {
    double centre = K(median_sorted)(v, vs, 0, n);
    ix na, nb;
    if (!(centre > 0)) { *ra = 0; *rb = n; return; }
    K(clip_range)(v, vs, 0, n, centre, centre * low, centre * high, &na, &nb);
    if (na == nb) { K(middle)(0, n, ra, rb); return; }
    *ra = na; *rb = nb;
}

static void K(reject_ranged)(const Stack *S, ix r, ix c0, ix w, const Plan *P, uint8_t *keep, ix kst, Scratch *T) {
    ix n = S->n, st = P->tile, a = 0, b = n;
    double low = P->p[0], high = P->p[1];
    float *s = T->s, *restrict lo = T->fa, *restrict hi = T->fb;
    ix vs = st; /* each column read in place in the sorted tile: v[j * vs] */
    K(copy_tile)(S, r, c0, w, s, st);
    K(cmpx)(s, w, st, P->rnet, P->nrnet);
    ix c = 0;
    if (P->reject == REJ_WINSORIZED)
        for (; c + 4 <= w; c += 4) {
            ix aq[4], bq[4];
            K(winsorized_quad)(s + c, vs, n, low, high, aq, bq);
            for (int u = 0; u < 4; u++) { lo[c + u] = s[aq[u] * vs + c + u]; hi[c + u] = s[(bq[u] - 1) * vs + c + u]; }
        }
    if (P->reject == REJ_WINSORIZED)
        for (; c + 2 <= w; c += 2) {
            ix a1, b1;
            K(winsorized_pair)(s + c, s + c + 1, vs, n, low, high, &a, &b, &a1, &b1);
            lo[c] = s[a * vs + c]; hi[c] = s[(b - 1) * vs + c];
            lo[c + 1] = s[a1 * vs + c + 1]; hi[c + 1] = s[(b1 - 1) * vs + c + 1];
        }
    for (; c < w; c++) {
        const float *v = s + c;
        switch (P->reject) {
        case REJ_SIGMA_ITERATIVE: K(sigma_iterative_range)(v, vs, n, low, high, &a, &b); break;
        case REJ_WINSORIZED: K(winsorized_range)(v, vs, n, low, high, &a, &b); break;
        case REJ_MAD: K(mad_range)(v, vs, n, low, high, &a, &b); break;
        default: K(percentile_range)(v, vs, n, low, high, &a, &b); break;
        }
        lo[c] = v[(a) * vs];
        hi[c] = v[(b - 1) * vs];
    }
    for (ix i = 0; i < n; i++) {
        const float *restrict x = K(row)(S, i, r, c0);
        uint8_t *restrict k = keep + i * kst;
        for (ix c = 0; c < w; c++) k[c] = (uint8_t)(1 - (x[c] < lo[c]) + (x[c] > hi[c]));
    }
}

/* The tile sorted (a network on whole rows); the frame of a sorted value is found only
 * for the values a rejection drops (frame_of), so the network moves no frame numbers. */
static void K(sorted_tile)(const Stack *S, ix r, ix c0, ix w, const Plan *P, Scratch *T) {
    K(copy_tile)(S, r, c0, w, T->s, P->tile);
    K(cmpx)(T->s, w, P->tile, P->rnet, P->nrnet);
}

static inline int K(same)(float a, float b) { return a == b || (a != a && b != b); } /* NaN: as one value */

/* The frame of the value at sorted position j of column `col` (v[j * vs]): equal values
 * keep the frames' order, as a stable sort would, so the t-th copy of a value is the
 * t-th frame, in frame order, that holds it. (The networks' min/max keep every value,
 * NaN included, so it is always found.) */
static ix K(frame_of)(const Stack *S, ix r, ix col, const float *v, ix vs, ix j) {
    float x = v[j * vs];
    ix t = 0, last = 0;
    for (ix q = j - 1; q >= 0 && K(same)(v[q * vs], x); q--) t++;
    for (ix i = 0; i < S->n; i++)
        if (K(same)(K(row)(S, i, r, col)[0], x)) {
            if (t-- == 0) return i;
            last = i;
        }
    return last;
}

static void K(reject_linear_fit)(const Stack *S, ix r, ix c0, ix w, const Plan *P, uint8_t *keep, ix kst,
                                 Scratch *T) {
    ix n = S->n, st = P->tile;
    double low = P->p[0], high = P->p[1];
    double *y = T->y;
    ix *pos = T->pos;
    uint8_t *code = T->code; /* by sorted position */
    K(sorted_tile)(S, r, c0, w, P, T);
    for (ix i = 0; i < n; i++) memset(keep + i * kst, 1, (size_t)w); /* kept, unless found below */
    for (ix c = 0; c < w; c++) {
        const float *v = T->s + c;      /* v[j * st]: the column, sorted */
        for (ix j = 0; j < n; j++) code[j] = 1;
        for (;;) {
            ix m = 0, gone = 0;
            for (ix j = 0; j < n; j++)
                if (code[j] == 1) { y[m] = v[j * st]; pos[m] = j; m++; }
            if (m < 3) break;
            /* least squares y = slope * x + icpt, x = rank among the values kept; sums in
             * four chains (the adds do not wait on each other), sum y and sum (x - xm) y in
             * one pass (the latter is sum (x - xm)(y - ym), as sum (x - xm) is exactly 0);
             * sum (x - xm)^2 in closed form */
            double xm = (m - 1) * 0.5, ym, sxy, sxx = (double)m * ((double)m * m - 1) / 12.0, slope, icpt, sigma,
                   dlow, dhigh, t[4] = {0.0, 0.0, 0.0, 0.0}, q[4] = {0.0, 0.0, 0.0, 0.0};
            ix j = 0;
            for (; j + 4 <= m; j += 4)
                for (int u = 0; u < 4; u++) { t[u] += y[j + u]; q[u] += ((double)(j + u) - xm) * y[j + u]; }
            for (; j < m; j++) { t[0] += y[j]; q[0] += ((double)j - xm) * y[j]; }
            ym = ((t[0] + t[1]) + (t[2] + t[3])) / m;
            sxy = (q[0] + q[1]) + (q[2] + q[3]);
            slope = sxy / sxx;
            icpt = ym - slope * xm;
            t[0] = t[1] = t[2] = t[3] = 0.0;
            for (j = 0; j + 4 <= m; j += 4)
                for (int u = 0; u < 4; u++) t[u] += fabs(y[j + u] - (slope * (double)(j + u) + icpt));
            for (; j < m; j++) t[0] += fabs(y[j] - (slope * (double)j + icpt));
            sigma = ((t[0] + t[1]) + (t[2] + t[3])) / m;
            dlow = low * sigma;
            dhigh = high * sigma;
            for (ix j = 0; j < m; j++) {
                double line = slope * j + icpt;
                if (line - y[j] > dlow) { code[pos[j]] = 0; gone++; }
                else if (y[j] - line > dhigh) { code[pos[j]] = 2; gone++; }
            }
            if (gone == m) { /* everything: keep the median value(s) of what was left */
                ix ma, mb;
                K(middle)(0, m, &ma, &mb);
                for (ix j = ma; j < mb; j++) code[pos[j]] = 1;
                break;
            }
            if (gone == 0) break;
        }
        for (ix j = 0; j < n; j++)
            if (code[j] != 1) keep[K(frame_of)(S, r, c0 + c, v, st, j) * kst + c] = code[j];
    }
}

/* One column's test in progress: the sorted values v[lo..hi] left, with running sums of
 * x - shift (a middle value, against cancellation) over them. */
typedef struct {
    const float *v;
    ix lo, hi, k;
    double shift, total, sq;
} K(Esd);

static inline void K(esd_start)(K(Esd) *E, const float *v, ix st, ix n) {
    double total = 0.0, sq = 0.0, shift = (double)v[((n - 1) / 2) * st];
    for (ix j = 0; j < n; j++) { double x = (double)v[j * st] - shift; total += x; sq += x * x; }
    E->v = v; E->lo = 0; E->hi = n - 1; E->k = 0; E->shift = shift; E->total = total; E->sq = sq;
}

/* Test i: the value farthest from the mean (low deviations divided by the relaxation)
 * leaves; without branches, so that two columns' chains overlap (the side taken is as
 * unpredictable as the data). */
static inline void K(esd_step)(K(Esd) *E, ix i, ix st, const double *rinv, const double *rinv1,
                               const double *lam2, double inv_relax, uint8_t *side) {
    ix m = E->hi - E->lo + 1;
    double total = E->total;
    double mean = E->shift + total * rinv[m], var = (E->sq - total * (total * rinv[m])) * rinv1[m];
    double vl = (double)E->v[E->lo * st], vh = (double)E->v[E->hi * st];
    double dlow = (mean - vl) * inv_relax, dhigh = vh - mean;
    int up = dhigh > dlow;
    double dev = up ? dhigh : dlow, x = (up ? vh : vl) - E->shift;
    side[i] = (uint8_t)(2 * up);
    E->hi -= up;
    E->lo += 1 - up;
    E->total = total - x;
    E->sq -= x * x;
    E->k = ((var > 0) & (dev > 0) & (dev * dev > lam2[i] * var)) ? i + 1 : E->k;
}

static inline void K(esd_mark)(const Stack *S, ix r, ix col, const K(Esd) *E, ix st, ix n, const uint8_t *side,
                               uint8_t *keep, ix kst) {
    ix lo = 0, hi = n - 1;
    for (ix i = 0; i < E->k; i++) {
        if (side[i] == 2) { keep[K(frame_of)(S, r, col, E->v, st, hi) * kst] = 2; hi--; }
        else { keep[K(frame_of)(S, r, col, E->v, st, lo) * kst] = 0; lo++; }
    }
}

/* params: outliers fraction, significance, low relaxation, r, lambda_1..lambda_r.
 * Each column is read in place in the sorted tile (frames found only for what is dropped),
 * two columns at a time; the steps multiply by reciprocals prepared once, and
 * R_i > lambda_i is tested as dev^2 > lambda_i^2 var (no square root, no division in
 * the loop): rounding differs from the textbook order in the last bits only
 * (tests/unit/test_rejection.py skips a column within 1e-9 of a critical value). */
static void K(reject_esd)(const Stack *S, ix r, ix c0, ix w, const Plan *P, uint8_t *keep, ix kst, Scratch *T) {
    ix n = S->n, st = P->tile, nmax = (ix)P->p[3], c = 0;
    double inv_relax = 1.0 / P->p[2];
    const double *lam = P->p + 4;
    double *rinv = T->y, *rinv1 = T->wv, *lam2 = T->lam2; /* 1/m, 1/(m-1) for m <= n; lambda_i^2 */
    uint8_t *side0 = T->side, *side1 = T->code;
    K(Esd) E0, E1;
    if (nmax > n) nmax = n;
    for (ix m = 2; m <= n; m++) { rinv[m] = 1.0 / m; rinv1[m] = 1.0 / (m - 1); }
    for (ix i = 0; i < nmax; i++) lam2[i] = lam[i] * lam[i];
    K(sorted_tile)(S, r, c0, w, P, T);
    for (ix i = 0; i < n; i++) memset(keep + i * kst, 1, (size_t)w); /* kept, unless found below */
    for (; c + 2 <= w; c += 2) {
        K(esd_start)(&E0, T->s + c, st, n);
        K(esd_start)(&E1, T->s + c + 1, st, n);
        for (ix i = 0; i < nmax; i++) {
            K(esd_step)(&E0, i, st, rinv, rinv1, lam2, inv_relax, side0);
            K(esd_step)(&E1, i, st, rinv, rinv1, lam2, inv_relax, side1);
        }
        K(esd_mark)(S, r, c0 + c, &E0, st, n, side0, keep + c, kst);
        K(esd_mark)(S, r, c0 + c + 1, &E1, st, n, side1, keep + c + 1, kst);
    }
    for (; c < w; c++) {
        K(esd_start)(&E0, T->s + c, st, n);
        for (ix i = 0; i < nmax; i++) K(esd_step)(&E0, i, st, rinv, rinv1, lam2, inv_relax, side0);
        K(esd_mark)(S, r, c0 + c, &E0, st, n, side0, keep + c, kst);
    }
}

/* the keep-mask of columns c0..c0+w of row r, row stride kst */
static void K(reject)(const Stack *S, ix r, ix c0, ix w, const Plan *P, uint8_t *keep, ix kst, Scratch *T) {
    switch (P->reject) {
    case REJ_MINMAX: K(minmax_keep)(S, r, c0, w, (ix)P->p[0], keep, kst, 0, T); break;
    case REJ_SIGMA: K(reject_sigma)(S, r, c0, w, P, keep, kst, T); break;
    case REJ_SIGMA_ITERATIVE: case REJ_WINSORIZED: case REJ_MAD: case REJ_PERCENTILE:
        K(reject_ranged)(S, r, c0, w, P, keep, kst, T); break;
    case REJ_LINEAR_FIT: K(reject_linear_fit)(S, r, c0, w, P, keep, kst, T); break;
    case REJ_ESD: K(reject_esd)(S, r, c0, w, P, keep, kst, T); break;
    case REJ_GIVEN:
        for (ix i = 0; i < S->n; i++)
            memcpy(keep + i * kst, P->given + (i * P->grows + (r - P->g0)) * S->cols + c0, (size_t)w);
        break;
    default:
        for (ix i = 0; i < S->n; i++) memset(keep + i * kst, 1, (size_t)w);
    }
}

/* ------------------------------------------------------------------ the row driver */

/* Rows r0..r1 into out (rows x cols, same row numbers as the stack); rejections counted
 * into fc (n x 2) and pc (2 x prows x cols, rows from prow0) when given. */
static void K(combine_rows)(const Stack *S, float *out, ix r0, ix r1, const Plan *P, Scratch *T, int64_t *fc,
                            uint16_t *pc, ix prows, ix prow0) {
    ix n = S->n, cols = S->cols, tile = P->tile;
    uint8_t *keep = T->keep;
    for (ix r = r0; r < r1; r++) {
        for (ix c0 = 0; c0 < cols; c0 += tile) {
            ix w = cols - c0 < tile ? cols - c0 : tile;
            float *orow = out + r * cols + c0;
            if (P->reject == REJ_NONE) {
                if (P->estimator == EST_MEAN) K(est_mean)(S, orow, r, c0, w, T);
                else K(est_median)(S, orow, r, c0, w, P, T);
                continue;
            }
            K(reject)(S, r, c0, w, P, keep, tile, T);
            if (P->estimator == EST_MEAN) K(est_mean_kept)(S, keep, orow, r, c0, w, P, T);
            else K(est_median_kept)(S, keep, orow, r, c0, w, P, T);
            if (!fc && !pc) continue;
            uint16_t *restrict lo = T->lo16, *restrict hi = T->hi16;
            for (ix c = 0; c < w; c++) { lo[c] = 0; hi[c] = 0; }
            for (ix i = 0; i < n; i++) {
                const uint8_t *restrict k = keep + i * tile;
                int32_t nl = 0, nh = 0; /* a tile has at most 2^31 columns */
                for (ix c = 0; c < w; c++) {
                    uint16_t l = k[c] == 0, h = k[c] == 2;
                    lo[c] += l; hi[c] += h;
                }
                for (ix c = 0; c < w; c++) { nl += k[c] == 0; nh += k[c] == 2; }
                if (fc) { fc[2 * i] += nl; fc[2 * i + 1] += nh; }
            }
            if (pc) {
                memcpy(pc + (r - prow0) * cols + c0, lo, (size_t)w * 2);
                memcpy(pc + (prows + r - prow0) * cols + c0, hi, (size_t)w * 2);
            }
        }
    }
}

/* ------------------------------------------------------------------ pixels */

static inline void K(calibrate_row)(float *restrict dst, ix w, int mode, const float *restrict cal, float ped,
                                    float factor) {
    if (mode == 1) {
        for (ix c = 0; c < w; c++) { float x = dst[c] - ped; dst[c] = x < 0 ? 0.0f : (x > 65535.0f ? 65535.0f : x); }
    } else if (mode == 2) {
        for (ix c = 0; c < w; c++) { float x = dst[c] - cal[c]; dst[c] = x < 0 ? 0.0f : (x > 65535.0f ? 65535.0f : x); }
    }
    if (factor != 1.0f)
        for (ix c = 0; c < w; c++) dst[c] = dst[c] * factor;
}

#define FILL_NATIVE(NAME, TYPE) \
    static void K(NAME)(const void *raw, float *out, ix rows, ix w, double scale, double zero, int mode, \
                        const float *cal, float ped, float factor) { \
        for (ix r = 0; r < rows; r++) { \
            const TYPE *restrict src = (const TYPE *)raw + r * w; \
            float *restrict dst = out + r * w; \
            for (ix c = 0; c < w; c++) dst[c] = (float)((double)src[c] * scale + zero); \
            K(calibrate_row)(dst, w, mode, mode == 2 ? cal + r * w : NULL, ped, factor); \
        } \
    }

FILL_NATIVE(fill_u8, uint8_t)
FILL_NATIVE(fill_i8, int8_t)
FILL_NATIVE(fill_u16, uint16_t)
FILL_NATIVE(fill_i16, int16_t)
FILL_NATIVE(fill_u32, uint32_t)
FILL_NATIVE(fill_i32, int32_t)
FILL_NATIVE(fill_u64, uint64_t)
FILL_NATIVE(fill_i64, int64_t)
FILL_NATIVE(fill_f32, float)
FILL_NATIVE(fill_f64, double)
#undef FILL_NATIVE

/* big-endian int16 (FITS BITPIX 16) */
static void K(fill_be16)(const void *raw, float *out, ix rows, ix w, double scale, double zero, int mode,
                         const float *cal, float ped, float factor) {
    for (ix r = 0; r < rows; r++) {
        const uint16_t *restrict src = (const uint16_t *)raw + r * w;
        float *restrict dst = out + r * w;
        for (ix c = 0; c < w; c++) {
            int32_t u = src[c];
            int32_t v = ((u & 0xFF) << 8) | (u >> 8);
            v = v - ((v & 0x8000) << 1);
            dst[c] = (float)(v * scale + zero);
        }
        K(calibrate_row)(dst, w, mode, mode == 2 ? cal + r * w : NULL, ped, factor);
    }
}

typedef void (*K(fill_fn))(const void *, float *, ix, ix, double, double, int, const float *, float, float);

static const K(fill_fn) K(fills)[] = {K(fill_be16), K(fill_u8), K(fill_i8), K(fill_u16), K(fill_i16),
                                      K(fill_u32), K(fill_i32), K(fill_u64), K(fill_i64), K(fill_f32),
                                      K(fill_f64)};

