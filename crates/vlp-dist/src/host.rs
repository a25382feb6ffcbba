//! Tensors as bytes in host memory, and the elementwise sums of such bytes: what the TCP
//! backend sends and reduces.

use candle_core::{DType, Device, Shape, Tensor};
use half::{bf16, f16};

use crate::error::{DistError, Result};

/// The tensor's elements, row-major, little-endian.
pub(crate) fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    fn le<T, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * N);
        for x in v {
            out.extend_from_slice(&f(x));
        }
        out
    }
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => le(t.to_vec1::<u32>()?, u32::to_le_bytes),
        DType::I64 => le(t.to_vec1::<i64>()?, i64::to_le_bytes),
        DType::F32 => le(t.to_vec1::<f32>()?, f32::to_le_bytes),
        DType::F64 => le(t.to_vec1::<f64>()?, f64::to_le_bytes),
        DType::BF16 => le(t.to_vec1::<bf16>()?, bf16::to_le_bytes),
        DType::F16 => le(t.to_vec1::<f16>()?, f16::to_le_bytes),
        other => {
            return Err(DistError::Unsupported {
                op: "exchange",
                reason: format!("tensors of {other:?}"),
            })
        }
    })
}

/// A tensor of `shape` and `dtype` on `device` from [`to_bytes`]'s layout.
pub(crate) fn from_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: impl Into<Shape>,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    if bytes.len() != shape.elem_count() * dtype.size_in_bytes() {
        return Err(DistError::OutOfStep(format!(
            "{} bytes received for a {dtype:?} tensor of shape {shape:?}",
            bytes.len()
        )));
    }
    Ok(
        Tensor::from_raw_buffer(bytes, dtype, shape.dims(), &candle_core::Device::Cpu)?
            .to_device(device)?,
    )
}

/// `acc += other` elementwise, in `dtype` (f32, f64, bf16, f16).
pub(crate) fn add_into(acc: &mut [u8], other: &[u8], dtype: DType) -> Result<()> {
    if acc.len() != other.len() {
        return Err(DistError::OutOfStep(format!(
            "all-reduce of {} bytes against {} bytes",
            acc.len(),
            other.len()
        )));
    }
    map_floats(acc, Some(other), dtype, |x, y| x + y)
}

/// `acc /= n` elementwise, in `dtype` (after [`add_into`]).
pub(crate) fn divide(acc: &mut [u8], n: usize, dtype: DType) -> Result<()> {
    let n = n as f64;
    map_floats(acc, None, dtype, |x, _| x / n)
}

/// `a = f(a, b)` over the elements of `acc` (and `other`, when given; else `b` = 0),
/// computed in f64 and rounded once to `dtype` (exact for f32/bf16/f16 sums of two
/// values and for divisions of f32; f64 sums in f64).
fn map_floats(
    acc: &mut [u8],
    other: Option<&[u8]>,
    dtype: DType,
    f: impl Fn(f64, f64) -> f64,
) -> Result<()> {
    macro_rules! map {
        ($n:expr, $read:expr, $write:expr) => {{
            let read = $read;
            let write = $write;
            for (i, a) in acc.chunks_exact_mut($n).enumerate() {
                let y = other.map_or(0.0, |o| read(&o[i * $n..(i + 1) * $n]));
                let v = f(read(a), y);
                a.copy_from_slice(&write(v));
            }
        }};
    }
    match dtype {
        DType::F32 => map!(
            4,
            |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            |v: f64| (v as f32).to_le_bytes()
        ),
        DType::F64 => map!(
            8,
            |b: &[u8]| f64::from_le_bytes(b.try_into().expect("8 bytes")),
            |v: f64| v.to_le_bytes()
        ),
        DType::BF16 => map!(
            2,
            |b: &[u8]| bf16::from_le_bytes(b.try_into().expect("2 bytes")).to_f64(),
            |v: f64| bf16::from_f64(v).to_le_bytes()
        ),
        DType::F16 => map!(
            2,
            |b: &[u8]| f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f64(),
            |v: f64| f16::from_f64(v).to_le_bytes()
        ),
        other => {
            return Err(DistError::Unsupported {
                op: "all-reduce",
                reason: format!("tensors of {other:?} (floats only)"),
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_every_dtype() {
        let base = Tensor::new(&[[1.5f32, -2.25, 3.0], [0.0, 7.5, -1.0]], &Device::Cpu).unwrap();
        for dtype in [
            DType::F32,
            DType::F64,
            DType::BF16,
            DType::F16,
            DType::U8,
            DType::U32,
            DType::I64,
        ] {
            let t = base.abs().unwrap().to_dtype(dtype).unwrap();
            let back = from_bytes(&to_bytes(&t).unwrap(), dtype, (2, 3), &Device::Cpu).unwrap();
            assert_eq!(
                back.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
                t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap(),
                "{dtype:?}"
            );
        }
        assert!(from_bytes(&[0u8; 5], DType::F32, (2,), &Device::Cpu).is_err());
    }

    #[test]
    fn sums_and_means_in_the_tensor_dtype() {
        let a = Tensor::new(&[1.0f32, 2.5, -3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, 0.25, 1.0], &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let mut acc = to_bytes(&a.to_dtype(dtype).unwrap()).unwrap();
            add_into(
                &mut acc,
                &to_bytes(&b.to_dtype(dtype).unwrap()).unwrap(),
                dtype,
            )
            .unwrap();
            divide(&mut acc, 2, dtype).unwrap();
            let got = from_bytes(&acc, dtype, (3,), &Device::Cpu).unwrap();
            let got = got.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(got, vec![0.75, 1.375, -1.0], "{dtype:?}");
        }
        let mut acc = to_bytes(&a).unwrap();
        assert!(matches!(
            add_into(&mut acc, &[0u8; 8], DType::F32),
            Err(DistError::OutOfStep(_))
        ));
        let mut ints = to_bytes(&a.to_dtype(DType::U32).unwrap()).unwrap();
        let other = ints.clone();
        assert!(matches!(
            add_into(&mut ints, &other, DType::U32),
            Err(DistError::Unsupported { .. })
        ));
    }
}
