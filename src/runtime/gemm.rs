//! Matrix products for the pair matrices and their backward, through the `gemm` crate.

use ndarray::{ArrayView2, ArrayViewMut2};

fn parallelism(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `out = alpha * lhs * rhs + (out if accumulate)`, for any strides.
fn product<T: Copy + 'static>(
    lhs: ArrayView2<T>,
    rhs: ArrayView2<T>,
    mut out: ArrayViewMut2<T>,
    accumulate: bool,
    one: T,
    threads: usize,
) {
    let (m, k) = lhs.dim();
    let n = rhs.ncols();
    if m == 0 || n == 0 {
        return;
    }
    let (lr, lc) = (lhs.strides()[0], lhs.strides()[1]);
    let (rr, rc) = (rhs.strides()[0], rhs.strides()[1]);
    let (or, oc) = (out.strides()[0], out.strides()[1]);
    // SAFETY: the pointers and strides come from live ndarray views of shapes (m, k),
    // (k, n) and (m, n), which is exactly what `gemm` reads and writes; `out` is borrowed
    // mutably and cannot alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            oc,
            or,
            accumulate,
            lhs.as_ptr(),
            lc,
            lr,
            rhs.as_ptr(),
            rc,
            rr,
            one,
            one,
            false,
            false,
            false,
            parallelism(threads),
        );
    }
}

/// `out = a b^T`.
pub fn abt<T: super::real::Real>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    out: ArrayViewMut2<T>,
    threads: usize,
) {
    product(a, b.t(), out, false, T::ONE, threads);
}

/// `out = x x^T`.
pub fn gram<T: super::real::Real>(x: ArrayView2<T>, out: ArrayViewMut2<T>, threads: usize) {
    product(x, x.t(), out, false, T::ONE, threads);
}

/// `out += g b`.
pub fn ab_acc<T: super::real::Real>(
    g: ArrayView2<T>,
    b: ArrayView2<T>,
    out: ArrayViewMut2<T>,
    threads: usize,
) {
    product(g, b, out, true, T::ONE, threads);
}

/// `out += g^T a`.
pub fn atb_acc<T: super::real::Real>(
    g: ArrayView2<T>,
    a: ArrayView2<T>,
    out: ArrayViewMut2<T>,
    threads: usize,
) {
    product(g.t(), a, out, true, T::ONE, threads);
}

/// `g <- g + g^T` in place, in tiles so that both triangles stay in cache: the adjoint of
/// `x x^T` with respect to `x` is then one product, `(g + g^T) x`.
pub fn symmetrize<T: super::real::Real>(mut g: ArrayViewMut2<T>) {
    const TILE: usize = 64;
    let n = g.nrows().min(g.ncols());
    for bi in (0..n).step_by(TILE) {
        for bj in (bi..n).step_by(TILE) {
            for i in bi..(bi + TILE).min(n) {
                let start = if bi == bj { i } else { bj };
                for j in start..(bj + TILE).min(n) {
                    let both = g[(i, j)] + g[(j, i)];
                    g[(i, j)] = both;
                    g[(j, i)] = both;
                }
            }
        }
    }
}
