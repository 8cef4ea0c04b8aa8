//! The tape: a model is a list of ops over numbered buffers (each with a name, for errors and debugging).
//! `forward` runs the ops in order and keeps only what the backward reads (each op lists it: inputs of
//! linears, norms and activations, q/k/v and the attention's row log-sum-exps; nothing for rope and add);
//! `backward` replays the tape in reverse. Parameters are not buffers: they are fetched
//! from a [`ParamStore`] when an op runs (memory-mapped weights, converted to f32 per op) and dropped after,
//! and a parameter's gradient lives only until its first forward use has been replayed, when it is folded
//! into its group's sum of squares and freed. So the peak memory is the weights' mmap, the activations,
//! and the gradients of the parameters in flight, never a full gradient copy of the model.
//!
//! The tape is generic over the [`Device`] its buffers live on and its ops run on (`Tape<Cpu>` by
//! default). Before each parameter group's first op (a decoder layer's, forward and backward), the tape
//! tells the device which parameters the next group will read ([`Device::prefetch`]), so a device that
//! holds only a window of the weights can upload the next layer while the current one computes.

pub mod cnn;
pub mod moe;
pub mod op;

use crate::error::Result;
pub use crate::runtime::ops::cpu::Cpu;
pub use crate::runtime::ops::{Device, ParamUse};
use std::borrow::Cow;
use std::sync::Arc;

pub type BufId = usize;
pub type ParamId = usize;

/// Where the tape reads parameters from: a name → f32 values (row-major, PyTorch layout).
pub trait ParamStore {
    fn param(&self, name: &str) -> Result<Cow<'_, [f32]>>;
    /// An identity no other store of this process shares: a device caches uploaded weights by it (an
    /// address would not do: a later store may be allocated where a dropped one was).
    fn id(&self) -> u64;
    /// The parameter's bf16 bits when it is stored as bf16 (read without converting), else `None`.
    fn param_bf16(&self, _name: &str) -> Result<Option<Cow<'_, [u16]>>> {
        Ok(None)
    }
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

/// One op of the tape, on device `D`. Inputs and outputs are buffer ids, parameters are [`ParamId`]s.
/// Each op is a type in [`op`] (or [`cnn`], CPU only) implementing this trait, so that everything about
/// an op (what it reads, writes and keeps, its forward and its backward) is in one place.
pub trait TapeOp<D: Device = Cpu>: std::fmt::Debug + Send + Sync {
    fn io(&self) -> OpIo;
    /// Those of its parameters it reads as a linear layer's weight ([`Device::weight`]); the others
    /// it reads as values ([`Device::param`]).
    fn weights(&self) -> Vec<ParamId> {
        Vec::new()
    }
    /// Write the outputs (allocated and zeroed by the tape) from the inputs.
    fn forward(&self, t: &mut Tape<D>, store: &dyn ParamStore) -> Result<()>;
    /// Accumulate into the gradients of the inputs (see `Tape::write_grad`) and of the parameters
    /// (`pg[param]`, allocated by the tape) from the gradients of the outputs.
    fn backward(
        &self,
        t: &mut Tape<D>,
        store: &dyn ParamStore,
        pg: &mut ParamGrads<D>,
    ) -> Result<()>;
}

/// The gradients of the parameters in flight during a backward, by [`ParamId`] (`None`: not allocated).
pub struct ParamGrads<D: Device>(Vec<Option<D::Buf>>);

impl<D: Device> ParamGrads<D> {
    /// Parameter `p`'s gradient, taken out so that it can be written while the tape is read; give it
    /// back with [`ParamGrads::put`].
    pub fn take(&mut self, p: ParamId) -> D::Buf {
        self.0[p]
            .take()
            .expect("the tape allocates the gradient of every parameter of the op it replays")
    }
    pub fn put(&mut self, p: ParamId, g: D::Buf) {
        self.0[p] = Some(g);
    }
    /// Parameter `p`'s gradient, to accumulate into.
    pub fn get_mut(&mut self, p: ParamId) -> &mut D::Slice {
        self.0[p]
            .as_deref_mut()
            .expect("the tape allocates the gradient of every parameter of the op it replays")
    }
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
pub struct Tape<D: Device = Cpu> {
    pub ops: Vec<Arc<dyn TapeOp<D>>>,
    pub bufs: Vec<Buffer>,
    pub params: Vec<Param>,
    pub marks: Vec<Mark>,
    /// Token ids, one per row of the activations (`seqs * tokens`).
    pub ids: Vec<i64>,
    /// Next-token targets per row, −1 where nothing is predicted (the last token of each sequence).
    pub targets: Vec<i64>,
    dev: D,
    /// `ids` and `targets` on the device, uploaded by the first forward.
    dev_ids: Option<(D::Ids, D::Ids)>,
    data: Vec<Option<D::Buf>>,
    grads: Vec<Option<D::Buf>>,
    loss: Option<f64>,
    /// Whether the current forward keeps what a backward needs (a backward follows).
    keep: bool,
    profile: Option<Profile>,
    pool: Pool<D>,
}

/// Freed buffers kept for reuse, by length. A training-style step allocates and frees the same few
/// buffer sizes over and over; fresh allocations of that size come from the kernel as untouched pages, and
/// faulting them in cost ~10% of a step on the CPU, so buffers are recycled (zeroed on reuse) instead.
pub struct Pool<D: Device = Cpu> {
    free: std::collections::HashMap<usize, Vec<D::Buf>>,
}

impl<D: Device> Default for Pool<D> {
    fn default() -> Self {
        Pool {
            free: Default::default(),
        }
    }
}

impl<D: Device> Pool<D> {
    /// A zeroed buffer of `len` elements.
    pub fn alloc(&mut self, dev: &D, len: usize) -> Result<D::Buf> {
        match self.free.get_mut(&len).and_then(Vec::pop) {
            Some(mut v) => {
                dev.zero(&mut v)?;
                Ok(v)
            }
            None => dev.alloc_zeroed(len),
        }
    }

    pub fn release(&mut self, dev: &D, v: D::Buf) {
        let len = dev.buf_len(&v);
        if len > 0 {
            self.free.entry(len).or_default().push(v);
        }
    }
}

/// Wall time per (op kind, direction), printed on stderr when `SGLP_PROFILE` is set. (On an asynchronous
/// device this is the time to enqueue, unless the device synchronises.)
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

impl Tape<Cpu> {
    /// A CPU tape recycling the buffers of `pool` (see [`Pool`]); [`Tape::into_pool`] gives them back.
    pub fn with_pool(ids: Vec<i64>, targets: Vec<i64>, pool: Pool<Cpu>) -> Self {
        Tape::on(Cpu, ids, targets, pool)
    }

    pub fn new(ids: Vec<i64>, targets: Vec<i64>) -> Self {
        Tape::on(Cpu, ids, targets, Pool::default())
    }
}

impl<D: Device> Tape<D> {
    /// A tape on device `dev`, recycling the buffers of `pool`.
    pub fn on(dev: D, ids: Vec<i64>, targets: Vec<i64>, pool: Pool<D>) -> Self {
        Tape {
            ops: Vec::new(),
            bufs: Vec::new(),
            params: Vec::new(),
            marks: Vec::new(),
            ids,
            targets,
            dev,
            dev_ids: None,
            data: Vec::new(),
            grads: Vec::new(),
            loss: None,
            keep: false,
            profile: std::env::var_os("SGLP_PROFILE").map(|_| Profile::default()),
            pool,
        }
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Every buffer the tape holds, for the next tape.
    pub fn into_pool(mut self) -> Pool<D> {
        self.release_all();
        std::mem::take(&mut self.pool)
    }

    fn release_all(&mut self) {
        let bufs: Vec<D::Buf> = std::mem::take(&mut self.data)
            .into_iter()
            .chain(std::mem::take(&mut self.grads))
            .flatten()
            .collect();
        for v in bufs {
            self.pool.release(&self.dev, v);
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

    pub fn push(&mut self, op: impl TapeOp<D> + 'static) {
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

    /// The contents of buffer `b` (written by an op that has run, and not freed yet).
    pub fn data(&self, b: BufId) -> &D::Slice {
        match &self.data[b] {
            Some(v) => v,
            None => panic!(
                "buffer '{}' read before it was written or after it was freed",
                self.bufs[b].name
            ),
        }
    }

    /// The gradient of buffer `b` (see [`Tape::has_grad`]).
    pub fn grad(&self, b: BufId) -> &D::Slice {
        match &self.grads[b] {
            Some(v) => v,
            None => panic!(
                "gradient of '{}' read before anything wrote it",
                self.bufs[b].name
            ),
        }
    }

    fn free_data(&mut self, b: BufId) {
        if let Some(v) = self.data[b].take() {
            self.pool.release(&self.dev, v);
        }
    }

    fn free_grad(&mut self, b: BufId) {
        if let Some(v) = self.grads[b].take() {
            self.pool.release(&self.dev, v);
        }
    }

    fn len_of(&self, b: BufId) -> usize {
        self.bufs[b].rows * self.bufs[b].cols
    }

    /// The device copies of the token ids and targets.
    fn dev_ids(&self) -> &(D::Ids, D::Ids) {
        self.dev_ids
            .as_ref()
            .expect("uploaded at the start of the forward")
    }

    /// When to announce which parameters to the device ([`Device::prefetch`]), for the ops run in `order`
    /// (`io`: every op's bookkeeping): at the first op of each parameter group's run of ops, the next
    /// run's parameters (each once, in the order they are read). The first entry, at `usize::MAX`, is the
    /// first run itself, announced before anything runs.
    pub(crate) fn prefetch_plan(&self, io: &[OpIo], order: &[usize]) -> Vec<(usize, Vec<ParamId>)> {
        // Runs of consecutive ops (in `order`) by group of their first parameter; ops without parameters
        // join the run they sit in. (first op, group, params)
        let mut runs: Vec<(usize, usize, Vec<ParamId>)> = Vec::new();
        for &i in order {
            let Some(&p0) = io[i].params.first() else {
                continue;
            };
            let g = self.params[p0].group;
            if runs.last().is_none_or(|r| r.1 != g) {
                runs.push((i, g, Vec::new()));
            }
            let ps = &mut runs.last_mut().expect("pushed above").2;
            for &p in &io[i].params {
                if !ps.contains(&p) {
                    ps.push(p);
                }
            }
        }
        let starts: Vec<usize> = std::iter::once(usize::MAX)
            .chain(runs.iter().map(|r| r.0))
            .collect();
        starts
            .into_iter()
            .zip(runs.into_iter().map(|r| r.2))
            .collect()
    }

    /// How the ops read each parameter: `[as values, as a weight]`.
    pub(crate) fn param_uses(&self, io: &[OpIo]) -> Vec<[bool; 2]> {
        let mut uses = vec![[false; 2]; self.params.len()];
        for (op, io) in self.ops.iter().zip(io) {
            let weights = op.weights();
            for &p in &io.params {
                uses[p][weights.contains(&p) as usize] = true;
            }
        }
        uses
    }

    fn prefetch(
        &self,
        store: &dyn ParamStore,
        params: &[ParamId],
        uses: &[[bool; 2]],
    ) -> Result<()> {
        let mut announce = Vec::with_capacity(params.len());
        for &p in params {
            let name = self.params[p].name.as_str();
            for (u, used) in [ParamUse::Values, ParamUse::Weight]
                .into_iter()
                .zip(uses[p])
            {
                if used {
                    announce.push((name, u));
                }
            }
        }
        self.dev.prefetch(store, &announce)
    }

    /// Run the ops in order, calling `on_mark(index, data)` for every mark. A buffer is freed after its
    /// last reader has run, unless `keep` (a backward follows) and some op's backward reads it. Returns the
    /// loss.
    pub fn forward(
        &mut self,
        store: &dyn ParamStore,
        keep: bool,
        on_mark: &mut dyn FnMut(usize, &D::Slice),
    ) -> Result<f64> {
        self.release_all();
        self.data = (0..self.bufs.len()).map(|_| None).collect();
        self.grads = (0..self.bufs.len()).map(|_| None).collect();
        self.loss = None;
        self.keep = keep;
        if self.dev_ids.is_none() {
            self.dev_ids = Some((self.dev.ids(&self.ids)?, self.dev.ids(&self.targets)?));
        }
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
        let order: Vec<usize> = (0..self.ops.len()).collect();
        let plan = self.prefetch_plan(&io, &order);
        let uses = self.param_uses(&io);
        let mut plan = plan.into_iter().peekable();
        if let Some((_, ps)) = plan.next_if(|(at, _)| *at == usize::MAX) {
            self.prefetch(store, &ps, &uses)?;
        }
        let mut next_mark = 0;
        self.emit_marks(0, &mut next_mark, on_mark);
        for i in 0..self.ops.len() {
            if let Some((_, ps)) = plan.next_if(|(at, _)| *at == i) {
                self.prefetch(store, &ps, &uses)?;
            }
            let op = Arc::clone(&self.ops[i]);
            for &b in &io[i].outputs {
                self.data[b] = Some(self.pool.alloc(&self.dev, self.len_of(b))?);
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

    fn emit_marks(&self, done: usize, next: &mut usize, on_mark: &mut dyn FnMut(usize, &D::Slice)) {
        while *next < self.marks.len() && self.marks[*next].after_ops == done {
            let m = self.marks[*next];
            on_mark(m.index, self.data(m.buf));
            *next += 1;
        }
    }

    /// Parameter `id` as the device reads it.
    fn p<'s>(&self, store: &'s dyn ParamStore, id: ParamId) -> Result<D::Param<'s>> {
        let p = &self.params[id];
        self.dev.param(store, &p.name, p.len)
    }

    /// Parameter `id` as a linear layer's weight (the op lists it in [`TapeOp::weights`]).
    fn w<'s>(&self, store: &'s dyn ParamStore, id: ParamId) -> Result<D::Weight<'s>> {
        let p = &self.params[id];
        self.dev.weight(store, &p.name, p.len)
    }

    /// Run `f` on buffer `out`, taken out of the tape so that `f` can read the other buffers beside it.
    fn write_output<R>(
        &mut self,
        out: BufId,
        f: impl FnOnce(&Self, &mut D::Slice) -> Result<R>,
    ) -> Result<R> {
        let mut y = self.data[out]
            .take()
            .expect("the tape allocates an op's outputs");
        let r = f(self, &mut y);
        self.data[out] = Some(y);
        r
    }

    /// Run `f` on the gradient of `b` (allocated, zeroed, on first use), taken out likewise.
    fn write_grad(
        &mut self,
        b: BufId,
        f: impl FnOnce(&Self, &mut D::Slice) -> Result<()>,
    ) -> Result<()> {
        let mut d = self.take_grad(b)?;
        let r = f(self, &mut d);
        self.grads[b] = Some(d);
        r
    }

    /// Whether something downstream gave `b` a gradient (when not, a backward has nothing to do).
    pub fn has_grad(&self, b: BufId) -> bool {
        self.grads[b].is_some()
    }

    /// Gradient buffer of `b`, allocated (zeroed) on first use; taken out so it can be written while other
    /// buffers are read. Give it back with [`Tape::put_grad`].
    fn take_grad(&mut self, b: BufId) -> Result<D::Buf> {
        match self.grads[b].take() {
            Some(g) => Ok(g),
            None => self.pool.alloc(&self.dev, self.len_of(b)),
        }
    }

    fn put_grad(&mut self, b: BufId, g: D::Buf) {
        self.grads[b] = Some(g);
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
        let order: Vec<usize> = (0..self.ops.len()).rev().collect();
        let plan = self.prefetch_plan(&io, &order);
        let uses = self.param_uses(&io);
        let mut plan = plan.into_iter().peekable();
        // The last group of the forward is the first of the backward and still resident: no head start.
        plan.next_if(|(at, _)| *at == usize::MAX);
        let mut pgrads = ParamGrads::<D>((0..self.params.len()).map(|_| None).collect());
        for i in order {
            if let Some((_, ps)) = plan.next_if(|(at, _)| *at == i) {
                self.prefetch(store, &ps, &uses)?;
            }
            let op = Arc::clone(&self.ops[i]);
            for &p in &io[i].params {
                if pgrads.0[p].is_none() {
                    pgrads.0[p] = Some(self.pool.alloc(&self.dev, self.params[p].len)?);
                }
            }
            let t0 = std::time::Instant::now();
            op.backward(self, store, &mut pgrads)?;
            if let Some(p) = &mut self.profile {
                p.add(io[i].kind, "backward", t0);
            }
            for &p in &io[i].params {
                if first_use[p] == i {
                    if let Some(g) = pgrads.0[p].take() {
                        sumsq[self.params[p].group] += self.dev.sum_sq(&g)?;
                        self.pool.release(&self.dev, g);
                    }
                }
            }
            for &b in &io[i].outputs {
                self.free_data(b);
                self.free_grad(b);
            }
        }
        for b in 0..self.bufs.len() {
            self.free_data(b);
            self.free_grad(b);
        }
        Ok(sumsq)
    }
}
