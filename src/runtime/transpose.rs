//! 8 × 8 blocks of a matrix moved across its diagonal on vector lanes.
//!
//! The mirror step of the Gram matrix and the symmetrisation of an adjoint transpose 2-4 MB
//! per call. Written as plain element moves, the compiler turns a block's transposition into
//! 64 scalar loads and inserts, and those passes ran at about two cycles per element; the
//! classic unpack / shuffle / lane-permute network does a block in 8 loads, 24 shuffles
//! and 8 stores (f32; four 4 × 4 networks in f64). It needs AVX, checked once per pass by
//! [`Transposer::detect`]; without it the scalar moves remain.

use super::real::Real;

/// Side of the square blocks moved at once.
pub const BLOCK: usize = 8;

/// A `BLOCK × BLOCK` block of entries, by rows.
pub type Block<T> = [[T; BLOCK]; BLOCK];

/// Moves blocks across the diagonal, on vector lanes where the processor allows.
#[derive(Debug, Clone, Copy)]
pub struct Transposer {
    avx: bool,
}

impl Transposer {
    /// The fastest way this processor has.
    pub fn detect() -> Transposer {
        #[cfg(target_arch = "x86_64")]
        let avx = std::arch::is_x86_feature_detected!("avx");
        #[cfg(not(target_arch = "x86_64"))]
        let avx = false;
        Transposer { avx }
    }

    /// Scalar moves only, whatever the processor (the tests compare both ways).
    pub fn scalar() -> Transposer {
        Transposer { avx: false }
    }

    /// `dst[a * dst_ld + b] = src[b * src_ld + a]` for `a, b < BLOCK`.
    ///
    /// # Safety
    /// Both blocks (`BLOCK` rows `*_ld` apart, `BLOCK` entries each) are valid for the
    /// access, and they do not overlap.
    #[inline(always)]
    pub unsafe fn block<T: Real>(self, src: *const T, src_ld: usize, dst: *mut T, dst_ld: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.avx {
            // SAFETY: `Real` is implemented for f32 and f64 only, so the size tells the
            // type; AVX was detected; the caller vouches for the blocks.
            unsafe {
                match size_of::<T>() {
                    4 => avx::block_f32(src.cast(), src_ld, dst.cast(), dst_ld),
                    _ => avx::block_f64(src.cast(), src_ld, dst.cast(), dst_ld),
                }
            }
            return;
        }
        for a in 0..BLOCK {
            for b in 0..BLOCK {
                // SAFETY: inside both blocks, as the caller guarantees.
                unsafe { *dst.add(a * dst_ld + b) = *src.add(b * src_ld + a) };
            }
        }
    }

    /// The block at `src` (rows `ld` apart) transposed: `out[a][b] = src[b * ld + a]`.
    ///
    /// # Safety
    /// As for [`Transposer::block`], for the block at `src`.
    #[inline(always)]
    pub unsafe fn load<T: Real>(self, src: *const T, ld: usize) -> Block<T> {
        let mut out = [[T::ZERO; BLOCK]; BLOCK];
        // SAFETY: `out` is a block of rows `BLOCK` apart, apart from `src`'s.
        unsafe { self.block(src, ld, out.as_mut_ptr().cast(), BLOCK) };
        out
    }

    /// Stores `block` transposed at `dst` (rows `ld` apart): `dst[b * ld + a] = block[a][b]`.
    ///
    /// # Safety
    /// As for [`Transposer::block`], for the block at `dst`.
    #[inline(always)]
    pub unsafe fn store<T: Real>(self, block: &Block<T>, dst: *mut T, ld: usize) {
        // SAFETY: `block` is a block of rows `BLOCK` apart, apart from `dst`'s.
        unsafe { self.block(block.as_ptr().cast(), BLOCK, dst, ld) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX is available; both 8 × 8 blocks of f32 are valid and disjoint.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn block_f32(src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
        // SAFETY: rows 0..8 of the source block.
        let row = |r: usize| unsafe { _mm256_loadu_ps(src.add(r * src_ld)) };
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        let (r4, r5, r6, r7) = (row(4), row(5), row(6), row(7));
        // Pairs of rows interleaved: (a0 b0 a1 b1 | a4 b4 a5 b5) and so on.
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        // Quadruples: (a0 b0 c0 d0 | a4 b4 c4 d4) and so on.
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        // SAFETY: rows 0..8 of the destination block.
        let put = |r: usize, v: __m256| unsafe { _mm256_storeu_ps(dst.add(r * dst_ld), v) };
        put(0, _mm256_permute2f128_ps::<0x20>(u0, u4));
        put(1, _mm256_permute2f128_ps::<0x20>(u1, u5));
        put(2, _mm256_permute2f128_ps::<0x20>(u2, u6));
        put(3, _mm256_permute2f128_ps::<0x20>(u3, u7));
        put(4, _mm256_permute2f128_ps::<0x31>(u0, u4));
        put(5, _mm256_permute2f128_ps::<0x31>(u1, u5));
        put(6, _mm256_permute2f128_ps::<0x31>(u2, u6));
        put(7, _mm256_permute2f128_ps::<0x31>(u3, u7));
    }

    /// # Safety
    /// AVX is available; both 8 × 8 blocks of f64 are valid and disjoint.
    #[target_feature(enable = "avx")]
    #[inline]
    pub unsafe fn block_f64(src: *const f64, src_ld: usize, dst: *mut f64, dst_ld: usize) {
        for (a, b) in [(0, 0), (0, 4), (4, 0), (4, 4)] {
            // The 4 x 4 quarter at rows a, columns b goes to rows b, columns a.
            // SAFETY: inside both blocks, as the caller guarantees.
            unsafe {
                quarter_f64(
                    src.add(a * src_ld + b),
                    src_ld,
                    dst.add(b * dst_ld + a),
                    dst_ld,
                )
            };
        }
    }

    /// # Safety
    /// As for [`block_f64`], for 4 × 4 blocks.
    #[target_feature(enable = "avx")]
    #[inline]
    unsafe fn quarter_f64(src: *const f64, src_ld: usize, dst: *mut f64, dst_ld: usize) {
        // SAFETY: rows 0..4 of the source block.
        let row = |r: usize| unsafe { _mm256_loadu_pd(src.add(r * src_ld)) };
        let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
        // (a0 b0 | a2 b2), (a1 b1 | a3 b3), and the same of rows c, d.
        let (t0, t1) = (_mm256_unpacklo_pd(r0, r1), _mm256_unpackhi_pd(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_pd(r2, r3), _mm256_unpackhi_pd(r2, r3));
        // SAFETY: rows 0..4 of the destination block.
        let put = |r: usize, v: __m256d| unsafe { _mm256_storeu_pd(dst.add(r * dst_ld), v) };
        put(0, _mm256_permute2f128_pd::<0x20>(t0, t2));
        put(1, _mm256_permute2f128_pd::<0x20>(t1, t3));
        put(2, _mm256_permute2f128_pd::<0x31>(t0, t2));
        put(3, _mm256_permute2f128_pd::<0x31>(t1, t3));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Real>(transposer: Transposer) {
        // Blocks inside larger buffers with odd row lengths, so that a wrong stride shows.
        let (src_ld, dst_ld) = (13, 11);
        let src: Vec<T> = (0..BLOCK * src_ld).map(|k| T::from_f64(k as f64)).collect();
        let mut dst = vec![T::from_f64(-1.0); BLOCK * dst_ld];
        // SAFETY: both buffers hold 8 rows of at least 8 entries at their strides.
        unsafe { transposer.block(src.as_ptr(), src_ld, dst.as_mut_ptr(), dst_ld) };
        for a in 0..BLOCK {
            for b in 0..dst_ld {
                let want = if b < BLOCK {
                    src[b * src_ld + a]
                } else {
                    T::from_f64(-1.0)
                };
                assert_eq!(dst[a * dst_ld + b], want, "entry ({a}, {b})");
            }
        }
        // SAFETY: as above.
        let loaded = unsafe { transposer.load(src.as_ptr(), src_ld) };
        let mut stored = vec![T::ZERO; BLOCK * src_ld];
        // SAFETY: as above.
        unsafe { transposer.store(&loaded, stored.as_mut_ptr(), src_ld) };
        for a in 0..BLOCK {
            for b in 0..BLOCK {
                assert_eq!(loaded[a][b], src[b * src_ld + a]);
                assert_eq!(stored[b * src_ld + a], src[b * src_ld + a]);
            }
        }
    }

    #[test]
    fn blocks_move_across_the_diagonal_either_way() {
        for transposer in [Transposer::detect(), Transposer::scalar()] {
            check::<f32>(transposer);
            check::<f64>(transposer);
        }
    }
}
