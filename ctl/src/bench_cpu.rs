//! `bench stream --cpu-bandwidth`: the CPU expert kernels against the memory they read, on
//! the host tier's own slots: a STREAM-like read of every host-resident expert (all threads,
//! each slot summed as 64-bit words), then the kernels over the same experts in groups of a
//! layer's top-k at one token row (a decode step's shape).

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use tileflow_engine::backend::cpu::ffn::{experts_into, SimdLevel};
use tileflow_engine::backend::{ExpertRef, ExpertWork, HostMatrix};
use tileflow_engine::tier::ExpertView;

/// The two read rates over the same bytes.
#[derive(Debug, Clone, Serialize)]
pub struct CpuBandwidth {
    /// The kernels' instruction set.
    pub kernels: &'static str,
    /// Host-tier bytes each pass covers.
    pub bytes: u64,
    /// The plain read, bytes per second (best pass).
    pub read_bytes_per_s: f64,
    /// The expert kernels at one row, weight bytes per second (best pass).
    pub kernel_bytes_per_s: f64,
    /// kernel / read.
    pub kernel_over_read: f64,
}

/// Measures `views` (host-tier experts of `hidden`-wide layers) `passes` times each way;
/// the kernels take `top_k` experts at a time.
pub fn measure(
    views: &[ExpertView<'_>],
    hidden: usize,
    top_k: usize,
    passes: usize,
) -> CpuBandwidth {
    let bytes: u64 = views.iter().map(|v| v.bytes.len() as u64).sum();
    let mut read_best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..passes {
        let t = Instant::now();
        sink ^= views
            .par_iter()
            .map(|v| {
                v.bytes.host().map_or(0, |b| {
                    b.chunks_exact(8)
                        .map(|w| {
                            u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
                        })
                        .fold(0u64, u64::wrapping_add)
                })
            })
            .reduce(|| 0, u64::wrapping_add);
        read_best = read_best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    let level = SimdLevel::current();
    let x = HostMatrix::new(
        1,
        hidden,
        (0..hidden)
            .map(|i| ((i % 17) as f32 - 8.0) / 64.0)
            .collect(),
    )
    .unwrap_or_else(|| HostMatrix::zeros(1, hidden));
    let mut kernel_best = f64::MAX;
    for _ in 0..passes {
        let t = Instant::now();
        for group in views.chunks(top_k.max(1)) {
            let work: Vec<ExpertWork<'_>> = group
                .iter()
                .map(|v| ExpertWork {
                    expert: v.extent.expert,
                    weights: ExpertRef {
                        bytes: v.bytes,
                        dtype: v.dtype,
                        gate: v.extent.gate,
                        up: v.extent.up,
                        down: v.extent.down,
                    },
                    rows: vec![0],
                    scales: vec![1.0],
                })
                .collect();
            let mut out = HostMatrix::zeros(1, hidden);
            // A shape the kernels refuse measures nothing: the pass then reads as slow.
            let _ = experts_into(level, &x, &work, &mut out);
        }
        kernel_best = kernel_best.min(t.elapsed().as_secs_f64());
    }
    let rate = |secs: f64| bytes as f64 / secs.max(1e-9);
    let (read, kernel) = (rate(read_best), rate(kernel_best));
    CpuBandwidth {
        kernels: level.as_str(),
        bytes,
        read_bytes_per_s: read,
        kernel_bytes_per_s: kernel,
        kernel_over_read: kernel / read,
    }
}
