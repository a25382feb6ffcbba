//! The streaming loader: shard specs in, batches of candle tensors out.
//!
//! Pipeline, per worker thread (like one PyTorch DataLoader worker running WebDataset):
//! its slice of the shards (epoch order shuffled by `seed + epoch`, split by rank and
//! worker; or, in resampled mode, shards drawn with replacement) -> samples grouped from
//! the tar stream -> a shuffle buffer of raw samples -> parse fields, clean and pick a
//! caption, decode and transform the image -> batches, tokenised and padded to the
//! longest caption. The calling thread takes whole batches from the workers in a fixed
//! round-robin order, so the batch sequence depends on the seed only, never on timing.
//!
//! Resume: every batch carries its worker's position *after* that batch (shard cursor,
//! sample offset in the shard, the positions of the samples in the shuffle buffer, the
//! RNG state). [`Loader::state`] is the position after the last batch handed out;
//! restoring it re-reads the few shards the buffer points into and continues with exactly
//! the batches an uninterrupted run would have produced.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvError, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::caption::usable_captions;
use crate::error::{DataError, Result};
use crate::fields::{parse_sample, FieldsConfig};
use crate::image_ops::{
    decode_rgb, DecodeError, ImageTransform, ImageTransformer, Normalization, TrainTransform,
};
use crate::rng::{derive_seed, Rng};
use crate::shard::{read_shard_with, RawSample};
use crate::source::Patience;
use crate::spec::{expand_spec, ShardUrl};
use crate::stats::{BadDataPolicy, Skip, SkipCounts, SkipReason, WarnLimiter};
use crate::tokenize::TextTokenizer;

/// Version of the serialised [`LoaderState`].
pub const STATE_VERSION: u32 = 1;

/// How shards are drawn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every shard once per epoch, in a per-epoch shuffled order.
    #[default]
    Epochs,
    /// Shards drawn with replacement, forever (WebDataset's `ResampledShards`).
    Resampled,
}

/// Which caption of a multi-caption sample goes into the batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptionChoice {
    /// A random one each time the sample is drawn (training).
    #[default]
    Random,
    /// Always the first.
    First,
}

/// Loader options. Defaults follow ALBEF's pretraining data path where it has one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Worker threads; each reads its own slice of the shards.
    pub workers: usize,
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
    pub mode: Mode,
    /// Shuffle the shard order each epoch (epochs mode).
    pub shuffle_shards: bool,
    /// Samples held by each worker's shuffle buffer; 0 or 1 disables sample shuffling.
    pub shuffle_buffer: usize,
    /// Samples gathered before the first one leaves the buffer (it then grows to full size).
    pub shuffle_initial: usize,
    /// Drop each worker's last, incomplete batch of an epoch.
    pub drop_last: bool,
    /// Finished batches queued per worker (bounds memory).
    pub prefetch: usize,
    /// Stop after this many epochs (epochs mode); `None` runs forever.
    pub max_epochs: Option<u64>,
    pub on_bad_data: BadDataPolicy,
    /// Images with more pixels are skipped before decoding (PIL's limit by default).
    pub max_pixels: u64,
    pub fields: FieldsConfig,
    pub caption_choice: CaptionChoice,
    /// Caption cleaning keeps at most this many words (ALBEF's `max_words`).
    pub max_words: usize,
    /// Tokens per caption including `[CLS]`/`[SEP]`.
    pub max_tokens: usize,
    pub image: ImageTransform,
    pub normalization: Normalization,
    /// Seconds a `pipe:` shard may send nothing before it is given up on (a problem
    /// naming it: skipped and counted, or the error under `fail`); 0 waits forever.
    pub stall_timeout_s: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            workers: 2,
            rank: 0,
            world_size: 1,
            seed: 0,
            mode: Mode::Epochs,
            shuffle_shards: true,
            shuffle_buffer: 1000,
            shuffle_initial: 100,
            drop_last: false,
            prefetch: 2,
            max_epochs: None,
            on_bad_data: BadDataPolicy::Skip,
            max_pixels: vlp_core::MAX_IMAGE_PIXELS,
            fields: FieldsConfig::default(),
            caption_choice: CaptionChoice::Random,
            max_words: 30,
            max_tokens: 30,
            image: ImageTransform::Train(TrainTransform::albef_pretrain(256)),
            normalization: Normalization::Clip,
            stall_timeout_s: crate::source::DEFAULT_STALL.as_secs(),
        }
    }
}

impl LoaderConfig {
    fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("workers", self.workers),
            ("world_size", self.world_size),
            ("prefetch", self.prefetch),
            ("max_words", self.max_words),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(DataError::config(name, "must be at least 1"));
            }
        }
        if self.rank >= self.world_size {
            return Err(DataError::config(
                "rank",
                format!(
                    "rank {} is not below world_size {}",
                    self.rank, self.world_size
                ),
            ));
        }
        if self.image_size() == 0 {
            return Err(DataError::config("image.size", "must be at least 1"));
        }
        Ok(())
    }

    fn image_size(&self) -> usize {
        self.image.output_size() as usize
    }
}

/// One batch, as the training loop sees it.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, 3, S, S]` f32, normalised.
    pub images: Tensor,
    /// `[B, L]` u32, padded to the longest caption of the batch.
    pub input_ids: Tensor,
    /// `[B, L]` u32, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// `__key__` of each sample.
    pub keys: Vec<String>,
    /// `__url__` of each sample.
    pub urls: Vec<Arc<str>>,
    /// Image id of each sample (for image-id-aware positives).
    pub image_ids: Vec<String>,
    /// The cleaned caption that was tokenised.
    pub captions: Vec<String>,
    pub epoch: u64,
    /// The worker that made the batch.
    pub worker: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Position of one sample: the worker's shard cursor and the index in that shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SamplePos {
    pub cursor: u64,
    pub index: u64,
}

/// Where one worker stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Index into the worker's shard sequence of the shard being read.
    pub cursor: u64,
    /// Samples of that shard already taken into the buffer.
    pub offset: u64,
    /// Samples in the shuffle buffer, in buffer order.
    pub buffer: Vec<SamplePos>,
    /// Samples that have left the buffer this epoch (drives the buffer's growth).
    pub emitted: u64,
    /// Shuffle, caption and augmentation randomness.
    pub rng: Rng,
    /// The worker has finished its epoch.
    pub done: bool,
    /// Samples delivered in batches this epoch.
    pub delivered: u64,
    /// Samples read from shards this epoch, good or bad (for the no-batch error).
    /// Defaults to 0 so that states saved before it existed still load.
    #[serde(default)]
    pub read: u64,
    /// Skips counted this epoch.
    pub skipped: SkipCounts,
}

impl WorkerState {
    fn fresh(seed: u64) -> Self {
        WorkerState {
            cursor: 0,
            offset: 0,
            buffer: Vec::new(),
            emitted: 0,
            rng: Rng::new(seed),
            done: false,
            delivered: 0,
            read: 0,
            skipped: SkipCounts::default(),
        }
    }
}

/// The loader's serialisable position. Restoring it requires the same shard list and
/// the same seed, rank, world size, worker count, batch size and buffer settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub version: u32,
    pub epoch: u64,
    /// The worker whose batch comes next.
    pub next_worker: usize,
    pub workers: Vec<WorkerState>,
    /// What the state is only valid for.
    pub fingerprint: Fingerprint,
}

/// The settings a [`LoaderState`] depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub shards: usize,
    pub shard_list_hash: u64,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    pub workers: usize,
    pub batch_size: usize,
    pub shuffle_buffer: usize,
    pub shuffle_initial: usize,
    pub mode: Mode,
}

impl LoaderState {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|source| DataError::Json {
            what: "loader state".into(),
            source,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| DataError::Json {
            what: "loader state".into(),
            source,
        })
    }
}

/// Per-epoch totals, logged at the end of each epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochSummary {
    pub epoch: u64,
    pub samples: u64,
    pub batches: u64,
    pub skipped: SkipCounts,
}

enum WorkerMsg {
    Batch(Box<Batch>, Box<WorkerState>),
    Done(Box<WorkerState>),
    Failed(DataError),
}

struct Running {
    receivers: Vec<Receiver<WorkerMsg>>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The streaming loader. Iterate it (or call [`Loader::next_batch`]) for batches.
pub struct Loader {
    cfg: LoaderConfig,
    urls: Arc<Vec<ShardUrl>>,
    tokenizer: Arc<TextTokenizer>,
    state: LoaderState,
    running: Option<Running>,
    batches_this_epoch: u64,
    summaries: Vec<EpochSummary>,
    finished: bool,
}

impl Loader {
    /// A loader over the shards of `spec` (see [`crate::spec`]).
    pub fn new(spec: &str, cfg: LoaderConfig, tokenizer: TextTokenizer) -> Result<Self> {
        Self::from_urls(expand_spec(spec)?, cfg, tokenizer)
    }

    pub fn from_urls(
        urls: Vec<ShardUrl>,
        cfg: LoaderConfig,
        tokenizer: TextTokenizer,
    ) -> Result<Self> {
        cfg.validate()?;
        if urls.is_empty() {
            return Err(DataError::NoShards {
                spec: "(an empty shard list)".into(),
            });
        }
        let slots = cfg.world_size * cfg.workers;
        if cfg.mode == Mode::Epochs && urls.len() < cfg.world_size {
            // A rank without a shard has no batch: the others would wait for it.
            return Err(DataError::config(
                "world_size",
                format!(
                    "{} shard(s) for {} processes: each process reads whole shards, so it \
                     needs at least one; write more, smaller shards (`vlp shards write \
                     --per-shard`), or sample with replacement (data.mode = \"resampled\")",
                    urls.len(),
                    cfg.world_size
                ),
            ));
        }
        if cfg.mode == Mode::Epochs && urls.len() < slots {
            tracing::warn!(
                shards = urls.len(),
                slots,
                "fewer shards than ranks x workers: some workers get no data each epoch"
            );
        }
        let fingerprint = Fingerprint {
            shards: urls.len(),
            shard_list_hash: hash_urls(&urls),
            seed: cfg.seed,
            rank: cfg.rank,
            world_size: cfg.world_size,
            workers: cfg.workers,
            batch_size: cfg.batch_size,
            shuffle_buffer: cfg.shuffle_buffer,
            shuffle_initial: cfg.shuffle_initial,
            mode: cfg.mode,
        };
        let state = LoaderState {
            version: STATE_VERSION,
            epoch: 0,
            next_worker: 0,
            workers: fresh_workers(&cfg, 0),
            fingerprint,
        };
        Ok(Loader {
            cfg,
            urls: Arc::new(urls),
            tokenizer: Arc::new(tokenizer),
            state,
            running: None,
            batches_this_epoch: 0,
            summaries: Vec::new(),
            finished: false,
        })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    pub fn shards(&self) -> &[ShardUrl] {
        &self.urls
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Summaries of the epochs completed so far.
    pub fn epoch_summaries(&self) -> &[EpochSummary] {
        &self.summaries
    }

    /// The position after the last batch handed out.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Continues from `state`: the following batches are those an uninterrupted run
    /// would have produced after the batch at which `state` was taken.
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        if state.version != STATE_VERSION {
            return Err(DataError::Resume {
                reason: format!(
                    "state version {} (this build reads {STATE_VERSION})",
                    state.version
                ),
            });
        }
        if state.fingerprint != self.state.fingerprint {
            return Err(DataError::Resume {
                reason: format!(
                    "the state was saved for {:?}, this loader is {:?}",
                    state.fingerprint, self.state.fingerprint
                ),
            });
        }
        if state.workers.len() != self.cfg.workers || state.next_worker >= self.cfg.workers {
            return Err(DataError::Resume {
                reason: "worker count does not match".into(),
            });
        }
        self.running = None;
        self.state = state;
        self.finished = false;
        Ok(())
    }

    /// Samples this rank sees in `epoch`, from the shards' manifests (`None` when a shard
    /// has no manifest entry, or in resampled mode). Skipped samples are not subtracted.
    pub fn samples_in_epoch(&self, epoch: u64) -> Option<u64> {
        if self.cfg.mode == Mode::Resampled {
            return None;
        }
        let paths: Vec<std::path::PathBuf> = self
            .urls
            .iter()
            .map(|u| match u {
                ShardUrl::Local(p) => Some(p.clone()),
                ShardUrl::Pipe(_) => None,
            })
            .collect::<Option<_>>()?;
        let counts = crate::writer::manifest_counts(&paths);
        let order = epoch_order(&self.cfg, self.urls.len(), epoch);
        let slots = self.cfg.world_size * self.cfg.workers;
        let mut total = 0;
        for (i, shard) in order.iter().enumerate() {
            if i % slots / self.cfg.workers == self.cfg.rank {
                total += counts[*shard]?;
            }
        }
        Some(total)
    }

    /// The next batch; `Ok(None)` once `max_epochs` epochs are done.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        loop {
            if self.finished {
                return Ok(None);
            }
            if self.running.is_none() {
                if self.state.workers.iter().all(|w| w.done) {
                    self.end_epoch()?;
                    continue;
                }
                self.running = Some(self.spawn());
            }
            let w = self.state.next_worker;
            let msg = self.wait_for(w)?;
            match msg {
                Ok(WorkerMsg::Batch(batch, after)) => {
                    self.state.workers[w] = *after;
                    self.advance_worker();
                    self.batches_this_epoch += 1;
                    return Ok(Some(*batch));
                }
                Ok(WorkerMsg::Done(after)) => {
                    self.state.workers[w] = *after;
                    if self.state.workers.iter().all(|s| s.done) {
                        self.running = None;
                        self.end_epoch()?;
                    } else {
                        self.advance_worker();
                    }
                }
                Ok(WorkerMsg::Failed(e)) => {
                    self.running = None;
                    self.finished = true;
                    return Err(e);
                }
                Err(_) => {
                    self.running = None;
                    self.finished = true;
                    return Err(DataError::Resume {
                        reason: format!("worker {w} stopped unexpectedly"),
                    });
                }
            }
        }
    }

    /// Worker `w`'s next message, waited for in short slices so that a signal (the stop
    /// request in `vlp_core::interrupt`) ends the wait even when a source sends nothing.
    fn wait_for(&mut self, w: usize) -> Result<std::result::Result<WorkerMsg, RecvError>> {
        let rx = &self.running.as_ref().expect("spawned above").receivers[w];
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(msg) => return Ok(Ok(msg)),
                Err(RecvTimeoutError::Disconnected) => return Ok(Err(RecvError)),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(signal) = vlp_core::interrupt::requested() {
                        return Err(DataError::Interrupted { signal });
                    }
                }
            }
        }
    }

    fn advance_worker(&mut self) {
        let n = self.cfg.workers;
        for step in 1..=n {
            let candidate = (self.state.next_worker + step) % n;
            if !self.state.workers[candidate].done {
                self.state.next_worker = candidate;
                return;
            }
        }
    }

    /// Closes the epoch: logs its summary and sets up the next one. An epoch that handed
    /// out no batch at all is an error: the next one would read the same shards and give
    /// nothing again, so without it a training loop would wait forever on empty epochs.
    fn end_epoch(&mut self) -> Result<()> {
        let mut summary = EpochSummary {
            epoch: self.state.epoch,
            batches: self.batches_this_epoch,
            ..Default::default()
        };
        let mut read = 0;
        for w in &self.state.workers {
            summary.samples += w.delivered;
            read += w.read;
            summary.skipped.merge(&w.skipped);
        }
        tracing::info!(
            "epoch {} (rank {}): {} samples in {} batches; skipped: {}",
            summary.epoch,
            self.cfg.rank,
            summary.samples,
            summary.batches,
            summary.skipped
        );
        // `delivered` survives a restore, unlike `batches_this_epoch`: a state saved after
        // the last batch of an epoch must not look like an empty epoch.
        if summary.samples == 0 {
            self.finished = true;
            let detail = self.no_batch_detail(read, &summary.skipped);
            self.summaries.push(summary);
            return Err(DataError::NoBatch {
                epoch: self.state.epoch,
                batch_size: self.cfg.batch_size,
                detail,
            });
        }
        self.summaries.push(summary);
        self.state.epoch += 1;
        self.state.next_worker = 0;
        self.state.workers = fresh_workers(&self.cfg, self.state.epoch);
        self.batches_this_epoch = 0;
        if self.cfg.max_epochs.is_some_and(|m| self.state.epoch >= m) {
            self.finished = true;
        }
        Ok(())
    }

    /// What an epoch without a batch read, and the likely reason, for [`DataError::NoBatch`].
    fn no_batch_detail(&self, read: u64, skipped: &SkipCounts) -> String {
        let usable = read.saturating_sub(skipped.samples());
        let mut detail = format!(
            "rank {}: {read} samples read, {} of them skipped; skipped: {}",
            self.cfg.rank,
            skipped.samples(),
            skipped
        );
        let slots = self.cfg.world_size * self.cfg.workers;
        if self.urls.len() <= self.cfg.rank * self.cfg.workers {
            detail.push_str(&format!(
                "; this rank got no shard: {} shards for {} ranks x {} workers",
                self.urls.len(),
                self.cfg.world_size,
                self.cfg.workers
            ));
        } else if usable > 0 && self.cfg.drop_last {
            detail.push_str(&format!(
                "; {usable} usable samples never filled a batch of {} in one worker, and drop_last drops each worker's short last batch ({} shards over {slots} ranks x workers)",
                self.cfg.batch_size,
                self.urls.len()
            ));
        }
        detail
    }

    fn spawn(&self) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for (w, st) in self.state.workers.iter().enumerate() {
            let (tx, rx) = sync_channel(self.cfg.prefetch);
            receivers.push(rx);
            let ctx = WorkerCtx {
                cfg: self.cfg.clone(),
                urls: Arc::clone(&self.urls),
                tokenizer: Arc::clone(&self.tokenizer),
                worker: w,
                epoch: self.state.epoch,
                shards: worker_shards(&self.cfg, self.urls.len(), self.state.epoch, w),
                stop: Arc::clone(&stop),
            };
            let st = st.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vlp-loader-{w}"))
                .spawn(move || run_worker(ctx, st, tx))
                .expect("spawning a loader thread");
            handles.push(handle);
        }
        Running {
            receivers,
            stop,
            handles,
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch().transpose()
    }
}

fn hash_urls(urls: &[ShardUrl]) -> u64 {
    urls.iter().fold(0, |acc, u| {
        let bytes = u.to_string();
        crate::rng::mix64(acc ^ vlp_core::hash::fnv1a64(bytes.as_bytes()))
    })
}

fn fresh_workers(cfg: &LoaderConfig, epoch: u64) -> Vec<WorkerState> {
    (0..cfg.workers)
        .map(|w| {
            WorkerState::fresh(derive_seed(&[
                cfg.seed,
                epoch,
                cfg.rank as u64,
                w as u64,
                1,
            ]))
        })
        .collect()
}

/// The shard order of an epoch (indices into the shard list).
fn epoch_order(cfg: &LoaderConfig, n: usize, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.shuffle_shards {
        Rng::new(derive_seed(&[cfg.seed, epoch, 0x5_4A2D])).shuffle(&mut order);
    }
    order
}

/// Which shards a worker reads.
enum WorkerShards {
    /// Epochs mode: this list, in order.
    List(Vec<usize>),
    /// Resampled mode: the shard at cursor k is drawn from (seed, rank, worker, k).
    Resampled { n: usize, seed: u64 },
}

impl WorkerShards {
    fn at(&self, cursor: u64) -> Option<usize> {
        match self {
            WorkerShards::List(list) => list.get(cursor as usize).copied(),
            WorkerShards::Resampled { n, seed } => {
                Some((derive_seed(&[*seed, cursor]) % *n as u64) as usize)
            }
        }
    }
}

fn worker_shards(cfg: &LoaderConfig, n: usize, epoch: u64, worker: usize) -> WorkerShards {
    match cfg.mode {
        Mode::Epochs => {
            let slots = cfg.world_size * cfg.workers;
            let slot = cfg.rank * cfg.workers + worker;
            let list = epoch_order(cfg, n, epoch)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % slots == slot)
                .map(|(_, s)| s)
                .collect();
            WorkerShards::List(list)
        }
        Mode::Resampled => WorkerShards::Resampled {
            n,
            seed: derive_seed(&[cfg.seed, cfg.rank as u64, worker as u64, 0xE5A]),
        },
    }
}

struct WorkerCtx {
    cfg: LoaderConfig,
    urls: Arc<Vec<ShardUrl>>,
    tokenizer: Arc<TextTokenizer>,
    worker: usize,
    epoch: u64,
    shards: WorkerShards,
    stop: Arc<AtomicBool>,
}

impl WorkerCtx {
    /// How this worker's `pipe:` reads wait: the configured stall limit, and the
    /// loader's stop flag, so that dropping the loader never waits on a stalled command.
    fn patience(&self) -> Patience {
        Patience {
            stall: (self.cfg.stall_timeout_s > 0)
                .then(|| std::time::Duration::from_secs(self.cfg.stall_timeout_s)),
            stop: Some(Arc::clone(&self.stop)),
        }
    }
}

/// A batch being filled by one worker.
struct Pending {
    images: Vec<f32>,
    keys: Vec<String>,
    urls: Vec<Arc<str>>,
    image_ids: Vec<String>,
    captions: Vec<String>,
}

impl Pending {
    fn new(cfg: &LoaderConfig) -> Self {
        let s = cfg.image_size();
        Pending {
            images: Vec::with_capacity(cfg.batch_size * 3 * s * s),
            keys: Vec::with_capacity(cfg.batch_size),
            urls: Vec::with_capacity(cfg.batch_size),
            image_ids: Vec::with_capacity(cfg.batch_size),
            captions: Vec::with_capacity(cfg.batch_size),
        }
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

struct Worker {
    ctx: WorkerCtx,
    st: WorkerState,
    buffer: Vec<RawSample>,
    pending: Pending,
    transformer: ImageTransformer,
    warn: WarnLimiter,
    tx: SyncSender<WorkerMsg>,
    /// Resampled mode: shards drawn since the last sign of progress (a usable sample, or
    /// the shuffle buffer growing), bounded by [`resampled_draw_limit`]. Not part of the
    /// state: it only decides when to give up, never what a batch holds.
    fruitless_draws: u64,
}

/// Resampled mode never ends an epoch, so "no batch" must be decided by counting draws:
/// this many shards drawn in a row without a usable sample mean the shards hold none.
/// With even one good shard in `n`, missing it `8n` times in a row has odds of about
/// e^-8 (3 in 10,000); with more good shards they vanish.
fn resampled_draw_limit(shards: usize) -> u64 {
    (shards as u64).saturating_mul(8).max(64)
}

/// Why a worker stopped early.
enum Halt {
    /// The loader was dropped or restored.
    Stopped,
    /// Bad data under the `fail` policy, or a resume that cannot be honoured.
    Failed(DataError),
}

fn run_worker(ctx: WorkerCtx, st: WorkerState, tx: SyncSender<WorkerMsg>) {
    let transformer = ImageTransformer::new(ctx.cfg.image.clone(), ctx.cfg.normalization);
    let pending = Pending::new(&ctx.cfg);
    let mut worker = Worker {
        ctx,
        st,
        buffer: Vec::new(),
        pending,
        transformer,
        warn: WarnLimiter::default(),
        tx,
        fruitless_draws: 0,
    };
    match worker.run() {
        Ok(()) | Err(Halt::Stopped) => {}
        Err(Halt::Failed(e)) => {
            let _ = worker.tx.send(WorkerMsg::Failed(e));
        }
    }
}

impl Worker {
    fn run(&mut self) -> std::result::Result<(), Halt> {
        if self.st.done {
            return self.send_done();
        }
        self.refill_buffer()?;
        while let Some(shard) = self.ctx.shards.at(self.st.cursor) {
            let url = self.ctx.urls[shard].clone();
            let mut halt = None;
            let outcome = read_shard_with(&url, self.st.offset, &self.ctx.patience(), |raw| {
                self.st.offset = raw.index + 1;
                match self.push(raw) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(h) => {
                        halt = Some(h);
                        ControlFlow::Break(())
                    }
                }
            });
            if let Some(h) = halt {
                return Err(h);
            }
            if let Some(problem) = outcome.problem {
                self.skip(problem)?;
            }
            self.st.cursor += 1;
            self.st.offset = 0;
            if let WorkerShards::Resampled { n, .. } = self.ctx.shards {
                self.fruitless_draws += 1;
                if self.fruitless_draws >= resampled_draw_limit(n) {
                    return Err(Halt::Failed(self.no_usable_sample(n)));
                }
            }
        }
        // End of the epoch: drain the buffer in random order, then the last batch.
        while !self.buffer.is_empty() {
            self.pop_one()?;
        }
        if self.pending.len() > 0 && !self.ctx.cfg.drop_last {
            self.send_batch()?;
        }
        self.pending = Pending::new(&self.ctx.cfg);
        self.st.done = true;
        self.send_done()
    }

    /// The error of a resampled worker that drew [`resampled_draw_limit`] shards in a row
    /// without a usable sample.
    fn no_usable_sample(&self, shards: usize) -> DataError {
        DataError::NoBatch {
            epoch: self.ctx.epoch,
            batch_size: self.ctx.cfg.batch_size,
            detail: format!(
                "resampled worker {} of rank {} drew {} of the {shards} shards in a row without a usable sample: {} samples read, {} of them skipped; skipped: {}",
                self.ctx.worker,
                self.ctx.cfg.rank,
                self.fruitless_draws,
                self.st.read,
                self.st.skipped.samples(),
                self.st.skipped
            ),
        }
    }

    fn send_done(&mut self) -> std::result::Result<(), Halt> {
        self.tx
            .send(WorkerMsg::Done(Box::new(self.st.clone())))
            .map_err(|_| Halt::Stopped)
    }

    /// Re-reads the samples a restored state's buffer points to.
    fn refill_buffer(&mut self) -> std::result::Result<(), Halt> {
        if self.st.buffer.is_empty() {
            return Ok(());
        }
        let wanted = self.st.buffer.clone();
        let mut cursors: Vec<u64> = wanted.iter().map(|p| p.cursor).collect();
        cursors.sort_unstable();
        cursors.dedup();
        let mut found: std::collections::HashMap<SamplePos, RawSample> = Default::default();
        for cursor in cursors {
            let Some(shard) = self.ctx.shards.at(cursor) else {
                return Err(Halt::Failed(DataError::Resume {
                    reason: format!("buffer points to shard cursor {cursor} beyond the epoch"),
                }));
            };
            let indices: std::collections::HashSet<u64> = wanted
                .iter()
                .filter(|p| p.cursor == cursor)
                .map(|p| p.index)
                .collect();
            let first = indices.iter().copied().min().unwrap_or(0);
            read_shard_with(&self.ctx.urls[shard], first, &self.ctx.patience(), |raw| {
                if indices.contains(&raw.index) {
                    found.insert(
                        SamplePos {
                            cursor,
                            index: raw.index,
                        },
                        raw,
                    );
                }
                if self.ctx.stop.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
        }
        for pos in &wanted {
            match found.remove(pos) {
                Some(raw) => self.buffer.push(raw),
                None => {
                    return Err(Halt::Failed(DataError::Resume {
                        reason: format!(
                            "sample {} of shard {} is no longer readable; the shards changed since the state was saved",
                            pos.index,
                            self.ctx.shards.at(pos.cursor).map_or("?".into(), |s| self.ctx.urls[s].to_string())
                        ),
                    }))
                }
            }
        }
        Ok(())
    }

    /// Takes one sample into the shuffle buffer and lets one out when the buffer is full
    /// enough. The buffer first fills to `shuffle_initial`, then grows by one for every
    /// two samples read until it holds `shuffle_buffer` (WebDataset's `shuffle(bufsize, initial)`).
    fn push(&mut self, raw: RawSample) -> std::result::Result<(), Halt> {
        if self.ctx.stop.load(Ordering::Relaxed) {
            return Err(Halt::Stopped);
        }
        self.st.read += 1;
        self.st.buffer.push(SamplePos {
            cursor: self.st.cursor,
            index: raw.index,
        });
        self.buffer.push(raw);
        let cfg = &self.ctx.cfg;
        let capacity = cfg.shuffle_buffer.max(1) as u64;
        let target = (cfg.shuffle_initial.max(1) as u64 + self.st.emitted).min(capacity);
        if self.buffer.len() as u64 >= target {
            self.pop_one()?;
        } else {
            // The sample waits in a growing buffer and may be good: that is progress. The
            // buffer grows only up to its capacity, so this cannot postpone the limit forever.
            self.fruitless_draws = 0;
        }
        Ok(())
    }

    fn pop_one(&mut self) -> std::result::Result<(), Halt> {
        let i = if self.ctx.cfg.shuffle_buffer > 1 {
            self.st.rng.below(self.buffer.len() as u64) as usize
        } else {
            0
        };
        let raw = if self.ctx.cfg.shuffle_buffer > 1 {
            self.st.buffer.swap_remove(i);
            self.buffer.swap_remove(i)
        } else {
            self.st.buffer.remove(0);
            self.buffer.remove(0)
        };
        self.st.emitted += 1;
        match self.prepare(raw) {
            Ok(()) => {
                self.fruitless_draws = 0;
                if self.pending.len() == self.ctx.cfg.batch_size {
                    self.send_batch()?;
                }
                Ok(())
            }
            Err(skip) => self.skip(skip),
        }
    }

    fn skip(&mut self, skip: Skip) -> std::result::Result<(), Halt> {
        self.st.skipped.add(skip.reason);
        match self.ctx.cfg.on_bad_data {
            BadDataPolicy::Skip => {
                self.warn.warn(&skip);
                Ok(())
            }
            BadDataPolicy::Fail => Err(Halt::Failed(skip.into_error())),
        }
    }

    /// Parses, decodes and transforms one sample into the pending batch.
    fn prepare(&mut self, raw: RawSample) -> std::result::Result<(), Skip> {
        let cfg = &self.ctx.cfg;
        let parsed = parse_sample(raw, &cfg.fields)?;
        let skip = |reason, detail: String| Skip {
            reason,
            url: parsed.url.to_string(),
            key: parsed.key.clone(),
            detail,
        };
        // The choice is among usable captions only, so a sample counts as good exactly when
        // `shards inspect` says so; with every caption usable the draw is the same as before.
        let mut usable = usable_captions(&parsed.captions, cfg.max_words);
        if usable.is_empty() {
            return Err(skip(
                SkipReason::MissingCaption,
                "no caption is left after cleaning (punctuation or whitespace only)".into(),
            ));
        }
        let choice = match cfg.caption_choice {
            CaptionChoice::Random if usable.len() > 1 => {
                self.st.rng.below(usable.len() as u64) as usize
            }
            _ => 0,
        };
        let caption = usable.swap_remove(choice);
        let image = decode_rgb(&parsed.image_bytes, cfg.max_pixels).map_err(|e| match e {
            DecodeError::TooLarge { .. } => skip(SkipReason::ImageTooLarge, e.to_string()),
            DecodeError::Corrupt(_) => skip(SkipReason::BadImage, e.to_string()),
        })?;
        let mut sample_rng = Rng::new(self.st.rng.next_u64());
        let n = 3 * cfg.image_size() * cfg.image_size();
        let images = &mut self.pending.images;
        images.reserve(n);
        self.transformer.apply_uninit(
            &image,
            &mut sample_rng,
            &mut images.spare_capacity_mut()[..n],
        );
        // SAFETY: `apply_uninit` wrote all `n` values after the current length.
        unsafe { images.set_len(images.len() + n) };
        self.pending.keys.push(parsed.key);
        self.pending.urls.push(parsed.url);
        self.pending.image_ids.push(parsed.image_id);
        self.pending.captions.push(caption);
        Ok(())
    }

    fn send_batch(&mut self) -> std::result::Result<(), Halt> {
        let pending = std::mem::replace(&mut self.pending, Pending::new(&self.ctx.cfg));
        let batch = self.finish_batch(pending).map_err(Halt::Failed)?;
        self.st.delivered += batch.len() as u64;
        self.tx
            .send(WorkerMsg::Batch(Box::new(batch), Box::new(self.st.clone())))
            .map_err(|_| Halt::Stopped)
    }

    fn finish_batch(&self, p: Pending) -> Result<Batch> {
        let b = p.len();
        let s = self.ctx.cfg.image_size();
        let encoded = self.ctx.tokenizer.encode_batch(&p.captions)?;
        // Batches are built on the host; the training loop moves them to its device.
        let host = vlp_core::device::host();
        let (input_ids, attention_mask) = encoded.to_tensors(&host)?;
        let images = Tensor::from_vec(p.images, (b, 3, s, s), &host)?;
        Ok(Batch {
            images,
            input_ids,
            attention_mask,
            keys: p.keys,
            urls: p.urls,
            image_ids: p.image_ids,
            captions: p.captions,
            epoch: self.ctx.epoch,
            worker: self.ctx.worker,
        })
    }
}
