// Causal (optionally sliding-window) GQA attention over the paged KV pool, one block per
// (head, row): warp w walks the visible keys in groups of ATT_KEYS (groups w, w + ATT_WARPS,
// ...) with an online softmax, then the warps' partial results are merged. head_dim up to
// 32 * ATT_DIMS.

#define ATT_WARPS 16
#define ATT_DIMS 8
#define ATT_KEYS 4

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
    // ATT_KEYS consecutive keys per warp at a time: their loads all in flight, then one
    // online-softmax update for the group.
    for (u32 j0 = lo[row] + warp * ATT_KEYS; j0 <= p; j0 += ATT_WARPS * ATT_KEYS) {
        float kv[ATT_KEYS][ATT_DIMS], vv[ATT_KEYS][ATT_DIMS], s[ATT_KEYS];
#pragma unroll
        for (int u = 0; u < ATT_KEYS; u++) {
            const u32 j = j0 + u;
            const bool live = j <= p;
            const long long slot =
                live ? (long long)blocks[j / block_size] * block_size + j % block_size : 0;
            const float* kr = kpool + slot * width + (long long)kvh * hd;
            const float* vr = vpool + slot * width + (long long)kvh * hd;
#pragma unroll
            for (int i = 0; i < ATT_DIMS; i++) {
                const int d = lane + 32 * i;
                kv[u][i] = live && d < hd ? kr[d] : 0.0f;
                vv[u][i] = live && d < hd ? vr[d] : 0.0f;
            }
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < ATT_KEYS; u++) {
            float t = 0.0f;
#pragma unroll
            for (int i = 0; i < ATT_DIMS; i++) t += qv[i] * kv[u][i];
            t = warp_sum(t) * scale;
            s[u] = j0 + u <= p ? t : -INFINITY;
            mn = fmaxf(mn, s[u]);
        }
        const float corr = expf(m - mn);
        l *= corr;
#pragma unroll
        for (int i = 0; i < ATT_DIMS; i++) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < ATT_KEYS; u++) {
            const float e = expf(s[u] - mn);
            l += e;
#pragma unroll
            for (int i = 0; i < ATT_DIMS; i++) acc[i] += e * vv[u][i];
        }
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
