// Element-wise ops and row moves.

// out[i, :] = table[ids[i], :] (ids checked on the host).
extern "C" __global__ void embed(const void* table, int dt, const u32* ids, int n, int cols,
                                 float* out) {
    pdl_launch_next();
    pdl_wait();
    long long total = (long long)n * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / cols, c = i % cols;
        out[i] = load_elem(table, (long long)ids[r] * cols + c, dt);
    }
}

extern "C" __global__ void clamp(float* x, long long n, float limit) {
    pdl_launch_next();
    pdl_wait();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = fminf(fmaxf(x[i], -limit), limit);
    }
}

// out = silu(gate) * up
extern "C" __global__ void swiglu(const float* gate, const float* up, float* out, long long n) {
    pdl_launch_next();
    pdl_wait();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = silu(gate[i]) * up[i];
    }
}

// out[r, :] += sigmoid(g[r]) * y[r, :]
extern "C" __global__ void add_gated(float* out, const float* y, const float* g, int rows,
                                     int cols) {
    pdl_launch_next();
    pdl_wait();
    long long total = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 1.0f / (1.0f + expf(-g[i / cols]));
        out[i] += s * y[i];
    }
}

// out[i, :] = x[rows[i], :]
extern "C" __global__ void gather_rows(const float* x, const u32* rows, int n, int cols,
                                       float* out) {
    pdl_launch_next();
    pdl_wait();
    long long total = (long long)n * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = x[(long long)rows[i / cols] * cols + i % cols];
    }
}

// x[r, c] += bias[c]
extern "C" __global__ void add_bias(float* x, const float* bias, int rows, int cols) {
    pdl_launch_next();
    pdl_wait();
    long long total = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] += bias[i % cols];
    }
}

// bf16 copy of x, for the tensor-core GEMMs of long prefills.
extern "C" __global__ void to_bf16(const float* x, u16* out, long long n) {
    pdl_launch_next();
    pdl_wait();
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16(x[i]);
    }
}

// KV write: pool[slots[r], :] = src[r, :] for k and v.
extern "C" __global__ void write_kv(const float* k, const float* v, const u32* slots, int n,
                                    int width, float* kpool, float* vpool) {
    pdl_launch_next();
    pdl_wait();
    long long total = (long long)n * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / width, c = i % width;
        long long dst = (long long)slots[r] * width + c;
        kpool[dst] = k[i];
        vpool[dst] = v[i];
    }
}
