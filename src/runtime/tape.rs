//! The tape: a model is a list of ops over numbered buffers (each with a name, for errors and debugging).
//! `forward` runs the ops in order and keeps only what the backward reads (each op lists it: inputs of
//! linears, norms and activations, q/k/v and the attention's row log-sum-exps; nothing for rope and add);
//! `backward` replays the tape in reverse. Parameters are not buffers: they are fetched
//! from a [`ParamStore`] when an op runs (memory-mapped weights, converted to f32 per op) and dropped after,
//! and a parameter's gradient lives only until its first forward use has been replayed, when it is folded
//! into its group's sum of squares and freed. So the peak memory is the weights' mmap, the activations,
//! and the gradients of the parameters in flight, never a full gradient copy of the model.

pub mod cnn;
pub mod op;

use crate::error::Result;
use std::borrow::Cow;
use std::sync::Arc;

pub type BufId = usize;
pub type ParamId = usize;

/// Where the tape reads parameters from: a name → f32 values (row-major, PyTorch layout).
pub trait ParamStore {
    fn param(&self, name: &str) -> Result<Cow<'_, [f32]>>;
}

/// A parameter the tape reads, and the group its gradient norm is reduced into.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub group: usize,
    pub len: usize,
}

#[derive(Clone, Debug)]
pub struct Buffer {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

/// What an op reads, writes and keeps: the tape's bookkeeping of one op.
#[derive(Clone, Debug)]
pub struct OpIo {
    /// The op's kind, for the per-op profile.
    pub kind: &'static str,
    /// Buffers it reads.
    pub inputs: Vec<BufId>,
    /// Buffers it writes.
    pub outputs: Vec<BufId>,
    /// Buffers whose contents its backward reads (none for ops that are linear with constant
    /// coefficients).
    pub saved: Vec<BufId>,
    /// Parameters it reads.
    pub params: Vec<ParamId>,
}

/// One op of the tape. Inputs and outputs are buffer ids, parameters are [`ParamId`]s. Each op is a type
/// in [`op`] implementing this trait, so that everything about an op (what it reads, writes and keeps,
/// its forward and its backward) is in one place.
pub trait TapeOp: std::fmt::Debug + Send + Sync {
    fn io(&self) -> OpIo;
    /// Write the outputs (allocated and zeroed by the tape) from the inputs.
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()>;
    /// Accumulate into the gradients of the inputs (see `Tape::write_grad`) and of the parameters
    /// (`pg[param]`, allocated by the tape) from the gradients of the outputs.
    fn backward(&self, t: &mut Tape, store: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()>;
}

/// A hidden state to report during the forward: after `after_ops` ops have run, buffer `buf` is hidden
/// state number `index`.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    pub after_ops: usize,
    pub index: usize,
    pub buf: BufId,
}

/// The program (ops, buffers, params, marks) plus the batch it runs on (ids, targets) and, once run, the
/// buffers' contents.
pub struct Tape {
    pub ops: Vec<Arc<dyn TapeOp>>,
    pub bufs: Vec<Buffer>,
    pub params: Vec<Param>,
    pub marks: Vec<Mark>,
    /// Token ids, one per row of the activations (`seqs * tokens`).
    pub ids: Vec<i64>,
    /// Next-token targets per row, −1 where nothing is predicted (the last token of each sequence).
    pub targets: Vec<i64>,
    data: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    loss: Option<f64>,
    /// Whether the current forward keeps what a backward needs (a backward follows).
    keep: bool,
    profile: Option<Profile>,
    pool: Pool,
}

/// Freed f32 buffers kept for reuse, by length. A training-style step allocates and frees the same few
/// buffer sizes over and over; fresh allocations of that size come from the kernel as untouched pages, and
/// faulting them in cost ~10% of a step, so buffers are recycled (zeroed on reuse) instead.
#[derive(Default)]
pub struct Pool {
    free: std::collections::HashMap<usize, Vec<Vec<f32>>>,
}

impl Pool {
    /// A zeroed buffer of `len` elements.
    pub fn alloc(&mut self, len: usize) -> Vec<f32> {
        match self.free.get_mut(&len).and_then(Vec::pop) {
            Some(mut v) => {
                v.fill(0.0);
                v
            }
            None => vec![0f32; len],
        }
    }

    pub fn release(&mut self, v: Vec<f32>) {
        if !v.is_empty() {
            self.free.entry(v.len()).or_default().push(v);
        }
    }
}

/// Wall time per (op kind, direction), printed on stderr when `SGLP_PROFILE` is set.
#[derive(Default)]
struct Profile {
    secs: std::collections::BTreeMap<(&'static str, &'static str), (f64, usize)>,
}

impl Profile {
    fn add(&mut self, kind: &'static str, dir: &'static str, t: std::time::Instant) {
        let e = self.secs.entry((kind, dir)).or_default();
        e.0 += t.elapsed().as_secs_f64();
        e.1 += 1;
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        let total: f64 = self.secs.values().map(|v| v.0).sum();
        eprintln!("runtime profile ({total:.3} s in ops):");
        for ((kind, dir), (s, n)) in &self.secs {
            eprintln!("  {kind:>14} {dir:>8}: {s:8.3} s over {n} calls");
        }
    }
}

impl Tape {
    /// A tape recycling the buffers of `pool` (see [`Pool`]); [`Tape::into_pool`] gives them back.
    pub fn with_pool(ids: Vec<i64>, targets: Vec<i64>, pool: Pool) -> Self {
        Tape {
            pool,
            ..Tape::new(ids, targets)
        }
    }

    /// Every buffer the tape holds, for the next tape.
    pub fn into_pool(mut self) -> Pool {
        for v in std::mem::take(&mut self.data)
            .into_iter()
            .chain(std::mem::take(&mut self.grads))
        {
            self.pool.release(v);
        }
        std::mem::take(&mut self.pool)
    }

    pub fn new(ids: Vec<i64>, targets: Vec<i64>) -> Self {
        Tape {
            ops: Vec::new(),
            bufs: Vec::new(),
            params: Vec::new(),
            marks: Vec::new(),
            ids,
            targets,
            data: Vec::new(),
            grads: Vec::new(),
            loss: None,
            keep: false,
            profile: std::env::var_os("SGLP_PROFILE").map(|_| Profile::default()),
            pool: Pool::default(),
        }
    }

    pub fn buffer(&mut self, name: impl Into<String>, rows: usize, cols: usize) -> BufId {
        self.bufs.push(Buffer {
            name: name.into(),
            rows,
            cols,
        });
        self.bufs.len() - 1
    }

    pub fn param(&mut self, name: impl Into<String>, group: usize, len: usize) -> ParamId {
        let name = name.into();
        if let Some(i) = self.params.iter().position(|p| p.name == name) {
            return i;
        }
        self.params.push(Param { name, group, len });
        self.params.len() - 1
    }

    pub fn push(&mut self, op: impl TapeOp + 'static) {
        self.ops.push(Arc::new(op));
    }

    /// Report `buf` as hidden state `index` once the ops pushed so far have run.
    pub fn mark(&mut self, index: usize, buf: BufId) {
        self.marks.push(Mark {
            after_ops: self.ops.len(),
            index,
            buf,
        });
    }

    fn free_data(&mut self, b: BufId) {
        let v = std::mem::take(&mut self.data[b]);
        self.pool.release(v);
    }

    fn len_of(&self, b: BufId) -> usize {
        self.bufs[b].rows * self.bufs[b].cols
    }

    /// Run the ops in order, calling `on_mark(index, data)` for every mark. A buffer is freed after its
    /// last reader has run, unless `keep` (a backward follows) and some op's backward reads it. Returns the
    /// loss.
    pub fn forward(
        &mut self,
        store: &dyn ParamStore,
        keep: bool,
        on_mark: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<f64> {
        for v in std::mem::take(&mut self.data)
            .into_iter()
            .chain(std::mem::take(&mut self.grads))
        {
            self.pool.release(v);
        }
        self.data = vec![Vec::new(); self.bufs.len()];
        self.grads = vec![Vec::new(); self.bufs.len()];
        self.loss = None;
        self.keep = keep;
        let io: Vec<OpIo> = self.ops.iter().map(|op| op.io()).collect();
        // Last op (by position) reading each buffer; marks count as reads at their position.
        let mut last_use = vec![0usize; self.bufs.len()];
        for (i, op) in io.iter().enumerate() {
            for &b in op.inputs.iter().chain(&op.outputs) {
                last_use[b] = last_use[b].max(i);
            }
        }
        for m in &self.marks {
            last_use[m.buf] = last_use[m.buf].max(m.after_ops.saturating_sub(1));
        }
        let mut saved = vec![false; self.bufs.len()];
        if keep {
            for &b in io.iter().flat_map(|op| &op.saved) {
                saved[b] = true;
            }
        }
        let mut next_mark = 0;
        self.emit_marks(0, &mut next_mark, on_mark);
        for i in 0..self.ops.len() {
            let op = Arc::clone(&self.ops[i]);
            for &b in &io[i].outputs {
                self.data[b] = self.pool.alloc(self.len_of(b));
            }
            let t0 = std::time::Instant::now();
            op.forward(self, store)?;
            if let Some(p) = &mut self.profile {
                p.add(io[i].kind, "forward", t0);
            }
            self.emit_marks(i + 1, &mut next_mark, on_mark);
            for &b in io[i].inputs.iter().chain(&io[i].outputs) {
                if last_use[b] == i && !saved[b] {
                    self.free_data(b);
                }
            }
        }
        self.loss
            .ok_or_else(|| crate::Error::Model("the model has no loss op".into()))
    }

    fn emit_marks(&self, done: usize, next: &mut usize, on_mark: &mut dyn FnMut(usize, &[f32])) {
        while *next < self.marks.len() && self.marks[*next].after_ops == done {
            let m = self.marks[*next];
            on_mark(m.index, &self.data[m.buf]);
            *next += 1;
        }
    }

    fn p<'s>(&self, store: &'s dyn ParamStore, id: ParamId) -> Result<Cow<'s, [f32]>> {
        store.param(&self.params[id].name)
    }

    /// Run `f` on buffer `out`, taken out of the tape so that `f` can read the other buffers beside it.
    fn write_output<R>(&mut self, out: BufId, f: impl FnOnce(&Tape, &mut [f32]) -> R) -> R {
        let mut y = std::mem::take(&mut self.data[out]);
        let r = f(self, &mut y);
        self.data[out] = y;
        r
    }

    /// Run `f` on the gradient of `b` (allocated, zeroed, on first use), taken out likewise.
    fn write_grad(&mut self, b: BufId, f: impl FnOnce(&Tape, &mut [f32])) {
        let mut d = self.take_grad(b);
        f(self, &mut d);
        self.grads[b] = d;
    }

    /// Whether something downstream gave `b` a gradient (when not, a backward has nothing to do).
    fn has_grad(&self, b: BufId) -> bool {
        !self.grads[b].is_empty()
    }

    /// Gradient buffer of `b`, allocated (zeroed) on first use; taken out so it can be written while other
    /// buffers are read.
    fn take_grad(&mut self, b: BufId) -> Vec<f32> {
        let g = std::mem::take(&mut self.grads[b]);
        if g.is_empty() {
            self.pool.alloc(self.len_of(b))
        } else {
            g
        }
    }

    /// Replay the tape in reverse from d(loss) = 1 after a `forward(.., keep = true, ..)`. Returns the sum
    /// of squared gradient entries per parameter group (`n_groups` groups). Activations and gradients are
    /// freed as soon as the op that produced them has been replayed.
    pub fn backward(&mut self, store: &dyn ParamStore, n_groups: usize) -> Result<Vec<f64>> {
        let mut sumsq = vec![0f64; n_groups];
        // A parameter's gradient is complete once its first forward use has been replayed.
        let io: Vec<OpIo> = self.ops.iter().map(|op| op.io()).collect();
        let mut first_use = vec![usize::MAX; self.params.len()];
        for (i, op) in io.iter().enumerate() {
            for &p in &op.params {
                first_use[p] = first_use[p].min(i);
            }
        }
        let mut pgrads: Vec<Vec<f32>> = vec![Vec::new(); self.params.len()];
        for i in (0..self.ops.len()).rev() {
            let op = Arc::clone(&self.ops[i]);
            for &p in &io[i].params {
                if pgrads[p].is_empty() {
                    pgrads[p] = self.pool.alloc(self.params[p].len);
                }
            }
            let t0 = std::time::Instant::now();
            op.backward(self, store, &mut pgrads)?;
            if let Some(p) = &mut self.profile {
                p.add(io[i].kind, "backward", t0);
            }
            for &p in &io[i].params {
                if first_use[p] == i {
                    let g = std::mem::take(&mut pgrads[p]);
                    sumsq[self.params[p].group] += sum_sq(&g);
                    self.pool.release(g);
                }
            }
            for &b in &io[i].outputs {
                self.free_data(b);
                let g = std::mem::take(&mut self.grads[b]);
                self.pool.release(g);
            }
        }
        for b in 0..self.bufs.len() {
            self.free_data(b);
            let g = std::mem::take(&mut self.grads[b]);
            self.pool.release(g);
        }
        Ok(sumsq)
    }
}

fn sum_sq(g: &[f32]) -> f64 {
    use rayon::prelude::*;
    g.par_chunks(16_384)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum()
}
