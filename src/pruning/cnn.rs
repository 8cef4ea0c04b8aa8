//! `prune --arch`: the SGLP decision on a CNN classifier (a PyTorch `state_dict` in safetensors plus an
//! architecture name), top-1 accuracy before and after, and the pruned model: a `state_dict` with the kept
//! units renumbered (`model.safetensors`) and `sglp-arch.json`, from which `scripts/rebuild_cnn.py` builds
//! the pruned PyTorch model; plus the report, as for a decoder.

use super::checkpoint::StagedDir;
use super::pipeline::{sglp_decide, Budget, SglpOptions};
use super::prune::{
    decision_report, finish_report, note_gradnorm_file, use_gradnorm_file, ReportInputs,
};
use crate::error::{Error, Result};
use crate::report::PruneReport;
use crate::runtime::cnn::{arch::Shortcut, CnnModel, Family, Images, Stem, UnitKind};
use crate::runtime::weights::{file_metadata, map_weights, stored_weights, tensor_view};
use crate::similarity::Backend;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `sglp-arch.json`'s format tag.
pub const ARCH_FORMAT: &str = "sglp-arch/1";

/// Images and their labels, as given on the command line.
#[derive(Clone, Debug)]
pub struct ImageFiles {
    pub images: PathBuf,
    pub labels: PathBuf,
}

impl ImageFiles {
    pub fn load(&self, model: &CnnModel) -> Result<Images> {
        let im = Images::load_npy(&self.images, &self.labels)?;
        model.check_images(&im, &self.images)?;
        Ok(im)
    }
}

/// One `prune --arch` run.
#[derive(Clone, Debug)]
pub struct CnnPruneSpec {
    /// The `state_dict` (safetensors).
    pub model: PathBuf,
    pub arch: String,
    pub images: ImageFiles,
    /// Held-out images for top-1 accuracy before and after.
    pub eval: Option<ImageFiles>,
    pub budget: Budget,
    pub out: PathBuf,
    pub force: bool,
    /// Per-unit gradient norms measured elsewhere.
    pub gradnorm_file: Option<PathBuf>,
    pub method: String,
    pub options: SglpOptions,
}

/// Top-1 accuracy and mean loss of `model` with `skip` bypassed, over `images` in batches.
pub fn accuracy(
    model: &CnnModel,
    images: &Images,
    batch: usize,
    skip: &[usize],
) -> Result<(f64, f64)> {
    let batch = batch.max(1);
    let (mut correct, mut loss) = (0usize, 0.0);
    for first in (0..images.n).step_by(batch) {
        let b = images.batch(first, batch);
        let o = model.forward(&b, skip, &mut |_, _| {})?;
        correct += o.correct;
        loss += o.loss * b.n as f64;
    }
    Ok((correct as f64 / images.n as f64, loss / images.n as f64))
}

/// Prune a CNN: decide, evaluate, write the pruned `state_dict`, `sglp-arch.json` and the report into a
/// staging directory renamed to `spec.out` at the end. `open_backend` is called once the inputs are
/// checked.
pub fn prune_cnn(
    spec: &CnnPruneSpec,
    open_backend: &mut dyn FnMut() -> Result<Box<dyn Backend>>,
) -> Result<(PruneReport, PathBuf)> {
    let t0 = Instant::now();
    let mut opts = spec.options.clone();
    if let (Ok(o), Ok(m)) = (spec.out.canonicalize(), spec.model.canonicalize()) {
        if m.starts_with(&o) {
            return Err(Error::invalid(format!(
                "{}: --out would replace the input model; choose another OUTDIR",
                spec.out.display()
            )));
        }
    }
    StagedDir::check_dest(&spec.out, spec.force)?;
    let model = CnnModel::load(&spec.model, &spec.arch)?;
    let removable = model.units().iter().filter(|u| u.removable).count();
    let budget = match spec.budget {
        Budget::Remove(n) => n,
        Budget::TargetLayers(m) => model.num_units().saturating_sub(m),
    };
    if budget == 0 || budget >= removable {
        return Err(Error::invalid(format!(
            "--remove must be between 1 and {} for --arch {} ({} of its {} units are removable; got {budget})",
            removable.saturating_sub(1),
            spec.arch,
            removable,
            model.num_units()
        )));
    }
    let images = spec.images.load(&model)?;
    let eval = spec.eval.as_ref().map(|e| e.load(&model)).transpose()?;
    use_gradnorm_file(
        &mut opts,
        spec.gradnorm_file.as_deref(),
        &model.unit_names(),
    )?;
    let mut backend = open_backend()?;
    let mut d = sglp_decide(&model, &images, budget, &opts, backend.as_mut())?;
    note_gradnorm_file(&mut d, spec.gradnorm_file.as_deref());

    let t_eval = Instant::now();
    let (acc_before, acc_after) = match &eval {
        Some(e) => (
            Some(accuracy(&model, e, opts.forward_batch, &[])?.0),
            Some(accuracy(&model, e, opts.forward_batch, &d.removed)?.0),
        ),
        None => (None, None),
    };
    let eval_s = t_eval.elapsed().as_secs_f64();

    let t_write = Instant::now();
    let staged = StagedDir::new(&spec.out, spec.force)?;
    write_pruned_state_dict(&model, &d.removed, &staged.path().join("model.safetensors"))?;
    let arch_json = pruned_arch(&model, &d.removed, (images.h, images.w))?;
    crate::io::output::write_atomic(
        &staged.path().join("sglp-arch.json"),
        (serde_json::to_string_pretty(&arch_json).expect("serialisable") + "\n").as_bytes(),
    )?;
    let params_before = model.structure.stem_params
        + model.structure.head_params
        + model.units().iter().map(|u| u.params).sum::<usize>();
    let params_removed: usize = d.removed.iter().map(|&u| model.units()[u].params).sum();
    let report = decision_report(
        d,
        &opts,
        ReportInputs {
            model: spec.model.display().to_string(),
            calibration: spec.images.images.display().to_string(),
            items: images.n,
            rows_per_item: 1,
            units: model.unit_names(),
            method: spec.method.clone(),
            params: (params_before, params_before - params_removed),
            eval: spec.eval.as_ref().map(|e| e.images.display().to_string()),
            perplexity: (None, None),
            arch: Some(spec.arch.clone()),
            accuracy: (acc_before, acc_after),
            eval_s,
        },
    );
    finish_report(staged, report, t_write, t0)
}

/// New key prefix of every kept unit's tensors: ResNet blocks renumbered within their stage
/// (`layer2.3` → `layer2.1`), VGG `features.{i}` indices recomputed for the shorter `features`.
fn renamed_prefixes(model: &CnnModel, removed: &[usize]) -> HashMap<String, String> {
    let s = &model.structure;
    let mut map = HashMap::new();
    match s.arch.family {
        Family::CifarResnet | Family::Resnet => {
            let mut next = vec![0usize; s.arch.blocks.len()];
            for (u, unit) in s.units.iter().enumerate() {
                if removed.contains(&u) {
                    continue;
                }
                let new = format!("layer{}.{}", unit.stage + 1, next[unit.stage]);
                next[unit.stage] += 1;
                map.insert(unit.name.clone(), new);
            }
        }
        Family::Vgg => {
            // features: conv, [bn], relu per conv; a pool after the last conv of each block (kept even
            // when that conv goes).
            let mut idx = 0usize;
            for (u, unit) in s.units.iter().enumerate() {
                let UnitKind::Conv {
                    conv,
                    bn,
                    pool_after,
                } = &unit.kind
                else {
                    continue;
                };
                if !removed.contains(&u) {
                    map.insert(conv.clone(), format!("features.{idx}"));
                    if let Some(bn) = bn {
                        map.insert(bn.clone(), format!("features.{}", idx + 1));
                    }
                    idx += if bn.is_some() { 3 } else { 2 };
                }
                if *pool_after {
                    idx += 1;
                }
            }
        }
    }
    map
}

/// The pruned `state_dict`: every tensor of the kept units under its new prefix, the stem and head as
/// they were; dtypes and bytes unchanged.
pub fn write_pruned_state_dict(model: &CnnModel, removed: &[usize], dst: &Path) -> Result<()> {
    let src = &model.path;
    let renamed = renamed_prefixes(model, removed);
    let dropped: Vec<&str> = removed
        .iter()
        .flat_map(|&u| model.units()[u].prefixes.iter().map(String::as_str))
        .collect();
    let map = map_weights(src)?;
    let under = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    };
    let mut keep = Vec::new();
    for t in stored_weights(&map, src)? {
        if dropped.iter().any(|p| under(&t.name, p)) {
            continue;
        }
        // The longest matching prefix: `features.1` must not catch `features.10`.
        let new = renamed
            .iter()
            .filter(|(old, _)| under(&t.name, old))
            .max_by_key(|(old, _)| old.len())
            .map(|(old, new)| format!("{new}{}", &t.name[old.len()..]))
            .unwrap_or_else(|| t.name.clone());
        keep.push((new, tensor_view(&map, &t, src)?));
    }
    let mut info = file_metadata(&map, src)?;
    info.entry("format".into()).or_insert_with(|| "pt".into());
    safetensors::serialize_to_file(keep, Some(info), dst)
        .map_err(|e| Error::format(dst, e.to_string()))
}

/// `sglp-arch.json`: what `scripts/rebuild_cnn.py` needs to build the pruned model in plain PyTorch.
pub fn pruned_arch(
    model: &CnnModel,
    removed: &[usize],
    (h, w): (usize, usize),
) -> Result<serde_json::Value> {
    let s = &model.structure;
    let kept = |u: usize| !removed.contains(&u);
    let mut v = serde_json::json!({
        "format": ARCH_FORMAT,
        "arch": s.arch.name,
        "family": s.arch.family,
        "in_channels": s.in_channels,
        "num_classes": s.num_classes,
        "removed": removed.iter().map(|&u| s.units[u].name.clone()).collect::<Vec<_>>(),
    });
    let obj = v.as_object_mut().expect("an object");
    match s.arch.family {
        Family::CifarResnet | Family::Resnet => {
            let stages = s.arch.blocks.len();
            let mut blocks = vec![0usize; stages];
            let mut widths = vec![0usize; stages];
            let mut shortcut = "identity";
            for (u, unit) in s.units.iter().enumerate() {
                widths[unit.stage] = match unit.kind {
                    UnitKind::Bottleneck { .. } => unit.c_out / 4,
                    _ => unit.c_out,
                };
                if kept(u) {
                    blocks[unit.stage] += 1;
                }
                match &unit.kind {
                    UnitKind::Basic { shortcut: sc } | UnitKind::Bottleneck { shortcut: sc } => {
                        match sc {
                            Shortcut::ZeroPad { .. } => shortcut = "A",
                            Shortcut::Projection { .. } if shortcut == "identity" => shortcut = "B",
                            _ => {}
                        }
                    }
                    UnitKind::Conv { .. } => {}
                }
            }
            let stem = match s.stem {
                Stem::Conv { .. } => s.units[0].c_in,
                Stem::None => s.in_channels,
            };
            obj.insert("blocks".into(), blocks.into());
            obj.insert("widths".into(), widths.into());
            obj.insert("stem_channels".into(), stem.into());
            obj.insert("bottleneck".into(), s.arch.bottleneck.into());
            obj.insert(
                "shortcut".into(),
                (if s.arch.family == Family::Resnet {
                    "B"
                } else {
                    shortcut
                })
                .into(),
            );
            obj.insert("head".into(), s.head[0].clone().into());
        }
        Family::Vgg => {
            // The torchvision-style cfg: channels, "M" for a pool.
            let mut cfg = Vec::new();
            for (u, unit) in s.units.iter().enumerate() {
                if kept(u) {
                    cfg.push(serde_json::json!(unit.c_out));
                }
                if let UnitKind::Conv {
                    pool_after: true, ..
                } = unit.kind
                {
                    cfg.push(serde_json::json!("M"));
                }
            }
            let head_pool = model.head_pool_for(h, w)?;
            obj.insert("cfg".into(), cfg.into());
            obj.insert("batch_norm".into(), s.arch.batch_norm.into());
            obj.insert(
                "classifier".into(),
                (if s.head.len() == 1 && s.head[0] == "classifier" {
                    "cifar"
                } else {
                    "torchvision"
                })
                .into(),
            );
            obj.insert(
                "head_pool".into(),
                serde_json::to_value(head_pool).expect("serialisable"),
            );
            obj.insert("head".into(), s.head.clone().into());
        }
    }
    Ok(v)
}
