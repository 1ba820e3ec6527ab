/* flatd's combine and pixel kernels: a small CPython extension (no numpy headers; arrays
 * come in through the buffer protocol, checked by flatd/stack/combine.py and pixels.py).
 *
 * A stack is float32 (N, rows, cols), C order. Rows r0..r1 are combined tile by tile
 * (one row, up to `tile` columns): a rejection writes a keep-mask (N x tile, row stride
 * `tile`: 1 kept, 0 rejected low, 2 rejected high), an estimator reduces what is kept.
 * Loops run over frames outside and columns inside, so that the compiler vectorizes
 * across pixels; the median is a sorting network applied to whole tile rows. The maths
 * follows flatd/stack/combine.py's docstrings and the README ("Robust rejection")
 * operation for operation: the property tests compare every method with a per-column
 * reference. The GIL is released while a kernel runs.
 *
 * This file is compiled twice into the module when the compiler allows it: once for the
 * baseline instruction set and once with AVX2 (x86-64), chosen at import by what the CPU
 * supports (see the bottom of the file). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

typedef Py_ssize_t ix;

enum { REJ_NONE = 0, REJ_MINMAX, REJ_SIGMA, REJ_SIGMA_ITERATIVE, REJ_WINSORIZED, REJ_MAD, REJ_PERCENTILE,
       REJ_LINEAR_FIT, REJ_ESD, REJ_GIVEN, REJ_COUNT };
enum { EST_MEAN = 0, EST_MEDIAN, EST_COUNT };

#define WINSOR_ITERATIONS 100 /* Huber's winsorization converges in a few; a bound against cycles */

typedef struct {
    const float *x; /* (n, rows, cols) */
    ix n, rows, cols;
} Stack;

typedef struct {
    int reject, estimator;
    const double *p; ix np;         /* the rejection's parameters (esd: outliers, alpha, relax, r, lambdas) */
    const int64_t *enet; ix nenet;  /* the estimator's network */
    const int64_t *rnet; ix nrnet;  /* the rejection's sort network */
    const uint8_t *given; ix grows; /* REJ_GIVEN: keep codes (n, grows, cols) for rows g0.. */
    ix g0;
    ix tile;
} Plan;

/* scratch for one thread: sized for n frames and tile columns */
typedef struct {
    float *s, *fa, *fb, *fc, *fd; /* s: n*tile; others: tile */
    double *da, *db;              /* tile */
    int64_t *ia;                  /* tile */
    int32_t *ib;                  /* tile */
    uint8_t *ba, *bb;             /* tile */
    double *wv, *y, *lam2; ix *pos; uint8_t *code, *side; /* n (wv, y, lam2: n + 1) */
    uint8_t *keep;                /* n*tile */
    uint16_t *lo16, *hi16;        /* tile */
    void *block;
} Scratch;

/* Lays the arrays out from `b` (each aligned to 64 bytes); returns the bytes they take. */
static size_t scratch_layout(Scratch *S, char *b, ix n, ix tile) {
    size_t nt = (size_t)n * (size_t)tile, t = (size_t)tile, nn = (size_t)n, used = 0;
#define TAKE(ptr, type, count) do { S->ptr = (type *)(void *)((uintptr_t)b + used); used += ((count) * sizeof(type) + 63) / 64 * 64; } while (0)
    TAKE(s, float, nt); TAKE(fa, float, t); TAKE(fb, float, t); TAKE(fc, float, t); TAKE(fd, float, t);
    TAKE(da, double, t); TAKE(db, double, t); TAKE(ia, int64_t, t); TAKE(ib, int32_t, t);
    TAKE(ba, uint8_t, t); TAKE(bb, uint8_t, t); TAKE(wv, double, nn + 1); TAKE(lam2, double, nn + 1); TAKE(y, double, nn + 1);
    TAKE(pos, ix, nn); TAKE(code, uint8_t, nn); TAKE(side, uint8_t, nn);
    TAKE(keep, uint8_t, nt); TAKE(lo16, uint16_t, t); TAKE(hi16, uint16_t, t);
#undef TAKE
    return used;
}

static int scratch_alloc(Scratch *S, ix n, ix tile) {
    char *b = (char *)malloc(scratch_layout(S, NULL, n, tile) + 64);
    if (!b) return -1;
    S->block = b;
    scratch_layout(S, (char *)(((uintptr_t)b + 63) / 64 * 64), n, tile);
    return 0;
}

static void scratch_free(Scratch *S) { free(S->block); S->block = NULL; }

/* ------------------------------------------------------------------ Student's t (esd) */

static double betacf(double a, double b, double x) {
    const double tiny = 1e-300;
    double qab = a + b, qap = a + 1.0, qam = a - 1.0, c = 1.0, d = 1.0 - qab * x / qap, h;
    if (fabs(d) < tiny) d = tiny;
    d = 1.0 / d;
    h = d;
    for (int m = 1; m < 10000; m++) {
        int m2 = 2 * m;
        double aa = m * (b - m) * x / ((qam + m2) * (a + m2)), delta;
        d = 1.0 + aa * d; if (fabs(d) < tiny) d = tiny;
        c = 1.0 + aa / c; if (fabs(c) < tiny) c = tiny;
        d = 1.0 / d;
        h *= d * c;
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 + aa * d; if (fabs(d) < tiny) d = tiny;
        c = 1.0 + aa / c; if (fabs(c) < tiny) c = tiny;
        d = 1.0 / d;
        delta = d * c;
        h *= delta;
        if (fabs(delta - 1.0) < 1e-16) break;
    }
    return h;
}

/* the regularized incomplete beta function I_x(a, b) */
static double betainc(double a, double b, double x) {
    double lbt;
    if (x <= 0.0) return 0.0;
    if (x >= 1.0) return 1.0;
    lbt = lgamma(a + b) - lgamma(a) - lgamma(b) + a * log(x) + b * log1p(-x);
    if (x < (a + 1.0) / (a + b + 2.0)) return exp(lbt) * betacf(a, b, x) / a;
    return 1.0 - exp(lbt) * betacf(b, a, 1.0 - x) / b;
}

/* the p-quantile of Student's t with df degrees of freedom: P(T > t) = I_x(df/2, 1/2) / 2
 * with x = df / (df + t^2); x by bisection on log x (200 steps) */
static double t_ppf(double p, double df) {
    double q, lo = -745.0, hi = 0.0, x;
    if (p == 0.5) return 0.0;
    if (p < 0.5) return -t_ppf(1.0 - p, df);
    q = 2.0 * (1.0 - p);
    for (int k = 0; k < 200; k++) {
        double mid = 0.5 * (lo + hi);
        if (betainc(0.5 * df, 0.5, exp(mid)) < q) lo = mid; else hi = mid;
    }
    x = exp(0.5 * (lo + hi));
    return sqrt(df * (1.0 - x) / x);
}

#define K(name) base_##name
#include "_kernels_body.h"
#undef K

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FLATD_NO_AVX2)
#define FLATD_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define K(name) avx2_##name
#include "_kernels_body.h"
#undef K
#pragma GCC pop_options
#endif


/* ------------------------------------------------------------------ dispatch */

typedef void (*combine_rows_fn)(const Stack *, float *, ix, ix, const Plan *, Scratch *, int64_t *, uint16_t *, ix,
                                ix);
typedef void (*reject_fn)(const Stack *, ix, ix, ix, const Plan *, uint8_t *, ix, Scratch *);

static struct {
    combine_rows_fn combine_rows;
    reject_fn reject;
    const base_fill_fn *fills;
    const char *isa;
} impl = {base_combine_rows, base_reject, base_fills, "baseline"};

static void choose_impl(void) {
#ifdef FLATD_HAVE_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && !getenv("FLATD_BASELINE_KERNELS")) {
        impl.combine_rows = avx2_combine_rows;
        impl.reject = avx2_reject;
        impl.fills = (const base_fill_fn *)avx2_fills;
        impl.isa = "avx2";
    }
#endif
}

/* ------------------------------------------------------------------ Python glue */

typedef struct {
    Py_buffer b;
    int held;
} Buf;

static void release(Buf *bufs, int count) {
    for (int k = 0; k < count; k++)
        if (bufs[k].held) { PyBuffer_Release(&bufs[k].b); bufs[k].held = 0; }
}

/* A C-contiguous buffer of at least `need` bytes (None allowed when `optional`). */
static int take(PyObject *o, Buf *buf, int writable, Py_ssize_t need, const char *what, int optional) {
    buf->held = 0;
    if (o == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_TypeError, "%s: an array is required", what);
        return -1;
    }
    if (PyObject_GetBuffer(o, &buf->b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    buf->held = 1;
    if (buf->b.len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, %zd needed", what, buf->b.len, need);
        return -1;
    }
    return 0;
}

static int check_net(const Buf *buf, ix n, const char *what) {
    const int64_t *net = (const int64_t *)buf->b.buf;
    ix count = buf->b.len / 8;
    if (count % 2) { PyErr_Format(PyExc_ValueError, "%s: pairs expected", what); return -1; }
    for (ix k = 0; k < count; k++)
        if (net[k] < 0 || net[k] >= n) { PyErr_Format(PyExc_ValueError, "%s: index %lld outside 0..%zd", what,
                                                      (long long)net[k], n - 1); return -1; }
    return 0;
}

static ix params_needed(int reject, const double *p, ix np) {
    switch (reject) {
    case REJ_MINMAX: case REJ_SIGMA: return 1;
    case REJ_SIGMA_ITERATIVE: case REJ_WINSORIZED: case REJ_MAD: case REJ_PERCENTILE: case REJ_LINEAR_FIT: return 2;
    case REJ_ESD: {
        if (np < 4 || !(p[3] >= 0 && p[3] <= 1e9)) return 4 + 1000000000; /* invalid */
        return 4 + (ix)p[3];
    }
    default: return 0;
    }
}

/* combine_rows(stack, n, rows, cols, out, r0, r1, reject, params, estimator, enet, rnet, tile,
 *              frame_counts, pixel_counts, prow0, given, g0) */
static PyObject *py_combine_rows(PyObject *self, PyObject *args) {
    PyObject *o_stack, *o_out, *o_params, *o_enet, *o_rnet, *o_fc, *o_pc, *o_given;
    ix n, rows, cols, r0, r1, tile, prow0, g0;
    int reject, estimator;
    Buf bufs[8];
    Stack S;
    Plan P;
    Scratch T;
    int failed = 0;
    memset(bufs, 0, sizeof bufs);
    if (!PyArg_ParseTuple(args, "OnnnOnniOiOOnOOnOn", &o_stack, &n, &rows, &cols, &o_out, &r0, &r1, &reject,
                          &o_params, &estimator, &o_enet, &o_rnet, &tile, &o_fc, &o_pc, &prow0, &o_given, &g0))
        return NULL;
    if (n < 1 || rows < 0 || cols < 0 || r0 < 0 || r1 > rows || r0 > r1 || tile < 1 || reject < 0 ||
        reject >= REJ_COUNT || estimator < 0 || estimator >= EST_COUNT) {
        PyErr_SetString(PyExc_ValueError, "combine_rows: bad dimensions or kernel numbers");
        return NULL;
    }
    if (take(o_stack, &bufs[0], 0, n * rows * cols * 4, "stack", 0) < 0 ||
        take(o_out, &bufs[1], 1, rows * cols * 4, "out", 0) < 0 ||
        take(o_params, &bufs[2], 0, 0, "params", 0) < 0 ||
        take(o_enet, &bufs[3], 0, 0, "estimator network", 0) < 0 ||
        take(o_rnet, &bufs[4], 0, 0, "rejection network", 0) < 0 ||
        take(o_fc, &bufs[5], 1, n * 2 * 8, "frame_counts", 1) < 0 ||
        take(o_pc, &bufs[6], 1, 0, "pixel_counts", 1) < 0 ||
        take(o_given, &bufs[7], 0, 0, "keep codes", 1) < 0 ||
        check_net(&bufs[3], n, "estimator network") < 0 || check_net(&bufs[4], n, "rejection network") < 0)
        goto fail;
    S.x = (const float *)bufs[0].b.buf; S.n = n; S.rows = rows; S.cols = cols;
    P.reject = reject; P.estimator = estimator; P.tile = tile;
    P.p = (const double *)bufs[2].b.buf; P.np = bufs[2].b.len / 8;
    P.enet = (const int64_t *)bufs[3].b.buf; P.nenet = bufs[3].b.len / 16;
    P.rnet = (const int64_t *)bufs[4].b.buf; P.nrnet = bufs[4].b.len / 16;
    P.given = NULL; P.grows = 0; P.g0 = g0;
    if (P.np < params_needed(reject, P.p, P.np)) {
        PyErr_SetString(PyExc_ValueError, "combine_rows: too few parameters for the rejection");
        goto fail;
    }
    ix prows = 0;
    if (bufs[6].held) {
        prows = cols ? bufs[6].b.len / (2 * cols * 2) : 0;
        if (r1 > r0 && (r0 < prow0 || r1 - prow0 > prows)) {
            PyErr_SetString(PyExc_ValueError, "pixel_counts: rows outside the array");
            goto fail;
        }
    }
    if (reject == REJ_GIVEN) {
        if (!bufs[7].held || !cols) { PyErr_SetString(PyExc_ValueError, "keep codes required"); goto fail; }
        P.given = (const uint8_t *)bufs[7].b.buf;
        P.grows = bufs[7].b.len / (n * cols);
        if (r1 > r0 && (r0 < g0 || r1 - g0 > P.grows)) {
            PyErr_SetString(PyExc_ValueError, "keep codes: rows outside the array");
            goto fail;
        }
    }
    if (r1 == r0 || cols == 0) { release(bufs, 8); Py_RETURN_NONE; }
    if (tile > cols) tile = P.tile = cols;
    if (scratch_alloc(&T, n, tile) < 0) { PyErr_NoMemory(); goto fail; }
    Py_BEGIN_ALLOW_THREADS
    impl.combine_rows(&S, (float *)bufs[1].b.buf, r0, r1, &P, &T, bufs[5].held ? (int64_t *)bufs[5].b.buf : NULL,
                      bufs[6].held ? (uint16_t *)bufs[6].b.buf : NULL, prows, prow0);
    Py_END_ALLOW_THREADS
    scratch_free(&T);
    release(bufs, 8);
    Py_RETURN_NONE;
fail:
    failed = 1;
    release(bufs, 8);
    (void)failed;
    return NULL;
}

/* reject_row(stack, n, rows, cols, r, reject, params, rnet, keep): keep (n, cols) */
static PyObject *py_reject_row(PyObject *self, PyObject *args) {
    PyObject *o_stack, *o_params, *o_rnet, *o_keep;
    ix n, rows, cols, r;
    int reject;
    Buf bufs[4];
    Stack S;
    Plan P;
    Scratch T;
    memset(bufs, 0, sizeof bufs);
    if (!PyArg_ParseTuple(args, "OnnnniOOO", &o_stack, &n, &rows, &cols, &r, &reject, &o_params, &o_rnet, &o_keep))
        return NULL;
    if (n < 1 || rows < 0 || cols < 1 || r < 0 || r >= rows || reject <= REJ_NONE || reject >= REJ_GIVEN) {
        PyErr_SetString(PyExc_ValueError, "reject_row: bad dimensions or kernel number");
        return NULL;
    }
    if (take(o_stack, &bufs[0], 0, n * rows * cols * 4, "stack", 0) < 0 ||
        take(o_params, &bufs[1], 0, 0, "params", 0) < 0 || take(o_rnet, &bufs[2], 0, 0, "rejection network", 0) < 0 ||
        take(o_keep, &bufs[3], 1, n * cols, "keep", 0) < 0 || check_net(&bufs[2], n, "rejection network") < 0) {
        release(bufs, 4);
        return NULL;
    }
    S.x = (const float *)bufs[0].b.buf; S.n = n; S.rows = rows; S.cols = cols;
    P.reject = reject; P.estimator = EST_MEAN; P.tile = cols;
    P.p = (const double *)bufs[1].b.buf; P.np = bufs[1].b.len / 8;
    P.enet = NULL; P.nenet = 0;
    P.rnet = (const int64_t *)bufs[2].b.buf; P.nrnet = bufs[2].b.len / 16;
    P.given = NULL; P.grows = 0; P.g0 = 0;
    if (P.np < params_needed(reject, P.p, P.np)) {
        PyErr_SetString(PyExc_ValueError, "reject_row: too few parameters for the rejection");
        release(bufs, 4);
        return NULL;
    }
    if (scratch_alloc(&T, n, cols) < 0) { release(bufs, 4); return PyErr_NoMemory(); }
    Py_BEGIN_ALLOW_THREADS
    impl.reject(&S, r, 0, cols, &P, (uint8_t *)bufs[3].b.buf, cols, &T);
    Py_END_ALLOW_THREADS
    scratch_free(&T);
    release(bufs, 4);
    Py_RETURN_NONE;
}

/* fill(kind, raw, out, rows, w, scale, zero, mode, cal, ped, factor): kind indexes fills[] */
static PyObject *py_fill(PyObject *self, PyObject *args) {
    static const int size[] = {2, 1, 1, 2, 2, 4, 4, 8, 8, 4, 8};
    PyObject *o_raw, *o_out, *o_cal;
    int kind, mode;
    ix rows, w;
    double scale, zero;
    float ped, factor;
    Buf bufs[3];
    memset(bufs, 0, sizeof bufs);
    if (!PyArg_ParseTuple(args, "iOOnnddiOff", &kind, &o_raw, &o_out, &rows, &w, &scale, &zero, &mode, &o_cal, &ped,
                          &factor))
        return NULL;
    if (kind < 0 || kind >= (int)(sizeof(size) / sizeof(size[0])) || rows < 0 || w < 0 || mode < 0 || mode > 2) {
        PyErr_SetString(PyExc_ValueError, "fill: bad kind, shape or mode");
        return NULL;
    }
    if (take(o_raw, &bufs[0], 0, rows * w * size[kind], "raw", 0) < 0 ||
        take(o_out, &bufs[1], 1, rows * w * 4, "out", 0) < 0 ||
        take(o_cal, &bufs[2], 0, mode == 2 ? rows * w * 4 : 0, "cal", mode != 2) < 0) {
        release(bufs, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    impl.fills[kind](bufs[0].b.buf, (float *)bufs[1].b.buf, rows, w, scale, zero, mode,
                     bufs[2].held ? (const float *)bufs[2].b.buf : NULL, ped, factor);
    Py_END_ALLOW_THREADS
    release(bufs, 3);
    Py_RETURN_NONE;
}

/* block_sums(band, rows, w, row0, b, out, ny, nx, limit) -> flags: a float32 band (rows x w,
 * C order) whose row 0 is row `row0` of an image, folded into out (float32 (2, 2, ny, nx),
 * C order, added to): out[ci, cj, Y, X] += the pixels of block (Y, X) (b x b pixels) whose
 * row and column offsets in the block have the parities ci and cj. Rows of blocks >= ny
 * and columns of blocks >= nx are left out of the sums (the last block of a row may be
 * partial: x < w). One pass, for the quality checks' binned masters (flatd.qc.previous)
 * and the previews' area averages (flatd.qc.previews). Returns what the band holds, as
 * bits: 1 a value not finite, 2 a finite value <= 0, 4 a finite value >= limit. */
enum { FOLD_NONFINITE = 1, FOLD_NONPOSITIVE = 2, FOLD_LIMIT = 4 };

/* The blocks of one buffered row: a few values each, so no vector loops (their set-up
 * costs more than the sums). */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
static void fold_row_blocks(const float *acc, ix w, ix b, float *even, float *odd, ix nx) {
    for (ix X = 0; X < nx; X++) {
        ix x0 = X * b, x1 = x0 + b < w ? x0 + b : w;
        float a0 = 0.0f, a1 = 0.0f;
        for (ix x = x0; x < x1; x += 2) a0 += acc[x];
        for (ix x = x0 + 1; x < x1; x += 2) a1 += acc[x];
        even[X] += a0;
        odd[X] += a1;
    }
}

/* The rows of a block of one parity are added into a row buffer first (contiguous,
 * vectorized), then the buffer is summed by blocks once per block row and parity. */
static int fold_blocks(const float *band, ix rows, ix w, ix row0, ix b, float *out, ix ny, ix nx, float limit,
                       int *flags) {
    uint32_t nonfinite = 0, nonpositive = 0, high = 0;
    /* a row buffer per parity, and a third that rows beyond the ny blocks are added into
     * and never folded (they are still looked at) */
    float *acc = calloc(3 * (size_t)(w > 0 ? w : 1), sizeof(float));
    if (!acc) return -1;
    int used[2] = {0, 0};
    for (ix r = 0; r < rows; r++) {
        const float *row = band + r * w;
        ix y = row0 + r, Y = y / b;
        int ci = (int)((y % b) & 1);
        float *a = acc + (Y < ny ? ci : 2) * w;
        for (ix x = 0; x < w; x++) {
            float v = row[x];
            uint32_t finite = (uint32_t)(v - v == 0.0f); /* v - v is 0 for a finite value, NaN otherwise */
            a[x] += v;
            nonfinite |= finite ^ 1u;
            nonpositive |= (uint32_t)(v <= 0.0f) & finite;
            high |= (uint32_t)(v >= limit) & finite;
        }
        if (Y >= ny) continue;
        used[ci] = 1;
        if (y % b == b - 1 || r == rows - 1) { /* the block row ends here, or the band does */
            for (int c = 0; c < 2; c++) {
                if (!used[c]) continue;
                float *even = out + ((c * 2) * ny + Y) * nx, *odd = even + ny * nx;
                fold_row_blocks(acc + c * w, w, b, even, odd, nx);
                memset(acc + c * w, 0, (size_t)w * sizeof(float));
                used[c] = 0;
            }
        }
    }
    free(acc);
    *flags = (nonfinite ? FOLD_NONFINITE : 0) | (nonpositive ? FOLD_NONPOSITIVE : 0) | (high ? FOLD_LIMIT : 0);
    return 0;
}

static PyObject *py_block_sums(PyObject *self, PyObject *args) {
    PyObject *o_band, *o_out;
    ix rows, w, row0, b, ny, nx;
    float limit;
    Buf bufs[2];
    int failed, flags = 0;
    memset(bufs, 0, sizeof bufs);
    if (!PyArg_ParseTuple(args, "OnnnnOnnf", &o_band, &rows, &w, &row0, &b, &o_out, &ny, &nx, &limit)) return NULL;
    if (rows < 0 || w < 0 || row0 < 0 || b < 1 || ny < 0 || nx < 0) {
        PyErr_SetString(PyExc_ValueError, "block_sums: bad shape");
        return NULL;
    }
    if (take(o_band, &bufs[0], 0, rows * w * 4, "band", 0) < 0 ||
        take(o_out, &bufs[1], 1, 4 * ny * nx * 4, "out", 0) < 0) {
        release(bufs, 2);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    failed = fold_blocks((const float *)bufs[0].b.buf, rows, w, row0, b, (float *)bufs[1].b.buf, ny, nx, limit, &flags);
    Py_END_ALLOW_THREADS
    release(bufs, 2);
    if (failed) return PyErr_NoMemory();
    return PyLong_FromLong(flags);
}

static PyObject *py_t_ppf(PyObject *self, PyObject *args) {
    double p, df;
    if (!PyArg_ParseTuple(args, "dd", &p, &df)) return NULL;
    return PyFloat_FromDouble(t_ppf(p, df));
}

static PyObject *py_betainc(PyObject *self, PyObject *args) {
    double a, b, x;
    if (!PyArg_ParseTuple(args, "ddd", &a, &b, &x)) return NULL;
    return PyFloat_FromDouble(betainc(a, b, x));
}

static PyMethodDef methods[] = {
    {"combine_rows", py_combine_rows, METH_VARARGS, "Combine rows r0..r1 of a float32 stack (see combine.py)."},
    {"reject_row", py_reject_row, METH_VARARGS, "The keep codes of one row (see combine.reject_codes)."},
    {"fill", py_fill, METH_VARARGS, "Raw pixels to calibrated float32 (see pixels.py)."},
    {"block_sums", py_block_sums, METH_VARARGS, "Fold a float32 band into per-parity block sums; what it holds, as bits."},
    {"t_ppf", py_t_ppf, METH_VARARGS, "The p-quantile of Student's t with df degrees of freedom."},
    {"betainc", py_betainc, METH_VARARGS, "The regularized incomplete beta function I_x(a, b)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "flatd's compiled kernels.", -1, methods,
                                    NULL, NULL, NULL, NULL};

/* The kernels' numbers by name, for flatd/stack/combine.py's tables (one place for them). */
static int add_codes(PyObject *m, const char *attr, const char *const *names, const int *codes, int count) {
    PyObject *d = PyDict_New();
    if (!d) return -1;
    for (int k = 0; k < count; k++) {
        PyObject *v = PyLong_FromLong(codes[k]);
        if (!v || PyDict_SetItemString(d, names[k], v) < 0) { Py_XDECREF(v); Py_DECREF(d); return -1; }
        Py_DECREF(v);
    }
    if (PyModule_AddObject(m, attr, d) < 0) { Py_DECREF(d); return -1; }
    return 0;
}

PyMODINIT_FUNC PyInit__kernels(void) {
    static const char *const rejections[] = {"minmax", "sigma", "sigma-iterative", "winsorized", "mad",
                                             "percentile", "linear-fit", "esd", "given"};
    static const int rejection_codes[] = {REJ_MINMAX, REJ_SIGMA, REJ_SIGMA_ITERATIVE, REJ_WINSORIZED, REJ_MAD,
                                          REJ_PERCENTILE, REJ_LINEAR_FIT, REJ_ESD, REJ_GIVEN};
    static const char *const estimators[] = {"mean", "median"};
    static const int estimator_codes[] = {EST_MEAN, EST_MEDIAN};
    static const char *const fold_names[] = {"nonfinite", "nonpositive", "limit"};
    static const int fold_codes[] = {FOLD_NONFINITE, FOLD_NONPOSITIVE, FOLD_LIMIT};
    PyObject *m;
    choose_impl();
    m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddStringConstant(m, "ISA", impl.isa) < 0 ||
        PyModule_AddIntConstant(m, "WINSOR_ITERATIONS", WINSOR_ITERATIONS) < 0 ||
        add_codes(m, "REJECTIONS", rejections, rejection_codes, 9) < 0 ||
        add_codes(m, "ESTIMATORS", estimators, estimator_codes, 2) < 0 ||
        add_codes(m, "FOLD_FLAGS", fold_names, fold_codes, 3) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
