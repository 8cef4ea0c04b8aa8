//! Write a synthetic "ResNet-like" activation file: layers in 3-4 blocks (stages) of similar
//! representations, so the CKA heatmap shows block structure and segmentation can recover the blocks.
//!
//! ```text
//! cargo run --release --example make_activations -- OUT.safetensors [--layers 12 --samples 512 --width 64 --seed 0]
//! ```
//!
//! Model: each block `b` has a latent `Z_b` (`samples × latent`), partly inherited from the previous block
//! (`Z_b = ρ·Z_{b-1}·M_b + N_b`), with a decaying spectrum (latent column `j` scaled by `1/sqrt(j+1)`, as
//! in real activations a few directions dominate). Inside a block a residual stream drifts,
//! `H_k = H_{k-1} + δ·N_k` (same spectrum) with `H_0 = Z_b`, and layer `k` is `relu(H_k·W_k) + σ·E_k`, where
//! `W_k` is mostly the block's random map to the layer's width and partly its own.
//! Stage widths double halfway through (`width`, then `2·width`), and the second layer of a block of three
//! or more is a bottleneck of half the stage width. Layers within a block share `Z_b`, so their CKA is
//! high; layers of different blocks share only the damped `ρ` component.
//!
//! The file is f32, tensors `layer1..layerL` of shape `[samples, width_l]`, with metadata `layers` (the
//! order) and `blocks` (the ground truth, 0-based inclusive layer ranges such as `0-2,3-6`). Deterministic
//! from `--seed`.

use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use safetensors::tensor::TensorView;
use sglp_engine::linalg::{matmul, MatRef, Parallelism};
use std::collections::HashMap;
use std::path::PathBuf;

/// How much of the previous block's latent a block inherits.
const RHO: f32 = 0.5;
/// Residual-stream drift per layer inside a block.
const DRIFT: f32 = 0.25;
/// Additive noise on every layer's output.
const NOISE: f32 = 0.1;
/// A layer's map is `SHARED·W_b + sqrt(1-SHARED²)·G_k`: mostly the block's map, partly its own.
const SHARED: f32 = 0.8;

#[derive(Parser, Debug)]
#[command(about = "Write a synthetic ResNet-like activation file (safetensors, f32)")]
struct Args {
    /// Output `.safetensors` path.
    out: PathBuf,
    /// Number of layers.
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Number of samples (rows).
    #[arg(long, default_value_t = 512)]
    samples: usize,
    /// Width of the first stage (later stages are twice as wide).
    #[arg(long, default_value_t = 64)]
    width: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run(args: &Args) -> sglp_engine::Result<()> {
    if args.layers == 0 || args.samples < 2 || args.width < 2 {
        return Err(sglp_engine::Error::invalid(
            "need --layers >= 1, --samples >= 2 and --width >= 2",
        ));
    }
    let mut rng = StdRng::seed_from_u64(args.seed);
    let sizes = block_sizes(args.layers, &mut rng);
    let latent = (args.width / 2).max(2);
    let n = args.samples;

    let mut names = Vec::with_capacity(args.layers);
    let mut tensors: Vec<(Vec<usize>, Vec<f32>)> = Vec::with_capacity(args.layers);
    let mut ranges = Vec::with_capacity(sizes.len());
    let mut z = gaussian(n * latent, 1.0, &mut rng);
    decay_spectrum(&mut z, latent);
    for (b, &size) in sizes.iter().enumerate() {
        if b > 0 {
            z = next_block_latent(&z, n, latent, &mut rng);
        }
        let stage_width = args.width << (2 * b / sizes.len());
        let first = names.len();
        let block_map = gaussian(latent * stage_width, 1.0 / (latent as f32).sqrt(), &mut rng);
        let mut h = z.clone();
        for k in 0..size {
            if k > 0 {
                let mut drift = gaussian(n * latent, DRIFT, &mut rng);
                decay_spectrum(&mut drift, latent);
                for (x, e) in h.iter_mut().zip(drift) {
                    *x += e;
                }
            }
            let width = if k == 1 && size >= 3 {
                (stage_width / 2).max(1)
            } else {
                stage_width
            };
            names.push(format!("layer{}", names.len() + 1));
            let out = layer_output(&h, n, latent, (&block_map, stage_width), width, &mut rng);
            tensors.push((vec![n, width], out));
        }
        ranges.push(format!("{}-{}", first, names.len() - 1));
    }

    let bytes: Vec<&[u8]> = tensors
        .iter()
        .map(|(_, v)| bytemuck::cast_slice(v))
        .collect();
    let views = names
        .iter()
        .zip(&tensors)
        .zip(&bytes)
        .map(|((name, (shape, _)), b)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .expect("shape matches data by construction");
            (name.as_str(), view)
        });
    let metadata = HashMap::from([
        ("layers".to_string(), names.join(",")),
        ("blocks".to_string(), ranges.join(",")),
        (
            "generator".to_string(),
            format!(
                "make_activations --layers {} --samples {} --width {} --seed {}",
                args.layers, args.samples, args.width, args.seed
            ),
        ),
    ]);
    let file = safetensors::serialize(views, Some(metadata))
        .map_err(|e| sglp_engine::Error::invalid(format!("serializing: {e}")))?;
    sglp_engine::io::output::write_atomic(&args.out, &file)?;
    eprintln!(
        "wrote {}: {} layers x {} samples, blocks {}",
        args.out.display(),
        args.layers,
        n,
        ranges.join(",")
    );
    Ok(())
}

/// Split `layers` into 3-4 blocks (fewer for tiny nets) of near-equal size, then move one layer between
/// two random blocks so the blocks are not all the same length.
fn block_sizes(layers: usize, rng: &mut StdRng) -> Vec<usize> {
    let blocks = match layers {
        0..=3 => 1,
        4..=5 => 2,
        6..=9 => 3,
        _ => 4,
    };
    let mut sizes: Vec<usize> = (0..blocks)
        .map(|b| layers / blocks + usize::from(b < layers % blocks))
        .collect();
    if blocks > 1 {
        let from = rng.random_range(0..blocks);
        let to = (from + rng.random_range(1..blocks)) % blocks;
        if sizes[from] > 2 {
            sizes[from] -= 1;
            sizes[to] += 1;
        }
    }
    sizes
}

fn gaussian(len: usize, std: f32, rng: &mut StdRng) -> Vec<f32> {
    let dist = Normal::new(0.0f32, std).expect("std is finite and positive");
    (0..len).map(|_| dist.sample(rng)).collect()
}

/// `Z_b = ρ·Z_{b-1}·M + N`, with `M` a random `latent × latent` map scaled to keep unit variance.
fn next_block_latent(z: &[f32], n: usize, latent: usize, rng: &mut StdRng) -> Vec<f32> {
    let m = gaussian(latent * latent, RHO / (latent as f32).sqrt(), rng);
    let mut next = gaussian(n * latent, (1.0 - RHO * RHO).sqrt(), rng);
    decay_spectrum(&mut next, latent);
    matmul(
        &mut next,
        latent,
        MatRef::rm(z, n, latent),
        MatRef::rm(&m, latent, latent),
        1.0,
        true,
        Parallelism::None,
    );
    next
}

/// Scale latent column `j` by `1/sqrt(j+1)`: like real activations, a few directions dominate.
fn decay_spectrum(z: &mut [f32], latent: usize) {
    for row in z.chunks_exact_mut(latent) {
        for (j, x) in row.iter_mut().enumerate() {
            *x /= ((j + 1) as f32).sqrt();
        }
    }
}

/// `relu(H·W) + σ·E`, `W` (`latent × width`) mixing the first `width` columns of the block's map
/// (`latent × block_width`, row-major) with a fresh random map.
fn layer_output(
    h: &[f32],
    n: usize,
    latent: usize,
    (block_map, block_width): (&[f32], usize),
    width: usize,
    rng: &mut StdRng,
) -> Vec<f32> {
    let mut w = gaussian(latent * width, 1.0 / (latent as f32).sqrt(), rng);
    let own = (1.0 - SHARED * SHARED).sqrt();
    for (w_row, b_row) in w
        .chunks_exact_mut(width)
        .zip(block_map.chunks_exact(block_width))
    {
        for (x, &b) in w_row.iter_mut().zip(b_row) {
            *x = SHARED * b + own * *x;
        }
    }
    let mut out = vec![0f32; n * width];
    matmul(
        &mut out,
        width,
        MatRef::rm(h, n, latent),
        MatRef::rm(&w, latent, width),
        1.0,
        false,
        Parallelism::None,
    );
    for (x, e) in out.iter_mut().zip(gaussian(n * width, NOISE, rng)) {
        *x = x.max(0.0) + e;
    }
    out
}
