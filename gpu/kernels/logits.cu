// Per row of logits, the sampler's LogitSummary (engine/src/sampler.rs), so the host need not
// scan the vocabulary: out[4 r ..] = the first index of the largest logit, that logit,
// log Σ exp(x − max) (terms in f32, summed in double), and 0; or 1 in the last place for a row
// with a NaN or +∞, or with every entry −∞ (the host scans that row and names the problem).
// grid (ceil(vocab / chunk), rows) of 256 threads: each block summarises its chunk of the row
// (largest logit, its first index, a bad entry, Σ exp(x − its own max)) into `part` (4 doubles
// a block), and the row's last block to finish (counted in `done`, zeroed before the launch)
// combines them in chunk order, rescaling each sum to the row's maximum.

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

// The block's (largest value, its first index, bad) over the thread's (m, mi, b); every
// thread gets it. Shared scratch of 32 entries each.
__device__ __forceinline__ void block_max_first(float& m, int& mi, int& b, float* sv, int* si,
                                                int* sb, int none) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    warp_max_first(m, mi, b);
    if (lane == 0) {
        sv[warp] = m;
        si[warp] = mi;
        sb[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sv[lane] : -INFINITY;
        mi = lane < nw ? si[lane] : none;
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
    __syncthreads();
}

extern "C" __global__ void logit_summary(const float* logits, int vocab, int chunk, double* part,
                                         u32* done, double* out) {
    pdl_launch_next();
    pdl_wait();
    __shared__ float sv[32];
    __shared__ int si[32], sb[32];
    __shared__ double partial[32];
    __shared__ bool last;
    const int row = blockIdx.y, nb = gridDim.x;
    const float* x = logits + (long long)row * vocab;
    const int lo = blockIdx.x * chunk, hi = min(vocab, lo + chunk);
    float m = -INFINITY;
    int mi = vocab, b = 0;
    // Each thread walks ascending indices, so a strict > keeps its first maximum.
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const float v = x[i];
        b |= isnan(v) || v == INFINITY;
        if (v > m) {
            m = v;
            mi = i;
        }
    }
    block_max_first(m, mi, b, sv, si, sb, vocab);
    double s = 0.0;
    if (!b && m != -INFINITY) {
        for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) s += (double)expf(x[i] - m);
    }
    // Every thread takes part (the condition is the block's): none is left at the barriers.
    s = block_sum_d(s, partial);
    double* p = part + 4LL * ((long long)row * nb + blockIdx.x);
    if (threadIdx.x == 0) {
        p[0] = (double)m;
        p[1] = (double)mi;
        p[2] = (double)b;
        p[3] = s;
        __threadfence();
        last = atomicAdd(done + row, 1u) == (u32)nb - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x != 0) return;
    __threadfence();
    const volatile double* rp = part + 4LL * row * nb;
    double mx = -INFINITY, idx = (double)vocab, bad = 0.0;
    for (int c = 0; c < nb; c++) {
        // Chunks in ascending order: a strict > keeps the first maximum.
        if (rp[4 * c] > mx) {
            mx = rp[4 * c];
            idx = rp[4 * c + 1];
        }
        bad += rp[4 * c + 2];
    }
    double* o = out + 4LL * row;
    if (bad != 0.0 || mx == -INFINITY) {
        o[3] = 1.0;
        return;
    }
    double total = 0.0;
    for (int c = 0; c < nb; c++) {
        const double mc = rp[4 * c];
        if (mc != -INFINITY) total += rp[4 * c + 3] * exp(mc - mx);
    }
    o[0] = idx;
    o[1] = mx;
    o[2] = mx + log(total);
    o[3] = 0.0;
}
