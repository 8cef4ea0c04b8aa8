//! The tape's ops. Each is a type with its buffers and parameters, and one [`TapeOp`] impl holding all
//! the tape needs of it side by side: what it reads, writes and keeps for the backward, its forward and
//! its backward. A new op is one more type here (the kernels it calls live in [`crate::runtime::ops`]).
//!
//! Forwards take their outputs out of the tape's `data` while they borrow their inputs from it (the ids
//! differ by construction); backwards do the same with the gradients, and return at once when nothing
//! downstream produced a gradient for their output.

use super::{BufId, ParamId, ParamStore, Tape, TapeOp};
use crate::error::Result;
use crate::runtime::ops::{cpu, cpu::AttnShape, RopeTable};
use std::sync::Arc;

/// out[r] = table[ids[r]] (ids: the tape's token ids).
#[derive(Clone, Debug)]
pub struct Embedding {
    pub table: ParamId,
    pub out: BufId,
}

impl TapeOp for Embedding {
    fn kind(&self) -> &'static str {
        "embedding"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![]
    }
    fn params(&self) -> Vec<ParamId> {
        vec![self.table]
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let table = t.p(store, self.table)?;
        let mut y = std::mem::take(&mut t.data[self.out]);
        cpu::embedding_forward(&t.ids, &table, t.bufs[self.out].cols, &mut y);
        t.data[self.out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()> {
        let dy = &t.grads[self.out];
        if !dy.is_empty() {
            cpu::embedding_backward(&t.ids, dy, t.bufs[self.out].cols, &mut pg[self.table]);
        }
        Ok(())
    }
}

/// out = x Wᵀ (+ b).
#[derive(Clone, Debug)]
pub struct Linear {
    pub x: BufId,
    pub w: ParamId,
    pub b: Option<ParamId>,
    pub out: BufId,
}

impl TapeOp for Linear {
    fn kind(&self) -> &'static str {
        "linear"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn params(&self) -> Vec<ParamId> {
        std::iter::once(self.w).chain(self.b).collect()
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let Linear { x, w, b, out } = *self;
        let (wv, bv) = (t.p(store, w)?, b.map(|b| t.p(store, b)).transpose()?);
        let (n, k, m) = (t.bufs[x].rows, t.bufs[x].cols, t.bufs[out].cols);
        let mut y = std::mem::take(&mut t.data[out]);
        cpu::linear_forward(&t.data[x], &wv, bv.as_deref(), n, k, m, &mut y);
        t.data[out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, store: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()> {
        let Linear { x, w, b, out } = *self;
        if t.grads[out].is_empty() {
            return Ok(());
        }
        let wv = t.p(store, w)?;
        let (n, k, m) = (t.bufs[x].rows, t.bufs[x].cols, t.bufs[out].cols);
        let mut dx = t.take_grad(x);
        let mut dw = std::mem::take(&mut pg[w]);
        let mut db = b.map(|b| std::mem::take(&mut pg[b]));
        cpu::linear_backward(
            &t.data[x],
            &wv,
            &t.grads[out],
            n,
            k,
            m,
            Some(&mut dx),
            &mut dw,
            db.as_deref_mut(),
        );
        t.grads[x] = dx;
        pg[w] = dw;
        if let (Some(b), Some(db)) = (b, db) {
            pg[b] = db;
        }
        Ok(())
    }
}

/// out = w ⊙ x / sqrt(mean(x²) + eps), per row.
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub x: BufId,
    pub w: ParamId,
    pub eps: f64,
    pub out: BufId,
}

impl TapeOp for RmsNorm {
    fn kind(&self) -> &'static str {
        "rmsnorm"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn params(&self) -> Vec<ParamId> {
        vec![self.w]
    }
    fn forward(&self, t: &mut Tape, store: &dyn ParamStore) -> Result<()> {
        let RmsNorm { x, w, eps, out } = *self;
        let wv = t.p(store, w)?;
        let mut y = std::mem::take(&mut t.data[out]);
        cpu::rmsnorm_forward(&t.data[x], &wv, t.bufs[x].cols, eps, &mut y);
        t.data[out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, store: &dyn ParamStore, pg: &mut [Vec<f32>]) -> Result<()> {
        let RmsNorm { x, w, eps, out } = *self;
        if t.grads[out].is_empty() {
            return Ok(());
        }
        let wv = t.p(store, w)?;
        let mut dx = t.take_grad(x);
        let mut dw = std::mem::take(&mut pg[w]);
        cpu::rmsnorm_backward(
            &t.data[x],
            &wv,
            &t.grads[out],
            t.bufs[x].cols,
            eps,
            &mut dx,
            &mut dw,
        );
        t.grads[x] = dx;
        pg[w] = dw;
        Ok(())
    }
}

/// Rotary position embedding of `heads` heads per row. Linear with constant coefficients: the backward
/// keeps nothing.
#[derive(Clone, Debug)]
pub struct Rope {
    pub x: BufId,
    pub heads: usize,
    pub table: Arc<RopeTable>,
    pub out: BufId,
}

impl TapeOp for Rope {
    fn kind(&self) -> &'static str {
        "rope"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![]
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let mut y = std::mem::take(&mut t.data[self.out]);
        cpu::rope_forward(&t.data[self.x], self.heads, &self.table, &mut y);
        t.data[self.out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        if t.grads[self.out].is_empty() {
            return Ok(());
        }
        let mut dx = t.take_grad(self.x);
        cpu::rope_backward(&t.grads[self.out], self.heads, &self.table, &mut dx);
        t.grads[self.x] = dx;
        Ok(())
    }
}

/// Causal (optionally windowed) grouped-query attention; `lse` keeps each query row's log-sum-exp for
/// the backward.
#[derive(Clone, Debug)]
pub struct Attention {
    pub q: BufId,
    pub k: BufId,
    pub v: BufId,
    pub shape: AttnShape,
    pub out: BufId,
    pub lse: BufId,
}

impl TapeOp for Attention {
    fn kind(&self) -> &'static str {
        "attention"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.q, self.k, self.v]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out, self.lse]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![self.q, self.k, self.v, self.lse]
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let Attention {
            q,
            k,
            v,
            shape,
            out,
            lse,
        } = *self;
        let mut y = std::mem::take(&mut t.data[out]);
        let mut p = std::mem::take(&mut t.data[lse]);
        cpu::attention_forward(&t.data[q], &t.data[k], &t.data[v], shape, &mut y, &mut p);
        t.data[out] = y;
        t.data[lse] = p;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        let Attention {
            q,
            k,
            v,
            shape,
            out,
            lse,
        } = *self;
        if t.grads[out].is_empty() {
            return Ok(());
        }
        let (mut dq, mut dk, mut dv) = (t.take_grad(q), t.take_grad(k), t.take_grad(v));
        cpu::attention_backward(
            &t.data[q],
            &t.data[k],
            &t.data[v],
            &t.data[lse],
            &t.grads[out],
            shape,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        t.grads[q] = dq;
        t.grads[k] = dk;
        t.grads[v] = dv;
        Ok(())
    }
}

/// out = x · sigmoid(x).
#[derive(Clone, Debug)]
pub struct Silu {
    pub x: BufId,
    pub out: BufId,
}

impl TapeOp for Silu {
    fn kind(&self) -> &'static str {
        "silu"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![self.x]
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let mut y = std::mem::take(&mut t.data[self.out]);
        cpu::silu_forward(&t.data[self.x], &mut y);
        t.data[self.out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        if t.grads[self.out].is_empty() {
            return Ok(());
        }
        let mut dx = t.take_grad(self.x);
        cpu::silu_backward(&t.data[self.x], &t.grads[self.out], &mut dx);
        t.grads[self.x] = dx;
        Ok(())
    }
}

/// out = a ⊙ b.
#[derive(Clone, Debug)]
pub struct Mul {
    pub a: BufId,
    pub b: BufId,
    pub out: BufId,
}

impl TapeOp for Mul {
    fn kind(&self) -> &'static str {
        "mul"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.a, self.b]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![self.a, self.b]
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let mut y = std::mem::take(&mut t.data[self.out]);
        cpu::mul_forward(&t.data[self.a], &t.data[self.b], &mut y);
        t.data[self.out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        let Mul { a, b, out } = *self;
        if t.grads[out].is_empty() {
            return Ok(());
        }
        let (mut da, mut db) = (t.take_grad(a), t.take_grad(b));
        cpu::mul_backward(&t.data[a], &t.data[b], &t.grads[out], &mut da, &mut db);
        t.grads[a] = da;
        t.grads[b] = db;
        Ok(())
    }
}

/// out = a + b (the residual connections). The backward keeps nothing.
#[derive(Clone, Debug)]
pub struct Add {
    pub a: BufId,
    pub b: BufId,
    pub out: BufId,
}

impl TapeOp for Add {
    fn kind(&self) -> &'static str {
        "add"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.a, self.b]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.out]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![]
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let mut y = std::mem::take(&mut t.data[self.out]);
        cpu::add_forward(&t.data[self.a], &t.data[self.b], &mut y);
        t.data[self.out] = y;
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        if t.grads[self.out].is_empty() {
            return Ok(());
        }
        let dy = std::mem::take(&mut t.grads[self.out]);
        for inp in [self.a, self.b] {
            let mut d = t.take_grad(inp);
            cpu::accumulate(&mut d, &dy);
            t.grads[inp] = d;
        }
        t.grads[self.out] = dy;
        Ok(())
    }
}

/// Mean softmax cross-entropy of the rows of `logits` against the tape's targets (−1 = not predicted):
/// the tape's loss. `lse` keeps each row's log-sum-exp for the backward.
#[derive(Clone, Debug)]
pub struct CrossEntropy {
    pub logits: BufId,
    pub lse: BufId,
}

impl TapeOp for CrossEntropy {
    fn kind(&self) -> &'static str {
        "cross_entropy"
    }
    fn inputs(&self) -> Vec<BufId> {
        vec![self.logits]
    }
    fn outputs(&self) -> Vec<BufId> {
        vec![self.lse]
    }
    fn saved(&self) -> Vec<BufId> {
        vec![self.logits, self.lse]
    }
    fn forward(&self, t: &mut Tape, _: &dyn ParamStore) -> Result<()> {
        let CrossEntropy { logits, lse } = *self;
        let mut l = std::mem::take(&mut t.data[lse]);
        let (sum, count) =
            cpu::cross_entropy_forward(&t.data[logits], t.bufs[logits].cols, &t.targets, &mut l);
        t.data[lse] = l;
        if count == 0 {
            return Err(crate::Error::invalid(
                "no predicted positions in the batch (sequences need at least 2 tokens)",
            ));
        }
        t.loss = Some(sum / count as f64);
        Ok(())
    }
    fn backward(&self, t: &mut Tape, _: &dyn ParamStore, _: &mut [Vec<f32>]) -> Result<()> {
        let CrossEntropy { logits, lse } = *self;
        let (_, count) = t.loss_count();
        // The logits are read by nothing else's backward: their storage becomes their gradient.
        let mut d = std::mem::take(&mut t.data[logits]);
        cpu::cross_entropy_backward_in_place(
            &mut d,
            t.bufs[logits].cols,
            &t.targets,
            &t.data[lse],
            1.0 / count as f64,
        );
        let prior = std::mem::replace(&mut t.grads[logits], d);
        if !prior.is_empty() {
            cpu::accumulate(&mut t.grads[logits], &prior);
        }
        Ok(())
    }
}
