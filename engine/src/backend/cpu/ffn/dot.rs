//! Weight rows times activation rows, `out[r * m + i] = w[r] · xs[i]`, on the widest vector
//! unit the CPU has (chosen at run time, see [`SimdLevel`]).

use std::sync::OnceLock;

use crate::dtype::Dtype;

/// The instruction set the CPU expert kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Plain Rust (any CPU).
    Scalar,
    /// AVX2 with FMA and F16C: 8 lanes.
    Avx2,
    /// AVX-512F: 16 lanes.
    Avx512,
}

impl SimdLevel {
    /// Its name in logs and metrics ("scalar", "avx2", "avx512").
    pub fn as_str(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The widest level this CPU runs.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Scalar
    }

    /// The level the kernels use: [`SimdLevel::detect`], or a lower one named by
    /// `TILEFLOW_CPU_SIMD` (scalar, avx2, avx512; a level the CPU lacks is not taken). Decided
    /// once per process and logged.
    pub fn current() -> SimdLevel {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = SimdLevel::detect();
            let asked = std::env::var("TILEFLOW_CPU_SIMD").ok();
            let level = match asked.as_deref() {
                Some("scalar") => SimdLevel::Scalar,
                Some("avx2") => SimdLevel::Avx2.min(best),
                Some("avx512") | None => best,
                Some(other) => {
                    tracing::warn!(value = other, "TILEFLOW_CPU_SIMD not understood; ignored");
                    best
                }
            };
            tracing::info!(
                kernels = level.as_str(),
                detected = best.as_str(),
                "CPU expert kernels"
            );
            level
        })
    }

    /// Every level this CPU runs, lowest first (for tests that compare them).
    pub fn available() -> Vec<SimdLevel> {
        let best = SimdLevel::detect();
        [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|&l| l <= best)
            .collect()
    }
}

/// `out[r * m + i] = w[r] · xs[i]` for the `n = out.len() / m` rows of `w` (`k` elements of
/// `dtype` each, little-endian, row after row) and the `m` rows of `xs` (`k` f32 each).
/// Returns false (computing nothing) when the lengths do not fit.
pub fn dot_rows(
    level: SimdLevel,
    dtype: Dtype,
    w: &[u8],
    k: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) -> bool {
    if m == 0 || !out.len().is_multiple_of(m) {
        return out.is_empty();
    }
    let n = out.len() / m;
    let fits = n
        .checked_mul(k)
        .and_then(|e| e.checked_mul(dtype.size()))
        .is_some_and(|b| b <= w.len())
        && m.checked_mul(k).is_some_and(|e| e <= xs.len());
    if !fits {
        return false;
    }
    match level.min(SimdLevel::detect()) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detect() found AVX-512F on this CPU; the lengths were checked above.
        SimdLevel::Avx512 => unsafe { super::x86::dot_avx512(dtype, w, k, xs, m, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: detect() found AVX2, FMA and F16C; the lengths were checked above.
        SimdLevel::Avx2 => unsafe { super::x86::dot_avx2(dtype, w, k, xs, m, out) },
        _ => dot_scalar(dtype, w, k, xs, m, out),
    }
    true
}

/// [`dot_rows`] in plain Rust: each weight row converted once, then its dot with every x row.
fn dot_scalar(dtype: Dtype, w: &[u8], k: usize, xs: &[f32], m: usize, out: &mut [f32]) {
    let row_bytes = k * dtype.size();
    let mut row = vec![0.0f32; k];
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        dtype.to_f32_into(&w[r * row_bytes..(r + 1) * row_bytes], &mut row);
        for (oi, x) in o.iter_mut().zip(xs.chunks_exact(k.max(1))) {
            *oi = row.iter().zip(x).map(|(a, b)| a * b).sum();
        }
        if k == 0 {
            o.fill(0.0);
        }
    }
}
