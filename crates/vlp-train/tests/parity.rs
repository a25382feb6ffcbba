//! Loss parity of one pretraining step against the PyTorch reference implementation of
//! ALBEF's step (`tests/fixtures/albef/`: the model before the step, the batch with the
//! reference's draws, and the expected losses, temperature, queue pointer and gradient
//! norms). The model is built with dropout 0 and the draws are replayed. It runs on
//! `test_device()`: the CPU, or the GPU in a CUDA build on a machine that has one (the
//! GPU check runs it there, so the CUDA kernels meet the same tolerances).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vlp_core::device::test_device;
use vlp_models::import::names::Format;
use vlp_models::import::{import_checkpoint, load_config, ImportOptions};
use vlp_models::AlbefModel;
use vlp_train::objectives::ObjectiveConfig;
use vlp_train::{pretrain_losses, Draws, StepBatch};

const LOSS_TOLERANCE: f64 = 1e-4;
const GRAD_RELATIVE_TOLERANCE: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/albef")
}

/// The fixture model in a `VarMap`, so its online parameters are trainable variables.
fn fixture_model(dir: &Path) -> (VarMap, AlbefModel) {
    let mut cfg = load_config(&dir.join("config.json")).expect("fixture config");
    cfg.text.dropout = 0.0;
    let opts = ImportOptions {
        format: Some(Format::AlbefPth),
        ..Default::default()
    };
    let imported = import_checkpoint(&dir.join("albef.safetensors"), Some(&cfg), &opts)
        .expect("import the fixture checkpoint");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &test_device());
    let model = AlbefModel::new(&cfg, vb).expect("build the model");
    {
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            let t = imported
                .tensors
                .get(name)
                .unwrap_or_else(|| panic!("the import lacks `{name}`"));
            var.set(
                &t.to_dtype(var.dtype())
                    .unwrap()
                    .to_device(var.device())
                    .unwrap(),
            )
            .unwrap();
        }
    }
    (varmap, model)
}

fn indices(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

#[test]
fn one_step_matches_the_reference_losses_and_gradients() {
    let dir = fixture_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let dev = test_device();
    eprintln!("parity on {dev:?}");
    let inputs: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("inputs.safetensors"), &dev).unwrap();
    let (_varmap, model) = fixture_model(&dir);
    assert_eq!(
        model.queue_ptr().unwrap() as u64,
        expected["queue_ptr_before"].as_u64().unwrap()
    );

    let batch = StepBatch::new(
        &inputs["images"],
        &inputs["input_ids"],
        &inputs["attention_mask"],
        None,
        &dev,
    )
    .unwrap();
    let draws = Draws::Replay {
        neg_image_for_text: indices(&inputs["neg_image_for_text"]),
        neg_text_for_image: indices(&inputs["neg_text_for_image"]),
        mlm_input_ids: inputs["mlm_input_ids"].clone(),
        mlm_labels: inputs["mlm_labels"].clone(),
    };
    let alpha = f64::from(inputs["alpha"].to_scalar::<f32>().unwrap());
    let cfg = ObjectiveConfig {
        momentum: expected["momentum"].as_f64().unwrap(),
        ..Default::default()
    };
    // The reference's forward starts with the momentum update (vlp ends the previous
    // step with it) and enqueues before ITM (vlp after the step's backward).
    model.momentum_update(cfg.momentum).unwrap();
    let losses = pretrain_losses(&model, &batch, &cfg, alpha, draws).unwrap();
    let entry = losses.queue_entry.as_ref().expect("ITC enqueues");
    model
        .enqueue(
            &entry.image_feat_m,
            &entry.text_feat_m,
            entry.image_ids.as_ref(),
        )
        .unwrap();

    for name in ["itc", "itm", "mlm", "total"] {
        let want = expected["losses"][name].as_f64().unwrap();
        let got = losses.part(name).unwrap().unwrap();
        eprintln!(
            "parity {name}: {got:.9} vs {want:.9} (diff {:.3e})",
            got - want
        );
        assert!(
            (got - want).abs() <= LOSS_TOLERANCE,
            "{name}: {got} vs {want}"
        );
    }
    let want_temp = expected["temp"].as_f64().unwrap();
    let temp = f64::from(losses.temp.to_scalar::<f32>().unwrap());
    assert!((temp - want_temp).abs() <= 1e-7, "temp {temp}");
    assert_eq!(
        losses.stats.masked_tokens as u64,
        expected["masked_tokens"].as_u64().unwrap()
    );
    assert_eq!(losses.stats.itm_fallbacks, 0);
    assert_eq!(
        model.queue_ptr().unwrap() as u64,
        expected["queue_ptr_after"].as_u64().unwrap()
    );

    let grads = losses.total.backward().unwrap();
    let norm = |t: &Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let vars = model.trainable_vars().unwrap();
    let mut total_sq = 0.0;
    let mut norms = HashMap::new();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("`{name}` got no gradient"));
        let n = norm(g);
        total_sq += n * n;
        norms.insert(name.as_str(), n);
    }
    let check = |what: &str, got: f64, want: f64| {
        let rel = (got - want).abs() / want.abs().max(1e-12);
        eprintln!("parity grad {what}: {got:.9} vs {want:.9} (relative {rel:.3e})");
        assert!(rel <= GRAD_RELATIVE_TOLERANCE, "{what}: {got} vs {want}");
    };
    for (name, want) in expected["grad_norms"].as_object().unwrap() {
        let got = *norms
            .get(name.as_str())
            .unwrap_or_else(|| panic!("no trainable parameter `{name}`"));
        check(name, got, want.as_f64().unwrap());
    }
    check(
        "total",
        total_sq.sqrt(),
        expected["grad_norm_total"].as_f64().unwrap(),
    );
}
