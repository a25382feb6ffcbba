//! Gradient buckets, as PyTorch DDP forms them: consecutive tensors of one dtype and
//! device flattened into one buffer of up to [`BUCKET_BYTES`], so that a model's few
//! hundred gradients cost a few exchanges, not one each.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::Result;

/// DDP's default bucket size, 25 MiB.
pub(crate) const BUCKET_BYTES: usize = 25 << 20;

/// The tensors' index ranges, one per bucket: consecutive, one dtype and device each, at
/// most `limit` bytes unless a single tensor is larger.
pub(crate) fn buckets(tensors: &[Tensor], limit: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.elem_count() * t.dtype().size_in_bytes();
        let fits = i > start
            && t.dtype() == tensors[start].dtype()
            && t.device().same_device(tensors[start].device())
            && bytes + size <= limit;
        if i > start && !fits {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// Applies `reduce` to each bucket of `tensors` flattened into one 1-d tensor, and puts
/// the result back in place, each tensor in its own shape.
pub(crate) fn reduce_in_buckets(
    tensors: &mut [Tensor],
    mut reduce: impl FnMut(Tensor) -> Result<Tensor>,
) -> Result<()> {
    for range in buckets(tensors, BUCKET_BYTES) {
        let flat: Vec<Tensor> = tensors[range.clone()]
            .iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let reduced = reduce(Tensor::cat(&flat, 0)?)?;
        let mut at = 0;
        for t in &mut tensors[range] {
            let n = t.elem_count();
            *t = reduced.narrow(0, at, n)?.reshape(t.shape())?;
            at += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn buckets_split_at_the_limit_and_at_dtype_changes() {
        let d = Device::Cpu;
        let t = |n: usize, dt: DType| Tensor::zeros(n, dt, &d).unwrap();
        let ts = [
            t(10, DType::F32),
            t(10, DType::F32),
            t(30, DType::F32),
            t(4, DType::F64),
            t(4, DType::F64),
        ];
        // 40 + 40 fit in 100 bytes; 120 is alone; the f64 tensors start a new bucket.
        assert_eq!(buckets(&ts, 100), vec![0..2, 2..3, 3..5]);
        assert_eq!(buckets(&ts, 1 << 20), vec![0..3, 3..5]);
        assert!(buckets(&[], 100).is_empty());
    }

    #[test]
    fn reduced_buckets_go_back_in_their_shapes() {
        let d = Device::Cpu;
        let mut ts = vec![
            Tensor::arange(0f32, 6., &d)
                .unwrap()
                .reshape((2, 3))
                .unwrap(),
            Tensor::arange(6f32, 8., &d).unwrap(),
        ];
        let mut calls = 0;
        reduce_in_buckets(&mut ts, |flat| {
            calls += 1;
            Ok((flat * 2.0)?)
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(
            ts[0].to_vec2::<f32>().unwrap(),
            vec![vec![0., 2., 4.], vec![6., 8., 10.]]
        );
        assert_eq!(ts[1].to_vec1::<f32>().unwrap(), vec![12., 14.]);
    }
}
