// Causal (optionally sliding-window) GQA attention over the paged KV pool, one block per
// (head, row): each warp walks every ATT_WARPS-th visible key with an online softmax, then the
// warps' partial results are merged. head_dim up to 32 * ATT_DIMS.

#define ATT_WARPS 16
#define ATT_DIMS 8

extern "C" __global__ void attention(const float* q, const float* kpool, const float* vpool,
                                     const u32* pos, const u32* lo, const u32* table_off,
                                     const u32* tables, int heads, int kv_heads, int hd,
                                     int block_size, float scale, float* out) {
    pdl_launch_next();
    pdl_wait();
    const int head = blockIdx.x, row = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = head / (heads / kv_heads);
    const long long width = (long long)kv_heads * hd;
    const float* qh = q + (long long)row * heads * hd + (long long)head * hd;
    float qv[ATT_DIMS], acc[ATT_DIMS];
#pragma unroll
    for (int i = 0; i < ATT_DIMS; i++) {
        int d = lane + 32 * i;
        qv[i] = d < hd ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const u32 p = pos[row];
    const u32* blocks = tables + table_off[row];
    for (u32 j = lo[row] + warp; j <= p; j += ATT_WARPS) {
        long long slot = (long long)blocks[j / block_size] * block_size + j % block_size;
        const float* kr = kpool + slot * width + (long long)kvh * hd;
        const float* vr = vpool + slot * width + (long long)kvh * hd;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_DIMS; i++) {
            int d = lane + 32 * i;
            if (d < hd) s += qv[i] * kr[d];
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn);
        float e = expf(s - mn);
#pragma unroll
        for (int i = 0; i < ATT_DIMS; i++) {
            int d = lane + 32 * i;
            if (d < hd) acc[i] = acc[i] * corr + e * vr[d];
        }
        l = l * corr + e;
        m = mn;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float sacc[ATT_WARPS][32 * ATT_DIMS];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_DIMS; i++) sacc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float mx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, sm[w]);
    float f[ATT_WARPS];
    float total = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = sm[w] == -INFINITY ? 0.0f : expf(sm[w] - mx);
        total += sl[w] * f[w];
    }
    float* o = out + (long long)row * heads * hd + (long long)head * hd;
#pragma unroll
    for (int i = 0; i < ATT_DIMS; i++) {
        int d = lane + 32 * i;
        if (d < hd) {
            float v = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) v += sacc[w][d] * f[w];
            o[d] = v / total;
        }
    }
}
