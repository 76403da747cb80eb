//! The float types a compiled loss runs in.

use crate::interp::Precision;
use multiversion::multiversion;
use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};
use std::sync::atomic::{AtomicBool, Ordering};

/// `f32` or `f64`: the embeddings, matrices, kernels and gradient of one run.
pub trait Real:
    Copy
    + Default
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + ndarray::ScalarOperand
    + ndarray::LinalgScalar
{
    const PRECISION: Precision;
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn is_finite(self) -> bool;
    /// The value's place in ascending order as an unsigned integer, `-0` and `0` as one;
    /// a float32 value's in the high half. A NaN's is meaningless.
    fn order_key(self) -> u64;
}

impl Real for f32 {
    const PRECISION: Precision = Precision::F32;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn order_key(self) -> u64 {
        // Without branches, to stay on the lanes: a negative value's bits reversed, a
        // positive value's with the sign bit set.
        let bits = if self == 0.0 { 0 } else { self.to_bits() };
        let flip = ((bits as i32 >> 31) as u32) | 1 << 31;
        u64::from(bits ^ flip) << 32
    }
}

impl Real for f64 {
    const PRECISION: Precision = Precision::F64;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn order_key(self) -> u64 {
        let bits = if self == 0.0 { 0 } else { self.to_bits() };
        let flip = ((bits as i64 >> 63) as u64) | 1 << 63;
        bits ^ flip
    }
}

/// Whether every value is finite, on the widest vector unit the CPU has: `v - v` is zero
/// for a finite `v` only, and the fold has no branch to keep it off the lanes.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma"))]
#[allow(clippy::eq_op)] // `v - v` is the test, not a slip
pub fn all_finite<F: Real>(values: &[F]) -> bool {
    values
        .chunks(256)
        .all(|chunk| chunk.iter().fold(true, |ok, &v| ok & (v - v == F::ZERO)))
}

/// Floats each thread takes at once where a call's flat passes over a gradient or an
/// embedding (zeros, copies, checks) run on the threads: alone, each was a serial stretch
/// of the call.
pub(super) const FLOATS_PER_TASK: usize = 1 << 16;

/// [`all_finite`] in blocks on `threads` (alone, a 1024 x 256 gradient's check took
/// 0.013 ms of one core).
pub fn all_finite_on_threads<F: Real>(values: &[F], threads: usize) -> bool {
    let finite = AtomicBool::new(true);
    let blocks: Vec<&[F]> = values.chunks(FLOATS_PER_TASK).collect();
    super::gemm::run_tasks(blocks, threads, |block| {
        if !all_finite(block) {
            finite.store(false, Ordering::Relaxed);
        }
    });
    finite.into_inner()
}
