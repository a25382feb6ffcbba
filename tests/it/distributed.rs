//! Data parallelism on the CPU backend: `vlp launch --nproc-per-node 2` against its
//! definition (one process computing both ranks' gradients and averaging them), a killed
//! worker stopping the run and `--resume` continuing it exactly, and the launch errors.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vlp_core::rng::derive_seed;
use vlp_data::loader::Loader;
use vlp_data::tokenize::TextTokenizer;
use vlp_models::AlbefModel;
use vlp_train::checkpoint;
use vlp_train::objectives::itc::alpha_at;
use vlp_train::optim::{AdamW, AdamWConfig, Gradients};
use vlp_train::{pretrain_losses, Draws, StepBatch};

use crate::common::{alive, proc_stat, vlp_bin};
use crate::pretrain::{final_weights, ok, Fixture};

/// A port pair (`MASTER_PORT`, `+1`) per run, distinct across tests and test processes.
fn port(k: u16) -> u16 {
    30000 + (std::process::id() % 1000) as u16 * 16 + 2 * k
}

/// `vlp launch --nproc-per-node 2 -- pretrain` in the fixture, shards and tokenizer by
/// absolute path (the reference below opens the same ones).
fn launch(fx: &Fixture, port: u16, sets: &[&str], resume: bool) -> Command {
    let root = fx.root.display().to_string();
    let mut cmd = Command::new(vlp_bin());
    cmd.current_dir(&fx.root).args([
        "launch",
        "--nproc-per-node",
        "2",
        "--master-port",
        &port.to_string(),
        "--grace",
        "5",
        "--",
        "pretrain",
        "--recipe",
        "recipe.toml",
        "--no-progress",
        "--set",
        &format!("data.shards=\"{root}/train-{{000000..000003}}.tar\""),
        "--set",
        &format!("data.tokenizer=\"{root}/tok.json\""),
    ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

/// The definition of a data-parallel step, in this process: from the 2-process run's
/// checkpoint of step 1, rank 0's and rank 1's batches (their loaders restored from it)
/// each give gradients on the same weights; their mean is clipped and applied; the
/// momentum features enter the queues rank 0's first. Returns every variable after it.
fn serial_step(ck: &std::path::Path) -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let state = checkpoint::load_state(ck).unwrap();
    let recipe = state.recipe.clone();
    let cfg = recipe.model_config(Some(ck)).unwrap();
    let mut varmap = VarMap::new();
    let model = AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    let mut optim = AdamW::new(
        model.trainable_vars().unwrap(),
        AdamWConfig {
            weight_decay: recipe.optim.weight_decay,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    checkpoint::load_into(ck, &mut varmap, &mut optim).unwrap();
    let step = state.step;
    let seed = state.rng.clone().next_u64();
    let lr = recipe.schedule(state.total_steps).get_lr(step);
    let o = &recipe.objectives;
    let alpha = alpha_at(step, state.alpha_ramp_steps, o.alpha);
    assert!(
        alpha > 0.0 && o.itc_on() && o.itm.enabled && o.mlm_on(),
        "every objective, distilled"
    );

    let mut grads: Option<Gradients> = None;
    let mut entries = Vec::new();
    let mut first_images = Vec::new();
    for rank in 0..2usize {
        let tokenizer = TextTokenizer::from_file(
            recipe.data.tokenizer.as_ref().unwrap(),
            recipe.data.max_tokens,
        )
        .unwrap();
        let mut lc = recipe.loader_config(cfg.vision.image_size as u32, rank);
        lc.drop_last = true;
        lc.max_epochs = None;
        let mut loader = Loader::new(&recipe.data.shards, lc, tokenizer).unwrap();
        loader
            .restore(serde_json::from_value(state.loaders[rank].clone()).unwrap())
            .unwrap();
        let batch = loader.next_batch().unwrap().expect("a batch");
        first_images.push(
            batch
                .images
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        let batch = StepBatch::new(
            &batch.images,
            &batch.input_ids,
            &batch.attention_mask,
            None,
            &dev,
        )
        .unwrap();
        let losses = pretrain_losses(
            &model,
            &batch,
            o,
            alpha,
            Draws::Seeded(derive_seed(&[seed, rank as u64, 0])),
        )
        .unwrap();
        let store = vlp_models::recompute::backward(&losses.total).unwrap();
        let g = optim.gradients(&store, 1.0).unwrap();
        match &mut grads {
            Some(sum) => sum.add(&g).unwrap(),
            None => grads = Some(g),
        }
        entries.push(losses.queue_entry.expect("ITC enqueues"));
    }
    assert_ne!(
        first_images[0], first_images[1],
        "the ranks read the same data"
    );
    let mut grads = grads.unwrap();
    grads.scale(0.5).unwrap();
    let norm = grads.global_norm().unwrap();
    if let Some(max) = recipe.optim.clip_grad_norm {
        grads.clip_known_norm(norm, max).unwrap();
    }
    optim.step(&grads, lr).unwrap();
    model.momentum_update(o.momentum).unwrap();
    let cat = |f: fn(&vlp_train::QueueEntry) -> &Tensor| {
        Tensor::cat(&[f(&entries[0]), f(&entries[1])], 0).unwrap()
    };
    model
        .enqueue(&cat(|e| &e.image_feat_m), &cat(|e| &e.text_feat_m), None)
        .unwrap();
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn two_processes_take_the_step_of_both_ranks_gradients_averaged() {
    let fx = Fixture::new(128);
    ok(&launch(
        &fx,
        port(0),
        &[
            "eval.sets=[]",
            "optim.total_steps=2",
            "run.save_every=1",
            "run.out_dir=\"dp\"",
        ],
        false,
    )
    .output()
    .unwrap());
    let expected = serial_step(&fx.path("dp/checkpoints/step-000001"));
    let got = candle_core::safetensors::load(
        fx.path("dp/checkpoints/step-000002/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut queues = 0;
    for (name, want) in &expected {
        let have = got.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let d = (have.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d <= 1e-5, "{name}: differs by {d}");
        queues += name.contains("queue") as usize;
    }
    assert!(queues >= 2, "the queues are compared too");
    // The logged losses are the ranks' means, the samples both ranks'.
    let metrics = vlp_train::metrics::read(&fx.path("dp")).unwrap();
    assert_eq!(metrics.len(), 2);
    let state = checkpoint::load_state(&fx.path("dp/checkpoints/step-000002")).unwrap();
    assert_eq!(state.samples_seen, 2 * 2 * 16);
    assert_eq!(state.loaders.len(), 2);
    assert_eq!(state.recipe.data.world_size, Some(2));
}

/// The worker of `rank` among the children of process `parent` (its environment says).
fn child_with_rank(parent: u32, rank: usize) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let ppid = proc_stat(pid)
            .and_then(|f| f.get(1).cloned())
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_worker_stops_the_run_and_resume_continues_exactly() {
    let fx = Fixture::new(128);
    let common = ["eval.sets=[]", "optim.total_steps=6", "run.save_every=2"];
    let sets = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        v.push(format!("run.out_dir=\"{dir}\""));
        v
    };
    let straight = sets("straight");
    let straight: Vec<&str> = straight.iter().map(String::as_str).collect();
    ok(&launch(&fx, port(1), &straight, false).output().unwrap());

    let killed = sets("killed");
    let killed: Vec<&str> = killed.iter().map(String::as_str).collect();
    let mut launcher = launch(&fx, port(2), &killed, false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = fx.path("killed");
    let start = Instant::now();
    loop {
        let steps = checkpoint::list(&run).unwrap_or_default();
        if steps.first().is_some_and(|&s| s >= 2) {
            let pid = child_with_rank(launcher.id(), 1).expect("rank 1 runs");
            // SAFETY: kill(2) on a process of this test's making.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended before the kill"
        );
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let out: Output = launcher.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 was killed by signal 9"), "{stderr}");
    assert!(checkpoint::list(&run).unwrap().last() < Some(&6));

    ok(&launch(&fx, port(3), &killed, true).output().unwrap());
    assert_eq!(
        final_weights(&fx.path("straight"), 6),
        final_weights(&run, 6),
        "the resumed run differs from the uninterrupted one"
    );
    let steps: Vec<u64> = vlp_train::metrics::read(&run)
        .unwrap()
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
}

/// The ranks of a SIGKILLed `vlp launch` ran on as orphans, holding the run lock, and
/// panicked at their next line to the dead launcher's pipe. They now get SIGTERM when it
/// dies and stop as a signalled run does: a checkpoint, the lock released.
#[test]
fn ranks_of_a_killed_launcher_stop_with_a_checkpoint_and_free_the_run() {
    let fx = Fixture::new(128);
    let sets = [
        "eval.sets=[]",
        "optim.total_steps=400",
        "run.save_every=2",
        "run.out_dir=\"orphaned\"",
    ];
    let mut launcher = launch(&fx, port(11), &sets, false)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let run = fx.path("orphaned");
    let start = Instant::now();
    while !checkpoint::list(&run)
        .unwrap_or_default()
        .first()
        .is_some_and(|&s| s >= 2)
    {
        assert!(
            launcher.try_wait().unwrap().is_none(),
            "the run ended early"
        );
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ranks: Vec<i32> = (0..2)
        .map(|r| child_with_rank(launcher.id(), r).expect("the rank runs"))
        .collect();
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let killed = Instant::now();
    while ranks.iter().any(|&pid| alive(pid)) {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "orphaned ranks run on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let steps = checkpoint::list(&run).unwrap();
    let last = *steps.last().unwrap();
    assert!(last < 400, "{steps:?}");
    let logged = vlp_train::metrics::read(&run).unwrap().len() as u64;
    assert_eq!(last, logged, "the checkpoint is of the last step run");
    // The kernel drops the lock as the last rank's files close; on a loaded machine that
    // can trail the process's end a little.
    let freed = Instant::now();
    while let Err(e) = vlp_train::run_lock::RunLock::acquire(&run) {
        assert!(freed.elapsed() < Duration::from_secs(30), "{e}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn launch_errors_name_the_cause() {
    let fx = Fixture::new(64);
    // The recipe asks for 3 processes, 2 were started.
    let out = launch(&fx, port(4), &["eval.sets=[]", "data.world_size=3"], false)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("data.world_size = 3 but 2 process(es)"),
        "{stderr}"
    );
    // Rank 0 alone: the rendezvous names the rank that never came.
    let out = Command::new(vlp_bin())
        .current_dir(&fx.root)
        .args(["pretrain", "--recipe", "recipe.toml", "--no-progress"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port(5).to_string())
        .env("VLP_RENDEZVOUS_TIMEOUT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("rank(s) [1] of 2 did not arrive"),
        "{stderr}"
    );
    // Resuming with another world size.
    ok(&launch(
        &fx,
        port(6),
        &["eval.sets=[]", "optim.total_steps=1", "run.out_dir=\"w\""],
        false,
    )
    .output()
    .unwrap());
    let out = Command::new(vlp_bin())
        .current_dir(&fx.root)
        .args([
            "pretrain",
            "--recipe",
            "recipe.toml",
            "--no-progress",
            "--resume",
        ])
        .args(["--set", "eval.sets=[]", "--set", "run.out_dir=\"w\""])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("resume with the same world size"),
        "{stderr}"
    );
}

#[test]
fn negative_all_rank_draws_across_processes_and_is_local_alone() {
    let fx = Fixture::new(128);
    let run = |dir: &str, all: bool, procs: u16| {
        let out_dir = format!("run.out_dir=\"{dir}\"");
        let flag = format!("objectives.itm.negative_all_rank={all}");
        let sets = [
            "eval.sets=[]",
            "optim.total_steps=2",
            "run.save_every=2",
            &out_dir,
            &flag,
        ];
        match procs {
            1 => ok(&fx.pretrain(&sets, false)),
            _ => ok(&launch(&fx, port(7 + all as u16), &sets, false)
                .output()
                .unwrap()),
        };
        final_weights(&fx.path(dir), 2)
    };
    // One process: nothing to gather, the same step.
    assert_eq!(run("one-local", false, 1), run("one-all", true, 1));
    // Two processes: negatives from the other rank change the step.
    let local = run("two-local", false, 2);
    let all = run("two-all", true, 2);
    assert_ne!(local, all, "negative_all_rank had no effect");
    for r in vlp_train::metrics::read(&fx.path("two-all")).unwrap() {
        let itm = r["loss_itm"].as_f64().unwrap();
        assert!(itm.is_finite() && itm > 0.0, "{r}");
    }
}
