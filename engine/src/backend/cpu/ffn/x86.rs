//! x86-64 vector paths of [`super::dot`]: AVX-512F (16 lanes) and AVX2 + FMA + F16C (8 lanes).
//!
//! Each weight element is widened to f32 exactly (bf16: the bits shifted up by 16; f16: the
//! F16C conversion), then multiplied into f32 accumulators: the products equal the reference's
//! (which converts to f32 and multiplies), only the order of the additions differs. A weight
//! row is read once for up to [`X_BLOCK`] rows of x, with two accumulator chains per x row.

#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::dtype::Dtype;

/// Rows of x one pass over a weight row serves.
pub(super) const X_BLOCK: usize = 4;

/// `out[r * m + i] = w[r] · xs[i]` for the `n = out.len() / m` rows of `w` (`k` elements of
/// `dtype` each, little-endian) and the `m` rows of `xs` (`k` f32 each), with AVX-512F.
///
/// # Safety
///
/// The CPU must have AVX-512F, and `w.len() >= n * k * dtype.size()`, `xs.len() >= m * k`,
/// `m > 0`, `out.len() % m == 0`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dot_avx512(
    dtype: Dtype,
    w: &[u8],
    k: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let row_bytes = k * dtype.size();
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut i0 = 0;
        while i0 < m {
            let mb = (m - i0).min(X_BLOCK);
            let x = &xs[i0 * k..(i0 + mb) * k];
            let o = &mut o[i0..i0 + mb];
            // SAFETY: AVX-512F is enabled in this function; wr holds k elements of dtype and
            // x holds mb rows of k f32 (sliced above, so in bounds).
            unsafe {
                match (dtype, mb) {
                    (Dtype::BF16, 1) => row_avx512::<1, BF>(wr, k, x, o),
                    (Dtype::BF16, 2) => row_avx512::<2, BF>(wr, k, x, o),
                    (Dtype::BF16, 3) => row_avx512::<3, BF>(wr, k, x, o),
                    (Dtype::BF16, _) => row_avx512::<4, BF>(wr, k, x, o),
                    (Dtype::F16, 1) => row_avx512::<1, HF>(wr, k, x, o),
                    (Dtype::F16, 2) => row_avx512::<2, HF>(wr, k, x, o),
                    (Dtype::F16, 3) => row_avx512::<3, HF>(wr, k, x, o),
                    (Dtype::F16, _) => row_avx512::<4, HF>(wr, k, x, o),
                    (Dtype::F32, 1) => row_avx512::<1, SF>(wr, k, x, o),
                    (Dtype::F32, 2) => row_avx512::<2, SF>(wr, k, x, o),
                    (Dtype::F32, 3) => row_avx512::<3, SF>(wr, k, x, o),
                    (Dtype::F32, _) => row_avx512::<4, SF>(wr, k, x, o),
                }
            }
            i0 += mb;
        }
    }
}

/// [`dot_avx512`] with AVX2, FMA and F16C.
///
/// # Safety
///
/// The CPU must have AVX2, FMA and F16C; the lengths as for [`dot_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_avx2(
    dtype: Dtype,
    w: &[u8],
    k: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let row_bytes = k * dtype.size();
    for (r, o) in out.chunks_exact_mut(m).enumerate() {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut i0 = 0;
        while i0 < m {
            let mb = (m - i0).min(X_BLOCK);
            let x = &xs[i0 * k..(i0 + mb) * k];
            let o = &mut o[i0..i0 + mb];
            // SAFETY: AVX2, FMA and F16C are enabled in this function; wr holds k elements
            // of dtype and x holds mb rows of k f32.
            unsafe {
                match (dtype, mb) {
                    (Dtype::BF16, 1) => row_avx2::<1, BF>(wr, k, x, o),
                    (Dtype::BF16, 2) => row_avx2::<2, BF>(wr, k, x, o),
                    (Dtype::BF16, 3) => row_avx2::<3, BF>(wr, k, x, o),
                    (Dtype::BF16, _) => row_avx2::<4, BF>(wr, k, x, o),
                    (Dtype::F16, 1) => row_avx2::<1, HF>(wr, k, x, o),
                    (Dtype::F16, 2) => row_avx2::<2, HF>(wr, k, x, o),
                    (Dtype::F16, 3) => row_avx2::<3, HF>(wr, k, x, o),
                    (Dtype::F16, _) => row_avx2::<4, HF>(wr, k, x, o),
                    (Dtype::F32, 1) => row_avx2::<1, SF>(wr, k, x, o),
                    (Dtype::F32, 2) => row_avx2::<2, SF>(wr, k, x, o),
                    (Dtype::F32, 3) => row_avx2::<3, SF>(wr, k, x, o),
                    (Dtype::F32, _) => row_avx2::<4, SF>(wr, k, x, o),
                }
            }
            i0 += mb;
        }
    }
}

/// The weight types as const parameters.
const BF: u8 = 0;
const HF: u8 = 1;
const SF: u8 = 2;

/// Weight element `j` of `wr` as f32 (the scalar tail).
fn weight_at<const T: u8>(wr: &[u8], j: usize) -> f32 {
    match T {
        BF => half::bf16::from_le_bytes([wr[2 * j], wr[2 * j + 1]]).to_f32(),
        HF => half::f16::from_le_bytes([wr[2 * j], wr[2 * j + 1]]).to_f32(),
        _ => f32::from_le_bytes([wr[4 * j], wr[4 * j + 1], wr[4 * j + 2], wr[4 * j + 3]]),
    }
}

/// 16 weights from element `j` of `wr` as f32.
///
/// # Safety
///
/// AVX-512F; `wr` holds at least `j + 16` elements of type T.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<const T: u8>(wr: &[u8], j: usize) -> __m512 {
    // SAFETY: the caller guarantees 16 elements from j (32 or 64 bytes) are inside wr;
    // the loads are unaligned.
    unsafe {
        match T {
            BF => {
                let h = _mm256_loadu_si256(wr.as_ptr().add(2 * j).cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            HF => _mm512_cvtph_ps(_mm256_loadu_si256(wr.as_ptr().add(2 * j).cast())),
            _ => _mm512_loadu_ps(wr.as_ptr().add(4 * j).cast()),
        }
    }
}

/// 8 weights from element `j` of `wr` as f32.
///
/// # Safety
///
/// AVX2 and F16C; `wr` holds at least `j + 8` elements of type T.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const T: u8>(wr: &[u8], j: usize) -> __m256 {
    // SAFETY: the caller guarantees 8 elements from j (16 or 32 bytes) are inside wr; the
    // loads are unaligned.
    unsafe {
        match T {
            BF => {
                let h = _mm_loadu_si128(wr.as_ptr().add(2 * j).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            HF => _mm256_cvtph_ps(_mm_loadu_si128(wr.as_ptr().add(2 * j).cast())),
            _ => _mm256_loadu_ps(wr.as_ptr().add(4 * j).cast()),
        }
    }
}

/// `o[i] = wr · x[i]` for the M rows of `x` (k f32 each).
///
/// # Safety
///
/// AVX-512F; `wr` holds k elements of type T, `x` M * k f32, `o` M entries.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn row_avx512<const M: usize, const T: u8>(wr: &[u8], k: usize, x: &[f32], o: &mut [f32]) {
    let mut a = [[_mm512_setzero_ps(); M]; 2];
    let mut j = 0;
    // The loop bounds (j + 32 <= k, then j + 16 <= k) keep every load below in bounds: 32
    // (16) weight elements from j are inside wr and as many floats from i * k + j inside x.
    while j + 32 <= k {
        // SAFETY: the loop bound keeps the loaded weight elements inside wr.
        let (w0, w1) = unsafe { (load16::<T>(wr, j), load16::<T>(wr, j + 16)) };
        for i in 0..M {
            // SAFETY: i < M and j < k, so i * k + j is inside x (M * k floats).
            let p = unsafe { x.as_ptr().add(i * k + j) };
            // SAFETY: the loop bound keeps the loaded floats inside x's row i.
            let (x0, x1) = unsafe { (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))) };
            a[0][i] = _mm512_fmadd_ps(w0, x0, a[0][i]);
            a[1][i] = _mm512_fmadd_ps(w1, x1, a[1][i]);
        }
        j += 32;
    }
    if j + 16 <= k {
        // SAFETY: the loop bound keeps the loaded weight elements inside wr.
        let w0 = unsafe { load16::<T>(wr, j) };
        for i in 0..M {
            // SAFETY: the loop bound keeps the loaded floats inside x's row i.
            let x0 = unsafe { _mm512_loadu_ps(x.as_ptr().add(i * k + j)) };
            a[0][i] = _mm512_fmadd_ps(w0, x0, a[0][i]);
        }
        j += 16;
    }
    for i in 0..M {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a[0][i], a[1][i]));
        for t in j..k {
            s += weight_at::<T>(wr, t) * x[i * k + t];
        }
        o[i] = s;
    }
}

/// The sum of the 8 lanes of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// [`row_avx512`] with 8-lane AVX2.
///
/// # Safety
///
/// AVX2, FMA and F16C; `wr` holds k elements of type T, `x` M * k f32, `o` M entries.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2<const M: usize, const T: u8>(wr: &[u8], k: usize, x: &[f32], o: &mut [f32]) {
    let mut a = [[_mm256_setzero_ps(); M]; 2];
    let mut j = 0;
    // The loop bounds (j + 16 <= k, then j + 8 <= k) keep every load below in bounds.
    while j + 16 <= k {
        // SAFETY: the loop bound keeps the loaded weight elements inside wr.
        let (w0, w1) = unsafe { (load8::<T>(wr, j), load8::<T>(wr, j + 8)) };
        for i in 0..M {
            // SAFETY: i < M and j < k, so i * k + j is inside x (M * k floats).
            let p = unsafe { x.as_ptr().add(i * k + j) };
            // SAFETY: the loop bound keeps the loaded floats inside x's row i.
            let (x0, x1) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
            a[0][i] = _mm256_fmadd_ps(w0, x0, a[0][i]);
            a[1][i] = _mm256_fmadd_ps(w1, x1, a[1][i]);
        }
        j += 16;
    }
    if j + 8 <= k {
        // SAFETY: the loop bound keeps the loaded weight elements inside wr.
        let w0 = unsafe { load8::<T>(wr, j) };
        for i in 0..M {
            // SAFETY: the loop bound keeps the loaded floats inside x's row i.
            let x0 = unsafe { _mm256_loadu_ps(x.as_ptr().add(i * k + j)) };
            a[0][i] = _mm256_fmadd_ps(w0, x0, a[0][i]);
        }
        j += 8;
    }
    for i in 0..M {
        let mut s = sum8(_mm256_add_ps(a[0][i], a[1][i]));
        for t in j..k {
            s += weight_at::<T>(wr, t) * x[i * k + t];
        }
        o[i] = s;
    }
}
