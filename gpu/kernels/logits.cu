// Per row of logits, the sampler's LogitSummary (engine/src/sampler.rs), so the host need not
// scan the vocabulary: out[4 r ..] = the first index of the largest logit, that logit,
// log Σ exp(x − max) (terms in f32, summed in double), and 0; or 1 in the last place for a row
// with a NaN or +∞, or with every entry −∞ (the host scans that row and names the problem).
// grid: one block per row (1024 threads).

// Folds (value, index, bad) over the warp: the larger value wins, the lower index on a tie.
__device__ __forceinline__ void warp_max_first(float& m, int& mi, int& b) {
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const int oi = __shfl_xor_sync(0xffffffffu, mi, o);
        b |= __shfl_xor_sync(0xffffffffu, b, o);
        if (om > m || (om == m && oi < mi)) {
            m = om;
            mi = oi;
        }
    }
}

extern "C" __global__ void logit_summary(const float* logits, int vocab, double* out) {
    pdl_launch_next();
    pdl_wait();
    __shared__ float sv[32];
    __shared__ int si[32], sb[32];
    __shared__ double partial[32];
    const float* x = logits + (long long)blockIdx.x * vocab;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    float m = -INFINITY;
    int mi = vocab, b = 0;
    // Each thread walks ascending indices, so a strict > keeps its first maximum.
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float v = x[i];
        b |= isnan(v) || v == INFINITY;
        if (v > m) {
            m = v;
            mi = i;
        }
    }
    warp_max_first(m, mi, b);
    if (lane == 0) {
        sv[warp] = m;
        si[warp] = mi;
        sb[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sv[lane] : -INFINITY;
        mi = lane < nw ? si[lane] : vocab;
        b = lane < nw ? sb[lane] : 0;
        warp_max_first(m, mi, b);
        if (lane == 0) {
            sv[0] = m;
            si[0] = mi;
            sb[0] = b;
        }
    }
    __syncthreads();
    m = sv[0];
    mi = si[0];
    b = sb[0];
    double* o = out + 4LL * blockIdx.x;
    if (b || m == -INFINITY) {
        // The same for every thread of the block, so none is left at the sum's barriers.
        if (tid == 0) o[3] = 1.0;
        return;
    }
    double s = 0.0;
    for (int i = tid; i < vocab; i += blockDim.x) s += (double)expf(x[i] - m);
    s = block_sum_d(s, partial);
    if (tid == 0) {
        o[0] = (double)mi;
        o[1] = (double)m;
        o[2] = (double)m + log(s);
        o[3] = 0.0;
    }
}
