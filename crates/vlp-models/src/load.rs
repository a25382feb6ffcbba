//! Loading a checkpoint folder (`config.json` + `model.safetensors`) into a model: the one
//! loader of pretraining, fine-tuning, evaluation, `embed` and `score`.
//!
//! Every tensor is checked before the model sees it: missing, mis-shaped and non-finite
//! tensors are all reported together, by name. Position embeddings whose grid differs
//! from the model's are interpolated (ViT fine-tuning at a higher resolution, ALBEF §5).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::albef::AlbefModel;
use crate::config::AlbefConfig;
use crate::error::{ModelError, Result, TensorProblem};
use crate::vit::interpolate_pos_embed;

/// The model config inside a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights inside a checkpoint folder (every parameter, the momentum twin, the queues).
pub const MODEL_FILE: &str = "model.safetensors";

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `VarMap` has no `Debug`; its presence is what matters.
        f.debug_struct("LoadedModel")
            .field("model", &self.model)
            .field("trainable", &self.varmap.is_some())
            .finish()
    }
}

/// What the loaded model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Parameters are `Var`s of a fresh `VarMap`, ready for an optimizer.
    Trainable,
    /// Parameters are plain tensors: no `VarMap`, nothing to train (inference).
    Frozen,
}

/// A loaded checkpoint.
pub struct LoadedModel {
    /// Built from the folder's config at the image size asked for (`model.config()`).
    pub model: AlbefModel,
    /// The model's variables: `Some` for [`LoadMode::Trainable`].
    pub varmap: Option<VarMap>,
}

/// Loads the checkpoint folder `dir` onto `device`: `config.json`, then
/// `model.safetensors` into a model built from it, at `image_size` when given (the
/// position embeddings are then interpolated to that grid).
///
/// Errors name the file; a checkpoint with missing, mis-shaped or non-finite tensors
/// gives [`ModelError::Checkpoint`] listing every one of them.
pub fn load_model(
    dir: &Path,
    image_size: Option<usize>,
    device: &Device,
    mode: LoadMode,
) -> Result<LoadedModel> {
    let mut config = AlbefConfig::load(&dir.join(CONFIG_FILE))?;
    if let Some(size) = image_size {
        config.vision.image_size = size;
        config.validate()?;
    }
    let path = dir.join(MODEL_FILE);
    let grid = config.vision.grid();
    match mode {
        LoadMode::Frozen => {
            let tensors = read_checked(&path)?;
            // The backend records what does not fit instead of failing at the first
            // tensor, so that the error lists all of them.
            let problems = Arc::new(Mutex::new(Vec::new()));
            let backend = Checked {
                tensors,
                grid,
                problems: Arc::clone(&problems),
            };
            let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
            let built = AlbefModel::new(&config, vb);
            let problems = std::mem::take(&mut *problems.lock().expect("problems lock"));
            if !problems.is_empty() {
                return Err(ModelError::Checkpoint { path, problems });
            }
            Ok(LoadedModel {
                model: built?,
                varmap: None,
            })
        }
        LoadMode::Trainable => {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
            let model = AlbefModel::new(&config, vb)?;
            load_into_varmap(&varmap, &path, grid)?;
            Ok(LoadedModel {
                model,
                varmap: Some(varmap),
            })
        }
    }
}

/// Sets every variable of `varmap` (a built model's) from the safetensors file `path`, by
/// name, on the variables' devices and dtypes. Position embeddings are interpolated to a
/// `grid` x `grid` patch grid where their shape differs ([`fit`]). Nothing is written
/// unless every variable has a finite tensor of its shape in the file.
pub fn load_into_varmap(varmap: &VarMap, path: &Path, grid: usize) -> Result<()> {
    let tensors = read_checked(path)?;
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut problems = Vec::new();
    let mut values = Vec::with_capacity(names.len());
    for name in names {
        let var = &vars[name];
        match fit(name, tensors.get(name.as_str()), var.dims(), grid) {
            Ok(t) => values.push((var, t)),
            Err(p) => problems.push(p),
        }
    }
    if !problems.is_empty() {
        return Err(ModelError::Checkpoint {
            path: path.to_owned(),
            problems,
        });
    }
    for (var, t) in values {
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// The tensors a model built from `config` holds (parameters, momentum twin, queues), by
/// name, with their shapes. Found by building the model over a backend that hands out
/// broadcast views of one zero, so nothing the size of the model is allocated.
pub fn expected_tensors(config: &AlbefConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    let shapes = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = Shapes {
        shapes: Arc::clone(&shapes),
    };
    let host = vlp_core::device::host();
    AlbefModel::new(
        config,
        VarBuilder::from_backend(Box::new(backend), DType::F32, host),
    )?;
    let shapes = std::mem::take(&mut *shapes.lock().expect("shapes lock"));
    Ok(shapes)
}

/// Checks that the tensors `found` (name -> shape, as a file's header lists them) are
/// those a model of `config` holds: every one there, each of its exact shape. Returns
/// every problem, by name.
pub fn check_tensor_names(
    config: &AlbefConfig,
    found: &HashMap<String, Vec<usize>>,
) -> Result<Vec<TensorProblem>> {
    Ok(expected_tensors(config)?
        .into_iter()
        .filter_map(|(name, expected)| match found.get(&name) {
            None => Some(TensorProblem::Missing { name }),
            Some(shape) if *shape != expected => Some(TensorProblem::Shape {
                name,
                found: shape.clone(),
                expected,
            }),
            Some(_) => None,
        })
        .collect())
}

/// A `VarBuilder` backend that records the name and shape of every tensor asked for.
struct Shapes {
    shapes: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for Shapes {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.shapes
            .lock()
            .expect("shapes lock")
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the model asked for a tensor of unknown shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The one rule for fitting a file's tensor to the model's shape `want`: taken as it is
/// when the shapes agree; a `*pos_embed` of another shape is interpolated to `grid`;
/// anything else is a problem named after the tensor.
fn fit(
    name: &str,
    found: Option<&Tensor>,
    want: &[usize],
    grid: usize,
) -> std::result::Result<Tensor, TensorProblem> {
    let Some(t) = found else {
        return Err(TensorProblem::Missing { name: name.into() });
    };
    let t = if t.dims() != want && name.ends_with("pos_embed") {
        tracing::info!("{name} {:?} interpolated to a {grid}x{grid} grid", t.dims());
        interpolate_pos_embed(t, grid).map_err(|e| TensorProblem::Unreadable {
            name: name.into(),
            message: e.to_string(),
        })?
    } else {
        t.clone()
    };
    if t.dims() != want {
        return Err(TensorProblem::Shape {
            name: name.into(),
            found: t.dims().to_vec(),
            expected: want.to_vec(),
        });
    }
    Ok(t)
}

/// The tensors of a safetensors file, in host memory, after checking that every float
/// tensor is finite.
fn read_checked(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(ModelError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let tensors = candle_core::safetensors::load(path, &vlp_core::device::host()).map_err(|e| {
        ModelError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("invalid safetensors file: {e}"),
            ),
        }
    })?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let problems: Vec<TensorProblem> = names
        .into_iter()
        .filter_map(|name| non_finite(name, &tensors[name]))
        .collect();
    if !problems.is_empty() {
        return Err(ModelError::Checkpoint {
            path: path.to_owned(),
            problems,
        });
    }
    Ok(tensors)
}

/// The NaN and infinity counts of a float tensor, as a problem when there are any.
pub(crate) fn non_finite(name: &str, t: &Tensor) -> Option<TensorProblem> {
    if !t.dtype().is_float() {
        return None;
    }
    // f32 holds every value of the narrower float types, NaN and Inf included.
    let values = match t.dtype() {
        DType::F64 => t
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .map(|v| count_non_finite(v.into_iter())),
        _ => t
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map(|v| count_non_finite(v.into_iter().map(f64::from))),
    };
    match values {
        Ok((0, 0)) => None,
        Ok((nan, inf)) => Some(TensorProblem::NonFinite {
            name: name.into(),
            nan,
            inf,
        }),
        Err(e) => Some(TensorProblem::Unreadable {
            name: name.into(),
            message: e.to_string(),
        }),
    }
}

/// `(NaN count, infinity count)`.
fn count_non_finite(values: impl Iterator<Item = f64>) -> (usize, usize) {
    values.fold((0, 0), |(nan, inf), x| {
        (
            nan + usize::from(x.is_nan()),
            inf + usize::from(x.is_infinite()),
        )
    })
}

/// A `VarBuilder` backend over a checkpoint's tensors that fits each requested tensor
/// with [`fit`] and records what does not fit (handing out zeros in its place), so that
/// one pass over the model finds every problem.
struct Checked {
    tensors: HashMap<String, Tensor>,
    grid: usize,
    problems: Arc<Mutex<Vec<TensorProblem>>>,
}

impl SimpleBackend for Checked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match fit(name, self.tensors.get(name), s.dims(), self.grid) {
            Ok(t) => t.to_device(dev)?.to_dtype(dtype),
            Err(problem) => {
                self.problems.lock().expect("problems lock").push(problem);
                Tensor::zeros(s, dtype, dev)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_device(dev)?.to_dtype(dtype),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlp_core::device::test_device;

    /// A trained-looking checkpoint folder of the micro model; returns its varmap.
    fn write_checkpoint(dir: &Path) -> VarMap {
        let cfg = crate::test_support::micro_config();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &vlp_core::device::host());
        AlbefModel::new(&cfg, vb).unwrap();
        cfg.save(&dir.join(CONFIG_FILE)).unwrap();
        varmap.save(dir.join(MODEL_FILE)).unwrap();
        varmap
    }

    fn tensors_of(dir: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(dir.join(MODEL_FILE), &vlp_core::device::host()).unwrap()
    }

    fn rewrite(dir: &Path, tensors: &HashMap<String, Tensor>) {
        candle_core::safetensors::save(tensors, dir.join(MODEL_FILE)).unwrap();
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b
            .to_device(a.device())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn frozen_and_trainable_loads_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path());
        let saved = tensors_of(dir.path());
        let dev = test_device();
        let images = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
        let mut features = Vec::new();
        for mode in [LoadMode::Frozen, LoadMode::Trainable] {
            let loaded = load_model(dir.path(), None, &dev, mode).unwrap();
            assert_eq!(loaded.model.config(), &crate::test_support::micro_config());
            assert_eq!(loaded.varmap.is_some(), mode == LoadMode::Trainable);
            let (_, feat) = loaded.model.encode_image(&images, false).unwrap();
            features.push(feat);
            if let Some(varmap) = &loaded.varmap {
                let vars = varmap.data().lock().unwrap();
                for (name, var) in vars.iter() {
                    assert_eq!(max_diff(var.as_tensor(), &saved[name]), 0.0, "{name}");
                }
            }
        }
        assert_eq!(max_diff(&features[0], &features[1]), 0.0);
    }

    #[test]
    fn position_embeddings_are_interpolated_to_the_asked_image_size() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path());
        let saved = tensors_of(dir.path());
        let expected = interpolate_pos_embed(&saved["visual_encoder.pos_embed"], 6).unwrap();
        for mode in [LoadMode::Frozen, LoadMode::Trainable] {
            let loaded = load_model(dir.path(), Some(48), &test_device(), mode).unwrap();
            assert_eq!(loaded.model.config().vision.image_size, 48);
            let pos = loaded.model.visual_encoder().pos_embed();
            assert_eq!(pos.dims(), &[1, 37, 32]);
            assert_eq!(max_diff(pos, &expected), 0.0);
        }
        // 36 is not a multiple of the patch size 8.
        let err = load_model(dir.path(), Some(36), &test_device(), LoadMode::Frozen).unwrap_err();
        assert!(err.to_string().contains("image_size"), "{err}");
    }

    #[test]
    fn non_finite_tensors_are_named_with_their_counts() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path());
        let mut tensors = tensors_of(dir.path());
        let host = vlp_core::device::host();
        let name = "visual_encoder.blocks.0.attn.qkv.weight";
        let w = &tensors[name];
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = f32::NAN;
        v[5] = f32::NAN;
        v[9] = f32::NAN;
        let bad = Tensor::from_vec(v, w.shape(), &host).unwrap();
        tensors.insert(name.into(), bad);
        tensors.insert("temp".into(), Tensor::new(f32::INFINITY, &host).unwrap());
        rewrite(dir.path(), &tensors);
        for mode in [LoadMode::Frozen, LoadMode::Trainable] {
            let err = load_model(dir.path(), None, &test_device(), mode).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ModelError::Checkpoint { .. }), "{msg}");
            assert!(msg.contains(MODEL_FILE), "{msg}");
            assert!(
                msg.contains(&format!("non-finite values in {name} (3 NaN)")),
                "{msg}"
            );
            assert!(msg.contains("non-finite values in temp (1 Inf)"), "{msg}");
        }
    }

    #[test]
    fn missing_and_mis_shaped_tensors_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path());
        let mut tensors = tensors_of(dir.path());
        tensors.remove("itm_head.weight");
        tensors.remove("text_proj_m.bias");
        let host = vlp_core::device::host();
        tensors.insert(
            "vision_proj.bias".into(),
            Tensor::zeros(3, DType::F32, &host).unwrap(),
        );
        rewrite(dir.path(), &tensors);
        for mode in [LoadMode::Frozen, LoadMode::Trainable] {
            let msg = load_model(dir.path(), None, &test_device(), mode)
                .unwrap_err()
                .to_string();
            for part in [
                "missing tensor itm_head.weight",
                "missing tensor text_proj_m.bias",
                "vision_proj.bias is [3], the model's [16]",
            ] {
                assert!(msg.contains(part), "{part}: {msg}");
            }
        }
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_model(dir.path(), None, &test_device(), LoadMode::Frozen).unwrap_err();
        assert!(err.to_string().contains(CONFIG_FILE), "{err}");
        crate::test_support::micro_config()
            .save(&dir.path().join(CONFIG_FILE))
            .unwrap();
        for mode in [LoadMode::Frozen, LoadMode::Trainable] {
            let err = load_model(dir.path(), None, &test_device(), mode).unwrap_err();
            assert!(err.to_string().contains(MODEL_FILE), "{err}");
        }
    }
}
