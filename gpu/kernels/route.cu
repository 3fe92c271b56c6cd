// Router: softmax over each row of logits, top-k (descending, ties to the lower index), and
// optional renormalisation. One warp per row; probabilities in shared memory (e floats).
// A row whose logits are NaN picks index e (out of range) for every choice.
extern "C" __global__ void route(const float* logits, int e, int k, int renorm, u32* experts,
                                 float* weights) {
    extern __shared__ float probs[];
    const int lane = threadIdx.x;
    const float* x = logits + (long long)blockIdx.x * e;
    float mx = -INFINITY;
    for (int i = lane; i < e; i += 32) mx = fmaxf(mx, x[i]);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i < e; i += 32) {
        float v = expf(x[i] - mx);
        probs[i] = v;
        s += v;
    }
    s = warp_sum(s);
    for (int i = lane; i < e; i += 32) probs[i] /= s;
    __syncwarp();
    u32* out_e = experts + (long long)blockIdx.x * k;
    float* out_w = weights + (long long)blockIdx.x * k;
    for (int t = 0; t < k; t++) {
        float bv = -2.0f;
        int bi = e;
        for (int i = lane; i < e; i += 32) {
            float v = probs[i];
            if (v > bv || (v == bv && i < bi)) {
                bv = v;
                bi = i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            out_e[t] = (u32)bi;
            out_w[t] = bv;
            // bi == e when every probability is NaN: nothing was picked (the host fails the
            // step on the out-of-range index).
            if (bi < e) probs[bi] = -1.0f;
        }
        __syncwarp();
    }
    if (renorm && lane == 0) {
        float sum = 0.0f;
        for (int t = 0; t < k; t++) sum += out_w[t];
        for (int t = 0; t < k; t++) out_w[t] /= sum;
    }
}
