/* The element-wise part of one LSTM step, fused into a single pass over (B, H) (see trainer/fused.py).

   Built at first use with -O3 -march=native -ffast-math, so the loops vectorize and tanhf becomes
   glibc's vector tanh. Gate activations `a` are one (B, 4H) row block per step, as the fused GEMM
   writes them: [s(i), s(f), s(2 z_g), s(o)], with tanh(z_g) = 2 s(2 z_g) - 1.
   All tensors are float32; rows of h and g_h may be strided (h lives inside the [h, x] buffer). */
#include <math.h>
#include <stddef.h>

/* c = s(f) c_prev + s(i) tanh(z_g);  tc = tanh(c);  h = s(o) tc. */
void lstm_step_forward(const float *restrict a, const float *restrict c_prev, float *restrict c,
                       float *restrict tc, float *restrict h, long batch, long hidden, long h_stride)
{
    for (long b = 0; b < batch; b++) {
        const float *si = a + b * 4 * hidden, *sf = si + hidden, *sg = sf + hidden, *so = sg + hidden;
        const float *cp = c_prev + b * hidden;
        float *cb = c + b * hidden, *tb = tc + b * hidden, *hb = h + b * h_stride;
#pragma omp simd
        for (long j = 0; j < hidden; j++) {
            float cn = sf[j] * cp[j] + si[j] * (2.0f * sg[j] - 1.0f);
            float t = tanhf(cn);
            cb[j] = cn;
            tb[j] = t;
            hb[j] = so[j] * t;
        }
    }
}

/* One reverse step. dh = g_h + carry_h (g_h may be NULL), dc = carry_c + dh s(o) (1 - tc^2);
   da (B, 4H) gets the gradient at the four pre-activations (z_g unscaled):
     i: dc tanh(z_g) s(i)(1 - s(i))   f: dc c_prev s(f)(1 - s(f))
     g: dc s(i) (1 - tanh(z_g)^2)     o: dh tc s(o)(1 - s(o))
   and carry_c becomes dc s(f), the gradient at c_prev, in place. */
void lstm_step_backward(const float *restrict a, const float *restrict c_prev, const float *restrict tc,
                        const float *restrict g_h, long g_stride, const float *restrict carry_h,
                        float *restrict carry_c, float *restrict da, long batch, long hidden)
{
    for (long b = 0; b < batch; b++) {
        const float *si = a + b * 4 * hidden, *sf = si + hidden, *sg = sf + hidden, *so = sg + hidden;
        const float *cp = c_prev + b * hidden, *tb = tc + b * hidden, *ch = carry_h + b * hidden;
        const float *gb = g_h ? g_h + b * g_stride : NULL;
        float *cc = carry_c + b * hidden;
        float *di = da + b * 4 * hidden, *df = di + hidden, *dg = df + hidden, *dout = dg + hidden;
#pragma omp simd
        for (long j = 0; j < hidden; j++) {
            float dh = gb ? gb[j] + ch[j] : ch[j];
            float t = tb[j], i = si[j], f = sf[j], o = so[j];
            float g = 2.0f * sg[j] - 1.0f;
            float dc = cc[j] + dh * o * (1.0f - t * t);
            di[j] = dc * g * i * (1.0f - i);
            df[j] = dc * cp[j] * f * (1.0f - f);
            dg[j] = dc * i * (1.0f - g * g);
            dout[j] = dh * t * o * (1.0f - o);
            cc[j] = dc * f;
        }
    }
}
