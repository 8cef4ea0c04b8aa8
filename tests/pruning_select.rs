//! Segmentation + allocation + selection on constructed cases where the right answer is known: a CKA
//! matrix of blocks of similar layers and hand-set gradient norms.

use sglp_engine::pruning::allocate::{allocate, Allocation};
use sglp_engine::pruning::select::{best_subsets, lowest_under_caps};
use sglp_engine::segmentation::{segment_cka, Features, KChoice};

/// CKA of `blocks` (lengths) of layers: 1 on the diagonal, `within` inside a block, decaying with the
/// distance between blocks outside; plus a seeded perturbation of size `noise` (symmetric).
fn block_cka(blocks: &[usize], within: f64, noise: f64, seed: u64) -> Vec<Vec<f64>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ids: Vec<usize> = blocks
        .iter()
        .enumerate()
        .flat_map(|(b, &n)| std::iter::repeat_n(b, n))
        .collect();
    let l = ids.len();
    let mut m = vec![vec![0.0; l]; l];
    for i in 0..l {
        for j in 0..=i {
            let v = if i == j {
                1.0
            } else if ids[i] == ids[j] {
                within + noise * rng.random_range(-1.0..1.0)
            } else {
                0.6 / (1 + ids[i].abs_diff(ids[j])) as f64 + noise * rng.random_range(-1.0..1.0)
            };
            m[i][j] = v;
            m[j][i] = v;
        }
    }
    m
}

#[test]
fn blocks_are_found_budget_split_and_lowest_gradnorm_removed() {
    // 12 layers in blocks of 5, 4, 3.
    let cka = block_cka(&[5, 4, 3], 0.95, 0.01, 11);
    let names: Vec<String> = (0..12).map(|i| format!("l{i}")).collect();
    let seg = segment_cka(&names, &cka, Features::Rows, KChoice::Fixed(3), 1).unwrap();
    let segments: Vec<(usize, usize)> = seg.segments.iter().map(|s| (s[0], s[1])).collect();
    assert_eq!(segments, vec![(0, 4), (5, 8), (9, 11)]);
    // Budget 6 over lengths 5, 4, 3: quotas 2.5, 2, 1.5 → floors 2, 2, 1; the one left goes to the largest
    // remainder, tied between segments 0 and 2 (.5 each) → the longer, segment 0.
    let lens: Vec<usize> = segments.iter().map(|&(a, b)| b - a + 1).collect();
    let counts = allocate(&lens, 6, Allocation::Proportional).unwrap();
    assert_eq!(counts, vec![3, 2, 1]);

    // Gradient norms with a known order inside each block.
    let g = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.35, 0.05, 0.5];
    let removed = lowest_under_caps(&segments, &counts, 6, &g).unwrap();
    assert_eq!(removed, vec![1, 2, 3, 5, 7, 10]);
}

#[test]
fn subset_search_prefers_the_subset_with_the_smallest_global_gradnorm() {
    let segments = [(0, 3), (4, 7)];
    let counts = [2, 1];
    // The network's global gradient norm after removal: layers 1 and 3 together keep it lowest in the
    // first segment (an interaction a per-layer ranking cannot see), layer 6 in the second; removing
    // layer 0 sends it up (as removing the first layer of a trained model does).
    let mut score = |removed: &[usize]| -> sglp_engine::Result<f64> {
        let mut s = 1.0;
        if removed == [1, 3] {
            s -= 0.5;
        }
        if removed.contains(&0) {
            s += 5.0;
        }
        if removed == [6] {
            s -= 0.1;
        }
        Ok(s)
    };
    let (removed, search) = best_subsets(&segments, &counts, 100, &mut score).unwrap();
    assert_eq!(removed, vec![1, 3, 6]);
    assert_eq!(search.len(), 2);
    assert_eq!(search[0].evaluated, 6);
    assert_eq!(search[1].evaluated, 4);
    // Every candidate's score is kept for the report, not only the winner's.
    assert_eq!(search[0].candidates.len(), 6);
    assert!(search[0]
        .candidates
        .iter()
        .any(|(set, s)| set == &vec![0, 1] && *s == 6.0));
    assert_eq!(search[0].score, 0.5);
}

/// The fused calibration pass (hidden states taken from the gradient-norm forward) gives the same CKA as
/// a separate capture and the same gradient norms as separate forward + backward passes.
#[test]
fn fused_calibration_pass_equals_separate_capture_and_gradnorm() {
    use sglp_engine::io::TokenMode;
    use sglp_engine::pruning::allocate::Allocation;
    use sglp_engine::pruning::calibration::mean_grad_norms;
    use sglp_engine::pruning::pipeline::{sglp_decide, SglpOptions};
    use sglp_engine::pruning::select::Selection;
    use sglp_engine::runtime::{CaptureSource, Model, Tokens};
    use sglp_engine::similarity::{compute_cka, cpu::CpuBackend, CkaSpec};
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_f16_bias");
    let model = Model::load(&dir).unwrap();
    let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
    let spec = CkaSpec {
        batch_size: 12,
        ..CkaSpec::default()
    };
    for gradnorm_batches in [None, Some(1)] {
        let opts = SglpOptions {
            cka: spec,
            features: Features::ColSum,
            k: KChoice::Fixed(1),
            min_len: 1,
            allocation: Allocation::Proportional,
            selection: Selection::Gradnorm,
            max_candidates: 8,
            shortlist: 0,
            shortlist_by: Default::default(),
            score_sequences: None,
            rank_sequences: None,
            forward_batch: 2,
            gradnorm_batches,
            prefix_cache: None,
            gradnorm: None,
        };
        let mut cpu = CpuBackend::new(1);
        let d = sglp_decide(&model, &tokens, 1, &opts, &mut cpu).unwrap();
        let mut capture = CaptureSource::new(&model, &tokens, 2, TokenMode::Samples);
        let separate = compute_cka(&mut capture, &spec, &mut cpu).unwrap();
        let (a, b) = (d.cka.cka_matrix(), separate.cka_matrix());
        assert_eq!(d.cka.n_samples, separate.n_samples);
        for (ra, rb) in a.iter().zip(&b) {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-12, "{x} vs {y}");
            }
        }
        let g = mean_grad_norms(&model, &tokens, 2, gradnorm_batches, &[], false).unwrap();
        let dg = d.gradnorm.unwrap();
        assert_eq!(dg, g);
        assert_eq!(
            dg.batches,
            gradnorm_batches.unwrap_or(tokens.sequences.div_ceil(2))
        );
    }
}

/// A pruned Qwen2 checkpoint with sliding-window layers keeps every kept layer's own attention kind:
/// its loss equals the original model's with the removed layer skipped.
#[test]
fn pruned_sliding_window_checkpoint_keeps_each_layers_window() {
    use sglp_engine::pruning::checkpoint::write_pruned_checkpoint;
    use sglp_engine::runtime::{Model, Tokens};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_sliding");
    let model = Model::load(&dir).unwrap();
    let tokens = Tokens::load_npy(&dir.join("tokens.npy")).unwrap();
    for removed in [0usize, 1] {
        let kept: Vec<usize> = (0..model.num_layers()).filter(|&i| i != removed).collect();
        let out = tempfile::tempdir().unwrap();
        write_pruned_checkpoint(
            &dir,
            out.path(),
            &model.names.layers_prefix(),
            model.num_layers(),
            &kept,
        )
        .unwrap();
        let pruned = Model::load(out.path()).unwrap();
        let want = model.forward(&tokens, &[removed], None).unwrap();
        let got = pruned.forward(&tokens, &[], None).unwrap();
        assert!(
            (got - want).abs() <= 1e-9 * want.abs(),
            "removed {removed}: {got} vs {want}"
        );
    }
}

/// The loss scorer's resumed evaluations (from the kept layer inputs of the base set) equal whole
/// forwards, on fresh random skip sets and rebases, for a plain and a sliding-window model.
#[test]
fn loss_scorer_resumes_from_shared_prefixes_exactly() {
    use rand::{Rng, SeedableRng};
    use sglp_engine::pruning::calibration::{perplexity, LossScorer};
    use sglp_engine::runtime::{Model, Tokens};
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    for name in ["trained_llama", "qwen2_sliding"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let model = Model::load(&dir).unwrap();
        let file = if name == "trained_llama" {
            "calib.npy"
        } else {
            "tokens.npy"
        };
        let all = Tokens::load_npy(&dir.join(file)).unwrap();
        let tokens = all.batch(0, all.sequences.min(5));
        let l = model.num_layers();
        let mut scorer = LossScorer::new(&model, &tokens, None, 2).unwrap();
        for _ in 0..12 {
            let pick = |rng: &mut rand::rngs::StdRng| -> Vec<usize> {
                let n = rng.random_range(0..l);
                let mut s: Vec<usize> = (0..n).map(|_| rng.random_range(0..l)).collect();
                s.sort_unstable();
                s.dedup();
                s
            };
            if rng.random_bool(0.4) {
                scorer.rebase(&pick(&mut rng)).unwrap();
            }
            let skip = pick(&mut rng);
            let got = scorer.loss(&skip).unwrap();
            let want = perplexity(&model, &tokens, 2, &skip).unwrap().loss;
            assert!(
                (got - want).abs() <= 1e-12 * want.abs(),
                "{name} skip {skip:?}: {got} vs {want}"
            );
        }
        // Resuming saved work: fewer whole-network passes than evaluations.
        assert!(scorer.layer_passes < scorer.evaluations as f64, "{name}");

        // Seeded from a calibration pass's layer inputs (the whole set, and its first batch alone), the
        // scorer runs no unpruned forward of its own and still gives whole forwards' losses.
        use sglp_engine::pruning::calibration::{calibration_pass, Needs, PassOptions};
        let needs = Needs {
            states: true,
            ..Needs::default()
        };
        let opts = PassOptions {
            cka: Default::default(),
            forward_batch: 2,
            gradnorm_batches: None,
            prefix_cache: None,
        };
        let mut cpu = sglp_engine::similarity::cpu::CpuBackend::new(1);
        let stats = calibration_pass(&model, &tokens, needs, &opts, &mut cpu).unwrap();
        let base = stats.states.expect("states kept");
        for seqs in [tokens.sequences, 2] {
            let mut seeded = LossScorer::new(&model, &tokens, Some(seqs), 2).unwrap();
            seeded.seed(&base);
            let sub = tokens.batch(0, seqs);
            for skip in [vec![], vec![l - 1], vec![0, l - 1]] {
                let got = seeded.loss(&skip).unwrap();
                let want = perplexity(&model, &sub, 2, &skip).unwrap().loss;
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs(),
                    "{name} seeded on {seqs} sequences, skip {skip:?}: {got} vs {want}"
                );
            }
            // Only the two non-empty sets ran: the unpruned loss came from the pass.
            assert_eq!(seeded.evaluations, 2, "{name}");
        }
    }
}

/// The scorers' memory budget and whether evaluated sets keep their layer inputs change how much of the
/// network runs, never the losses: with no budget every evaluation is a whole forward; without kept
/// inputs each rebase costs one partial forward; with both, rebasing onto the step's winner is free.
#[test]
fn prefix_cache_budget_changes_the_work_not_the_losses() {
    use rand::{Rng, SeedableRng};
    use sglp_engine::pruning::calibration::LossScorer;
    use sglp_engine::runtime::{Model, Tokens};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained_llama");
    let model = Model::load(&dir).unwrap();
    let tokens = Tokens::load_npy(&dir.join("calib.npy"))
        .unwrap()
        .batch(0, 4);
    let l = model.num_layers();
    assert!(l >= 4, "{l}");
    let new = || LossScorer::new(&model, &tokens, None, 2).unwrap();
    let mut scorers = [
        ("cached", new()),
        ("no budget", new().with_budget(0)),
        ("unkept", new().keep_pending(false)),
    ];
    // Two greedy steps over random candidates: score every candidate with the removed set as the base,
    // then remove the best.
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut removed: Vec<usize> = Vec::new();
    for _ in 0..2 {
        let mut candidates: Vec<usize> = (0..l).filter(|c| !removed.contains(c)).collect();
        candidates.retain(|_| rng.random_bool(0.7));
        if candidates.is_empty() {
            candidates.push((0..l).find(|c| !removed.contains(c)).unwrap());
        }
        let mut best = (f64::INFINITY, 0);
        for &c in &candidates {
            let mut set = removed.clone();
            set.push(c);
            let losses: Vec<f64> = scorers
                .iter_mut()
                .map(|(_, s)| s.score_step(&set, c).unwrap())
                .collect();
            for ((name, _), v) in scorers.iter().zip(&losses) {
                assert!(
                    (v - losses[0]).abs() <= 1e-12 * losses[0].abs(),
                    "{name}, set {set:?}: {v} vs {}",
                    losses[0]
                );
            }
            if losses[0] < best.0 {
                best = (losses[0], c);
            }
        }
        removed.push(best.1);
    }
    let [(_, cached), (_, whole), (_, unkept)] = &scorers;
    // No budget: every evaluation a whole network.
    assert_eq!(whole.layer_passes, whole.evaluations as f64);
    assert!(cached.layer_passes < whole.layer_passes);
    // Unkept inputs: the second step's rebase onto the first step's winner is one more run.
    assert_eq!(unkept.evaluations, cached.evaluations + 1);
    assert!(unkept.layer_passes < whole.layer_passes);
}
