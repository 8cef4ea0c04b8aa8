//! `prune`, `eval` and `compare` from the command line: outputs (ShortGPT / angular statistics checked
//! against PyTorch's hidden states), and clear errors with exit code 2 on bad input. Uses the runtime's tiny fixture model tests/fixtures/llama_llama3_rope (3 layers, vocab 128).

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use common::{engine, engine_ok, read_json, write_tokens};

fn fixture() -> PathBuf {
    common::fixture("llama_llama3_rope")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Run `prune` on the fixture with the given extra arguments.
fn prune(out: &Path, extra: &[&str]) -> Output {
    let m = fixture();
    let t = m.join("tokens.npy");
    let mut args = vec![
        "prune",
        "--model",
        s(&m),
        "--tokens",
        s(&t),
        "--out",
        s(out),
        "--cka-batch",
        "16",
        "--batch",
        "2",
    ];
    args.extend_from_slice(extra);
    engine(&args)
}

fn assert_exit2(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    // One line of error (notes and warnings aside).
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1);
}

/// Only `keep` (if any) is left in `dir`: no staging or aside directories.
fn assert_no_leftovers(dir: &Path, keep: &[&str]) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

#[test]
fn prune_writes_checkpoint_report_and_pictures() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let t = fixture().join("tokens.npy");
    let o = prune(&out, &["--target-layers", "2", "--eval-tokens", s(&t)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "config.json",
        "model.safetensors",
        "sglp-report.json",
        "sglp-report.html",
        "sglp-cka.png",
        "sglp-gradnorm.png",
        "sglp-segmentation-loss.png",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let r = read_json(&out.join("sglp-report.json"));
    assert_eq!(r["format"], "sglp-prune-report/2");
    assert_eq!(r["method"], "sglp");
    assert_eq!(r["removed"].as_array().unwrap().len(), 1);
    assert_eq!(r["cka"]["cka"].as_array().unwrap().len(), 3);
    // The default decision measures losses, not gradient norms: the single-removal losses rank the
    // shortlist and each greedy step lists its candidates' calibration losses.
    assert!(r["gradnorm"].is_null());
    let single = r["single_removal_loss"].as_array().unwrap();
    assert_eq!(single.len(), 3);
    assert!(single.iter().all(|v| v.as_f64().unwrap() > 0.0));
    let steps = r["greedy_steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    let best = steps[0]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(steps[0]["score"].as_f64().unwrap(), best);
    assert_eq!(r["removed"][0], steps[0]["removed"]);
    assert!(r["params_after"].as_u64().unwrap() < r["params_before"].as_u64().unwrap());
    assert!(r["perplexity_before"].as_f64().unwrap() > 1.0);
    for stage in [
        "capture_s",
        "cka_s",
        "segmentation_s",
        "gradnorm_s",
        "selection_s",
        "writing_s",
    ] {
        assert!(r["timings"][stage].as_f64().unwrap() >= 0.0);
    }
    let html = std::fs::read_to_string(out.join("sglp-report.html")).unwrap();
    assert_eq!(html.matches("data:image/png;base64,").count(), 3);
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_no_leftovers(tmp.path(), &["pruned"]);
}

#[test]
fn budget_not_below_the_layer_count_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    assert_exit2(
        &prune(&out, &["--remove", "3"]),
        "--remove must be between 1 and 2",
    );
    assert_exit2(&prune(&out, &["--target-layers", "0"]), "--target-layers");
    assert!(!out.exists());
    assert_no_leftovers(tmp.path(), &[]);
}

#[test]
fn a_prefix_cache_budget_that_is_not_a_size_is_refused_and_zero_gives_the_same_decision() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for bad in ["--prefix-cache-gib=-1", "--prefix-cache-gib=nan"] {
        assert_exit2(
            &prune(&out, &["--remove", "1", bad]),
            "--prefix-cache-gib must be a number of GiB",
        );
    }
    assert!(!out.exists());
    // No cache: every candidate runs the whole network, the same layers go.
    let removed = |dir: &Path, extra: &[&str], says: &str| {
        let mut args = vec!["--remove", "1"];
        args.extend_from_slice(extra);
        let o = prune(dir, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains(says), "{err}");
        read_json(&dir.join("sglp-report.json"))["removed"].clone()
    };
    let cached = removed(&tmp.path().join("cached"), &[], "with the shared prefixes");
    let whole = removed(
        &tmp.path().join("whole"),
        &["--prefix-cache-gib", "0"],
        "without the prefix cache",
    );
    assert_eq!(cached, whole);
}

#[test]
fn more_segments_than_layers_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    assert_exit2(&prune(&out, &["--remove", "1", "--k", "5"]), "--k 5");
    // Two segments of three layers leave room for one removal, not two, when segments keep a layer.
    for allocation in ["adaptive", "proportional"] {
        assert_exit2(
            &prune(
                &out,
                &["--remove", "2", "--k", "2", "--allocation", allocation],
            ),
            "without emptying a segment",
        );
    }
    assert!(!out.exists());
    // The default (open) allocation may empty a segment.
    let o = prune(&out, &["--remove", "2", "--k", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_dir_all(&out).unwrap();
    assert_no_leftovers(tmp.path(), &[]);
}

#[test]
fn existing_outdir_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    assert_exit2(&prune(&out, &["--remove", "1"]), "already exists");
    assert!(
        out.join("keep.txt").exists(),
        "refused run must not touch OUTDIR"
    );
    let o = prune(&out, &["--remove", "1", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("sglp-report.json").exists());
    assert_no_leftovers(tmp.path(), &["o"]);
    // Never over the input model, even with --force.
    assert_exit2(
        &prune(&fixture(), &["--remove", "1", "--force"]),
        "--out is the input model",
    );
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.npy");
    let mut ids: Vec<i64> = (0..2 * 8).map(|i| (i * 7) % 128).collect();
    ids[8 + 5] = 128; // sequence 1, token 5
    write_tokens(&bad, 2, 8, &ids);
    let out = tmp.path().join("o");
    let m = fixture();
    let o = engine(&[
        "prune",
        "--model",
        s(&m),
        "--tokens",
        s(&bad),
        "--out",
        s(&out),
        "--remove",
        "1",
    ]);
    assert_exit2(&o, "sequence 1, token 5");
    assert!(!out.exists());
    assert_no_leftovers(tmp.path(), &["bad.npy"]);
    let o = engine(&["eval", "--model", s(&m), "--tokens", s(&bad)]);
    assert_exit2(&o, "outside the vocabulary");
}

#[test]
fn eval_prints_and_writes_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture();
    let t = m.join("tokens.npy");
    let j = tmp.path().join("e.json");
    let mut ppl = Vec::new();
    for b in ["1", "2", "3"] {
        let o = engine_ok(&[
            "eval",
            "--model",
            s(&m),
            "--tokens",
            s(&t),
            "--batch",
            b,
            "-o",
            s(&j),
        ]);
        assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"));
        let v = read_json(&j);
        assert_eq!(v["predicted_tokens"], 3 * 15);
        ppl.push(v["perplexity"].as_f64().unwrap());
    }
    // The token mean does not depend on how the sequences are batched.
    for p in &ppl[1..] {
        assert!((p - ppl[0]).abs() < 1e-6 * ppl[0], "{ppl:?}");
    }
}

#[test]
fn compare_sweeps_budgets_for_every_criterion() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture();
    let t = m.join("tokens.npy");
    let dir = tmp.path().join("cmp");
    // `compare` of the fixture, its tokens for calibration and evaluation, then `more`.
    let compare = |more: &[&str]| {
        // f32 products on a GPU too: the block influences are held to the hidden states at 1e-5.
        let mut args = vec![
            "compare",
            "--model",
            s(&m),
            "--tokens",
            s(&t),
            "--eval-tokens",
            s(&t),
            "--matmul",
            "f32",
        ];
        args.extend_from_slice(more);
        engine(&args)
    };
    let o = compare(&[
        "--remove",
        "1..2",
        "--seed",
        "3",
        "--seeds",
        "4",
        "--cka-batch",
        "16",
        "--batch",
        "2",
        "--out-dir",
        s(&dir),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    for c in [
        "sglp",
        "sglp-paper",
        "shortgpt",
        "angular",
        "mpruner",
        "random",
        "sleb",
    ] {
        assert!(table.contains(c), "{c} missing from\n{table}");
    }
    for f in ["sglp-compare.json", "sglp-compare.png", "sglp-compare.html"] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    let html = std::fs::read_to_string(dir.join("sglp-compare.html")).unwrap();
    assert_eq!(html.matches("data:image/png;base64,").count(), 1);
    let v = read_json(&dir.join("sglp-compare.json"));
    assert_eq!(v["format"], "sglp-compare/3");
    assert_eq!(v["metric"], "perplexity");
    assert_eq!(v["budgets"], serde_json::json!([1, 2]));
    let curves = v["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 7);
    let base = v["params"].as_u64().unwrap();
    let base_loss = v["baseline"]["loss"].as_f64().unwrap();
    for c in curves {
        let points = c["points"].as_array().unwrap();
        assert_eq!(points.len(), 2, "{}", c["criterion"]);
        for (p, n) in points.iter().zip([1usize, 2]) {
            assert_eq!(p["remove"], n);
            assert_eq!(p["removed"].as_array().unwrap().len(), n);
            let loss = p["loss"].as_f64().unwrap();
            assert!(loss.is_finite() && loss != base_loss, "{p}");
            assert!((p["value"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp());
            assert!(p["params"].as_u64().unwrap() < base);
        }
        assert!(c["decide_s"].as_f64().unwrap() >= 0.0);
    }
    // Random: four seeds per budget, the curve at their median, inside their range.
    let random = curves.iter().find(|c| c["criterion"] == "random").unwrap();
    for p in random["points"].as_array().unwrap() {
        let band = &p["random"];
        assert_eq!(band["seeds"], serde_json::json!([3, 4, 5, 6]));
        let (lo, med, hi) = (
            band["min"].as_f64().unwrap(),
            band["median"].as_f64().unwrap(),
            band["max"].as_f64().unwrap(),
        );
        assert!(lo <= med && med <= hi);
        assert_eq!(p["value"].as_f64().unwrap(), med);
    }
    // SLEB: one greedy order serves every budget, so budget 2 keeps budget 1's layer.
    let sleb = curves.iter().find(|c| c["criterion"] == "sleb").unwrap();
    let order = sleb["details"]["order"].as_array().unwrap();
    let p1 = &sleb["points"][0]["removed"];
    assert_eq!(p1[0], order[0]);
    assert!(sleb["points"][1]["removed"]
        .as_array()
        .unwrap()
        .contains(&order[0]));
    check_criteria_against_reference_hidden_states(curves);
    for (remove, error) in [
        ("1..3", "--remove must be between"),
        ("2..1", "--remove: expected"),
    ] {
        assert_exit2(&compare(&["--remove", remove]), error);
    }
}

/// ShortGPT's block influence and the angular distances (span 1) from PyTorch's float64 hidden states of
/// the fixture (tests/fixtures/*/reference.safetensors, `hidden.{i}` [sequences, tokens, hidden]).
fn check_criteria_against_reference_hidden_states(rows: &[serde_json::Value]) {
    let hidden = |i: usize| common::reference_tensor("llama_llama3_rope", &format!("hidden.{i}"));
    let cos = |a: &[f64], b: &[f64]| {
        let ab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let aa: f64 = a.iter().map(|x| x * x).sum();
        let bb: f64 = b.iter().map(|x| x * x).sum();
        ab / (aa.sqrt() * bb.sqrt())
    };
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let curve = |name: &str| rows.iter().find(|r| r["criterion"] == name).unwrap();
    let bi = floats(&curve("shortgpt")["details"]["block_influence"]);
    // Span 1: the angular distances of the budget-1 point.
    let ad = floats(&curve("angular")["points"][0]["details"]["angular_distance"]);
    assert_eq!(bi.len(), 3);
    for l in 0..3 {
        let (shape, a) = hidden(l);
        let (_, b) = hidden(l + 1);
        let (seqs, t, d) = (shape[0], shape[1], shape[2]);
        let rows_cos: Vec<f64> = a
            .chunks_exact(d)
            .zip(b.chunks_exact(d))
            .map(|(x, y)| cos(x, y))
            .collect();
        let want_bi = 1.0 - rows_cos.iter().sum::<f64>() / (seqs * t) as f64;
        assert!(
            (bi[l] - want_bi).abs() < 1e-5,
            "BI[{l}] {} vs {want_bi}",
            bi[l]
        );
        let want_ad = (0..seqs)
            .map(|q| rows_cos[q * t + t - 1].clamp(-1.0, 1.0).acos() / std::f64::consts::PI)
            .sum::<f64>()
            / seqs as f64;
        assert!(
            (ad[l] - want_ad).abs() < 1e-5,
            "angular[{l}] {} vs {want_ad}",
            ad[l]
        );
    }
}
