// Router: softmax over each row of logits, top-k (descending, ties to the lower index), and
// optional renormalisation. One warp per row; probabilities in shared memory (e floats).
// A row whose logits are NaN picks index e (out of range) for every choice.
// One warp routes one row: x has e logits; out_e / out_w get the k choices (and sh_e / sh_w
// too when not null). Every lane learns each pick, so up to 32 picks are kept in the lanes'
// registers and written once, normalised by the sum taken in pick order (as the reference).
__device__ void route_row(const float* x, int e, int k, int renorm, u32* out_e, float* out_w,
                          float* probs, u32* sh_e, float* sh_w) {
    const int lane = threadIdx.x & 31;
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
    float sum = 0.0f, myw = 0.0f;
    u32 mye = 0;
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
        sum += bv;
        if (k <= 32) {
            if (lane == t) {
                mye = (u32)bi;
                myw = bv;
            }
        } else if (lane == 0) {
            out_e[t] = (u32)bi;
            out_w[t] = bv;
        }
        // bi == e when every probability is NaN: nothing was picked (the host fails the step
        // on the out-of-range index).
        if (lane == 0 && bi < e) probs[bi] = -1.0f;
        __syncwarp();
    }
    if (k <= 32) {
        if (lane < k) {
            float w = renorm ? myw / sum : myw;
            out_e[lane] = mye;
            out_w[lane] = w;
            if (sh_e != nullptr) sh_e[lane] = mye;
            if (sh_w != nullptr) sh_w[lane] = w;
        }
    } else if (lane == 0) {
        for (int t = 0; t < k; t++) {
            if (renorm) out_w[t] /= sum;
            if (sh_e != nullptr) sh_e[t] = out_e[t];
            if (sh_w != nullptr) sh_w[t] = out_w[t];
        }
    }
}

// grid: one 32-thread block per row; shared memory e floats.
extern "C" __global__ void route(const float* logits, int e, int k, int renorm, u32* experts,
                                 float* weights) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ float probs[];
    const long long r = blockIdx.x;
    route_row(logits + r * e, e, k, renorm, experts + r * k, weights + r * k, probs, nullptr,
              nullptr);
}
