//! The one bounds-checked entry into the `gemm` crate (candle's own CPU matrix multiply)
//! for the fused ops: strided operands, so transposes and views cost no copy.

use gemm::Parallelism;

use super::affine::Float;

/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_MACS: usize = 1 << 16;

/// `dst = [dst +] beta * lhs * rhs` for an `m x k` by `k x n` product; each matrix is a
/// slice with its row and column strides (`dst`: row stride `dst_rs`, contiguous rows).
/// Runs on up to `threads` rayon threads when the product is large enough.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: T,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len(), "gemm: dst out of bounds");
    if k > 0 {
        assert!(
            last(m, k, lhs_rs, lhs_cs) < lhs.len(),
            "gemm: lhs out of bounds"
        );
        assert!(
            last(k, n, rhs_rs, rhs_cs) < rhs.len(),
            "gemm: rhs out of bounds"
        );
    }
    let parallelism = if m * n * k >= PARALLEL_MACS && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts keep every element gemm reads or writes inside the slices, and
    // `dst` is a `&mut`, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::ONE,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}
