//! One conversation on the CPU engine: the KV cache, the scratch buffers and
//! the worker pool, all made when the session is, so a decode step allocates
//! nothing; and the forward pass, block by block.

use half::f16;
use lorafold_kernels::attention::{self, Row};
use lorafold_kernels::{gemm, ActBuf, ActType, Isa, Out};

use super::ops::{self, RopeStyle};
use super::pool::WorkerPool;
use super::weights::{CpuWeights, Matrix};
use crate::arch::Activation;
use crate::model::ModelConfig;

/// The KV cache's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    /// Half precision, as llama.cpp's default: half the memory.
    #[default]
    F16,
    /// Full precision, for exact comparisons.
    F32,
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<KvType, String> {
        match s {
            "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            other => Err(format!("unknown KV cache type '{other}' (f16, f32)")),
        }
    }
}

/// Keys or values of every layer: `[layer][kv head][position][head_dim]`.
enum KvData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvData {
    fn new(kind: KvType, len: usize) -> KvData {
        match kind {
            KvType::F32 => KvData::F32(vec![0.0; len]),
            KvType::F16 => KvData::F16(vec![f16::ZERO; len]),
        }
    }

    fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            KvData::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            KvData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[at..at + x.len()].convert_from_f32_slice(x);
            }
        }
    }

    /// The row of `len` values at `at`, as stored.
    fn row(&self, at: usize, len: usize) -> Row<'_> {
        match self {
            KvData::F32(v) => Row::F32(&v[at..at + len]),
            KvData::F16(v) => Row::F16(&v[at..at + len]),
        }
    }

    /// The `n` values at `at` as f32: the cache itself, or widened into `scratch`.
    fn f32_rows<'a>(&'a self, at: usize, n: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match self {
            KvData::F32(v) => &v[at..at + n],
            KvData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                v[at..at + n].convert_to_f32_slice(&mut scratch[..n]);
                &scratch[..n]
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            KvData::F32(v) => v.len() * 4,
            KvData::F16(v) => v.len() * 2,
        }
    }
}

/// A matmul of one projection over `t` input rows into `out` (`[t, n]`).
struct MatJob<'a> {
    m: &'a Matrix,
    input: &'a [f32],
    out: Out,
    /// Index of the rounded input in `Scratch::acts`.
    act: usize,
    /// Offset of this job's adapter products A·x in `Scratch::ax`.
    ax: usize,
}

/// Buffers sized once for `batch` rows.
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Rounded inputs, one buffer per (format, width) the model needs.
    acts: Vec<ActBuf>,
    /// Adapter products A·x.
    ax: Vec<f32>,
    /// Per thread: scores, then one head-wide accumulator.
    per_thread: Vec<f32>,
    logits: Vec<f32>,
}

/// Why a forward step cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// No tokens.
    Empty,
    /// Past the session's context.
    ContextFull {
        /// tokens given
        tokens: usize,
        /// position before them
        position: usize,
        /// the context size
        max: usize,
    },
    /// A token id beyond the embedding's rows.
    TokenOutOfRange {
        /// the id
        id: u32,
        /// rows of the embedding
        vocab: usize,
    },
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Empty => write!(f, "no tokens to run (empty input)"),
            StepError::ContextFull {
                tokens,
                position,
                max,
            } => write!(
                f,
                "{tokens} tokens at position {position} exceed the context of {max}"
            ),
            StepError::TokenOutOfRange { id, vocab } => write!(
                f,
                "token id {id} is out of range: the embedding has {vocab} rows"
            ),
        }
    }
}

/// A session of the CPU engine over borrowed weights.
pub struct CpuSession<'m> {
    w: &'m CpuWeights,
    cfg: &'m ModelConfig,
    pool: WorkerPool,
    isa: Isa,
    kv_k: KvData,
    kv_v: KvData,
    pos: usize,
    max: usize,
    batch: usize,
    /// cos and sin tables, `[max, head_dim / 2]`, one pair per RoPE base.
    ropes: Vec<(Vec<f32>, Vec<f32>)>,
    /// Each layer's index into `ropes`.
    layer_rope: Vec<usize>,
    style: RopeStyle,
    s: Scratch,
}

/// Rows per prefill step: llama.cpp's default micro-batch.
pub const BATCH: usize = 512;

/// Output rows per share of a matmul, so tiles of weight rows stay whole.
const ROW_ALIGN: usize = 16;

impl<'m> CpuSession<'m> {
    /// A session for up to `max` positions with `threads` threads, running
    /// `isa`'s kernels.
    pub fn new(
        w: &'m CpuWeights,
        cfg: &'m ModelConfig,
        rope_factors: Option<&[f32]>,
        max: usize,
        threads: usize,
        kv: KvType,
        isa: Isa,
    ) -> CpuSession<'m> {
        let max = max.max(1);
        let batch = BATCH.min(max);
        let hd = cfg.head_dim;
        let (q_out, kv_out) = (cfg.n_head * hd, cfg.n_head_kv * hd);
        let ffn = w.blocks.first().map_or(0, |b| b.gate.n);
        let kv_len = cfg.n_layers * cfg.n_head_kv * max * hd;
        let bases = cfg.rope_bases();
        let ropes = bases
            .iter()
            .map(|&b| ops::rope_tables(max, hd, b, rope_factors))
            .collect();
        let layer_rope = cfg.layer_ropes();
        let pool = WorkerPool::new(threads);
        // One rounded-input buffer per (format, width) in the model.
        let mut acts: Vec<ActBuf> = Vec::new();
        let mut need = |m: &Matrix| {
            let a = m.wtype.act_type();
            if !acts.iter().any(|b| b.act_type() == a && b.k() == m.k) {
                acts.push(ActBuf::new(a, m.k, batch));
            }
        };
        for b in &w.blocks {
            for m in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down] {
                need(m);
            }
        }
        need(w.head());
        let max_rank: usize = w
            .blocks
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
            .chain(std::iter::once(w.head()))
            .map(|m| m.loras.iter().map(|l| l.rank).sum::<usize>())
            .max()
            .unwrap_or(0);
        let s = Scratch {
            x: vec![0.0; batch * cfg.dim],
            h: vec![0.0; batch * cfg.dim.max(ffn)],
            q: vec![0.0; batch * q_out],
            k: vec![0.0; batch * kv_out],
            v: vec![0.0; batch * kv_out],
            attn: vec![0.0; batch * q_out],
            tmp: vec![0.0; batch * cfg.dim],
            gate: vec![0.0; batch * ffn],
            up: vec![0.0; batch * ffn],
            acts,
            // Up to three projections (q, k, v) share one step.
            ax: vec![0.0; 3 * batch * max_rank],
            per_thread: vec![0.0; pool.threads() * attention_scratch(batch, max, hd, kv)],
            logits: vec![0.0; cfg.vocab],
        };
        CpuSession {
            w,
            cfg,
            pool,
            isa,
            kv_k: KvData::new(kv, kv_len),
            kv_v: KvData::new(kv, kv_len),
            pos: 0,
            max,
            batch,
            ropes,
            layer_rope,
            style: cfg.spec().rope,
            s,
        }
    }

    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The context size.
    pub fn max_tokens(&self) -> usize {
        self.max
    }

    /// Forget everything (the cache is reused).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv_k.bytes() + self.kv_v.bytes()
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Run `tokens` after what came before, with the adapters' user scales
    /// `scales` (by slot); returns the logits of the last position
    /// (`[vocab]`), or of every position (`[tokens, vocab]`) when `all`.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        all: bool,
        scales: &[Option<f64>],
    ) -> Result<&[f32], StepError> {
        self.forward_observed(tokens, all, scales, None)
    }

    /// [`CpuSession::forward`], showing `observer` the f32 rows each block's
    /// linear layers read (before they are rounded for the kernels).
    pub fn forward_observed(
        &mut self,
        tokens: &[u32],
        all: bool,
        scales: &[Option<f64>],
        mut observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<&[f32], StepError> {
        let vocab = self.cfg.vocab;
        if tokens.is_empty() {
            return Err(StepError::Empty);
        }
        if self.pos + tokens.len() > self.max {
            return Err(StepError::ContextFull {
                tokens: tokens.len(),
                position: self.pos,
                max: self.max,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(StepError::TokenOutOfRange { id, vocab });
        }
        let rows_out = if all { tokens.len() } else { 1 };
        if self.s.logits.len() < rows_out * vocab {
            self.s.logits.resize(rows_out * vocab, 0.0);
        }
        let batch = self.batch;
        let n_chunks = tokens.len().div_ceil(batch);
        for (c, chunk) in tokens.chunks(batch).enumerate() {
            let last = c + 1 == n_chunks;
            let head_rows = if all {
                Some(c * batch)
            } else if last {
                Some(0)
            } else {
                None
            };
            self.step(chunk, head_rows, all, scales, observer.as_deref_mut());
            self.pos += chunk.len();
        }
        Ok(&self.s.logits[..rows_out * vocab])
    }

    /// The hidden rows entering the first block for a window of `ids`
    /// (`[ids.len(), dim]`, into `out`). With [`CpuSession::block_rows`] a
    /// model runs a layer at a time over many windows: calibration's order,
    /// which reads each layer's weights once and holds one layer's statistics.
    pub fn embed_rows(
        &mut self,
        ids: &[u32],
        scales: &[Option<f64>],
        out: &mut Vec<f32>,
    ) -> Result<(), StepError> {
        self.check_window(ids.len())?;
        let vocab = self.cfg.vocab;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(StepError::TokenOutOfRange { id, vocab });
        }
        let dim = self.cfg.dim;
        out.clear();
        for chunk in ids.chunks(self.batch) {
            self.embed(chunk, scales);
            out.extend_from_slice(&self.s.x[..chunk.len() * dim]);
        }
        Ok(())
    }

    /// Block `layer` over one window's hidden rows `x` (`[t, dim]`, in place,
    /// at positions `0..t`), showing `observer` its linear inputs: the same
    /// arithmetic, chunk for chunk, as [`CpuSession::forward`] from an empty
    /// cache, so statistics taken either way are equal to the bit.
    pub fn block_rows(
        &mut self,
        layer: usize,
        x: &mut [f32],
        scales: &[Option<f64>],
        mut observer: Option<&mut LinearObserver<'_>>,
    ) -> Result<(), StepError> {
        let dim = self.cfg.dim;
        let t = x.len() / dim;
        self.check_window(t)?;
        assert!(
            layer < self.w.blocks.len() && x.len() == t * dim,
            "a block and rows of the model"
        );
        self.pos = 0;
        for chunk in x.chunks_mut(self.batch * dim) {
            let n = chunk.len() / dim;
            self.s.x[..chunk.len()].copy_from_slice(chunk);
            self.block(layer, n, scales, observer.as_deref_mut());
            chunk.copy_from_slice(&self.s.x[..chunk.len()]);
            self.pos += n;
        }
        self.pos = 0;
        Ok(())
    }

    /// A window of `t` tokens fits an empty cache.
    fn check_window(&self, t: usize) -> Result<(), StepError> {
        if t == 0 {
            return Err(StepError::Empty);
        }
        if t > self.max {
            return Err(StepError::ContextFull {
                tokens: t,
                position: 0,
                max: self.max,
            });
        }
        Ok(())
    }

    /// One chunk of at most `batch` tokens at `self.pos`. `head_at`: where in
    /// the logits this chunk's rows go (every row when `all`, else the last
    /// row at 0), or None when no logits are wanted from it.
    fn step(
        &mut self,
        ids: &[u32],
        head_at: Option<usize>,
        all: bool,
        scales: &[Option<f64>],
        mut observer: Option<&mut LinearObserver<'_>>,
    ) {
        self.embed(ids, scales);
        for layer in 0..self.w.blocks.len() {
            self.block(layer, ids.len(), scales, observer.as_deref_mut());
        }
        let Some(at) = head_at else { return };
        let t = ids.len();
        self.head(if all { 0 } else { t - 1 }, t, at, scales);
    }

    /// The logits of hidden rows `first..t` of `s.x`, into `s.logits` from row `at`.
    fn head(&mut self, first: usize, t: usize, at: usize, scales: &[Option<f64>]) {
        let (w, cfg) = (self.w, self.cfg);
        let dim = cfg.dim;
        let rows = t - first;
        for (j, i) in (first..t).enumerate() {
            ops::rms_norm(
                &self.s.x[i * dim..(i + 1) * dim],
                &w.output_norm,
                cfg.rms_eps as f32,
                &mut self.s.h[j * dim..(j + 1) * dim],
            );
        }
        let vocab = cfg.vocab;
        let out = self.s.logits[at * vocab..(at + rows) * vocab].as_mut_ptr();
        self.matmuls(&[(w.head(), out)], Input::H, rows, dim, scales);
    }

    /// The logits (`[t, vocab]`, into `out`) of a window's hidden rows `x`
    /// (`[t, dim]`) leaving the last block: the end of a run a layer at a
    /// time ([`CpuSession::block_rows`]).
    pub fn head_rows(
        &mut self,
        x: &[f32],
        scales: &[Option<f64>],
        out: &mut Vec<f32>,
    ) -> Result<(), StepError> {
        let (dim, vocab) = (self.cfg.dim, self.cfg.vocab);
        self.check_window(x.len() / dim)?;
        if self.s.logits.len() < self.batch * vocab {
            self.s.logits.resize(self.batch * vocab, 0.0);
        }
        out.clear();
        for chunk in x.chunks(self.batch * dim) {
            let n = chunk.len() / dim;
            self.s.x[..chunk.len()].copy_from_slice(chunk);
            self.head(0, n, 0, scales);
            out.extend_from_slice(&self.s.logits[..n * vocab]);
        }
        Ok(())
    }

    /// The hidden rows of `ids` (at most `batch`) entering the first block, into `s.x`.
    fn embed(&mut self, ids: &[u32], scales: &[Option<f64>]) {
        let (w, cfg) = (self.w, self.cfg);
        let dim = cfg.dim;
        let emb = w.embedding.weights(w.file.as_ref());
        for (i, &id) in ids.iter().enumerate() {
            let x = &mut self.s.x[i * dim..(i + 1) * dim];
            lorafold_kernels::dequantize_row(&emb, id as usize, x);
            for l in &w.embedding_loras {
                let Some(s) = scales.get(l.slot).copied().flatten().filter(|s| *s != 0.0) else {
                    continue;
                };
                let s = (s * l.file_scale as f64) as f32;
                for kk in 0..l.rank {
                    let av = l.a.get(id as usize * l.rank + kk);
                    attention::axpy(x, s * av, l.b.row(kk * dim, dim), self.isa);
                }
            }
            // After the adapter, so a merged embedding and an attached one
            // are scaled alike.
            if let Some(scale) = cfg.embedding_scale() {
                x.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }

    /// Block `layer` over the `t` hidden rows in `s.x` (in place), at `self.pos`.
    fn block(
        &mut self,
        layer: usize,
        t: usize,
        scales: &[Option<f64>],
        mut observer: Option<&mut LinearObserver<'_>>,
    ) {
        let mut observe = |layer: usize, input: LinearInput, rows: &[f32], k: usize| {
            if let Some(o) = observer.as_deref_mut() {
                o(layer, input, rows, k);
            }
        };
        let cfg = self.cfg;
        let b = &self.w.blocks[layer];
        let (dim, hd) = (cfg.dim, cfg.head_dim);
        let q_out = cfg.n_head * hd;
        let eps = cfg.rms_eps as f32;
        self.norm_rows(t, &b.attn_norm);
        observe(layer, LinearInput::AttnIn, &self.s.h[..t * dim], dim);
        let (hq, hk, hv) = (
            self.s.q.as_mut_ptr(),
            self.s.k.as_mut_ptr(),
            self.s.v.as_mut_ptr(),
        );
        self.matmuls(
            &[(&b.q, hq), (&b.k, hk), (&b.v, hv)],
            Input::H,
            t,
            dim,
            scales,
        );
        if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
            let kv_out = cfg.n_head_kv * hd;
            for h in self.s.q[..t * q_out].chunks_exact_mut(hd) {
                ops::rms_norm_in_place(h, qn, eps);
            }
            for h in self.s.k[..t * kv_out].chunks_exact_mut(hd) {
                ops::rms_norm_in_place(h, kn, eps);
            }
        }
        self.rope_and_cache(layer, t);
        self.attention(layer, t);
        let tmp = self.s.tmp.as_mut_ptr();
        observe(
            layer,
            LinearInput::AttnOut,
            &self.s.attn[..t * q_out],
            q_out,
        );
        self.matmuls(&[(&b.o, tmp)], Input::Attn, t, q_out, scales);
        if let Some(n) = &b.post_attn_norm {
            for row in self.s.tmp[..t * dim].chunks_exact_mut(dim) {
                ops::rms_norm_in_place(row, n, eps);
            }
        }
        ops::add(&mut self.s.x[..t * dim], &self.s.tmp[..t * dim]);
        self.norm_rows(t, &b.ffn_norm);
        observe(layer, LinearInput::FfnIn, &self.s.h[..t * dim], dim);
        let (g, u) = (self.s.gate.as_mut_ptr(), self.s.up.as_mut_ptr());
        self.matmuls(&[(&b.gate, g), (&b.up, u)], Input::H, t, dim, scales);
        let ffn = b.gate.n;
        match cfg.spec().activation {
            Activation::Silu => lorafold_kernels::swiglu(
                &mut self.s.gate[..t * ffn],
                &self.s.up[..t * ffn],
                self.isa,
            ),
            Activation::GeluTanh => lorafold_kernels::geglu(
                &mut self.s.gate[..t * ffn],
                &self.s.up[..t * ffn],
                self.isa,
            ),
        }
        observe(layer, LinearInput::FfnDown, &self.s.gate[..t * ffn], ffn);
        self.matmuls(&[(&b.down, tmp)], Input::Gate, t, ffn, scales);
        if let Some(n) = &b.post_ffn_norm {
            for row in self.s.tmp[..t * dim].chunks_exact_mut(dim) {
                ops::rms_norm_in_place(row, n, eps);
            }
        }
        ops::add(&mut self.s.x[..t * dim], &self.s.tmp[..t * dim]);
    }

    /// RMSNorm of the hidden rows `0..t` (`s.x`) by `weight`, into `s.h`.
    fn norm_rows(&mut self, t: usize, weight: &[f32]) {
        let dim = self.cfg.dim;
        let eps = self.cfg.rms_eps as f32;
        for (x, h) in self.s.x[..t * dim]
            .chunks_exact(dim)
            .zip(self.s.h.chunks_exact_mut(dim))
        {
            ops::rms_norm(x, weight, eps, h);
        }
    }

    /// Project input rows `0..t` (each `k` wide) through each matrix into its
    /// output (`[t, n]`), adding bias and adapters: one job for the pool.
    fn matmuls(
        &mut self,
        mats: &[(&Matrix, *mut f32)],
        input: Input,
        t: usize,
        k: usize,
        scales: &[Option<f64>],
    ) {
        let file = self.w.file.as_ref();
        let isa = self.isa;
        let s = &mut self.s;
        let input: &[f32] = match input {
            Input::H => &s.h[..t * k],
            Input::Attn => &s.attn[..t * k],
            Input::Gate => &s.gate[..t * k],
        };
        // Round the input once per format it is needed in.
        let mut jobs: [Option<MatJob>; 3] = [None, None, None];
        let mut ax_used = 0;
        let mut rounded: [Option<ActType>; 3] = [None; 3];
        for (j, &(m, out)) in mats.iter().enumerate() {
            let want = m.wtype.act_type();
            let act = s
                .acts
                .iter()
                .position(|b| b.act_type() == want && b.k() == k)
                .expect("an input buffer per format and width, made with the session");
            if !rounded.contains(&Some(want)) {
                s.acts[act].quantize(input);
                rounded[j] = Some(want);
            }
            let ax = ax_used;
            for (l, _) in m.active_loras(scales) {
                ax_used += t * l.rank;
            }
            jobs[j] = Some(MatJob {
                m,
                input,
                out: Out { ptr: out, ld: m.n },
                act,
                ax,
            });
        }
        let jobs = &jobs;
        // Adapter products A·x first: rank values per input row, one dot
        // product each, in chunks for the threads (a prefill of 128 rows
        // through a rank-16 adapter is 2M of them), then a barrier before
        // the B side.
        if ax_used > 0 {
            if s.ax.len() < ax_used {
                s.ax.resize(ax_used, 0.0);
            }
            // Prefill: the input once more as f32 rows for the float kernels'
            // register tiles (made on the first prefill with an adapter).
            let f32_act = (t > 1).then(|| {
                let at = s
                    .acts
                    .iter()
                    .position(|b| b.act_type() == ActType::F32 && b.k() == k);
                let at = at.unwrap_or_else(|| {
                    s.acts.push(ActBuf::new(ActType::F32, k, t));
                    s.acts.len() - 1
                });
                s.acts[at].quantize(input);
                at
            });
            let acts = &s.acts;
            let ax_out = Out {
                ptr: s.ax.as_mut_ptr(),
                ld: 0,
            };
            // Prefill: `mine` is a range of the rows of every active A, one
            // adapter after another; decode: a range of `ax` itself.
            let products = |mine: std::ops::Range<usize>, _thread: usize| {
                // A whole copy: capturing only `.ptr` would not be Sync.
                let dst = ax_out;
                if let Some(fa) = f32_act {
                    let mut base = 0;
                    for job in jobs.iter().flatten() {
                        let mut off = job.ax;
                        for (l, _) in job.m.active_loras(scales) {
                            let rows = mine.start.max(base)..mine.end.min(base + l.rank);
                            if !rows.is_empty() {
                                let rows = rows.start - base..rows.end - base;
                                let o = Out {
                                    // SAFETY: inside `ax`, which holds ax_used values.
                                    ptr: unsafe { dst.ptr.add(off) },
                                    ld: l.rank,
                                };
                                // SAFETY: this chunk alone writes columns
                                // `rows` of this adapter's t rows of rank.
                                unsafe { gemm(&l.a.weights(k, l.rank), rows, &acts[fa], o, isa) };
                            }
                            base += l.rank;
                            off += t * l.rank;
                        }
                    }
                    return;
                }
                for job in jobs.iter().flatten() {
                    let mut off = job.ax;
                    for (l, _) in job.m.active_loras(scales) {
                        let span = off..off + t * l.rank;
                        let lo = mine.start.max(span.start);
                        for u in lo..mine.end.min(span.end) {
                            let (i, r) = ((u - off) / l.rank, (u - off) % l.rank);
                            let x = &job.input[i * k..(i + 1) * k];
                            let a = l.a.row(r * k, k);
                            // SAFETY: unit u is this chunk's alone.
                            unsafe { *dst.ptr.add(u) = attention::dot(x, a, isa) };
                        }
                        off = span.end;
                    }
                }
            };
            if t == 1 {
                // A decode step's few thousand products are not worth a hand-off.
                products(0..ax_used, 0);
            } else {
                let ranks = jobs
                    .iter()
                    .flatten()
                    .flat_map(|j| j.m.active_loras(scales))
                    .map(|(l, _)| l.rank)
                    .sum();
                self.pool.run_chunks(ranks, 1, &products);
            }
        }
        let total: usize = jobs.iter().flatten().map(|j| j.m.n).sum();
        let acts = &s.acts;
        let ax = &s.ax;
        // Output rows of the matrices one after another, in chunks of whole
        // tiles.
        let work = |mine: std::ops::Range<usize>, _thread: usize| {
            let mut base = 0;
            for job in jobs.iter().flatten() {
                let rows = mine.start.max(base)..mine.end.min(base + job.m.n);
                base += job.m.n;
                if rows.is_empty() {
                    continue;
                }
                let rows = rows.start - (base - job.m.n)..rows.end - (base - job.m.n);
                let wts = job.m.weights(file);
                // SAFETY: each chunk writes only its own rows' columns of
                // each output, which holds t rows of n.
                unsafe { gemm(&wts, rows.clone(), &acts[job.act], job.out, isa) };
                add_bias_and_adapters(job, rows, t, ax, scales, isa);
            }
        };
        self.pool.run_chunks(total, ROW_ALIGN, &work);
    }

    /// Rotate q and k, and store k and v in the cache at their positions.
    fn rope_and_cache(&mut self, layer: usize, t: usize) {
        let cfg = self.cfg;
        let hd = cfg.head_dim;
        let half = hd / 2;
        let (q_out, kv_out) = (cfg.n_head * hd, cfg.n_head_kv * hd);
        let (cos_all, sin_all) = &self.ropes[self.layer_rope[layer]];
        for i in 0..t {
            let p = self.pos + i;
            let (cos, sin) = (
                &cos_all[p * half..(p + 1) * half],
                &sin_all[p * half..(p + 1) * half],
            );
            for h in self.s.q[i * q_out..(i + 1) * q_out].chunks_exact_mut(hd) {
                ops::rope(h, cos, sin, self.style);
            }
            for h in self.s.k[i * kv_out..(i + 1) * kv_out].chunks_exact_mut(hd) {
                ops::rope(h, cos, sin, self.style);
            }
            for kvh in 0..cfg.n_head_kv {
                let at = self.kv_index(layer, kvh, p);
                let src = i * kv_out + kvh * hd;
                self.kv_k.write(at, &self.s.k[src..src + hd]);
                self.kv_v.write(at, &self.s.v[src..src + hd]);
            }
        }
    }

    fn kv_index(&self, layer: usize, kv_head: usize, pos: usize) -> usize {
        ((layer * self.cfg.n_head_kv + kv_head) * self.max + pos) * self.cfg.head_dim
    }

    /// The attention output (rows `ld` apart) and the per-thread scratch
    /// (a row per thread), as pointers the workers share.
    fn attention_buffers(&mut self, ld: usize) -> (Out, Out) {
        let per = self.s.per_thread.len() / self.pool.threads();
        let out = Out {
            ptr: self.s.attn.as_mut_ptr(),
            ld,
        };
        let scratch = Out {
            ptr: self.s.per_thread.as_mut_ptr(),
            ld: per,
        };
        (out, scratch)
    }

    /// softmax(q·kᵀ / √d + causal mask) · v for every query head and row.
    fn attention(&mut self, layer: usize, t: usize) {
        if t == 1 {
            self.attention_decode(layer);
        } else {
            self.attention_prefill(layer, t);
        }
    }

    /// One position: fused over the cache, one unit per query head so the
    /// few units still spread over the threads, and nothing allocated.
    fn attention_decode(&mut self, layer: usize) {
        let cfg = self.cfg;
        let hd = cfg.head_dim;
        let group = cfg.n_head / cfg.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let units = cfg.n_head;
        // A local layer's query sees the last `window` positions, itself included.
        let first = first_key(self.pos, cfg.layer_attention(layer).window);
        let (out, scratch) = self.attention_buffers(0);
        let (q, pos) = (&self.s.q, self.pos);
        let (kv_k, kv_v) = (&self.kv_k, &self.kv_v);
        let this = &*self;
        let isa = self.isa;
        let work = |heads: std::ops::Range<usize>, th: usize| {
            // Whole copies: a closure capturing only `.ptr` would not be Sync.
            let (scratch, out) = (scratch, out);
            // SAFETY: each thread uses its own slice of the per-thread
            // scratch, and runs one chunk at a time.
            let mine = unsafe {
                std::slice::from_raw_parts_mut(scratch.ptr.add(th * scratch.ld), scratch.ld)
            };
            let (scores, acc) = mine.split_at_mut(pos + 1);
            let scores = &mut scores[first..];
            let acc = &mut acc[..hd];
            for h in heads {
                let kvh = h / group;
                let qv = &q[h * hd..(h + 1) * hd];
                for (j, sc) in (first..).zip(scores.iter_mut()) {
                    let kr = kv_k.row(this.kv_index(layer, kvh, j), hd);
                    *sc = attention::dot(qv, kr, isa) * scale;
                }
                attention::softmax(scores, isa);
                acc.fill(0.0);
                for (j, &p) in (first..).zip(scores.iter()) {
                    attention::axpy(acc, p, kv_v.row(this.kv_index(layer, kvh, j), hd), isa);
                }
                // SAFETY: heads are disjoint between chunks.
                unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.ptr.add(h * hd), hd) };
            }
        };
        self.pool.run_chunks(units, 1, &work);
    }

    /// `t` positions: per KV head and block of [`PREFILL_ROWS`] query
    /// positions, the scores and the weighted values are two dense matrix
    /// products (the `gemm` crate's packed kernels, which reuse each loaded
    /// key and value across the block's rows). One dot product per (query,
    /// key) pair instead was load-bound and made prefill slow down with
    /// length several times faster than attention's quadratic cost does.
    fn attention_prefill(&mut self, layer: usize, t: usize) {
        let cfg = self.cfg;
        let hd = cfg.head_dim;
        let q_out = cfg.n_head * hd;
        let group = cfg.n_head / cfg.n_head_kv;
        let scale = 1.0 / (hd as f32).sqrt();
        let blocks = t.div_ceil(PREFILL_ROWS);
        let units = cfg.n_head_kv * blocks;
        let window = cfg.layer_attention(layer).window;
        let (out, scratch) = self.attention_buffers(q_out);
        let (q, pos) = (&self.s.q, self.pos);
        let (kv_k, kv_v) = (&self.kv_k, &self.kv_v);
        let this = &*self;
        let isa = self.isa;
        let work = |chunk: std::ops::Range<usize>, th: usize| {
            let (scratch, out) = (scratch, out);
            // SAFETY: each thread uses its own slice of the per-thread
            // scratch, and runs one chunk at a time.
            let mine = unsafe {
                std::slice::from_raw_parts_mut(scratch.ptr.add(th * scratch.ld), scratch.ld)
            };
            // Last blocks first: they are the longest, and claiming them
            // first leaves the short ones to even out the threads' ends.
            for u in chunk {
                let (b, kvh) = (blocks - 1 - u / cfg.n_head_kv, u % cfg.n_head_kv);
                let i0 = b * PREFILL_ROWS;
                let rows = PREFILL_ROWS.min(t - i0);
                // Keys from the first one this block's first row sees (a
                // sliding window hides the older ones from every row).
                let k0 = first_key(pos + i0, window);
                let len = pos + i0 + rows - k0;
                let (scores, rest) = mine.split_at_mut(rows * len);
                let first = this.kv_index(layer, kvh, k0);
                let (ks, vs) = rest.split_at_mut(rest.len() / 2);
                let k = kv_k.f32_rows(first, len * hd, ks);
                let v = kv_v.f32_rows(first, len * hd, vs);
                for h in kvh * group..(kvh + 1) * group {
                    let qh = &q[i0 * q_out + h * hd..];
                    // SAFETY: `qh` holds `rows` rows of `hd` at stride `q_out`,
                    // `k` and `v` `len` rows of `hd`, `scores` `rows * len`.
                    unsafe {
                        ::gemm::gemm(
                            rows,
                            len,
                            hd,
                            scores.as_mut_ptr(),
                            1,
                            len as isize,
                            false,
                            qh.as_ptr(),
                            1,
                            q_out as isize,
                            k.as_ptr(),
                            hd as isize,
                            1,
                            0.0,
                            scale,
                            false,
                            false,
                            false,
                            ::gemm::Parallelism::None,
                        );
                    }
                    for (r, row) in scores.chunks_exact_mut(len).enumerate() {
                        // Causal: position pos + i0 + r sees keys up to
                        // itself, and within its window.
                        let p = pos + i0 + r;
                        let (seen, future) = row.split_at_mut(p + 1 - k0);
                        let (hidden, seen) = seen.split_at_mut(first_key(p, window) - k0);
                        hidden.fill(0.0);
                        attention::softmax(seen, isa);
                        future.fill(0.0);
                    }
                    // SAFETY: `out` rows i0..i0 + rows of head h are this
                    // unit's alone; the operands are sized as above.
                    unsafe {
                        ::gemm::gemm(
                            rows,
                            hd,
                            len,
                            out.ptr.add(i0 * q_out + h * hd),
                            1,
                            q_out as isize,
                            false,
                            scores.as_ptr(),
                            1,
                            len as isize,
                            v.as_ptr(),
                            1,
                            hd as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            ::gemm::Parallelism::None,
                        );
                    }
                }
            }
        };
        self.pool.run_chunks(units, 1, &work);
    }
}

/// The first key position a query at `pos` sees: within `window` positions
/// of itself (itself included), or the first.
fn first_key(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// Query positions per unit of prefill attention: enough rows for the
/// products' tiles, and few enough that the masked (future) columns a block
/// computes stay a small share.
const PREFILL_ROWS: usize = 64;

/// Floats of per-thread attention scratch: in decode, the scores over `max`
/// positions and a head-wide accumulator; in prefill, the scores of a block
/// of query rows and, for an f16 cache, its keys and values widened to f32.
fn attention_scratch(batch: usize, max: usize, hd: usize, kv: KvType) -> usize {
    let widened = match kv {
        KvType::F32 => 0,
        KvType::F16 => 2 * max * hd,
    };
    (max + hd).max(PREFILL_ROWS.min(batch) * max + widened)
}

/// The input a block's linear layers read: q, k and v share one, gate and
/// up share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearInput {
    /// The normed residual that q, k and v read.
    AttnIn,
    /// The attention output that the output projection reads.
    AttnOut,
    /// The normed residual that gate and up read.
    FfnIn,
    /// SwiGLU's output that the down projection reads.
    FfnDown,
}

impl LinearInput {
    /// Every input, in block order.
    pub const ALL: [LinearInput; 4] = [
        LinearInput::AttnIn,
        LinearInput::AttnOut,
        LinearInput::FfnIn,
        LinearInput::FfnDown,
    ];

    /// The tensors (GGUF names after `blk.N.`) that read it.
    pub fn readers(self) -> &'static [&'static str] {
        match self {
            LinearInput::AttnIn => &["attn_q", "attn_k", "attn_v"],
            LinearInput::AttnOut => &["attn_output"],
            LinearInput::FfnIn => &["ffn_gate", "ffn_up"],
            LinearInput::FfnDown => &["ffn_down"],
        }
    }
}

/// What [`CpuSession::forward_observed`] calls: (layer, input, rows, width),
/// the rows being `rows.len() / width` tokens.
pub type LinearObserver<'a> = dyn FnMut(usize, LinearInput, &[f32], usize) + 'a;

/// Which scratch buffer a matmul reads.
#[derive(Clone, Copy)]
enum Input {
    H,
    Attn,
    Gate,
}

/// Bias and `scale * B (A x)` for rows `rows` of every input row.
fn add_bias_and_adapters(
    job: &MatJob,
    rows: std::ops::Range<usize>,
    t: usize,
    ax: &[f32],
    scales: &[Option<f64>],
    isa: Isa,
) {
    let m = job.m;
    if m.bias.is_none() && m.loras.is_empty() {
        return;
    }
    for i in 0..t {
        // SAFETY: the caller owns these rows' columns of this output row.
        let out = unsafe {
            std::slice::from_raw_parts_mut(job.out.ptr.add(i * job.out.ld + rows.start), rows.len())
        };
        if let Some(bias) = &m.bias {
            ops::add(out, &bias[rows.clone()]);
        }
        let mut off = job.ax;
        for (l, s) in m.active_loras(scales) {
            let a = &ax[off + i * l.rank..off + (i + 1) * l.rank];
            // Bᵀ is stored a row per rank: rank contiguous axpys over our rows.
            for (kk, &av) in a.iter().enumerate() {
                let bt = l.b.row(kk * m.n + rows.start, rows.len());
                attention::axpy(out, s * av, bt, isa);
            }
            off += t * l.rank;
        }
    }
}
