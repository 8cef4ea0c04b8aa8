//! The `sglp-engine` CLI end to end: cka → segment, run, info, and bad input (one-line error, exit 2,
//! no output written or clobbered).

mod common;

use common::{engine as run, engine_ok, read_json, write_activations};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn cka_then_segment_finds_the_three_groups() {
    let dir = tmp();
    let acts = dir.path().join("acts.safetensors");
    write_activations(&acts, 96, 12, 10, 1, true);
    let cka = dir.path().join("cka.json");
    engine_ok(&[
        "cka",
        "-i",
        acts.to_str().unwrap(),
        "--cka-batch",
        "32",
        "--device",
        "cpu",
        "--out",
        cka.to_str().unwrap(),
    ]);
    let v = read_json(&cka);
    assert_eq!(v["format"], "sglp-cka/1");
    assert_eq!(v["n_samples"], 96);
    assert_eq!(v["n_batches"], 3);
    assert_eq!(v["estimator"], "unbiased");
    assert_eq!(v["layers"][10], "block10");
    assert_eq!(v["cka"].as_array().unwrap().len(), 12);
    assert!((v["cka"][4][4].as_f64().unwrap() - 1.0).abs() < 1e-12);

    let seg = dir.path().join("seg.json");
    engine_ok(&[
        "segment",
        "--cka",
        cka.to_str().unwrap(),
        "--k",
        "3",
        "--features",
        "rows",
        "--out",
        seg.to_str().unwrap(),
    ]);
    let s = read_json(&seg);
    assert_eq!(s["format"], "sglp-segments/1");
    assert_eq!(s["segments"], serde_json::json!([[0, 3], [4, 7], [8, 11]]));
    assert_eq!(s["loss_curve"].as_array().unwrap().len(), 8);

    // CSV output of the same CKA.
    let o = run(&[
        "cka",
        "-i",
        acts.to_str().unwrap(),
        "--cka-batch",
        "32",
        "--format",
        "csv",
        "--estimator",
        "biased",
    ]);
    assert!(o.status.success());
    let csv = String::from_utf8(o.stdout).unwrap();
    assert!(csv.starts_with("layer,block0,block1"));
    assert_eq!(csv.lines().count(), 13);
}

#[test]
fn run_writes_both_files_and_info_lists_layers_and_devices() {
    let dir = tmp();
    let acts = dir.path().join("a.safetensors");
    write_activations(&acts, 64, 9, 6, 2, false);
    let out = dir.path().join("out");
    engine_ok(&[
        "run",
        "-i",
        acts.to_str().unwrap(),
        "-i",
        acts.to_str().unwrap(),
        "--cka-batch",
        "16",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(read_json(&out.join("cka.json"))["n_samples"], 128);
    assert!(read_json(&out.join("segments.json"))["k"].as_u64().unwrap() >= 1);

    let o = engine_ok(&[
        "info",
        "-i",
        acts.to_str().unwrap(),
        "--layers",
        "block[0-2]$",
    ]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("3 layers, 64 samples"), "{text}");
    assert!(text.contains("block2") && !text.contains("block5"));
    assert!(text.contains("cpu"), "{text}");
}

/// Runs with a bad input: exit code 2, a one-line error naming `needle`, and `out` untouched.
fn assert_bad(args: &[&str], needle: &str, out: &Path) {
    std::fs::write(out, "previous content").unwrap();
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "previous content",
        "{args:?} clobbered the output"
    );
}

#[test]
fn bad_inputs_fail_cleanly_without_touching_the_output() {
    let dir = tmp();
    let out = dir.path().join("out.json");
    let o = out.to_str().unwrap();
    let good = dir.path().join("good.safetensors");
    write_activations(&good, 20, 3, 4, 3, true);
    let g = good.to_str().unwrap();

    let missing = dir.path().join("missing.safetensors");
    assert_bad(
        &["cka", "-i", missing.to_str().unwrap(), "--out", o],
        "missing.safetensors",
        &out,
    );

    let trunc = dir.path().join("trunc.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() - 10]).unwrap();
    assert_bad(
        &["cka", "-i", trunc.to_str().unwrap(), "--out", o],
        "trunc.safetensors",
        &out,
    );

    // Three samples with the unbiased estimator.
    let tiny = dir.path().join("tiny.safetensors");
    write_activations(&tiny, 3, 2, 4, 4, false);
    assert_bad(
        &["cka", "-i", tiny.to_str().unwrap(), "--out", o],
        "at least 4 samples",
        &out,
    );
    assert_bad(
        &["cka", "-i", g, "--cka-batch", "3", "--out", o],
        "at least 4",
        &out,
    );

    assert_bad(
        &["cka", "-i", g, "--layers", "^nothing$", "--out", o],
        "good.safetensors",
        &out,
    );

    // Shards whose layers differ.
    let other = dir.path().join("other.safetensors");
    write_activations(&other, 20, 4, 4, 5, true);
    assert_bad(
        &["cka", "-i", g, "-i", other.to_str().unwrap(), "--out", o],
        "other.safetensors",
        &out,
    );

    // NaN in a layer: named, with the first bad sample.
    let nan = dir.path().join("nan.safetensors");
    let mut x = vec![0.5f32; 10 * 3];
    for (i, v) in x.iter_mut().enumerate() {
        *v = (i as f32 * 0.37).sin();
    }
    x[7 * 3 + 1] = f32::NAN;
    let views = vec![
        (
            "a".to_string(),
            TensorView::new(Dtype::F32, vec![10, 3], bytemuck::cast_slice(&x)).unwrap(),
        ),
        (
            "b".to_string(),
            TensorView::new(Dtype::F32, vec![10, 3], bytemuck::cast_slice(&x)).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &nan).unwrap();
    assert_bad(
        &[
            "cka",
            "-i",
            nan.to_str().unwrap(),
            "--estimator",
            "biased",
            "--out",
            o,
        ],
        "sample: 7",
        &out,
    );

    // segment: a CKA file that is not square, and one with NaN.
    let cka_bad = dir.path().join("bad-cka.json");
    std::fs::write(
        &cka_bad,
        r#"{"format":"sglp-cka/1","layers":["a","b"],"estimator":"unbiased","kernel":{"type":"linear"},"batch_size":4,"n_samples":8,"n_batches":2,"route":"gram","backend":"cpu","cka":[[1.0,0.5]],"hsic":[[1.0,0.5]],"warnings":[]}"#,
    )
    .unwrap();
    assert_bad(
        &["segment", "--cka", cka_bad.to_str().unwrap(), "--out", o],
        "not square",
        &out,
    );
    std::fs::write(
        &cka_bad,
        r#"{"format":"sglp-cka/1","layers":["a","b"],"estimator":"unbiased","kernel":{"type":"linear"},"batch_size":4,"n_samples":8,"n_batches":2,"route":"gram","backend":"cpu","cka":[[1.0,null],[null,1.0]],"hsic":[[1.0,null],[null,1.0]],"warnings":[]}"#,
    )
    .unwrap();
    assert_bad(
        &[
            "segment",
            "--cka",
            cka_bad.to_str().unwrap(),
            "--k",
            "1",
            "--out",
            o,
        ],
        "not finite",
        &out,
    );
    assert_bad(
        &["segment", "--cka", g, "--out", o],
        "good.safetensors",
        &out,
    );
}

#[test]
fn cka_straight_from_a_model_equals_cka_on_its_captured_activations() {
    let dir = tmp();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_llama3_rope");
    let (m, t) = (model.to_str().unwrap(), model.join("tokens.npy"));
    let captured = dir.path().join("h.safetensors");
    engine_ok(&[
        "capture",
        "--model",
        m,
        "--tokens",
        t.to_str().unwrap(),
        "--out",
        captured.to_str().unwrap(),
    ]);
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    engine_ok(&[
        "cka",
        "--input",
        captured.to_str().unwrap(),
        "--cka-batch",
        "8",
        "--out",
        a.to_str().unwrap(),
    ]);
    engine_ok(&[
        "cka",
        "--model",
        m,
        "--tokens",
        t.to_str().unwrap(),
        "--batch",
        "3",
        "--cka-batch",
        "8",
        "--out",
        b.to_str().unwrap(),
    ]);
    let (a, b) = (read_json(&a), read_json(&b));
    assert_eq!(a["layers"], b["layers"]);
    assert_eq!(a["n_samples"], b["n_samples"]);
    let (ca, cb) = (a["cka"].as_array().unwrap(), b["cka"].as_array().unwrap());
    for (ra, rb) in ca.iter().zip(cb) {
        for (x, y) in ra.as_array().unwrap().iter().zip(rb.as_array().unwrap()) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-12);
        }
    }
    // A tokens file is not a token mode for activation files.
    let o = run(&[
        "cka",
        "--input",
        captured.to_str().unwrap(),
        "--tokens",
        t.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
}
