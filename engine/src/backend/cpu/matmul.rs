//! The one GEMM shape the forward pass needs, `x · wᵀ`, as a safe wrapper over `gemm`.

use gemm::Parallelism;

use super::shape_err;
use crate::backend::BackendError;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, row-major; lengths are checked.
pub(super) fn matmul_nt(
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    parallelism: Parallelism,
) -> Result<(), BackendError> {
    if x.len() != m * k || w.len() != n * k || out.len() != m * n {
        return Err(shape_err(
            "linear",
            format!(
                "x {} w {} out {} do not fit m={m} k={k} n={n}",
                x.len(),
                w.len(),
                out.len()
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let (ki, ni) = (k as isize, n as isize);
    // SAFETY: the lengths were checked above, so with these strides every index gemm touches
    // lies inside its slice: dst (i, j) at i*n + j < m*n, lhs (i, l) at i*k + l < m*k and rhs
    // (l, j) = w[j, l] at j*k + l < n*k. `out` is an exclusive borrow that aliases neither
    // input, and read_dst = false means its old contents are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ni,
            false,
            x.as_ptr(),
            1,
            ki,
            w.as_ptr(),
            ki,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
