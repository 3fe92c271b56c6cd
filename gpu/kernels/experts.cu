// Routed experts in three launches over all selected experts at once, reading weights straight
// from their slots. An "assignment" is one (token row, expert) pair; assignments are grouped by
// expert, ascending, and `xs` holds the token rows in assignment order.
//
// ptrs: per expert, device addresses of gate [inter, hidden], up [inter, hidden] and
// down [hidden, inter]; starts: per expert, its first assignment (n_experts + 1 entries).

// act[a, j] = silu(xs[a] · gate[j]) * (xs[a] · up[j]);
// grid (ceil(inter / (8 / split)), experts), 256 threads, `split` warps per column.
extern "C" __global__ void experts_gate_up(const float* xs, int hidden, int inter, int dt,
                                           const u64* ptrs, const u32* starts, int split,
                                           float* act) {
    pdl_launch_next();
    pdl_wait();
    __shared__ float red[8][GEMV_ROWS];
    const int e = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * (8 / split) + warp / split;
    const int kslice = hidden / split, k0 = (warp % split) * kslice;
    const bool live = j < inter;
    const int esize = dt == DT_F32 ? 4 : 2;
    const long long off = ((long long)(live ? j : 0) * hidden + k0) * esize;
    const char* g = (const char*)ptrs[3 * e] + off;
    const char* u = (const char*)ptrs[3 * e + 1] + off;
    const u32 a1 = starts[e + 1];
    for (u32 a = starts[e]; a < a1; a += GEMV_ROWS) {
        float ga[GEMV_ROWS], ua[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) ga[r] = ua[r] = 0.0f;
        int mm = min(GEMV_ROWS, (int)(a1 - a));
        const float* x = xs + (long long)a * hidden + k0;
        if (live) {
            dot_rows(g, dt, x, hidden, mm, kslice, ga);
            dot_rows(u, dt, x, hidden, mm, kslice, ua);
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            ga[r] = warp_sum(ga[r]);
            ua[r] = warp_sum(ua[r]);
        }
        float gv = split_reduce(ga, split, mm, red);
        float uv = split_reduce(ua, split, mm, red);
        if (live && warp % split == 0 && lane < mm) {
            act[(long long)(a + lane) * inter + j] = silu(gv) * uv;
        }
    }
}

// y[a, c] = scale[a] * (act[a] · down[c]); grid (ceil(hidden / (8 / split)), experts)
extern "C" __global__ void experts_down(const float* act, int hidden, int inter, int dt,
                                        const u64* ptrs, const u32* starts, const float* scales,
                                        int split, float* y) {
    pdl_launch_next();
    pdl_wait();
    __shared__ float red[8][GEMV_ROWS];
    const int e = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * (8 / split) + warp / split;
    const int kslice = inter / split, k0 = (warp % split) * kslice;
    const bool live = c < hidden;
    const int esize = dt == DT_F32 ? 4 : 2;
    const char* d =
        (const char*)ptrs[3 * e + 2] + ((long long)(live ? c : 0) * inter + k0) * esize;
    const u32 a1 = starts[e + 1];
    for (u32 a = starts[e]; a < a1; a += GEMV_ROWS) {
        float acc[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = 0.0f;
        int mm = min(GEMV_ROWS, (int)(a1 - a));
        if (live) dot_rows(d, dt, act + (long long)a * inter + k0, inter, mm, kslice, acc);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = warp_sum(acc[r]);
        float v = split_reduce(acc, split, mm, red);
        if (live && warp % split == 0 && lane < mm) {
            y[(long long)(a + lane) * hidden + c] = v * scales[a + lane];
        }
    }
}

// gate·up of columns j0 .. j0 + C - 1 (those below inter) of one expert for one row x: the C
// gate rows and the C up rows streamed together by one warp (see dot_stream); lane c writes
// act[j0 + c].
template <int C>
__device__ __forceinline__ void gate_up_cols(const float* x, int hidden, int inter, int bf,
                                             const u16* gate, const u16* up, int j0, float* act) {
    const u16* rows[2 * C];
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long off = (long long)min(j0 + c, inter - 1) * hidden;
        rows[c] = gate + off;
        rows[C + c] = up + off;
    }
    float acc[2 * C];
    dot_stream<2 * C, STREAM_LOADS / (2 * C)>(rows, bf, x, hidden, acc);
    warp_sums<2 * C>(acc);
    const int lane = threadIdx.x & 31;
    const float g = lane_value<C>(acc), u = lane_value<C>(acc + C);
    if (lane < C && j0 + lane < inter) act[j0 + lane] = silu(g) * u;
}

// gate·up when every selected expert has exactly one assignment (a one-token step), with
// 16-bit weights: a warp computes C (1, 2 or 4) columns of one expert, reading the row of x
// directly (x[assign[a]]: no gather); grid (ceil(inter / (8 * C)), experts) of 256 threads.
// Entries without an assignment return at once. experts_gate_up_one_row_c<C>.
template <int C>
__device__ __forceinline__ void experts_gate_up_one_row(const float* x, const u32* assign,
                                                        int hidden, int inter, int bf,
                                                        const u64* ptrs, const u32* starts,
                                                        float* act) {
    pdl_launch_next();
    pdl_wait();
    const int e = blockIdx.y;
    const int j0 = (blockIdx.x * 8 + (threadIdx.x >> 5)) * C;
    const u32 a = starts[e];
    if (j0 >= inter || a == starts[e + 1]) return;
    const u16 *gate = (const u16*)ptrs[3 * e], *up = (const u16*)ptrs[3 * e + 1];
    gate_up_cols<C>(x + (long long)assign[a] * hidden, hidden, inter, bf, gate, up, j0,
                    act + (long long)a * inter);
}

#define EXPERTS_GATE_UP_ONE_ROW(C)                                                             \
    extern "C" __global__ void experts_gate_up_one_row_c##C(                                   \
        const float* x, const u32* assign, int hidden, int inter, int bf, const u64* ptrs,      \
        const u32* starts, float* act) {                                                       \
        experts_gate_up_one_row<C>(x, assign, hidden, inter, bf, ptrs, starts, act);           \
    }
EXPERTS_GATE_UP_ONE_ROW(1)
EXPERTS_GATE_UP_ONE_ROW(2)
EXPERTS_GATE_UP_ONE_ROW(4)

#define NO_ASSIGN 0xffffffffu

// Most assignments one row may have for experts_down_combine_one_row.
#define COMBINE_MAX 64

// scale * (act · down[c]) for the columns c0 .. c0 + C - 1 (those below hidden) of one expert,
// by one warp (see dot_stream); lane c writes y[c].
template <int C>
__device__ __forceinline__ void down_cols(const float* act, int inter, int hidden, int bf,
                                          const u16* down, int c0, float scale, float* y) {
    const float v = rows_dot<C>(down, hidden, c0, bf, act, inter);
    const int lane = threadIdx.x & 31;
    if (lane < C) y[lane] = v * scale;
}

// down and the combine in one launch for a one-token step of 16-bit experts: out[c] (+)= the
// sum over the row's assignments, in its CSR order (ascending expert), of scale[a] *
// (act[a] · down[c]), added in the order experts_combine adds. A block takes groups of C (1,
// 2, 4 or 8) columns, group blockIdx.x, then every gridDim.x-th after it (the row's lists read
// once per block); for each, warp w computes them for the row's assignments w, w + 8, ...
// (each its expert's only one: entry a of ptrs), then C threads add them up in order.
// grid up to ceil(hidden / C) blocks of 256 threads; at most COMBINE_MAX assignments.
// experts_down_combine_one_row_c<C>.
template <int C>
__device__ __forceinline__ void experts_down_combine_one_row(
    const float* act, int hidden, int inter, int bf, const u64* ptrs, const float* scales,
    const u32* row_starts, const u32* row_assign, float* out, int fresh) {
    pdl_launch_next();
    pdl_wait();
    // Two buffers: a group's sums are written while the threads of the group before may still
    // be adding theirs up (one barrier per group).
    __shared__ float y[2][COMBINE_MAX][C];
    const int warp = threadIdx.x >> 5;
    const u32 t0 = row_starts[0], n = row_starts[1] - t0;
    int buf = 0;
    for (int c0 = blockIdx.x * C; c0 < hidden; c0 += gridDim.x * C, buf ^= 1) {
        for (u32 t = warp; t < n; t += blockDim.x >> 5) {
            const u32 a = row_assign[t0 + t];
            if (a == NO_ASSIGN) continue;
            down_cols<C>(act + (long long)a * inter, inter, hidden, bf,
                         (const u16*)ptrs[3 * a + 2], c0, scales[a], y[buf][t]);
        }
        __syncthreads();
        const int j = threadIdx.x;
        if (j < C && c0 + j < hidden) {
            float o = fresh ? 0.0f : out[c0 + j];
            for (u32 t = 0; t < n; t++) {
                if (row_assign[t0 + t] != NO_ASSIGN) o += y[buf][t][j];
            }
            out[c0 + j] = o;
        }
    }
}

#define EXPERTS_DOWN_COMBINE_ONE_ROW(C)                                                        \
    extern "C" __global__ void experts_down_combine_one_row_c##C(                              \
        const float* act, int hidden, int inter, int bf, const u64* ptrs, const float* scales,  \
        const u32* row_starts, const u32* row_assign, float* out, int fresh) {                 \
        experts_down_combine_one_row<C>(act, hidden, inter, bf, ptrs, scales, row_starts,      \
                                        row_assign, out, fresh);                               \
    }
EXPERTS_DOWN_COMBINE_ONE_ROW(1)
EXPERTS_DOWN_COMBINE_ONE_ROW(2)
EXPERTS_DOWN_COMBINE_ONE_ROW(4)
EXPERTS_DOWN_COMBINE_ONE_ROW(8)

// out[r, c] += y[a, c] for each assignment a of row r, in ascending expert order (the order
// transformers adds them); row_starts / row_assign list them per row (CSR). NO_ASSIGN entries
// (a token whose router named no expert, see moe_plan) add nothing. With `fresh`, out starts
// from zero instead of its contents.
extern "C" __global__ void experts_combine(float* out, const float* y, const u32* row_starts,
                                           const u32* row_assign, int rows, int hidden,
                                           int fresh) {
    pdl_launch_next();
    pdl_wait();
    long long total = (long long)rows * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / hidden, c = i % hidden;
        float o = fresh ? 0.0f : out[i];
        for (u32 t = row_starts[r]; t < row_starts[r + 1]; t++) {
            u32 a = row_assign[t];
            if (a != NO_ASSIGN) o += y[(long long)a * hidden + c];
        }
        out[i] = o;
    }
}

// Where choice `lane` of a row's k (k <= 32, one per lane; e its expert, NO_ASSIGN past k)
// goes in the row's list: valid choices (e < ne) by ascending expert (a router picks an expert
// once per row), then the out-of-range ones in their order. `nvalid` gets the valid count.
__device__ __forceinline__ u32 rank_choice(u32 e, int k, int ne, u32& nvalid) {
    const int lane = threadIdx.x & 31;
    const bool ok = lane < k && e < (u32)ne;
    u32 rank = 0;
    nvalid = 0;
    for (int j = 0; j < k; j++) {
        const u32 ej = __shfl_sync(0xffffffffu, e, j);
        const bool okj = ej < (u32)ne;
        nvalid += okj;
        rank += ok ? (okj && ej < e) : (!okj && j < lane);
    }
    return ok ? rank : nvalid + rank;
}

// moe_plan's lists for one token (n = k <= 32 choices), by one warp: every expert has one
// assignment, so a valid choice's rank among the valid ones by ascending expert is its entry,
// its assignment and its place in the row's list; out-of-range choices (a NaN router) come
// after them as NO_ASSIGN. The same lists the general path builds.
__device__ void plan_one_row(const u32* experts, const float* weights, int k, int ne, int maxsel,
                             const u64* table, u64* ptrs, u32* starts, u32* assign,
                             float* scales, u32* row_starts, u32* row_assign) {
    const int lane = threadIdx.x & 31;
    const u32 e = lane < k ? experts[lane] : NO_ASSIGN;
    const float w = lane < k ? weights[lane] : 0.0f;
    const bool ok = lane < k && e < (u32)ne;
    u32 nvalid;
    const u32 rank = rank_choice(e, k, ne, nvalid);
    if (ok) {
        ptrs[3 * rank] = table[3 * e];
        ptrs[3 * rank + 1] = table[3 * e + 1];
        ptrs[3 * rank + 2] = table[3 * e + 2];
        starts[rank] = rank;
        assign[rank] = 0;
        scales[rank] = w;
        row_assign[rank] = rank;
    } else if (lane < k) {
        row_assign[rank] = NO_ASSIGN;
    }
    for (int s = nvalid + lane; s < maxsel; s += 32) {
        ptrs[3 * s] = ptrs[3 * s + 1] = ptrs[3 * s + 2] = 0;
        starts[s] = nvalid;
    }
    for (int a = nvalid + lane; a < k; a += 32) {
        assign[a] = 0;
        scales[a] = 0.0f;
    }
    if (lane == 0) {
        starts[maxsel] = nvalid;
        row_starts[0] = 0;
        row_starts[1] = (u32)k;
    }
}

// The routed experts' work lists built on the device from the router's decision, so a step
// whose experts are all resident never waits for the host: the same lists `experts()` builds
// on the host, for the three kernels above. One block.
//
// experts / weights: the router's n = rows * k choices; when `logits` is not null the block
// first routes them itself (route_row, one warp per row) and writes them there, else route()
// did. table: per expert of the layer, its gate, up and down addresses. Out: ptrs / starts for
// `maxsel` >= the distinct experts chosen (unused entries empty), assign / scales per
// assignment (grouped by ascending expert, ascending row within one), row_starts / row_assign
// per row (k each, ascending expert); slot_of: scratch, n entries. An expert index outside the
// layer (only a NaN router gives one) gets no assignment; the host sees it when it reads the
// routing back after the step, and fails the step. One token routed here (k <= 32) takes
// plan_one_row: warp 0 alone, no block-wide phases.
//
// Shared memory: 3 * ne u32, then with `staged` the choices, their weights and their slots
// (3 * n u32), then with `logits` (8 * ne floats) the routers' probabilities.
extern "C" __global__ void moe_plan(const float* logits, int renorm, u32* experts,
                                    float* weights, int n, int k, int rows, int ne, int maxsel,
                                    int staged, const u64* table, u64* ptrs, u32* starts,
                                    u32* assign, float* scales, u32* row_starts,
                                    u32* row_assign, u32* slot_of_global) {
    pdl_launch_next();
    pdl_wait();
    extern __shared__ u32 plan_sh[];
    u32* count = plan_sh;
    u32* first = plan_sh + ne;
    u32* seli = plan_sh + 2 * ne;
    u32* rest = plan_sh + 3 * ne;
    const int tid = threadIdx.x, nt = blockDim.x;
    const u32* ex = experts;
    const float* wt = weights;
    u32* slot_of = slot_of_global;
    if (staged) {
        ex = rest;
        wt = (const float*)(rest + n);
        slot_of = rest + 2 * n;
    }
    if (logits != nullptr) {
        float* probs = (float*)(rest + (staged ? 3 * n : 0)) + (tid >> 5) * ne;
        for (int r = tid >> 5; r < rows; r += nt >> 5) {
            const long long o = (long long)r * k;
            route_row(logits + (long long)r * ne, ne, k, renorm, experts + o, weights + o, probs,
                      staged ? rest + o : nullptr, staged ? (float*)(rest + n) + o : nullptr);
        }
    } else if (staged) {
        for (int t = tid; t < n; t += nt) {
            rest[t] = experts[t];
            rest[n + t] = __float_as_uint(weights[t]);
        }
    }
    if (logits != nullptr && rows == 1 && k <= 32) {
        // One token, routed above by warp 0, whose lanes read back their own choices.
        if (tid < 32) {
            plan_one_row(experts, weights, k, ne, maxsel, table, ptrs, starts, assign, scales,
                         row_starts, row_assign);
        }
        return;
    }
    __syncthreads();
    for (int e = tid; e < ne; e += nt) {
        u32 c = 0;
        for (int t = 0; t < n; t++) c += ex[t] == (u32)e;
        count[e] = c;
    }
    for (int t = tid; t < n; t += nt) slot_of[t] = NO_ASSIGN;
    __syncthreads();
    // Exclusive scans of the counts (first assignment) and of the chosen flags (entry), by
    // warp 0 in chunks of 32 experts.
    __shared__ u32 valid, nsel;
    if (tid < 32) {
        u32 at = 0, sel = 0;
        for (int e0 = 0; e0 < ne; e0 += 32) {
            const int e = e0 + tid;
            const u32 c = e < ne ? count[e] : 0;
            u32 ic = c, is = c ? 1 : 0;
            for (int o = 1; o < 32; o <<= 1) {
                u32 vc = __shfl_up_sync(0xffffffffu, ic, o);
                u32 vs = __shfl_up_sync(0xffffffffu, is, o);
                if (tid >= o) {
                    ic += vc;
                    is += vs;
                }
            }
            if (e < ne) {
                first[e] = at + ic - c;
                seli[e] = sel + is - (c ? 1 : 0);
            }
            at += __shfl_sync(0xffffffffu, ic, 31);
            sel += __shfl_sync(0xffffffffu, is, 31);
        }
        if (tid == 0) {
            valid = at;
            nsel = sel;
        }
    }
    __syncthreads();
    for (int e = tid; e < ne; e += nt) {
        if (!count[e]) continue;
        const u32 s = seli[e];
        ptrs[3 * s] = table[3 * e];
        ptrs[3 * s + 1] = table[3 * e + 1];
        ptrs[3 * s + 2] = table[3 * e + 2];
        starts[s] = first[e];
    }
    for (int s = nsel + tid; s < maxsel; s += nt) {
        ptrs[3 * s] = ptrs[3 * s + 1] = ptrs[3 * s + 2] = 0;
        starts[s] = valid;
    }
    if (tid == 0) starts[maxsel] = valid;
    // Assignments of each expert in ascending token order.
    for (int e = tid; e < ne; e += nt) {
        u32 a = first[e];
        if (!count[e]) continue;
        for (int t = 0; t < n; t++) {
            if (ex[t] == (u32)e) {
                assign[a] = t / k;
                scales[a] = wt[t];
                slot_of[t] = a++;
            }
        }
    }
    // Unused tail (only with out-of-range experts): gathered from row 0, never computed.
    for (u32 a = valid + tid; a < (u32)n; a += nt) {
        assign[a] = 0;
        scales[a] = 0.0f;
    }
    __syncthreads();
    // Per row, its k choices by ascending expert (a router picks an expert once per row),
    // out-of-range choices last. k <= 32: a warp per row, lane i ranks choice i against the
    // others; else a thread per row, by repeated minimum.
    if (k <= 32) {
        const int lane = tid & 31;
        for (int r = tid >> 5; r < rows; r += nt >> 5) {
            const long long base = (long long)r * k;
            const u32 e = lane < k ? ex[base + lane] : NO_ASSIGN;
            const bool ok = lane < k && e < (u32)ne;
            u32 nvalid;
            const u32 rank = rank_choice(e, k, ne, nvalid);
            if (lane < k) row_assign[base + rank] = ok ? slot_of[base + lane] : NO_ASSIGN;
            if (lane == 0) row_starts[r] = (u32)base;
            if (lane == 0 && r == rows - 1) row_starts[rows] = (u32)(base + k);
        }
        return;
    }
    for (int r = tid; r < rows; r += nt) {
        const long long base = (long long)r * k;
        row_starts[r] = (u32)base;
        if (r == rows - 1) row_starts[rows] = (u32)(base + k);
        u32 prev = 0;
        bool any = false;
        for (int j = 0; j < k; j++) {
            u32 best = 0xffffffffu, slot = NO_ASSIGN;
            for (int i = 0; i < k; i++) {
                u32 e = ex[base + i];
                if (e < (u32)ne && (!any || e > prev) && e < best) {
                    best = e;
                    slot = slot_of[base + i];
                }
            }
            if (slot != NO_ASSIGN) {
                prev = best;
                any = true;
            }
            row_assign[base + j] = slot;
        }
    }
}
