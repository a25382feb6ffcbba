//! The device seam: where a command's `--device` / a recipe's `run.device` becomes a candle
//! [`Device`]. Library code never names a device itself; it takes the one resolved here
//! and passes it down, or asks for [`host`] for data that lives in host memory (decoded
//! images, checkpoint files being read).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// A device as a user writes it: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

/// Why a device could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected `cpu`, `cuda` or `cuda:N`")]
    Unknown(String),
    #[error(
        "device `{0}`: this vlp was built without CUDA; rebuild with `--features cuda` \
         (cargo build --release --features cuda)"
    )]
    NotBuilt(DeviceSpec),
    #[error("device `{spec}`: {source}")]
    Open {
        spec: DeviceSpec,
        #[source]
        source: candle_core::Error,
    },
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = DeviceError;
    fn try_from(s: String) -> Result<Self, DeviceError> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl DeviceSpec {
    /// Opens the device. Asking for CUDA from a build without the `cuda` feature is an
    /// error naming the feature, never a silent fall back to the CPU.
    pub fn resolve(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                if !cfg!(feature = "cuda") {
                    return Err(DeviceError::NotBuilt(self));
                }
                open_cuda(ordinal).map_err(|source| DeviceError::Open { spec: self, source })
            }
        }
    }
}

/// GPU `ordinal`, opened once per process. candle's CUDA device issues work on the
/// calling thread's default stream, so a run's compute is on one stream (its training
/// thread's); a helper thread that uploads must synchronise before handing data over.
/// On first use the device's memory pool is told to keep what is freed (instead of
/// returning it to the driver at every synchronisation) and candle's per-tensor event
/// tracking is turned off (it only matters with several streams, and costs two events
/// per tensor).
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(dev) = open.get(&ordinal) {
        return Ok(dev.clone());
    }
    let dev = Device::new_cuda(ordinal)?;
    if let Device::Cuda(cuda) = &dev {
        tune(cuda, ordinal)?;
    }
    open.insert(ordinal, dev.clone());
    Ok(dev)
}

#[cfg(feature = "cuda")]
fn tune(dev: &candle_core::cuda_backend::CudaDevice, ordinal: usize) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let err = |e: result::DriverError| candle_core::Error::Cuda(Box::new(e));
    // SAFETY: driver calls on the device the context was just created for; the release
    // threshold attribute is a u64. Event tracking is off before any tensor exists, and
    // vlp uses the device's one stream only.
    unsafe {
        let cu = result::device::get(ordinal as i32).map_err(err)?;
        let pool = result::device::get_default_mem_pool(cu).map_err(err)?;
        let mut threshold: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(err)?;
        dev.disable_event_tracking();
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    Device::new_cuda(ordinal)
}

/// The host: where loaders build batches and checkpoints are read before they move to
/// the model's device.
pub fn host() -> Device {
    Device::Cpu
}

/// The device tests run on: CUDA 0 when this build has the `cuda` feature and a GPU is
/// present, the CPU otherwise — so one test body checks every device the build supports.
pub fn test_device() -> Device {
    if cfg!(feature = "cuda") {
        if let Ok(dev) = open_cuda(0) {
            return dev;
        }
    }
    Device::Cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_spellings() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "cuda:", "cuda:x", "tpu", "gpu", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                err.contains("expected `cpu`, `cuda` or `cuda:N`"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cpu_resolves_and_cuda_without_the_feature_names_it() {
        assert!(DeviceSpec::Cpu.resolve().unwrap().is_cpu());
        match DeviceSpec::Cuda(0).resolve() {
            Err(DeviceError::NotBuilt(_)) => assert!(!cfg!(feature = "cuda")),
            // A CUDA build opens the GPU, or says why it cannot; it never claims the
            // feature is missing.
            Ok(dev) => assert!(cfg!(feature = "cuda") && dev.is_cuda()),
            Err(e) => assert!(cfg!(feature = "cuda"), "{e}"),
        }
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }

    #[test]
    fn serde_round_trip_through_the_string_form() {
        #[derive(Serialize, Deserialize)]
        struct R {
            device: DeviceSpec,
        }
        let r: R = serde_json::from_str(r#"{"device":"cuda:1"}"#).unwrap();
        assert_eq!(r.device, DeviceSpec::Cuda(1));
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"device":"cuda:1"}"#);
        assert!(serde_json::from_str::<R>(r#"{"device":"cuda:x"}"#).is_err());
    }
}
