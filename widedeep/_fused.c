/* widedeep's fused CPU step: losses and gradients of K small MLPs in one call.
 *
 * Built and loaded by widedeep/fused.py (see there for when it is used). For each model in
 * turn, the forward pass, the loss (BCE with logits on one logit, cross-entropy on several)
 * and the backward pass run over the whole batch with every intermediate in a scratch buffer
 * small enough to stay in cache, instead of streaming K models' activations through memory
 * once per torch operation. A hidden block is widedeep.model.Block: Linear, layer norm
 * (optional), activation, dropout (optional, masks drawn by the caller), identity shortcut
 * (optional); Wide & Deep's wide part adds its logits to the head's. Models may be split
 * between threads. Rows are the vector axis: activations are feature-major,
 * (width, n_pad), n_pad = n rounded up to the vector width, and padded rows carry a zero
 * gradient so they never reach a sum.
 *
 * Plain C with GCC/Clang vector extensions (the compiler picks AVX-512, AVX2, SSE or NEON),
 * plus a few AVX-512 instructions where the CPU has them (exp's rounding and scaling, a
 * reciprocal estimate, a lane sum), each with a portable twin. exp, log, tanh and erf are
 * written out (Cephes' and Abramowitz & Stegun's float approximations) because libm's are
 * not vectorised without -ffast-math, which would also let the compiler drop the NaN
 * handling that divergence detection relies on: NaN in, NaN out, as in torch.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

/* Floats per vector: one AVX-512 register, else 8 (one AVX register; two SSE or NEON ones).
 * NOTE: not 16 everywhere: without AVX-512 the compiler splits each 16-float operation in
 * two, spills the register blocks below and takes ~10x as long to build (AMD EPYC, AVX2,
 * gcc 12: 79 s against 9 s), and the step ran ~10x slower (2 nets of 8 x 64 ReLU units, 100
 * Adam epochs on diabetes: 7.0 s against 0.6 s). */
#if defined(__AVX512F__)
#define V 16
#else
#define V 8
#endif
typedef float vf __attribute__((vector_size(V * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(V * sizeof(int32_t))));

/* Activations (codes shared with fused.py); p0, p1 are their parameters. */
enum {
    ACT_NONE = -1, ACT_SIGMOID, ACT_TANH, ACT_RELU,
    ACT_LEAKY_RELU, /* p0: negative slope */
    ACT_ELU,        /* p0: alpha */
    ACT_SELU,
    ACT_CELU,       /* p0: alpha */
    ACT_HARDTANH,   /* p0, p1: min, max (ReLU6: 0, 6) */
    ACT_LOGSIGMOID,
    ACT_SOFTPLUS,   /* p0, p1: beta, threshold */
    /* from here on, the derivative needs the pre-activation z */
    ACT_SILU, ACT_GELU, ACT_MISH, ACT_HARDSWISH, ACT_HARDSIGMOID,
    ACT_SOFTSHRINK, /* p0: lambda */
    ACT_TANHSHRINK, ACT_SOFTSIGN,
    ACT_THRESHOLD,  /* p0, p1: threshold, value */
    ACT_PRELU,      /* p0: the layer's learnable slope (one per layer), from the parameters */
    /* over the features of a row, not elementwise: from the outputs a alone */
    ACT_SOFTMAX, ACT_SOFTMIN, ACT_LOGSOFTMAX,
};
#define NEEDS_Z(act) ((act) >= ACT_SILU && (act) <= ACT_PRELU)
#define ROWWISE(act) ((act) >= ACT_SOFTMAX)
#define SELU_ALPHA 1.6732632423543772848170429916717f
#define SELU_SCALE 1.0507009873554804934193349852946f

#define ALWAYS_INLINE static inline __attribute__((always_inline))

static inline vf splat(float s) { return (vf){0} + s; }

/* The pre-activations that the forward pass keeps for the backward one (NEEDS_Z) are
 * written a few lines at a time into every row of a layer. For the activations whose own
 * arithmetic is a compare or two (STREAMED), those stores were most of the forward pass
 * once a model keeps more than the L2 cache holds: where it keeps more than STREAM_BYTES,
 * they go past the caches (AVX-512 streaming stores: a full line each, no read for
 * ownership). 2 nets on 607 rows, ms per step, one process alternating the two builds (dev
 * VM): 32 x 64 units, hardsigmoid 17.7 -> 13.2, prelu 15.7 -> 11.4, threshold 15.0 -> 11.5,
 * softshrink 16.5 -> 12.4, hardswish 14.9 -> 11.9, softsign 14.7 -> 12.8; 8 x 64, 0.88-1.01
 * of the time. Activations with an exp or a tanh hide the stores behind their arithmetic
 * and would only lose the cached reads of the backward pass (GELU, SiLU, mish, tanhshrink:
 * 1.03-1.22x at 4 to 16 x 64). */
#define STREAMED(act)                                                                       \
    ((act) == ACT_HARDSWISH || (act) == ACT_HARDSIGMOID || (act) == ACT_SOFTSHRINK ||       \
     (act) == ACT_SOFTSIGN || (act) == ACT_THRESHOLD || (act) == ACT_PRELU)
#define STREAM_BYTES (1L << 20)
static __thread int stream_kept; /* this thread's step: a STREAMED activation, > STREAM_BYTES */

static inline void store_kept(vf *p, vf v) {
#if defined(__AVX512F__)
    if (stream_kept) {
        _mm512_stream_ps((float *)p, (__m512)v);
        return;
    }
#endif
    *p = v;
}
static inline vf sel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* 1 / x: AVX-512's 14-bit estimate and one Newton step (within an ulp or two of a
 * division, at a fraction of vdivps' cost); a plain division elsewhere. */
static inline vf v_recip(vf x) {
#if defined(__AVX512F__)
    vf r = __builtin_ia32_rcp14ps512_mask(x, (vf){0}, (unsigned short)0xffff);
    return r * (2.0f - x * r);
#else
    return 1.0f / x;
#endif
}

/* The sum of a vector's lanes, as a tree (a serial sum would be a 16-add latency chain). */
static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    typedef float vh __attribute__((vector_size(V * sizeof(float) / 2)));
    vh lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (float *)&v + V / 2, sizeof hi);
    lo += hi;
    float s = 0.0f;
    for (int i = 0; i < V / 2; i++) s += lo[i];
    return s;
#endif
}

/* exp(r) for |r| <= ln 2 / 2 (Cephes' expf polynomial); both exp()s below reduce to it. */
static inline vf exp_reduced(vf r) {
    vf p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
             + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
}

#if defined(__AVX512F__)
/* exp(x), x clamped to [-104, 88] (exp(-104) is 0 in float); NaN stays NaN. AVX-512 rounds
 * and scales by 2^k in one instruction each, which halves the work of the portable version
 * below. The lower clamp keeps k * ln 2 exact enough: r must stay within ln 2 / 2. */
static inline vf v_exp(vf x) {
    /* NaN: min and max return their second operand */
    __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.0f),
                             _mm512_min_ps(_mm512_set1_ps(88.0f), (__m512)x));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = (vf)v - (vf)k * 0.693359375f + (vf)k * 2.12194440e-4f;
    vf p = exp_reduced(r);
    return (vf)_mm512_scalef_ps((__m512)p, k); /* p * 2^k, 0 below the float range */
}
#else
/* exp(x), clamped to [exp(-87), exp(88)] (normal floats); NaN stays NaN. */
static inline vf v_exp(vf x) {
    x = sel(x > 88.0f, splat(88.0f), x);
    x = sel(x < -87.0f, splat(-87.0f), x);
    vf k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln 2) */
    vf r = x - k * 0.693359375f + k * 2.12194440e-4f;
    vf p = exp_reduced(r);
    vi scale = (__builtin_convertvector(k, vi) + 127) << 23; /* 2^k */
    return p * (vf)scale;
}
#endif

/* log(x) for positive x; NaN stays NaN. */
static inline vf v_log(vf x) {
    vi bits = (vi)x;
    vi e = ((bits >> 23) & 0xff) - 126; /* x = m * 2^e, m in [0.5, 1) */
    vf m = (vf)((bits & 0x007fffff) | 0x3f000000);
    vi low = m < 0.707106781186547524f;
    e = e + low; /* -1 where low */
    m = sel(low, m + m - 1.0f, m - 1.0f);
    vf z = m * m;
    vf y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m
                 - 1.2420140846e-1f) * m + 1.4249322787e-1f) * m - 1.6668057665e-1f) * m
              + 2.0000714765e-1f) * m - 2.4999993993e-1f) * m + 3.3333331174e-1f) * m * z;
    vf fe = __builtin_convertvector(e, vf);
    y = y - 2.12194440e-4f * fe - 0.5f * z;
    vf r = m + y + 0.693359375f * fe;
    return sel(x != x, x, r);
}

/* log(1 + u) for u >= 0, accurate for small u. */
static inline vf v_log1p(vf u) {
    vf w = 1.0f + u;
    return sel(w == 1.0f, u, v_log(w) * (u * v_recip(w - 1.0f)));
}

/* exp(x) - 1, accurate near 0 (where exp(x) - 1 would cancel): a Taylor polynomial there. */
static inline vf v_expm1(vf x) {
    vf t = ((((((1.0f / 5040) * x + 1.0f / 720) * x + 1.0f / 120) * x + 1.0f / 24) * x
             + 1.0f / 6) * x + 0.5f) * (x * x) + x;
    return sel(sel(x < 0.0f, -x, x) < 0.35f, t, v_exp(x) - 1.0f);
}

static inline vf v_sigmoid(vf x) { return v_recip(1.0f + v_exp(-x)); }

static inline vf v_tanh(vf x) {
    vf ax = sel(x < 0.0f, -x, x);
    vf big = 1.0f - 2.0f * v_recip(v_exp(ax + ax) + 1.0f);
    big = sel(x < 0.0f, -big, big);
    vf s = x * x;
    vf small = ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s
                 + 1.33314422036e-1f) * s - 3.33332819422e-1f) * s * x + x;
    return sel(ax >= 0.625f, big, small);
}

/* erf(x) given e = exp(-x^2): Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7);
 * NaN stays NaN. */
static inline vf v_erf_with(vf x, vf e) {
    vf ax = sel(x < 0.0f, -x, x);
    vf t = v_recip(1.0f + 0.3275911f * ax);
    vf y = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t
            + 0.254829592f) * t;
    vf r = 1.0f - y * e;
    return sel(x < 0.0f, -r, r);
}

static inline vf v_erf(vf x) { return v_erf_with(x, v_exp(-x * x)); }

/* tanh(softplus(z)) for mish, from e = exp(z) alone: (1 + e)^2 = n + 1 with n = e (e + 2),
 * so tanh(log(1 + e)) = ((1 + e)^2 - 1) / ((1 + e)^2 + 1) = n / (n + 2); 1 above z = 20,
 * where float rounds it to 1 (and where n may overflow). NaN stays NaN. */
static inline vf mish_t(vf z, vf e) {
    vf n = e * (e + 2.0f);
    return sel(z > 20.0f, splat(1.0f), n * v_recip(n + 2.0f));
}

static inline vf relu6(vf t) { return sel(t < 0.0f, splat(0.0f), sel(t > 6.0f, splat(6.0f), t)); }

/* The activation of z (none for the head). */
ALWAYS_INLINE vf act_fwd(vf z, int act, float p0, float p1) {
    switch (act) {
    case ACT_SIGMOID: return v_sigmoid(z);
    case ACT_TANH: return v_tanh(z);
    case ACT_RELU: return sel(z < 0.0f, splat(0.0f), z);
    case ACT_LEAKY_RELU: return sel(z < 0.0f, z * p0, z);
    case ACT_ELU: return sel(z > 0.0f, z, p0 * v_expm1(z));
    case ACT_SELU: return SELU_SCALE * sel(z > 0.0f, z, SELU_ALPHA * v_expm1(z));
    case ACT_CELU: return sel(z > 0.0f, z, p0 * v_expm1(z * (1.0f / p0)));
    case ACT_HARDTANH: return sel(z < p0, splat(p0), sel(z > p1, splat(p1), z));
    case ACT_LOGSIGMOID: /* min(z, 0) - log(1 + exp(-|z|)) */
        return sel(z > 0.0f, splat(0.0f), z) - v_log1p(v_exp(-sel(z < 0.0f, -z, z)));
    case ACT_SOFTPLUS: {
        vf bz = z * p0;
        return sel(bz > p1, z, v_log1p(v_exp(bz)) * (1.0f / p0));
    }
    case ACT_SILU: return z * v_sigmoid(z);
    case ACT_GELU: return z * (0.5f + 0.5f * v_erf(z * 0.70710678118654752f));
    case ACT_MISH: return z * mish_t(z, v_exp(z));
    case ACT_HARDSWISH: return z * relu6(z + 3.0f) * (1.0f / 6.0f);
    case ACT_HARDSIGMOID: return relu6(z + 3.0f) * (1.0f / 6.0f);
    case ACT_SOFTSHRINK: /* z - clamp(z, -lambda, lambda), as torch: NaN stays NaN */
        return z - sel(z > p0, splat(p0), sel(z < -p0, splat(-p0), z));
    case ACT_TANHSHRINK: return z - v_tanh(z);
    case ACT_SOFTSIGN: return z * v_recip(1.0f + sel(z < 0.0f, -z, z));
    case ACT_THRESHOLD: return sel(z <= p0, splat(p1), z);
    case ACT_PRELU: return sel(z > 0.0f, z, z * p0);
    default: return z;
    }
}

/* g * activation'(z), from the activation's output a or (NEEDS_Z) its input z, as torch's
 * *_backward kernels compute it. */
ALWAYS_INLINE vf act_back(vf g, vf a, vf z, int act, float p0, float p1) {
    switch (act) {
    case ACT_SIGMOID: return g * (1.0f - a) * a;
    case ACT_TANH: return g * (1.0f - a * a);
    case ACT_RELU: return sel(a <= 0.0f, splat(0.0f), g);
    case ACT_LEAKY_RELU: return sel(a > 0.0f, g, g * p0);
    case ACT_ELU: return sel(a > 0.0f, g, g * (a + p0)); /* alpha exp(z) = a + alpha */
    case ACT_SELU: return sel(a > 0.0f, g * SELU_SCALE, g * (a + SELU_SCALE * SELU_ALPHA));
    case ACT_CELU: return sel(a > 0.0f, g, g * (a * (1.0f / p0) + 1.0f)); /* exp(z / alpha) */
    case ACT_HARDTANH: return sel((a <= p0) | (a >= p1), splat(0.0f), g);
    case ACT_LOGSIGMOID: return -g * v_expm1(a); /* sigmoid(-z) = 1 - exp(a) */
    case ACT_SOFTPLUS: /* sigmoid(beta z) = 1 - exp(-beta a) */
        return sel(a * p0 > p1, g, -g * v_expm1(-a * p0));
    case ACT_SILU: {
        vf s = v_sigmoid(z);
        return g * s * (1.0f + z * (1.0f - s));
    }
    case ACT_GELU: { /* Phi(z) + z phi(z); erf(z / sqrt 2) takes the same exp(-z^2 / 2) */
        vf x = z * 0.70710678118654752f, e = v_exp(-x * x);
        return g * ((0.5f + 0.5f * v_erf_with(x, e)) + z * 0.39894228040143268f * e);
    }
    case ACT_MISH: { /* one exp for tanh(softplus(z)) and sigmoid(z) = e / (1 + e) */
        vf e = v_exp(z), t = mish_t(z, e);
        vf s = sel(z > 20.0f, splat(1.0f), e * v_recip(1.0f + e));
        return g * (t + z * s * (1.0f - t * t));
    }
    case ACT_HARDSWISH:
        return sel(z < -3.0f, splat(0.0f), sel(z <= 3.0f, g * (z * (1.0f / 3.0f) + 0.5f), g));
    case ACT_HARDSIGMOID:
        return sel((z > -3.0f) & (z < 3.0f), g * (1.0f / 6.0f), splat(0.0f));
    case ACT_SOFTSHRINK: return sel((z >= -p0) & (z <= p0), splat(0.0f), g);
    case ACT_TANHSHRINK: {
        vf t = v_tanh(z);
        return g * (t * t);
    }
    case ACT_SOFTSIGN: {
        vf r = v_recip(1.0f + sel(z < 0.0f, -z, z));
        return g * (r * r);
    }
    case ACT_THRESHOLD: return sel(z <= p0, splat(0.0f), g);
    case ACT_PRELU: return sel(z > 0.0f, g, g * p0);
    default: return g;
    }
}

/* The products of a layer, forward (W h + b) and backward (W^T g), are one kernel:
 * out[o][c] = start[o] + sum over r of W[o * so + r * sr] x[r][c], with (so, sr) = (in, 1)
 * forward and (1, in) backward. It computes blocks of JB outputs x CB row chunks in
 * registers: per r, CB vector loads and JB scalar broadcasts feed JB x CB independent FMAs,
 * so the loop is bound by FMA throughput rather than by loads or one chain's latency (4
 * cycles per FMA). The outer loop runs over blocks of CB chunks, whose x rows (in x CB
 * vectors: 24 KB at width 64) stay in L1 while every block of outputs passes over them; the
 * activation (or its derivative) is applied to each such block of outputs while it is in
 * cache, by a loop compiled once per activation. */
#define U 8
#if defined(__AVX512F__)
#define JB 4 /* 4 x 6 accumulators and 6 loaded vectors: 30 of the 32 vector registers */
#define CB 6
#elif defined(__AVX__)
#define JB 3 /* 3 x 4 accumulators and 4 loaded vectors: the 16 AVX registers */
#define CB 4
#else
#define JB 2 /* a vf is 2 SSE or NEON registers: 6 accumulators take 12 */
#define CB 3
#endif

/* Accumulators a block may hold: JB x CB for whole blocks; a block of fewer chunks (the last
 * cw < CB of a layer's, or all of them where the batch is small) takes more outputs
 * instead, ACC / cw. With one or two chunks (mini-batches of 16 or 32 rows), JB outputs
 * would leave most of the FMA units idle: 4 chains of 4-cycle FMAs, against the 8 that two
 * units keep busy. */
#define ACC (JB * CB)

/* The jb x cb block at (o0, c0), started from the bias b (or zero where b is NULL), into
 * out: rows of nc vectors (of V floats), aligned as vectors unless unaligned (stores that
 * allow either cost ~6 % more at full batch). */
ALWAYS_INLINE void block_(const float *W, long so, long sr, int nr, const float *b,
                          const vf *x, int nc, int o0, int c0, int jb, int cb, float *out,
                          int unaligned) {
    vf acc[ACC][CB];
    for (int j = 0; j < jb; j++)
        for (int u = 0; u < cb; u++) acc[j][u] = splat(b ? b[o0 + j] : 0.0f);
    const float *w = W + o0 * so;
    for (int r = 0; r < nr; r++) {
        const vf *xr = x + (long)r * nc + c0;
        vf xv[CB];
        for (int u = 0; u < cb; u++) xv[u] = xr[u];
        for (int j = 0; j < jb; j++) {
            float wj = w[j * so + r * sr];
            for (int u = 0; u < cb; u++) acc[j][u] += wj * xv[u];
        }
    }
    for (int j = 0; j < jb; j++)
        for (int u = 0; u < cb; u++) {
            long at = (long)(o0 + j) * nc + c0 + u;
            if (unaligned)
                memcpy(out + at * V, &acc[j][u], sizeof(vf));
            else
                ((vf *)out)[at] = acc[j][u];
        }
}

/* Chunks [c0, c0 + cw) of every output: blocks of ACC / cw outputs, then of 4, 2 and 1. */
ALWAYS_INLINE void columns_(const float *W, long so, long sr, int nr, const float *b,
                            const vf *x, int no, int nc, int c0, int cw, float *out,
                            int unaligned) {
    const int jb = ACC / cw;
    int o = 0;
#define BLOCKS(J) block_(W, so, sr, nr, b, x, nc, o, c0, J, cw, out, unaligned)
    for (; o + jb <= no; o += jb) BLOCKS(jb);
    for (; jb > 4 && o + 4 <= no; o += 4) BLOCKS(4);
    for (; jb > 2 && o + 2 <= no; o += 2) BLOCKS(2);
    for (; o < no; o++) BLOCKS(1);
#undef BLOCKS
}

/* columns_ for the last cw < CB chunks, cw known at compile time in each case. */
static void columns_rest(const float *W, long so, long sr, int nr, const float *b,
                         const vf *x, int no, int nc, int c0, int cw, float *out,
                         int unaligned) {
    switch (cw) {
#define CASE(N)                                                                              \
    case N:                                                                                  \
        if (unaligned) columns_(W, so, sr, nr, b, x, no, nc, c0, N, out, 1);                 \
        else columns_(W, so, sr, nr, b, x, no, nc, c0, N, out, 0);                           \
        break;
    CASE(1)
    CASE(2)
#if CB > 3
    CASE(3)
    CASE(4)
    CASE(5)
#endif
#undef CASE
    default: break;
    }
}

/* Applies the activation to chunks [c0, c0 + cw) of z (no, nc), keeping its input in pre
 * where NEEDS_Z; back: z (the gradient wrt an activation's output) becomes the gradient wrt
 * its input, from that activation's output a and input pre. */
ALWAYS_INLINE void apply_(int back, int act, float p0, float p1, vf *z, vf *pre, const vf *a,
                          int no, int nc, int c0, int cw) {
    for (int o = 0; o < no; o++)
        for (long at = (long)o * nc + c0; at < (long)o * nc + c0 + cw; at++) {
            vf s = z[at];
            if (back) {
                z[at] = act_back(s, a[at], NEEDS_Z(act) ? pre[at] : s, act, p0, p1);
            } else {
                if (STREAMED(act))
                    store_kept(pre + at, s);
                else if (NEEDS_Z(act))
                    pre[at] = s;
                z[at] = act_fwd(s, act, p0, p1);
            }
        }
}

/* Narrow layers (at most NARROW outputs, as the lecture's) instead apply the activation in
 * registers, U row chunks of one output at a time: there, a pass of its own over the
 * outputs costs more than the blocked product saves (lecture net, ReLU: 8.3 against 7.1 us
 * per model-epoch on the dev VM). */
#define NARROW 8

/* narrow: z (out, nc) = act(W (out, in) h (in, nc) + b); its input into pre if NEEDS_Z */
ALWAYS_INLINE void narrow_(const float *W, const float *b, const vf *h, int in, int out,
                           int nc, int act, float p0, float p1, vf *z, vf *pre) {
    int c = 0;
    for (; c + U <= nc; c += U) {
        for (int j = 0; j < out; j++) {
            const float *w = W + (long)j * in;
            vf acc[U];
            for (int u = 0; u < U; u++) acc[u] = splat(b[j]);
            for (int i = 0; i < in; i++) {
                const vf *hi = h + (long)i * nc + c;
                for (int u = 0; u < U; u++) acc[u] += w[i] * hi[u];
            }
            long at = (long)j * nc + c;
            for (int u = 0; u < U; u++) {
                if (NEEDS_Z(act)) pre[at + u] = acc[u];
                z[at + u] = act_fwd(acc[u], act, p0, p1);
            }
        }
    }
    for (; c < nc; c++) {
        for (int j = 0; j < out; j++) {
            vf acc = splat(b[j]);
            for (int i = 0; i < in; i++) acc += W[(long)j * in + i] * h[(long)i * nc + c];
            if (NEEDS_Z(act)) pre[(long)j * nc + c] = acc;
            z[(long)j * nc + c] = act_fwd(acc, act, p0, p1);
        }
    }
}

/* narrow: gh (in, nc) = W^T (in, out) g (out, nc), times the derivative of the activation
 * whose output a (in, nc) was this layer's input (and input pre, if NEEDS_Z): the gradient
 * wrt that activation's input. */
ALWAYS_INLINE void narrow_back_(const float *W, const vf *g, const vf *a, const vf *pre,
                                int act, float p0, float p1, int in, int out, int nc, vf *gh) {
    int c = 0;
    for (; c + U <= nc; c += U) {
        for (int i = 0; i < in; i++) {
            vf acc[U];
            for (int u = 0; u < U; u++) acc[u] = splat(0.0f);
            for (int j = 0; j < out; j++) {
                const vf *gj = g + (long)j * nc + c;
                float w = W[(long)j * in + i];
                for (int u = 0; u < U; u++) acc[u] += w * gj[u];
            }
            long at = (long)i * nc + c;
            for (int u = 0; u < U; u++)
                gh[at + u] = act_back(acc[u], a[at + u], NEEDS_Z(act) ? pre[at + u] : acc[u], act,
                                      p0, p1);
        }
    }
    for (; c < nc; c++) {
        for (int i = 0; i < in; i++) {
            vf acc = splat(0.0f);
            for (int j = 0; j < out; j++) acc += W[(long)j * in + i] * g[(long)j * nc + c];
            long at = (long)i * nc + c;
            gh[at] = act_back(acc, a[at], NEEDS_Z(act) ? pre[at] : acc, act, p0, p1);
        }
    }
}

/* The softmax family over the no features of each row, for chunks [c0, c0 + cw) of z (no,
 * nc), as torch computes them: exp(z - max) / sum, and z - max - log(sum) for log-softmax
 * (softmin is softmax of -z). back: z holds the gradient g wrt the outputs a and becomes the
 * gradient wrt the inputs: a (g - sum(g a)) for softmax (negated for softmin), and
 * g - exp(a) sum(g) for log-softmax. */
ALWAYS_INLINE void rowwise_(int back, int act, vf *z, const vf *a, int no, int nc, int c0,
                            int cw) {
    for (long c = c0; c < c0 + cw; c++) {
        vf *zc = z + c;
        const vf *ac = a + c;
        if (back) {
            vf sum = splat(0.0f);
            for (int o = 0; o < no; o++)
                sum += act == ACT_LOGSOFTMAX ? zc[o * nc] : zc[o * nc] * ac[o * nc];
            for (int o = 0; o < no; o++) {
                vf g = zc[o * nc], y = ac[o * nc];
                zc[o * nc] = act == ACT_LOGSOFTMAX ? g - v_exp(y) * sum
                             : act == ACT_SOFTMIN  ? -(y * (g - sum))
                                                   : y * (g - sum);
            }
            continue;
        }
        float sign = act == ACT_SOFTMIN ? -1.0f : 1.0f;
        vf m = sign * zc[0];
        for (int o = 1; o < no; o++) m = sel(sign * zc[o * nc] > m, sign * zc[o * nc], m);
        vf sum = splat(0.0f);
        for (int o = 0; o < no; o++) {
            vf e = v_exp(sign * zc[o * nc] - m);
            if (act != ACT_LOGSOFTMAX) zc[o * nc] = e;
            sum += e;
        }
        if (act == ACT_LOGSOFTMAX) {
            vf shift = m + v_log(sum);
            for (int o = 0; o < no; o++) zc[o * nc] = zc[o * nc] - shift;
        } else {
            for (int o = 0; o < no; o++) zc[o * nc] = zc[o * nc] / sum;
        }
    }
}

/* apply_, narrow_ and narrow_back_ compiled once per elementwise activation, rowwise_ once
 * per row-wise one, so that none tests which inside. */
#define EACH_ACTIVATION(X) X(ACT_SIGMOID) X(ACT_TANH) X(ACT_RELU) X(ACT_LEAKY_RELU) X(ACT_ELU) \
    X(ACT_SELU) X(ACT_CELU) X(ACT_HARDTANH) X(ACT_LOGSIGMOID) X(ACT_SOFTPLUS) X(ACT_SILU)       \
    X(ACT_GELU) X(ACT_MISH) X(ACT_HARDSWISH) X(ACT_HARDSIGMOID) X(ACT_SOFTSHRINK)            \
    X(ACT_TANHSHRINK) X(ACT_SOFTSIGN) X(ACT_THRESHOLD) X(ACT_PRELU)
#define EACH_ROWWISE(X) X(ACT_SOFTMAX) X(ACT_SOFTMIN) X(ACT_LOGSOFTMAX)

static void apply(int back, int act, const float *p, vf *z, vf *pre, const vf *a, int no,
                  int nc, int c0, int cw) {
    switch (act * 2 + back) {
#define CASE(A)                                                                              \
    case A * 2: apply_(0, A, p[0], p[1], z, pre, a, no, nc, c0, cw); break;                  \
    case A * 2 + 1: apply_(1, A, p[0], p[1], z, pre, a, no, nc, c0, cw); break;
    EACH_ACTIVATION(CASE)
#undef CASE
#define CASE(A)                                                                              \
    case A * 2: rowwise_(0, A, z, a, no, nc, c0, cw); break;                                 \
    case A * 2 + 1: rowwise_(1, A, z, a, no, nc, c0, cw); break;
    EACH_ROWWISE(CASE)
#undef CASE
    default: break; /* ACT_NONE */
    }
}

/* out (no, nc) = act(W x + b) forward, or act'(.) * W^T x backward (see above). */
static void product(const float *W, long so, long sr, int nr, const float *b, const vf *x,
                    int no, int nc, int back, int act, const float *p, vf *z, vf *pre,
                    const vf *a) {
    int c = 0;
    for (; c + CB <= nc; c += CB) {
        columns_(W, so, sr, nr, b, x, no, nc, c, CB, (float *)z, 0);
        apply(back, act, p, z, pre, a, no, nc, c, CB);
    }
    if (c < nc) {
        columns_rest(W, so, sr, nr, b, x, no, nc, c, nc - c, (float *)z, 0);
        apply(back, act, p, z, pre, a, no, nc, c, nc - c);
    }
}

/* z (out, nc) = act(W (out, in) h (in, nc) + b); the pre-activation into pre if NEEDS_Z */
static void dense(const float *W, const float *b, const vf *h, int in, int out, int nc,
                  int act, const float *p, vf *z, vf *pre) {
    if (out > NARROW || ROWWISE(act)) {
        product(W, in, 1, in, b, h, out, nc, 0, act, p, z, pre, NULL);
        return;
    }
    switch (act) {
#define CASE(A) case A: narrow_(W, b, h, in, out, nc, A, p[0], p[1], z, pre); break;
    EACH_ACTIVATION(CASE)
#undef CASE
    default: narrow_(W, b, h, in, out, nc, ACT_NONE, 0.0f, 0.0f, z, pre);
    }
}

/* gh (in, nc) = W^T (in, out) g (out, nc), times the derivative of the activation whose
 * output a (in, nc) was this layer's input (and input pre, if NEEDS_Z): the gradient wrt
 * that activation's input. */
static void dense_back(const float *W, const vf *g, const vf *a, const vf *pre, int act,
                       const float *p, int in, int out, int nc, vf *gh) {
    if (in > NARROW || ROWWISE(act)) {
        product(W, 1, in, out, NULL, g, in, nc, 1, act, p, gh, (vf *)pre, a);
        return;
    }
    switch (act) {
#define CASE(A) case A: narrow_back_(W, g, a, pre, A, p[0], p[1], in, out, nc, gh); break;
    EACH_ACTIVATION(CASE)
#undef CASE
    default: narrow_back_(W, g, a, pre, ACT_NONE, 0.0f, 0.0f, in, out, nc, gh);
    }
}

/* sum over c of a[c] * b[c], as one float */
static float dot(const vf *a, const vf *b, int nc) {
    vf acc[U];
    for (int u = 0; u < U; u++) acc[u] = splat(0.0f);
    int c = 0;
    for (; c + U <= nc; c += U)
        for (int u = 0; u < U; u++) acc[u] += a[c + u] * b[c + u];
    for (; c < nc; c++) acc[0] += a[c] * b[c];
    for (int u = 1; u < U; u++) acc[0] += acc[u];
    return hsum(acc[0]);
}

/* sum over c of a[c], as one float */
static float total(const vf *a, int nc) {
    vf acc[U];
    for (int u = 0; u < U; u++) acc[u] = splat(0.0f);
    int c = 0;
    for (; c + U <= nc; c += U)
        for (int u = 0; u < U; u++) acc[u] += a[c + u];
    for (; c < nc; c++) acc[0] += a[c];
    for (int u = 1; u < U; u++) acc[0] += acc[u];
    return hsum(acc[0]);
}

#if defined(__AVX512F__)
/* x and y folded in half block by block: for blocks of 2w lanes, the first half of each
 * block of the result is x's block's two halves added, the second half y's. */
ALWAYS_INLINE vf fold(vf x, vf y, int w) {
#define HALVES(...) __builtin_shufflevector(x, y, __VA_ARGS__)
    switch (w) {
    case 8:
        return HALVES(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + HALVES(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    case 4:
        return HALVES(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + HALVES(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    case 2:
        return HALVES(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
             + HALVES(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    default:
        return HALVES(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
             + HALVES(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
#undef HALVES
}

/* Sixteen sums at once: lane l of the result is the sum of the lanes of acc[s], s = l with
 * its 4 bits reversed. Four rounds of folds (32 shuffles and 15 adds, against ~8
 * instructions per vector for hsum). */
static inline vf sum16(const vf *acc) {
    vf s[16];
    for (int i = 0; i < 16; i++) s[i] = acc[i];
    for (int n = 8, w = 8; n >= 1; n /= 2, w /= 2)
        for (int p = 0; p < n; p++) s[p] = fold(s[2 * p], s[2 * p + 1], w);
    return s[0];
}

/* dW[j0 + j][i0 + i] for j, i < 4: 8 vector loads feed 16 FMAs per row chunk (16 of the 32
 * registers accumulate), and one sum16 replaces 16 lane sums. Accumulator s holds output
 * a = 4 j + i at s = a with its bits reversed, so that lane a of sum16 is dW's entry a. */
static void grad_block(const vf *g, const vf *h, int in, int nc, int j0, int i0, float *dW) {
    static const int slot[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    vf acc[16];
    for (int s = 0; s < 16; s++) acc[s] = splat(0.0f);
    const vf *gj = g + (long)j0 * nc, *hi = h + (long)i0 * nc;
    for (int c = 0; c < nc; c++) {
        vf gv[4], hv[4];
        for (int u = 0; u < 4; u++) gv[u] = gj[(long)u * nc + c], hv[u] = hi[(long)u * nc + c];
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) acc[slot[4 * j + i]] += gv[j] * hv[i];
    }
    vf sums = sum16(acc);
    for (int j = 0; j < 4; j++)
        memcpy(dW + (long)(j0 + j) * in + i0, (float *)&sums + 4 * j, 4 * sizeof(float));
}
#endif

#if defined(__AVX512F__)
/* x and y swap their off-diagonal b x b blocks: in each block of 2b lanes, x keeps its first
 * half and takes y's first half as its second, y takes x's second half as its first. */
ALWAYS_INLINE void swap_blocks(vf *x, vf *y, int b) {
    vf a = *x, c = *y;
    switch (b) {
    case 8:
        *x = __builtin_shufflevector(a, c, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        *y = __builtin_shufflevector(a, c, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        return;
    case 4:
        *x = __builtin_shufflevector(a, c, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
        *y = __builtin_shufflevector(a, c, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        return;
    case 2:
        *x = __builtin_shufflevector(a, c, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
        *y = __builtin_shufflevector(a, c, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        return;
    case 1:
        *x = __builtin_shufflevector(a, c, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
        *y = __builtin_shufflevector(a, c, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
        return;
    }
}
#endif

/* T (rows, in) = h (in, rows) transposed: rows [0, nc V) of h's rows of nc vectors, into
 * rows of in / V vectors (in a multiple of V). With AVX-512, 16 x 16 tiles in registers
 * (four rounds of swap_blocks); elsewhere, one float at a time. */
static void transpose(const vf *h, int in, int nc, vf *T) {
#if defined(__AVX512F__)
    for (int i0 = 0; i0 < in; i0 += V)
        for (int c = 0; c < nc; c++) {
            vf t[V];
            for (int u = 0; u < V; u++) t[u] = h[(long)(i0 + u) * nc + c];
            for (int b = V / 2; b >= 1; b /= 2)
                for (int u = 0; u < V; u++)
                    if ((u & b) == 0) swap_blocks(&t[u], &t[u + b], b);
            for (int u = 0; u < V; u++) T[((long)c * V + u) * (in / V) + i0 / V] = t[u];
        }
#else
    const float *hf = (const float *)h;
    float *tf = (float *)T;
    long rows = (long)nc * V;
    for (int i = 0; i < in; i++)
        for (long r = 0; r < rows; r++) tf[r * in + i] = hf[(long)i * rows + r];
#endif
}

/* dense_grad where the batch is small (nc <= GRAD_ROWS_NC) and in is a multiple of V: dW =
 * g T, T = h^T (rows, in) in scratch, as the blocked product that the forward pass uses,
 * with a row's inputs as the vector axis. The row axis would need a lane sum per entry of
 * dW, which costs more than its nc FMAs once nc is small (mini-batches of 32 rows: nc = 2);
 * here the transposition, in x rows floats, is shared by all out rows of dW. */
#define GRAD_ROWS_NC 8
static void dense_grad_rows(const vf *g, const vf *h, int in, int out, int n, int nc,
                            float *dW, vf *T) {
    transpose(h, in, nc, T);
    int ci = in / V, c = 0;
    const float *G = (const float *)g;
    for (; c + CB <= ci; c += CB) columns_(G, (long)nc * V, 1, n, NULL, T, out, ci, c, CB, dW, 1);
    if (c < ci) columns_rest(G, (long)nc * V, 1, n, NULL, T, out, ci, c, ci - c, dW, 1);
}

/* dW (out, in) = g h^T, db (out) = g summed over rows. With AVX-512, blocks of 4 outputs x
 * 4 inputs (grad_block) up to the last multiple of 4 of each; elsewhere, and for the
 * outputs beyond, blocks of 2 outputs x 4 inputs share their loads (6 vectors for 8 FMAs,
 * against 2 for 1 in a plain dot product); the 4 input rows of a block stay in L1 while
 * every output block streams past them. */
static void dense_grad(const vf *g, const vf *h, int in, int out, int n, int nc, float *dW,
                       float *db, vf *T) {
    for (int j = 0; j < out; j++) db[j] = total(g + (long)j * nc, nc);
    if (nc <= GRAD_ROWS_NC && in % V == 0) {
        dense_grad_rows(g, h, in, out, n, nc, dW, T);
        return;
    }
    int j_start = 0; /* outputs below it are done in 4 x 4 blocks, for inputs below in & ~3 */
#if defined(__AVX512F__)
    j_start = out & ~3;
    for (int i = 0; i + 4 <= in; i += 4)
        for (int j = 0; j < j_start; j += 4) grad_block(g, h, in, nc, j, i, dW);
#endif
    int i = 0;
    for (; i + 4 <= in; i += 4) {
        const vf *h0 = h + (long)i * nc;
        int j = j_start;
        for (; j + 2 <= out; j += 2) {
            const vf *g0 = g + (long)j * nc, *g1 = g0 + nc;
            vf a[8];
            for (int u = 0; u < 8; u++) a[u] = splat(0.0f);
            for (int c = 0; c < nc; c++) {
                vf x0 = g0[c], x1 = g1[c];
                for (int u = 0; u < 4; u++) {
                    vf hv = h0[(long)u * nc + c];
                    a[u] += x0 * hv;
                    a[4 + u] += x1 * hv;
                }
            }
            for (int u = 0; u < 4; u++) {
                dW[(long)j * in + i + u] = hsum(a[u]);
                dW[(long)(j + 1) * in + i + u] = hsum(a[4 + u]);
            }
        }
        for (; j < out; j++)
            for (int u = 0; u < 4; u++)
                dW[(long)j * in + i + u] = dot(g + (long)j * nc, h0 + (long)u * nc, nc);
    }
    for (; i < in; i++)
        for (int j = 0; j < out; j++)
            dW[(long)j * in + i] = dot(g + (long)j * nc, h + (long)i * nc, nc);
}

/* prelu, backward, for a layer of width units: g (width, nc) holds the gradient wrt the
 * activation's outputs and becomes the gradient wrt its inputs z (g where z > 0, slope * g
 * elsewhere); returns the slope's gradient, the sum of z * g where z <= 0 over the real
 * rows, as torch's prelu backward. */
static float prelu_back(vf *g, const vf *z, const vi *real, float slope, int width, int nc) {
    vf sum = splat(0.0f);
    for (int o = 0; o < width; o++)
        for (long c = 0; c < nc; c++) {
            long at = (long)o * nc + c;
            vf gv = g[at], zv = z[at];
            vi above = zv > 0.0f;
            sum += sel(above | ~real[c], splat(0.0f), zv * gv);
            g[at] = sel(above, gv, gv * slope);
        }
    return hsum(sum);
}

/* Mean loss over the n real rows, and its gradient wrt the logits o (n_out, nc) into g. */
static float loss_grad(const vf *o, const vf *target, const vi *label, const vi *real,
                       int n_out, int nc, int n, vf *g) {
    vf total = splat(0.0f);
    float inv_n = 1.0f / (float)n;
    if (n_out == 1) {
        for (int c = 0; c < nc; c++) {
            vf x = o[c], t = target[c];
            vf ax = sel(x < 0.0f, -x, x);
            vf e = v_exp(-ax), r = v_recip(1.0f + e); /* sigmoid(|x|) = r */
            vf l = sel(x > 0.0f, x, splat(0.0f)) - x * t + v_log1p(e);
            total += sel(real[c], l, splat(0.0f));
            vf sig = sel(x < 0.0f, e * r, r);
            g[c] = sel(real[c], (sig - t) * inv_n, splat(0.0f));
        }
    } else {
        for (int c = 0; c < nc; c++) {
            vf mx = o[c];
            for (int j = 1; j < n_out; j++) {
                vf v = o[(long)j * nc + c];
                mx = sel(v > mx, v, mx);
            }
            vf s = splat(0.0f), picked = splat(0.0f);
            for (int j = 0; j < n_out; j++) {
                vf v = o[(long)j * nc + c];
                s += v_exp(v - mx);
                picked = sel(label[c] == j, v, picked);
            }
            /* as log_softmax: (o - max) - log(s), never (o - (max + log(s))), which loses
             * the small log(s) next to a large max */
            vf ls = v_log(s);
            total += sel(real[c], (mx - picked) + ls, splat(0.0f));
            for (int j = 0; j < n_out; j++) {
                vf p = v_exp((o[(long)j * nc + c] - mx) - ls);
                vf d = sel(label[c] == j, p - 1.0f, p) * inv_n;
                g[(long)j * nc + c] = sel(real[c], d, splat(0.0f));
            }
        }
    }
    return hsum(total) / (float)n;
}

/* The parameters of hidden layer l's activation: act_params, or prelu's slope for that
 * layer, from the model's parameters p, in lp. */
static inline const float *layer_params(const float *act_params, const long *s_off,
                                        const float *p, int l, float *lp) {
    if (s_off == NULL) return act_params;
    lp[0] = p[s_off[l]], lp[1] = 0.0f;
    return lp;
}

/* dense_back, and for prelu the gradient of the slope of the activation whose output a
 * (in, nc) is, into *slope_grad. */
static void back_through(const float *W, const vf *g, const vf *a, const vf *pre, int act,
                         const float *params, const vi *real, float *slope_grad, int in,
                         int out, int nc, vf *gh) {
    if (act != ACT_PRELU) {
        dense_back(W, g, a, pre, act, params, in, out, nc, gh);
        return;
    }
    dense_back(W, g, a, pre, ACT_NONE, params, in, out, nc, gh); /* wrt prelu's outputs */
    *slope_grad = prelu_back(gh, pre, real, params[0], in, nc);
}

/* The gradient wrt a hidden layer's pre-activation into out (width, nc), from the gradient
 * G wrt its block's output: act'(.) * (G * factor), factor being dropout's (NULL: none),
 * from the activation's output a and (NEEDS_Z) its input z; prelu's slope gradient into
 * *slope_grad. The unfused twin of back_through's activation part, for where G is needed
 * whole (residual blocks) or dropout comes between. */
static void act_back_pass(int act, const float *params, const vf *G, const vf *factor,
                          const vf *a, const vf *z, const vi *real, float *slope_grad,
                          int width, int nc, vf *out) {
    long count = (long)width * nc;
    if (factor != NULL)
        for (long i = 0; i < count; i++) out[i] = G[i] * factor[i];
    else
        memcpy(out, G, count * sizeof(vf));
    if (act == ACT_PRELU)
        *slope_grad = prelu_back(out, z, real, params[0], width, nc);
    else
        apply(1, act, params, out, (vf *)z, a, width, nc, 0, nc);
}

/* rows (rows, n) floats, one after another, into dst as rows of nc vectors (zero padded) */
static void load_rows(vf *dst, const float *src, int rows, int n, int nc) {
    for (int r = 0; r < rows; r++) {
        float *row = (float *)(dst + (long)r * nc);
        memcpy(row, src + (long)r * n, n * sizeof(float));
        memset(row + n, 0, ((long)nc * V - n) * sizeof(float));
    }
}

#define LN_EPS 1e-5f /* torch's LayerNorm default */

static inline vf v_sqrt(vf x) { /* vsqrtps where the CPU has it (-fno-math-errno) */
    vf r;
    for (int i = 0; i < V; i++) r[i] = sqrtf(x[i]);
    return r;
}

/* Layer norm over the width units of each row, in place on z (width, nc), as torch's
 * LayerNorm (biased variance, eps 1e-5): (z - mean) / sqrt(var + eps) into xhat, that
 * 1 / sqrt(var + eps) per row into rstd (nc), and xhat * gamma + beta into z. */
static void ln_forward(vf *z, vf *xhat, vf *rstd, const float *gamma, const float *beta,
                       int width, int nc) {
    float inv_w = 1.0f / (float)width;
    for (long c = 0; c < nc; c++) {
        vf sum = splat(0.0f), var = splat(0.0f);
        for (int o = 0; o < width; o++) sum += z[(long)o * nc + c];
        vf mean = sum * inv_w;
        for (int o = 0; o < width; o++) {
            vf dev = z[(long)o * nc + c] - mean;
            var += dev * dev;
        }
        vf r = 1.0f / v_sqrt(var * inv_w + LN_EPS);
        rstd[c] = r;
        for (int o = 0; o < width; o++) {
            long at = (long)o * nc + c;
            vf x = (z[at] - mean) * r;
            xhat[at] = x;
            z[at] = x * gamma[o] + beta[o];
        }
    }
}

/* Layer norm's backward, in place on g (width, nc): the gradient wrt its output becomes the
 * gradient wrt its input; gamma's and beta's gradients (sums over the rows: padded ones
 * carry zeros) into dgamma and dbeta. */
static void ln_backward(vf *g, const vf *xhat, const vf *rstd, const float *gamma, int width,
                        int nc, float *dgamma, float *dbeta) {
    for (int o = 0; o < width; o++) {
        dgamma[o] = dot(g + (long)o * nc, xhat + (long)o * nc, nc);
        dbeta[o] = total(g + (long)o * nc, nc);
    }
    float inv_w = 1.0f / (float)width;
    for (long c = 0; c < nc; c++) {
        vf m1 = splat(0.0f), m2 = splat(0.0f);
        for (int o = 0; o < width; o++) {
            long at = (long)o * nc + c;
            vf gx = g[at] * gamma[o];
            m1 += gx;
            m2 += gx * xhat[at];
        }
        m1 *= inv_w, m2 *= inv_w;
        for (int o = 0; o < width; o++) {
            long at = (long)o * nc + c;
            g[at] = rstd[c] * ((g[at] * gamma[o] - m1) - xhat[at] * m2);
        }
    }
}

/* y += x over count vectors, as x + y: a residual block's shortcut. */
static void add_shortcut(vf *y, const vf *x, long count) {
    for (long i = 0; i < count; i++) y[i] = x[i] + y[i];
}

/* torch's CPU generator, for the random draws the step and widedeep_dropout_masks make as
 * torch would: torch.Generator.get_state()'s bytes (STATE_BYTES) hold an mt19937 whose 624
 * words are stored as uint64s from byte 24, with its count of draws left at byte 8 (int)
 * and its next index at byte 16 (uint64); widedeep.fused checks this layout, and the draws,
 * against torch before it uses them. */
#define MT_N 624
#define MT_M 397

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    uint32_t y = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (y >> 1) ^ ((0u - (v & 1u)) & 0x9908b0dfu); /* no table: the loops vectorise */
}

static void mt_refill(uint32_t *s) { /* the generation step of mt19937, as torch's */
    for (int i = 0; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ mt_twist(s[i], s[i + 1]);
    for (int i = MT_N - MT_M; i < MT_N - 1; i++)
        s[i] = s[i + MT_M - MT_N] ^ mt_twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ mt_twist(s[MT_N - 1], s[0]);
}

/* mt19937's output from a word of its state (tempering) */
static inline uint32_t mt_temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

/* The generator of one model: its state s, and t, every word of s tempered (one vectorised
 * pass per refill, instead of one word at a time); left and next as torch counts them. */
struct mt {
    uint32_t s[MT_N], t[MT_N];
    int left, next;
};

static void mt_retemper(struct mt *g) {
    for (int i = 0; i < MT_N; i++) g->t[i] = mt_temper(g->s[i]);
}

static inline uint32_t mt_draw(struct mt *g) { /* as torch's mt19937::operator() */
    if (--g->left == 0) {
        mt_refill(g->s);
        mt_retemper(g);
        g->left = MT_N;
        g->next = 0;
    }
    return g->t[g->next++];
}

#define STATE_BYTES 5056 /* torch's CPUGeneratorImplStateLegacy */
#define STATE_LEFT 8
#define STATE_NEXT 16
#define STATE_WORDS 24

static void mt_load(struct mt *g, const uint8_t *st) { /* from torch's state bytes */
    int32_t left;
    uint64_t next, word;
    memcpy(&left, st + STATE_LEFT, sizeof left);
    memcpy(&next, st + STATE_NEXT, sizeof next);
    for (int i = 0; i < MT_N; i++) {
        memcpy(&word, st + STATE_WORDS + 8L * i, sizeof word);
        g->s[i] = (uint32_t)word;
    }
    mt_retemper(g);
    g->left = left, g->next = (int)next;
}

static void mt_save(const struct mt *g, uint8_t *st) { /* back into torch's state bytes */
    int32_t left = g->left;
    uint64_t next = (uint64_t)g->next, word;
    memcpy(st + STATE_LEFT, &left, sizeof left);
    memcpy(st + STATE_NEXT, &next, sizeof next);
    for (int i = 0; i < MT_N; i++) {
        word = g->s[i];
        memcpy(st + STATE_WORDS + 8L * i, &word, sizeof word);
    }
}

/* rrelu's slopes for a hidden layer's pre-activations z (width, nc), into factor (width,
 * nc; the padding rows 0), as torch's rrelu_with_noise draws them in training from the
 * model's generator g: element by element of the plain loop's (n, width) tensor, row after
 * row, a slope from U(lower, upper) where z <= 0 (not NaN), else 1. A slope is
 * uniform_real_distribution<double>: random64() (two draws, the first the high word) masked
 * to 53 bits, times 2^-53, times (upper - lower), plus lower, in double (two roundings:
 * never an FMA), then float. g NULL: the model is evaluated, every slope below zero is the
 * mean, as torch's leaky_relu with (lower + upper) / 2. */
static void rrelu_slopes(struct mt *g, const vf *z, vf *factor, int width, int n, int nc,
                         float lower, float upper) {
    const float *zf = (const float *)z;
    float *f = (float *)factor;
    const long stride = (long)nc * V;
    const double from = lower, span = (double)upper - (double)lower;
    const float mean = (float)(((double)lower + (double)upper) / 2);
    for (int u = 0; u < width; u++) memset(f + u * stride + n, 0, (stride - n) * sizeof(float));
    if (g == NULL) {
        for (int u = 0; u < width; u++)
            for (int r = 0; r < n; r++)
                f[u * stride + r] = zf[u * stride + r] <= 0.0f ? mean : 1.0f;
        return;
    }
    /* Without a branch on the sign (half the elements, at random: a misprediction each),
     * except where a refill of the generator may come within the next two words. */
    int left = g->left, next = g->next;
    for (int r = 0; r < n; r++)
        for (int u = 0; u < width; u++) {
            long i = u * stride + r;
            int below = zf[i] <= 0.0f;
            uint64_t hi, lo;
            if (left > 2) { /* two words without a refill (next + 1 < MT_N) */
                hi = g->t[next], lo = g->t[next + 1];
                next += 2 * below, left -= 2 * below;
            } else if (below) {
                g->left = left, g->next = next;
                hi = mt_draw(g), lo = mt_draw(g);
                left = g->left, next = g->next;
            } else {
                f[i] = 1.0f;
                continue;
            }
            /* < 2^53: exact as a signed conversion (AVX2 has none for unsigned) */
            int64_t bits = (int64_t)(((hi << 32) | lo) & ((1ULL << 53) - 1));
            volatile double scaled = (double)bits * 0x1p-53 * span; /* rounded, as torch's */
            float slope = (float)(scaled + from);
            f[i] = below ? slope : 1.0f;
        }
    g->left = left, g->next = next;
}

/* rrelu_slopes for an (n, width) tensor z, row after row as torch holds it, into out (n,
 * width), from the generator whose torch state is state (advanced in place; NULL: the mean
 * slope): what widedeep.fused checks the step's draws against torch's with. Returns 0, or
 * -1 when scratch memory could not be allocated. */
int widedeep_rrelu_slopes(uint8_t *state, const float *z, int width, int n, float lower,
                          float upper, float *out) {
    int nc = (n + V - 1) / V;
    vf *zv = aligned_alloc(64, 2 * (size_t)width * nc * sizeof(vf));
    struct mt *g = malloc(sizeof *g);
    if (zv == NULL || g == NULL) {
        free(zv), free(g);
        return -1;
    }
    float *zf = (float *)zv, *f = (float *)(zv + (long)width * nc);
    for (int u = 0; u < width; u++)
        for (int r = 0; r < nc * V; r++)
            zf[(long)u * nc * V + r] = r < n ? z[(long)r * width + u] : 0.0f;
    if (state != NULL) mt_load(g, state);
    rrelu_slopes(state != NULL ? g : NULL, zv, zv + (long)width * nc, width, n, nc, lower, upper);
    if (state != NULL) mt_save(g, state);
    for (int r = 0; r < n; r++)
        for (int u = 0; u < width; u++) out[(long)r * width + u] = f[(long)u * nc * V + r];
    free(zv), free(g);
    return 0;
}

/* One call's arguments (see widedeep_mlp_step below), shared by the threads it starts. */
struct step {
    int d, n, depth, n_out, act;
    const int *widths, *res;
    const float *act_params, *flat;
    long P;
    const long *w_off, *b_off, *s_off, *ln_off;
    const float *X, *noise, *shift;
    uint8_t *const *rr_states;
    int x_per_model, y_per_model, wide;
    long wide_w, wide_b;
    const int64_t *y;
    float *loss, *grad;
};

/* Models [k0, k1) of a step, on the calling thread, in scratch memory of their own. */
static int step_models(const struct step *s, int k0, int k1) {
    const int d = s->d, n = s->n, depth = s->depth, n_out = s->n_out, act = s->act;
    const int *widths = s->widths, *res = s->res;
    const float *act_params = s->act_params, *flat = s->flat, *X = s->X;
    const float *noise = s->noise, *shift = s->shift;
    /* rrelu (act is ACT_NONE, act_params its lower and upper bounds): its slopes, drawn here
     * from each model's generator state, multiply the layer's output as dropout's factors do */
    uint8_t *const *rr_states = s->rr_states;
    const int factored = noise != NULL || rr_states != NULL;
    const long P = s->P, *w_off = s->w_off, *b_off = s->b_off, *s_off = s->s_off;
    const long *ln_off = s->ln_off; /* layer norm's gamma and beta of layer l: 2 l, 2 l + 1 */
    const int x_per_model = s->x_per_model, y_per_model = s->y_per_model, wide = s->wide;
    /* the wide part's inputs: the features, then (crossed) their products two by two */
    const int dw = wide == 0 ? 0 : wide == 1 ? d : d + d * (d - 1) / 2;
    const int64_t *y = s->y;
    float *loss = s->loss, *grad = s->grad;
    int nc = (n + V - 1) / V, maxw = d > n_out ? d : n_out;
    /* NOTE: an odd row stride (in cache lines): with an even one, the rows of a layer map to a
     * fraction of L1's sets (48 lines: a quarter) and evict each other at width >= 16. The
     * extra chunk is padding, like the tail of the last one. */
    if (nc >= 16) nc |= 1;
    long hidden = 0;
    for (int l = 0; l < depth; l++) {
        hidden += widths[l];
        if (widths[l] > maxw) maxw = widths[l];
    }
    long dropped = factored ? hidden : 0; /* rows of dropout's factors or rrelu's slopes */
    long normed = ln_off != NULL ? hidden + depth : 0; /* layer norm's xhat and rstd rows */
    int tw = dw > maxw ? dw : maxw; /* rows of T, dense_grad's scratch */
    long floats = ((long)(dw > d ? dw : d) + 2 * hidden + dropped + normed + n_out + 4L * maxw
                   + tw + 1) * nc * V;
    size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    vf *buf = aligned_alloc(64, bytes + 2 * (size_t)nc * sizeof(vi));
    struct mt *gen = rr_states != NULL ? malloc(sizeof *gen) : NULL;
    if (buf == NULL || (rr_states != NULL && gen == NULL)) {
        free(buf), free(gen);
        return -1;
    }
#if defined(__SSE__)
    /* Flush denormals to zero while the step runs (restored on return): exp(-z^2) and the
     * like reach them for |z| beyond ~9, and each costs a microcode assist of ~100 cycles.
     * Values below 1.2e-38 change nothing at float32 tolerance. */
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ | DAZ */
#endif
    stream_kept = STREAMED(act) && hidden * nc * (long)sizeof(vf) > STREAM_BYTES;
    vf *h0 = buf, *acts = h0 + (long)(dw > d ? dw : d) * nc, *pre = acts + hidden * nc;
    vf *out = pre + hidden * nc;
    vf *g1 = out + (long)n_out * nc, *g2 = g1 + (long)maxw * nc, *G = g2 + (long)maxw * nc;
    vf *G_new = G + (long)maxw * nc, *drop = G_new + (long)maxw * nc;
    vf *xhat = drop + dropped * nc, *rstd = xhat + (ln_off ? hidden : 0) * nc;
    vf *target = xhat + normed * nc, *T = target + nc;
    vi *label = (vi *)((char *)buf + bytes), *real = label + nc;
    for (int c = 0; c < nc; c++)
        for (int r = 0; r < V; r++) real[c][r] = c * V + r < n ? -1 : 0;

    float lp[2]; /* a prelu layer's parameters */
    for (int k = k0; k < k1; k++) {
        const float *p = flat + (long)k * P;
        float *gk = grad + (long)k * P;
        if (k == k0 || x_per_model) {
            load_rows(h0, X + (x_per_model ? (long)k * d * n : 0), d, n, nc);
            vf *cross = h0 + (long)d * nc; /* X[i] X[j], i < j, as widedeep.batched.wide_input */
            for (int i = 0; wide == 2 && i < d; i++)
                for (int j = i + 1; j < d; j++, cross += nc)
                    for (int c = 0; c < nc; c++)
                        cross[c] = h0[(long)i * nc + c] * h0[(long)j * nc + c];
        }
        if (k == k0 || y_per_model) {
            const int64_t *yk = y + (y_per_model ? (long)k * n : 0);
            for (int r = 0; r < nc * V; r++) {
                int v = r < n ? (int)yk[r] : 0;
                ((float *)target)[r] = (float)v;
                ((int32_t *)label)[r] = v;
            }
        }
        /* forward: acts holds each hidden layer's output (a block's: after dropout, its
         * input added where it is residual); pre, what the backward pass needs of the
         * activation: its input where NEEDS_Z, else, where dropout or a shortcut follows,
         * its output; drop, dropout's factors (its mask, scaled) */
        const vf *h = h0;
        int in = d;
        vf *a = acts;
        struct mt *draws = NULL; /* rrelu: this model's generator (NULL: evaluated) */
        if (rr_states != NULL && rr_states[k] != NULL) mt_load(draws = gen, rr_states[k]);
        for (int l = 0; l < depth; l++) {
            vf *z = pre + (a - acts);
            long count = (long)widths[l] * nc;
            const float *params = layer_params(act_params, s_off, p, l, lp);
            if (ln_off != NULL) { /* Linear, layer norm, then the activation */
                dense(p + w_off[l], p + b_off[l], h, in, widths[l], nc, ACT_NONE, params, a,
                      NULL);
                ln_forward(a, xhat + (a - acts), rstd + (long)l * nc, p + ln_off[2 * l],
                           p + ln_off[2 * l + 1], widths[l], nc);
                apply(0, act, params, a, z, NULL, widths[l], nc, 0, nc);
            } else {
                dense(p + w_off[l], p + b_off[l], h, in, widths[l], nc, act, params, a, z);
            }
            int shortcut = res != NULL && res[l];
            if ((shortcut || factored) && !NEEDS_Z(act)) memcpy(z, a, count * sizeof(vf));
            if (rr_states != NULL) { /* rrelu: z times its slopes, as torch */
                vf *slopes = drop + (a - acts);
                rrelu_slopes(draws, a, slopes, widths[l], n, nc, act_params[0], act_params[1]);
                for (long i = 0; i < count; i++) a[i] = a[i] * slopes[i];
            } else if (noise != NULL) { /* a * factor (+ shift, alpha dropout), as torch */
                long first = ((long)k * hidden + (a - acts) / nc) * n; /* unit's row */
                vf *factor = drop + (a - acts);
                load_rows(factor, noise + first, widths[l], n, nc);
                if (shift != NULL) {
                    load_rows(G_new, shift + first, widths[l], n, nc);
                    for (long i = 0; i < count; i++) a[i] = a[i] * factor[i] + G_new[i];
                } else {
                    for (long i = 0; i < count; i++) a[i] = a[i] * factor[i];
                }
            }
            if (shortcut) add_shortcut(a, h, count);
            h = a, in = widths[l], a += count;
        }
        if (draws != NULL) mt_save(draws, rr_states[k]);
        dense(p + w_off[depth], p + b_off[depth], h, in, n_out, nc, ACT_NONE, act_params, out,
              NULL);
        if (wide) { /* Wide & Deep: the wide part's logits, plus the deep part's */
            dense(p + s->wide_w, p + s->wide_b, h0, dw, n_out, nc, ACT_NONE, act_params, g2,
                  NULL);
            add_shortcut(out, g2, (long)n_out * nc);
        }
        loss[k] = loss_grad(out, target, label, real, n_out, nc, n, g1);
        if (wide) dense_grad(g1, h0, dw, n_out, n, nc, gk + s->wide_w, gk + s->wide_b, T);

        /* backward, layer l from the head (l = depth) down. gz: the gradient wrt layer l's
         * pre-activation. Where a block is residual, the gradient wrt its output (G) passes
         * down its shortcut whole, so it is kept: G_{l-1} = W_l^T gz + G_l. */
        vf *gz = g1, *g_below = g2;
        const vf *top = a; /* where layer l's outputs start in acts (the head's: the end) */
        for (int l = depth; l >= 0; l--) {
            int w = l == depth ? n_out : widths[l], in_l = l > 0 ? widths[l - 1] : d;
            const vf *below = l > 0 ? top - (long)in_l * nc : h0; /* layer l's input */
            if (ln_off != NULL && l < depth) { /* gz: wrt layer norm's output, then input */
                ln_backward(gz, xhat + (top - acts), rstd + (long)l * nc, p + ln_off[2 * l], w,
                            nc, gk + ln_off[2 * l], gk + ln_off[2 * l + 1]);
            }
            dense_grad(gz, below, in_l, w, n, nc, gk + w_off[l], gk + b_off[l], T);
            if (l == 0) break;
            int shortcut = res != NULL && l < depth && res[l];  /* G_l passes down */
            int keep = res != NULL && res[l - 1];               /* G_{l-1} will */
            const vf *z = pre + (below - acts);
            /* its activation's output */
            const vf *a_out = (keep || factored) && !NEEDS_Z(act) ? z : below;
            const float *params = layer_params(act_params, s_off, p, l - 1, lp);
            float *slope_grad = s_off ? gk + s_off[l - 1] : NULL;
            if (!shortcut && !keep && !factored) {
                back_through(p + w_off[l], gz, a_out, z, act, params, real, slope_grad, in_l, w,
                             nc, g_below);
            } else {
                dense_back(p + w_off[l], gz, a_out, z, ACT_NONE, params, in_l, w, nc, G_new);
                if (shortcut) add_shortcut(G_new, G, (long)in_l * nc);
                act_back_pass(act, params, G_new, factored ? drop + (below - acts) : NULL,
                              a_out, z, real, slope_grad, in_l, nc, g_below);
                vf *t = G; G = G_new; G_new = t;
            }
            vf *t = gz; gz = g_below; g_below = t;
            top = below;
        }
    }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
#if defined(__AVX512F__)
    _mm_sfence(); /* streaming stores ordered before the buffer goes back to malloc */
#endif
    free(buf), free(gen);
    return 0;
}

struct part {
    const struct step *step;
    int k0, k1, status;
};

static void *run_part(void *arg) {
    struct part *part = arg;
    part->status = step_models(part->step, part->k0, part->k1);
    return NULL;
}

#define MAX_THREADS 256

/* Floats per vector of this build (V): what the compiler found on this CPU. */
int widedeep_lanes(void) { return V; }

/* Losses (K) and gradients (K, P) of K MLPs with parameters flat (K, P).
 *
 * Layer l (depth hidden layers, then the head) has its weight (out, in) at flat offset
 * w_off[l] and its bias at b_off[l]; widths[l] is its output size; hidden layers apply
 * activation act (ACT_*) with parameters act_params[0..1], except prelu, whose slope is a
 * parameter of its own in each hidden layer l, at flat offset s_off[l] (s_off is NULL for
 * other activations). Where res is not NULL, hidden layer l with res[l] != 0 is a residual
 * block (its input added to its output; it has as many units as inputs). wide: 1 where a
 * Wide & Deep model's wide part (weight at wide_w, bias at wide_b) adds its logits, on the
 * features, 2 on the features and their products two by two; 0: none. Where noise is not
 * NULL, dropout follows each hidden activation: its output times noise, plus shift (alpha
 * dropout; else NULL), both (K, hidden units, n), drawn by the caller. Where rr_states is
 * not NULL, the activation is rrelu (act is ACT_NONE, act_params its lower and upper bounds)
 * and model k draws its slopes from the generator whose torch state rr_states[k] holds,
 * advanced in place (NULL: evaluated, the mean slope); not with noise. Where ln_off is not
 * NULL, layer norm (gamma at ln_off[2 l], beta at ln_off[2 l + 1]) comes between each hidden
 * layer's product and its activation. X is (d, n),
 * shared, or (K, d, n) when x_per_model; y is (n) or (K, n) int64 class labels. Returns 0,
 * or -1 when scratch memory could not be allocated.
 *
 * threads: the models are split into that many runs of consecutive models (at most K), each
 * on a thread of its own (the calling thread takes the first) with scratch memory of its
 * own; each model's results are the same however they are split.
 */
int widedeep_mlp_step(int threads, int K, int d, int n, int depth, const int *widths,
                      int n_out, int act, const float *act_params,
                      const float *flat, long P, const long *w_off, const long *b_off,
                      const float *X, int x_per_model, const int64_t *y, int y_per_model,
                      const long *s_off, const int *res, int wide, long wide_w, long wide_b,
                      const float *noise, const float *shift, const long *ln_off,
                      uint8_t *const *rr_states, float *loss, float *grad) {
    struct step s = {.d = d, .n = n, .depth = depth, .n_out = n_out, .act = act,
                     .widths = widths, .res = res, .act_params = act_params, .flat = flat, .P = P,
                     .w_off = w_off, .b_off = b_off, .s_off = s_off, .X = X,
                     .x_per_model = x_per_model, .y_per_model = y_per_model, .y = y,
                     .wide = wide, .wide_w = wide_w, .wide_b = wide_b, .noise = noise,
                     .shift = shift, .ln_off = ln_off, .rr_states = rr_states,
                     .loss = loss, .grad = grad};
    if (threads > K) threads = K;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1) return step_models(&s, 0, K);
    struct part parts[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++)
        parts[t] = (struct part){&s, (int)((long)K * t / threads),
                                 (int)((long)K * (t + 1) / threads), 0};
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_part, &parts[t]) == 0;
    run_part(&parts[0]);
    int status = parts[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_part(&parts[t]); /* no thread to be had: this one runs them */
        if (parts[t].status != 0) status = parts[t].status;
    }
    return status;
}

/* One optimizer step of K models, in place on their flat (K, P) parameters, as torch.optim's
 * single-tensor SGD (momentum m, no dampening, no Nesterov; buf starts at zero, so that
 * buf = g at step 1 as in torch), Adam and AdamW (betas 0.9 / 0.999, eps 1e-8; moments in
 * buf and sq), weight decay wd, all per model (lr, momentum, wd: K each); t is the step
 * number, from 1. One pass over each array, instead of ~15 torch operations that each
 * stream (K, P) floats through memory and allocate some of them. */
enum { OPT_SGD, OPT_ADAM, OPT_ADAMW };

void widedeep_opt_step(int kind, int K, long P, float *flat, const float *grad, float *buf,
                       float *sq, const float *lr, const float *momentum, const float *wd,
                       double t) {
#if defined(__SSE__)
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ | DAZ: moments of a dead unit decay to denormals */
#endif
    /* as torch: bias corrections in double, then used as float scalars */
    double bc1 = 1.0 - pow(0.9, t), bc2_sqrt = sqrt(1.0 - pow(0.999, t));
    for (int k = 0; k < K; k++) {
        float *p = flat + (long)k * P, *m = buf + (long)k * P;
        const float *g = grad + (long)k * P;
        float decay = wd[k];
        if (kind == OPT_SGD) {
            float mu = momentum[k], step = lr[k];
            for (long i = 0; i < P; i++) {
                float gi = decay != 0.0f ? g[i] + decay * p[i] : g[i];
                m[i] = m[i] * mu + gi;
                p[i] -= step * m[i];
            }
            continue;
        }
        float *v = sq + (long)k * P;
        float step = (float)(lr[k] / bc1), scale = (float)bc2_sqrt;
        /* as torch: 1 - lr * wd in double, used as a float */
        float shrink = kind == OPT_ADAMW ? (float)(1.0 - (double)lr[k] * decay) : 1.0f;
        if (kind == OPT_ADAMW) decay = 0.0f; /* decoupled: the parameter shrinks instead */
        for (long i = 0; i < P; i++) {
            float pi = p[i] * shrink, gi = decay != 0.0f ? g[i] + decay * pi : g[i];
            float mi = m[i] + 0.1f * (gi - m[i]); /* lerp(m, g, 1 - beta1) */
            float vi = v[i] * 0.999f + 0.001f * gi * gi;
            m[i] = mi, v[i] = vi;
            p[i] = pi - step * mi / (sqrtf(vi) / scale + 1e-8f);
        }
    }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
}

/* Dropout's masks as torch draws them (widedeep.batched.dropout_masks), straight from the
 * state of each model's CPU generator (see mt_load), advanced in place. torch's
 * bernoulli_(keep) on a float tensor takes, for each element in memory order, a double from
 * random64() (two draws, the first the high word) masked to 53 bits, times 2^-53, and keeps
 * the element where that is below keep: ~10 ns an element on the dev VM, most of a dropout
 * step's time on small nets. The plain loop draws hidden layer l's mask as an (n, width)
 * tensor, row after row; here it lands in rows of units, out[(first unit of l + u) * n + r],
 * for the step above: on where kept, off where not (dropout's scaled 1 and 0), and for alpha
 * dropout the shift added after it, shift_on or shift_off (shift is NULL otherwise). K models,
 * each state STATE_BYTES; where states[k] is NULL, model k has no stream: factors of 1, shifts
 * of 0. Returns 0, or -1 when scratch memory could not be allocated. */

#define ROWS V
typedef uint8_t vb __attribute__((vector_size(V)));

int widedeep_dropout_masks(int K, uint8_t *const *states, int depth,
                            const int *widths, int n, double keep, float on, float off,
                            float shift_on, float shift_off, float *noise, float *shift) {
    long hidden = 0;
    for (int l = 0; l < depth; l++) hidden += widths[l];
    /* x = bits / 2^53 < keep, bits < 2^53, is bits < ceil(keep 2^53): all exact in double */
    double limit = ceil(keep * 9007199254740992.0);
    uint64_t below = limit <= 0.0 ? 0 : (uint64_t)limit;
    int widest = 0;
    for (int l = 0; l < depth; l++) widest = widths[l] > widest ? widths[l] : widest;
    struct mt *g = malloc(sizeof *g);
    uint8_t *flags = malloc((size_t)ROWS * (widest > 0 ? widest : 1));
    if (g == NULL || flags == NULL) {
        free(g), free(flags);
        return -1;
    }
    for (int k = 0; k < K; k++) {
        float *nk = noise + (long)k * hidden * n, *sk = shift ? shift + (long)k * hidden * n : NULL;
        if (states[k] == NULL) { /* a model without a stream (evaluated): nothing dropped */
            for (long i = 0; i < hidden * n; i++) nk[i] = 1.0f;
            if (sk) memset(sk, 0, hidden * n * sizeof(float));
            continue;
        }
        mt_load(g, states[k]);
        long unit0 = 0;
        for (int l = 0; l < depth; l++) {
            int w = widths[l];
            /* ROWS rows at a time, in draw order into flags, then written unit by unit: a
             * unit's ROWS rows are one line of out (a store per row would touch a line each) */
            for (int r0 = 0; r0 < n; r0 += ROWS) {
                int rows = n - r0 < ROWS ? n - r0 : ROWS, left = g->left, next = g->next;
                for (int r = 0; r < rows; r++)
                    for (int u = 0; u < w; u++) {
                        uint64_t hi, lo;
                        if (left > 2) { /* both words without a refill */
                            hi = g->t[next], lo = g->t[next + 1];
                            next += 2, left -= 2;
                        } else {
                            g->left = left, g->next = next;
                            hi = mt_draw(g), lo = mt_draw(g);
                            left = g->left, next = g->next;
                        }
                        flags[u * ROWS + r] = (((hi << 32) | lo) & ((1ULL << 53) - 1)) < below;
                    }
                g->left = left, g->next = next;
                for (int u = 0; u < w; u++) {
                    const uint8_t *f = flags + u * ROWS;
                    float *o = nk + (unit0 + u) * n + r0;
                    if (rows == ROWS) { /* one vector of flags, one of each value */
                        vb fb;
                        memcpy(&fb, f, sizeof fb);
                        vi kept = __builtin_convertvector(fb, vi) != 0;
                        vf v = sel(kept, splat(on), splat(off));
                        memcpy(o, &v, sizeof v);
                        if (sk) {
                            v = sel(kept, splat(shift_on), splat(shift_off));
                            memcpy(sk + (o - nk), &v, sizeof v);
                        }
                    } else {
                        for (int r = 0; r < rows; r++) o[r] = f[r] ? on : off;
                        if (sk)
                            for (int r = 0; r < rows; r++) sk[o - nk + r] = f[r] ? shift_on : shift_off;
                    }
                }
            }
            unit0 += w;
        }
        mt_save(g, states[k]);
    }
    free(g), free(flags);
    return 0;
}
