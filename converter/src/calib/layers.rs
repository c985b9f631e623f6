//! Calibration statistics made a layer at a time, as a conversion reaches
//! each layer's tensors: the model runs every window through block 0, then
//! every window through block 1, and so on, so each layer's weights are read
//! once and only the layers in use hold their XᵀX. Collected whole, a 7B
//! model's statistics are 124 GiB; a layer at a time, its widest (an FFN
//! input 18944 wide) is 4.3 GB while summed.
//!
//! A thread of its own owns the model and the windows' hidden states; a
//! tensor's rounding asks it for its layer and waits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lorafold_runtime::cpu::{KvType, LinearInput};
use lorafold_runtime::model::{Model, SessionOptions};

use super::{tensor_name, CalibError, CalibStats};

/// One input's statistics, as the feed made them.
#[derive(Debug)]
pub struct LayerInput {
    /// Σ x xᵀ, `[k, k]` row-major, f32.
    pub xtx: Vec<f32>,
    /// Its diagonal in f64.
    pub sum2: Vec<f64>,
}

/// A layer's statistics are ready.
#[derive(Debug, Clone, Copy)]
pub struct LayerStep {
    /// The layer (from 0).
    pub layer: usize,
    /// Layers in the model.
    pub layers: usize,
    /// Seconds since the feed started: the conversion's time too, since a
    /// layer is asked for once the previous one's tensors are rounded.
    pub elapsed_seconds: f64,
    /// Seconds the model took over this layer's windows.
    pub layer_seconds: f64,
    /// Whether the feed started again from the embeddings to make it (a
    /// layer asked for after later ones, e.g. by a budget's next round).
    pub restarted: bool,
}

impl LayerStep {
    /// Seconds left at the pace so far, if every layer comes in turn.
    pub fn eta_seconds(&self) -> f64 {
        let done = (self.layer + 1) as f64;
        self.elapsed_seconds / done * (self.layers as f64 - done)
    }
}

/// Called as each layer's statistics are ready (on the feed's thread).
pub type LayerProgress = Box<dyn Fn(&LayerStep) + Send>;

type Reply = Result<BTreeMap<usize, BTreeMap<LinearInput, LayerInput>>, String>;

/// The statistics of a model over windows of tokens, made a layer at a time
/// on request ([`LayerFeed::get`]).
pub struct LayerFeed {
    path: PathBuf,
    /// Requests go one at a time: (the layer asked for, the layers made so far).
    channel: Mutex<(Sender<usize>, Receiver<Reply>)>,
    /// Layers made and not yet dropped.
    ready: Mutex<BTreeMap<usize, BTreeMap<LinearInput, Arc<LayerInput>>>>,
    /// Keep every layer once made (when all of them fit in memory), so that a
    /// layer asked for again is not made again.
    keep_all: bool,
}

impl std::fmt::Debug for LayerFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerFeed")
            .field("path", &self.path)
            .field("keep_all", &self.keep_all)
            .finish()
    }
}

impl LayerFeed {
    /// The statistics of `model` over `windows`, each from an empty cache,
    /// made as they are asked for; `keep_all` keeps every layer made.
    pub fn start(
        model: Model,
        windows: Vec<Vec<u32>>,
        keep_all: bool,
        progress: LayerProgress,
    ) -> LayerFeed {
        let path = model.file().path().to_path_buf();
        let (ask, asked) = channel::<usize>();
        let (reply, replies) = channel::<Reply>();
        std::thread::Builder::new()
            .name("lorafold-calibration".into())
            .spawn(move || serve(model, windows, asked, reply, progress))
            .expect("a thread for calibration");
        LayerFeed {
            path,
            channel: Mutex::new((ask, replies)),
            ready: Mutex::default(),
            keep_all,
        }
    }

    /// The statistics of `input` of `layer`, made now if not at hand. Layers
    /// more than one before it are dropped (unless kept): a conversion rounds
    /// tensors in file order, a few at a time, so those are done with.
    pub fn get(&self, layer: usize, input: LinearInput) -> Result<Arc<LayerInput>, CalibError> {
        let lost = || {
            CalibError::Run(format!(
                "{}: the calibration thread stopped",
                self.path.display()
            ))
        };
        if let Some(found) = self.lookup(layer, input) {
            return Ok(found);
        }
        // One request at a time: the others wait here, then find theirs made.
        let channel = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = self.lookup(layer, input) {
            return Ok(found);
        }
        channel.0.send(layer).map_err(|_| lost())?;
        let made = channel
            .1
            .recv()
            .map_err(|_| lost())?
            .map_err(CalibError::Run)?;
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        for (l, inputs) in made {
            ready.insert(
                l,
                inputs.into_iter().map(|(i, s)| (i, Arc::new(s))).collect(),
            );
        }
        if !self.keep_all {
            ready.retain(|&l, _| l + 1 >= layer);
        }
        drop(ready);
        self.lookup(layer, input).ok_or_else(|| {
            CalibError::Run(format!(
                "{}: no statistics for {}",
                self.path.display(),
                tensor_name(layer, input)
            ))
        })
    }

    /// The statistics at hand, if any.
    fn lookup(&self, layer: usize, input: LinearInput) -> Option<Arc<LayerInput>> {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        ready.get(&layer)?.get(&input).cloned()
    }

    /// The model the statistics are of.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The feed's thread: for each layer asked for, run the windows on to it
/// (from the embeddings again when it was passed) and send back the
/// statistics of each layer run on the way. Ends when the feed is dropped.
fn serve(
    model: Model,
    windows: Vec<Vec<u32>>,
    asked: Receiver<usize>,
    reply: Sender<Reply>,
    progress: LayerProgress,
) {
    // The sums' products (candle's matmul) run on a pool of their own: the
    // conversion's pool may have every thread waiting here for a layer.
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("lorafold-calibration-{i}"))
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            return refuse_all(
                asked,
                reply,
                format!("cannot start calibration threads: {e}"),
            )
        }
    };
    pool.install(|| serve_in_pool(model, windows, asked, reply, progress));
}

/// [`serve`] inside the calibration's own pool.
fn serve_in_pool(
    model: Model,
    windows: Vec<Vec<u32>>,
    asked: Receiver<usize>,
    reply: Sender<Reply>,
    progress: LayerProgress,
) {
    let start = Instant::now();
    let ctx = windows.iter().map(Vec::len).max().unwrap_or(1);
    let mut session = match model.session_with(SessionOptions {
        // The statistics are the weights', not a rounded cache's.
        kv: KvType::F32,
        ..SessionOptions::new(ctx)
    }) {
        Ok(s) => Some(s),
        Err(e) => return refuse_all(asked, reply, e.to_string()),
    };
    let session = session.as_mut().expect("made above");
    let layers = model.config.n_layers;
    let mut hidden: Vec<Vec<f32>> = Vec::new();
    // The next layer the hidden states enter.
    let mut next = 0;
    for layer in asked {
        let result = (|| {
            if layer >= layers {
                return Err(format!("no layer {layer}: the model has {layers}"));
            }
            let restarted = layer < next;
            if restarted || hidden.is_empty() {
                hidden = session.embed_windows(&windows).map_err(|e| e.to_string())?;
                next = 0;
            }
            let mut made = BTreeMap::new();
            while next <= layer {
                let t0 = Instant::now();
                // Layers passed on the way are kept too: a batch of tensors
                // in flight may still ask for the one before.
                let stats = run_layer(session, next, &mut hidden)?;
                model.release_layer(next);
                made.insert(next, stats);
                progress(&LayerStep {
                    layer: next,
                    layers,
                    elapsed_seconds: start.elapsed().as_secs_f64(),
                    layer_seconds: t0.elapsed().as_secs_f64(),
                    restarted,
                });
                next += 1;
            }
            Ok(made)
        })();
        if reply.send(result).is_err() {
            return;
        }
    }
}

/// Answer every request with `problem` (the feed cannot run).
fn refuse_all(asked: Receiver<usize>, reply: Sender<Reply>, problem: String) {
    for _ in asked {
        let _ = reply.send(Err(problem.clone()));
    }
}

/// Every window through block `layer` (in place), summing its four inputs.
fn run_layer(
    session: &mut lorafold_runtime::model::Session<'_>,
    layer: usize,
    hidden: &mut [Vec<f32>],
) -> Result<BTreeMap<LinearInput, LayerInput>, String> {
    let mut stats = CalibStats::default();
    let mut failed = None;
    for x in hidden.iter_mut() {
        let mut observe = |l: usize, input: LinearInput, rows: &[f32], k: usize| {
            if failed.is_none() {
                if let Err(e) = stats.add(l, input, rows, k) {
                    failed = Some(e.to_string());
                }
            }
        };
        session
            .block_rows(layer, x, Some(&mut observe))
            .map_err(|e| e.to_string())?;
        if let Some(e) = failed.take() {
            return Err(e);
        }
    }
    stats.flush_checked()?;
    let mut out = BTreeMap::new();
    for ((l, input), s) in std::mem::take(&mut stats.inputs) {
        let super::Matrix::Owned(xtx) = s.matrix else {
            return Err(format!("no rows reached {}", tensor_name(l, input)));
        };
        out.insert(input, LayerInput { xtx, sum2: s.sum2 });
    }
    Ok(out)
}
