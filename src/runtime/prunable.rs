//! The model seam of the pruning pipeline: what the calibration pass, the loss scorers and the SGLP
//! decision need from a network, whatever its family. The LLaMA-family decoder ([`Model`] on [`Tokens`])
//! and the CNN classifiers ([`CnnModel`] on [`Images`]) implement it; a third family implements it once.
//!
//! A network is a sequence of *units* (decoder layers, residual blocks, VGG convs). Hidden state `i` is
//! the input of the first unit for `i = 0` and the output of unit `u` for `i = u + 1`; each item of the
//! data (a sequence, an image) gives [`CalibrationData::rows_per_item`] rows of it — the CKA's samples —
//! of [`PrunableModel::hidden_widths`] values.

use super::cnn::{CnnModel, Images};
use super::{GradNorms, Model, OnHidden, Tokens};
use crate::error::{Error, Result};
use crate::similarity::cuda::DeviceBatch;
use std::sync::Arc;

/// Calibration or evaluation data, cut into batches of items.
pub trait CalibrationData: Clone + Send + Sync {
    /// Items: sequences or images.
    fn items(&self) -> usize;
    /// Items `first .. first + count`, clamped to the end.
    fn batch(&self, first: usize, count: usize) -> Self;
    /// Rows of every hidden state per item: tokens per sequence, 1 per image.
    fn rows_per_item(&self) -> usize;
}

impl CalibrationData for Tokens {
    fn items(&self) -> usize {
        self.sequences
    }
    fn batch(&self, first: usize, count: usize) -> Self {
        Tokens::batch(self, first, count)
    }
    fn rows_per_item(&self) -> usize {
        self.len
    }
}

impl CalibrationData for Images {
    fn items(&self) -> usize {
        self.n
    }
    fn batch(&self, first: usize, count: usize) -> Self {
        Images::batch(self, first, count)
    }
    fn rows_per_item(&self) -> usize {
        1
    }
}

/// One forward + backward: the loss and the gradient norms.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitGrads {
    /// The batch's mean loss.
    pub loss: f64,
    /// ‖∂loss/∂θ_u‖ over the parameters of unit u (0 for skipped units).
    pub per_unit: Vec<f64>,
    /// The norm over every parameter outside the units (embeddings, stem, norms, head).
    pub rest: f64,
}

/// A network the pruning pipeline can calibrate, score and prune. See the module doc for the indexing.
pub trait PrunableModel: Sync {
    type Data: CalibrationData;

    fn num_units(&self) -> usize;
    fn unit_names(&self) -> Vec<String>;
    /// Whether unit u may be removed (replaced by the identity): its input and output shapes match.
    fn removable(&self) -> Vec<bool>;
    /// Values per row of hidden states `0..=U` on `data`.
    fn hidden_widths(&self, data: &Self::Data) -> Result<Vec<usize>>;
    /// Forward only, with `skip` bypassed; `on_hidden(i, rows × width)` ([`OnHidden`]: `None` when no
    /// hidden state is read, so that a GPU copies none out). Returns the mean loss.
    fn loss(&self, data: &Self::Data, skip: &[usize], on_hidden: OnHidden<'_>) -> Result<f64>;
    /// Forward + backward, with `skip` bypassed; `on_hidden` as in [`PrunableModel::loss`].
    fn unit_grads(
        &self,
        data: &Self::Data,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<UnitGrads>;
    /// [`PrunableModel::loss`] (with `grads`: [`PrunableModel::unit_grads`]) with no skipped unit, the
    /// units' outputs (hidden states `1..=U`) left on GPU `ordinal` and handed to `sink` as one device
    /// batch after the pass, for the CUDA CKA. Returns the loss and the gradients, or `Ok(None)` when
    /// the model does not run on that GPU (the caller takes the host path; the default).
    fn pass_to_device(
        &self,
        _data: &Self::Data,
        _grads: bool,
        _ordinal: usize,
        _sink: &mut dyn FnMut(&DeviceBatch) -> Result<()>,
    ) -> Result<Option<(f64, Option<UnitGrads>)>> {
        Ok(None)
    }
    /// Whether the passes compute the hidden states in host memory (reading them through `on_hidden`
    /// costs nothing) rather than on a GPU (each one a device-to-host copy).
    fn hidden_on_host(&self) -> bool {
        true
    }
    /// Whether [`PrunableModel::loss_from`] can resume a forward at a unit (the loss scorers' prefix
    /// cache).
    fn can_resume(&self) -> bool {
        false
    }
    /// Forward from unit `start`, given its input `h` (hidden state `start` of a network that agrees with
    /// this one before `start`); `on_hidden` sees hidden states `start..=U`.
    fn loss_from(
        &self,
        _data: &Self::Data,
        _start: usize,
        _h: Arc<Vec<f32>>,
        _skip: &[usize],
        _on_hidden: OnHidden<'_>,
    ) -> Result<f64> {
        Err(Error::invalid("this model cannot resume a forward pass"))
    }
}

/// A decoder's gradient norms as the units' ([`UnitGrads`]).
fn unit_grads(g: GradNorms) -> UnitGrads {
    let rest = g.embed_tokens.powi(2) + g.norm.powi(2) + g.lm_head.unwrap_or(0.0).powi(2);
    UnitGrads {
        loss: g.loss,
        per_unit: g.per_layer,
        rest: rest.sqrt(),
    }
}

impl PrunableModel for Model {
    type Data = Tokens;

    fn num_units(&self) -> usize {
        self.num_layers()
    }
    fn unit_names(&self) -> Vec<String> {
        self.layer_names()
    }
    fn removable(&self) -> Vec<bool> {
        vec![true; self.num_layers()]
    }
    fn hidden_widths(&self, _: &Tokens) -> Result<Vec<usize>> {
        Ok(vec![self.hidden_size(); self.num_layers() + 1])
    }
    fn loss(&self, data: &Tokens, skip: &[usize], on_hidden: OnHidden<'_>) -> Result<f64> {
        self.forward(data, skip, on_hidden)
    }
    fn unit_grads(
        &self,
        data: &Tokens,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<UnitGrads> {
        Ok(unit_grads(self.grad_norms_observed(data, skip, on_hidden)?))
    }
    fn pass_to_device(
        &self,
        data: &Tokens,
        grads: bool,
        ordinal: usize,
        sink: &mut dyn FnMut(&DeviceBatch) -> Result<()>,
    ) -> Result<Option<(f64, Option<UnitGrads>)>> {
        Ok(Model::pass_to_device(self, data, grads, ordinal, sink)?
            .map(|p| (p.loss, p.grads.map(unit_grads))))
    }
    fn can_resume(&self) -> bool {
        true
    }
    fn hidden_on_host(&self) -> bool {
        self.runner_on_host()
    }
    fn loss_from(
        &self,
        data: &Tokens,
        start: usize,
        h: Arc<Vec<f32>>,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<f64> {
        self.forward_from(data, start, h, skip, on_hidden)
    }
}

impl PrunableModel for CnnModel {
    type Data = Images;

    fn num_units(&self) -> usize {
        CnnModel::num_units(self)
    }
    fn unit_names(&self) -> Vec<String> {
        CnnModel::unit_names(self)
    }
    fn removable(&self) -> Vec<bool> {
        self.units().iter().map(|u| u.removable).collect()
    }
    fn hidden_widths(&self, data: &Images) -> Result<Vec<usize>> {
        Ok(self
            .hidden_shapes(data.h, data.w)?
            .into_iter()
            .map(|(c, h, w)| c * h * w)
            .collect())
    }
    fn loss(&self, data: &Images, skip: &[usize], on_hidden: OnHidden<'_>) -> Result<f64> {
        Ok(self
            .forward(data, skip, on_hidden.unwrap_or(&mut |_, _| {}))?
            .loss)
    }
    fn unit_grads(
        &self,
        data: &Images,
        skip: &[usize],
        on_hidden: OnHidden<'_>,
    ) -> Result<UnitGrads> {
        let g = self.grad_norms(data, skip, on_hidden.unwrap_or(&mut |_, _| {}))?;
        Ok(UnitGrads {
            loss: g.outcome.loss,
            per_unit: g.per_unit,
            rest: (g.stem.powi(2) + g.head.powi(2)).sqrt(),
        })
    }
}
