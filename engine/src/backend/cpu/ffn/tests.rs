//! The CPU expert kernels against a plain f64 reference, at every vector level this CPU runs.

use super::*;
use crate::backend::ExpertBytes;

/// Uniform values in [-1, 1) from a splitmix64 stream.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `w · x` in f64 over the weights as stored, and Σ|w·x| (the scale of its rounding).
fn reference_dot(w: &[f32], x: &[f32]) -> (f64, f64) {
    w.iter().zip(x).fold((0.0, 0.0), |(s, a), (&p, &q)| {
        let v = f64::from(p) * f64::from(q);
        (s + v, a + v.abs())
    })
}

#[test]
fn dot_rows_matches_the_reference_at_every_level_and_odd_shape() {
    for level in SimdLevel::available() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            for k in [1, 7, 8, 15, 16, 17, 31, 32, 33, 100, 257] {
                for m in [1, 2, 3, 4, 5, 9] {
                    let n = 3;
                    let bytes = dtype.from_f32(&values(n * k, k as u64));
                    let w = dtype.to_f32(&bytes);
                    let xs = values(m * k, 1000 + m as u64);
                    let mut out = vec![f32::NAN; n * m];
                    assert!(dot_rows(level, dtype, &bytes, k, &xs, m, &mut out));
                    for r in 0..n {
                        for i in 0..m {
                            let (want, scale) =
                                reference_dot(&w[r * k..(r + 1) * k], &xs[i * k..(i + 1) * k]);
                            let got = f64::from(out[r * m + i]);
                            assert!(
                                (got - want).abs() <= 1e-6 * scale + 1e-30,
                                "{level:?} {dtype:?} k={k} m={m} row {r} x {i}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn dot_rows_refuses_lengths_that_do_not_fit() {
    let level = SimdLevel::current();
    let w = vec![0u8; 2 * 16];
    let xs = vec![0.0f32; 16];
    let mut out = vec![0.0f32; 2];
    // Two rows of 16 bf16 need 64 bytes.
    assert!(!dot_rows(level, Dtype::BF16, &w, 16, &xs, 1, &mut out));
    // Two x rows of 16 need 32 floats.
    assert!(!dot_rows(level, Dtype::BF16, &w, 16, &xs, 2, &mut out[..2]));
    assert!(!dot_rows(level, Dtype::BF16, &w, 16, &xs, 0, &mut out));
    assert!(dot_rows(level, Dtype::BF16, &w, 16, &xs, 1, &mut out[..1]));
}

/// An expert's extent (gate | up | down) in `dtype` with random weights, and the weights as
/// stored, in f32.
struct TestExpert {
    bytes: Vec<u8>,
    dtype: Dtype,
    gate: ProjectionExtent,
    up: ProjectionExtent,
    down: ProjectionExtent,
    w: [Vec<f32>; 3],
}

impl TestExpert {
    fn new(dtype: Dtype, hidden: usize, inter: usize, seed: u64) -> TestExpert {
        let mut bytes = Vec::new();
        let mut w: [Vec<f32>; 3] = Default::default();
        let mut ext = Vec::new();
        for (p, shape) in [[inter, hidden], [inter, hidden], [hidden, inter]]
            .into_iter()
            .enumerate()
        {
            let b = dtype.from_f32(&values(shape[0] * shape[1], seed * 3 + p as u64));
            w[p] = dtype.to_f32(&b);
            ext.push(ProjectionExtent {
                offset: bytes.len() as u64,
                shape,
            });
            bytes.extend_from_slice(&b);
        }
        TestExpert {
            bytes,
            dtype,
            gate: ext[0],
            up: ext[1],
            down: ext[2],
            w,
        }
    }

    fn weights(&self) -> ExpertRef<'_> {
        ExpertRef {
            bytes: ExpertBytes::Host(&self.bytes),
            dtype: self.dtype,
            gate: self.gate,
            up: self.up,
            down: self.down,
        }
    }

    /// The FFN of one row in f64.
    fn reference(&self, x: &[f32]) -> Vec<f64> {
        let (hidden, inter) = (self.gate.shape[1], self.gate.shape[0]);
        let act: Vec<f64> = (0..inter)
            .map(|j| {
                let g = reference_dot(&self.w[0][j * hidden..(j + 1) * hidden], x).0;
                let u = reference_dot(&self.w[1][j * hidden..(j + 1) * hidden], x).0;
                g / (1.0 + (-g).exp()) * u
            })
            .collect();
        (0..hidden)
            .map(|c| {
                let row = &self.w[2][c * inter..(c + 1) * inter];
                row.iter().zip(&act).map(|(&d, &a)| f64::from(d) * a).sum()
            })
            .collect()
    }
}

#[test]
fn experts_match_the_reference_for_every_dtype_odd_sizes_and_shared_rows() {
    for level in SimdLevel::available() {
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            for (hidden, inter) in [(37, 19), (64, 48), (130, 70)] {
                let rows = 5;
                let x = HostMatrix::new(rows, hidden, values(rows * hidden, 7)).unwrap();
                let experts: Vec<TestExpert> = (0..4)
                    .map(|e| TestExpert::new(dtype, hidden, inter, 10 + e))
                    .collect();
                // Expert 2 takes every row (more than one x block), 0 two rows, 3 one, 1 none.
                let routes: [Vec<usize>; 4] = [vec![1, 4], vec![], vec![0, 1, 2, 3, 4], vec![2]];
                let work: Vec<ExpertWork<'_>> = routes
                    .iter()
                    .enumerate()
                    .map(|(e, r)| ExpertWork {
                        expert: e,
                        weights: experts[e].weights(),
                        rows: r.clone(),
                        scales: r.iter().map(|&i| 0.25 + 0.1 * i as f32).collect(),
                    })
                    .collect();
                let mut out = HostMatrix::new(rows, hidden, values(rows * hidden, 99)).unwrap();
                let start = out.clone();
                experts_into(level, &x, &work, &mut out).unwrap();
                for r in 0..rows {
                    let mut want: Vec<f64> = start.row(r).iter().map(|&v| f64::from(v)).collect();
                    for w in &work {
                        if let Some(j) = w.rows.iter().position(|&i| i == r) {
                            let y = experts[w.expert].reference(x.row(r));
                            for (o, v) in want.iter_mut().zip(y) {
                                *o += f64::from(w.scales[j]) * v;
                            }
                        }
                    }
                    for (c, (&got, &w)) in out.row(r).iter().zip(&want).enumerate() {
                        assert!(
                            got.is_finite(),
                            "{level:?} {dtype:?} row {r} col {c}: {got}"
                        );
                        assert!(
                            (f64::from(got) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{level:?} {dtype:?} [{hidden}, {inter}] row {r} col {c}: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn experts_name_the_expert_whose_bytes_or_rows_do_not_fit() {
    let level = SimdLevel::current();
    let e = TestExpert::new(Dtype::BF16, 16, 8, 1);
    let x = HostMatrix::zeros(2, 16);
    let mut out = HostMatrix::zeros(2, 16);
    let mut weights = e.weights();
    weights.bytes = ExpertBytes::Host(&e.bytes[..e.bytes.len() - 2]);
    let work = |weights, rows: Vec<usize>| ExpertWork {
        expert: 5,
        weights,
        scales: vec![1.0; rows.len()],
        rows,
    };
    let err = experts_into(level, &x, &[work(weights, vec![0])], &mut out).unwrap_err();
    assert!(err.to_string().contains("expert 5"), "{err}");
    assert!(err.to_string().contains("down"), "{err}");
    let err = experts_into(level, &x, &[work(e.weights(), vec![2])], &mut out).unwrap_err();
    assert!(err.to_string().contains("row 2 of 2"), "{err}");
    let mut narrow = HostMatrix::zeros(2, 8);
    let err = experts_into(level, &x, &[work(e.weights(), vec![0])], &mut narrow).unwrap_err();
    assert!(err.to_string().contains("[2, 8]"), "{err}");
}
