//! The CNN runtime against PyTorch: tiny random models of every family made by
//! scripts/make_cnn_fixtures.py (plain PyTorch, float64 reference on the stored float32 weights). Loss,
//! block outputs and logits within 1e-5 relative (to the tensor's largest value), gradient norms within
//! 1e-4 relative — the tolerances of the LLM fixtures. Families: CIFAR ResNet-20 with option-A and option-B
//! shortcuts, torchvision ResNet-18 and ResNet-50 (bottlenecks), VGG-11-BN (torchvision classifier,
//! adaptive 7×7 pool) and VGG-16 (CIFAR layout, one linear).

mod common;

use common::{fixtures, rel};
use safetensors::SafeTensors;
use sglp_engine::runtime::cnn::{CnnModel, Images};
use std::collections::HashMap;

const FIXTURES: [&str; 6] = [
    "cifar_resnet20_a",
    "cifar_resnet20_b",
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "vgg16_cifar",
];

struct Reference {
    arch: String,
    skip: Vec<usize>,
    units: Vec<String>,
    tensors: HashMap<String, Vec<f64>>,
}

fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(
        fixtures()
            .join("cnn")
            .join(name)
            .join("reference.safetensors"),
    )
    .unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let vals = v
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, vals)
        })
        .collect();
    Reference {
        arch: meta["arch"].clone(),
        skip: meta["skip"]
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect(),
        units: serde_json::from_str(&meta["units"]).unwrap(),
        tensors,
    }
}

fn load(name: &str) -> (CnnModel, Images, Reference) {
    let dir = fixtures().join("cnn").join(name);
    let r = reference(name);
    let model = CnnModel::load(&dir.join("model.safetensors"), &r.arch).unwrap();
    let images = Images::load_npy(&dir.join("images.npy"), &dir.join("labels.npy")).unwrap();
    model
        .check_images(&images, &dir.join("images.npy"))
        .unwrap();
    (model, images, r)
}

/// max |a − b| / max |b|.
fn rel_max(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()))
        / scale
}

#[test]
fn structure_matches_pytorch() {
    for name in FIXTURES {
        let (model, _, r) = load(name);
        assert_eq!(model.unit_names(), r.units, "{name}: unit names");
        let removable: Vec<bool> = model.units().iter().map(|u| u.removable).collect();
        let want: Vec<bool> = r.tensors["removable"].iter().map(|&v| v == 1.0).collect();
        assert_eq!(removable, want, "{name}: removable units");
        assert!(removable.iter().any(|&x| x), "{name}: nothing removable");
    }
}

#[test]
fn forward_backward_match_pytorch() {
    for name in FIXTURES {
        let (model, images, r) = load(name);
        let mut seen = vec![false; model.num_units() + 1];
        let mut worst = 0f64;
        let g = model
            .grad_norms(&images, &[], &mut |i, h| {
                let err = rel_max(h, &r.tensors[&format!("hidden.{i}")]);
                assert!(err < 1e-5, "{name}: hidden {i}: rel err {err:.2e}");
                worst = worst.max(err);
                seen[i] = true;
            })
            .unwrap();
        assert!(seen.iter().all(|&s| s), "{name}: not every hidden state");
        let loss = r.tensors["loss"][0];
        assert!(
            rel(g.outcome.loss, loss) < 1e-5,
            "{name}: loss {} vs {loss}",
            g.outcome.loss
        );
        assert_eq!(g.outcome.correct as f64, r.tensors["correct"][0], "{name}");
        for (u, (&a, &b)) in g.per_unit.iter().zip(&r.tensors["gradnorm"]).enumerate() {
            assert!(rel(a, b) < 1e-4, "{name}: unit {u} grad norm {a} vs {b}");
        }
        let extra = &r.tensors["extra"];
        if extra[0] > 0.0 {
            assert!(rel(g.stem, extra[0]) < 1e-4, "{name}: stem {}", g.stem);
        }
        assert!(rel(g.head, extra[1]) < 1e-4, "{name}: head {}", g.head);
        // The forward-only pass gives the same loss as the forward of forward + backward.
        let f = model.forward(&images, &[], &mut |_, _| {}).unwrap();
        assert_eq!(f.loss, g.outcome.loss, "{name}");
        eprintln!(
            "{name}: loss {:.6}, worst hidden rel err {worst:.1e}",
            f.loss
        );
    }
}

#[test]
fn skipped_units_match_pytorch() {
    for name in FIXTURES {
        let (model, images, r) = load(name);
        let logits = model.logits(&images, &r.skip).unwrap();
        let err = rel_max(&logits, &r.tensors["logits_skip"]);
        assert!(
            err < 1e-5,
            "{name}: logits with {:?} skipped: {err:.2e}",
            r.skip
        );
        // Skipping changes the logits (the fixture's skip set is not a no-op).
        let full = model.logits(&images, &[]).unwrap();
        assert!(
            full.iter().zip(&logits).any(|(a, b)| (a - b).abs() > 1e-4),
            "{name}"
        );
        // Skipped units have no gradient.
        let g = model.grad_norms(&images, &r.skip, &mut |_, _| {}).unwrap();
        for &u in &r.skip {
            assert_eq!(g.per_unit[u], 0.0, "{name}: skipped unit {u}");
        }
    }
}

#[test]
fn unremovable_unit_and_wrong_keys_are_one_line_errors() {
    let (model, images, _) = load("cifar_resnet20_a");
    // layer2.0 downsamples: unit 3.
    let e = model.logits(&images, &[3]).unwrap_err().to_string();
    assert!(e.contains("layer2.0") && !e.contains('\n'), "{e}");
    let path = fixtures().join("cnn/cifar_resnet20_a/model.safetensors");
    let e = CnnModel::load(&path, "cifar-resnet32")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer1.3") && !e.contains('\n'), "{e}");
    let e = CnnModel::load(&path, "resnet18").err().unwrap().to_string();
    assert!(!e.contains('\n') && e.contains("conv1.weight"), "{e}");
    let e = CnnModel::load(&path, "vgg13").err().unwrap().to_string();
    assert!(e.contains("features.0.weight"), "{e}");
}
