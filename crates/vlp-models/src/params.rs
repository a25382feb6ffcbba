//! Named parameter lists: which tensors a model fetched from its `VarBuilder`, so that
//! trainable parameters, the momentum twin and the non-trained state (queues) can be told
//! apart by name without a second source of truth.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Tensors fetched through a recording `VarBuilder`, in fetch order, names relative to
/// the recorder's root.
pub(crate) type Fetched = Arc<Mutex<Vec<(String, Tensor)>>>;

/// A `VarBuilder` backend that forwards to another `VarBuilder` and remembers every tensor
/// it hands out. With `detach`, the model receives detached views (same storage, no
/// autograd tracking) while the list keeps the originals, so in-place updates of the
/// originals (`Var::set`) are seen by the model but its forwards build no graph.
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    fetched: Fetched,
    detach: bool,
}

impl Recorder<'_> {
    fn keep(&self, name: &str, t: Tensor) -> Tensor {
        let mut fetched = self.fetched.lock().expect("parameter list lock");
        if !fetched.iter().any(|(n, _)| n == name) {
            fetched.push((name.to_string(), t.clone()));
        }
        if self.detach {
            t.detach()
        } else {
            t
        }
    }
}

impl SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        Ok(self.keep(name, t))
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        Ok(self.keep(name, t))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A `VarBuilder` over `vb` (same prefix, dtype, device) that records what it hands out.
pub(crate) fn recording<'a>(vb: &VarBuilder<'a>, detach: bool) -> (VarBuilder<'a>, Fetched) {
    let fetched: Fetched = Arc::new(Mutex::new(Vec::new()));
    let backend = Recorder {
        inner: vb.clone(),
        fetched: fetched.clone(),
        detach,
    };
    let rec = VarBuilder::from_backend(Box::new(backend), vb.dtype(), vb.device().clone());
    (rec, fetched)
}

/// Takes the recorded list out.
pub(crate) fn take(fetched: &Fetched) -> Vec<(String, Tensor)> {
    std::mem::take(&mut *fetched.lock().expect("parameter list lock"))
}
