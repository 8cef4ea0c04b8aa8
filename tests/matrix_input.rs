//! `segment --cka FILE` takes any square similarity matrix: the engine's JSON, a plain JSON object, `.npy`
//! (float32/float64) and CSV (with or without header row and name column), with one-line errors (exit 2,
//! nothing written) for bad ones.

mod common;

use common::engine;
use npyz::WriterBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A random symmetric L×L matrix with 3 diagonal blocks of high similarity; the block ends (inclusive).
fn block_matrix(seed: u64) -> (Vec<Vec<f64>>, Vec<[usize; 2]>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sizes: Vec<usize> = (0..3).map(|_| rng.random_range(2..6)).collect();
    let l: usize = sizes.iter().sum();
    let mut block = Vec::new();
    let mut segs = Vec::new();
    for (b, &n) in sizes.iter().enumerate() {
        let start = block.len();
        block.extend(std::iter::repeat_n(b, n));
        segs.push([start, start + n - 1]);
    }
    let mut m = vec![vec![1.0; l]; l];
    for i in 0..l {
        for j in 0..i {
            let v = if block[i] == block[j] {
                0.8 + 0.15 * rng.random::<f64>()
            } else {
                0.05 + 0.25 * rng.random::<f64>()
            };
            m[i][j] = v;
            m[j][i] = v;
        }
    }
    (m, segs)
}

fn names(l: usize) -> Vec<String> {
    (0..l).map(|i| format!("layer{i}")).collect()
}

fn engine_json(m: &[Vec<f64>], layers: &[String]) -> String {
    serde_json::json!({
        "format": "sglp-cka/1", "layers": layers, "estimator": "unbiased",
        "kernel": {"type": "linear"}, "batch_size": 4, "n_samples": 8, "n_batches": 2,
        "route": "gram", "backend": "cpu", "cka": m, "hsic": m, "warnings": []
    })
    .to_string()
}

fn write_npy<T: npyz::Serialize + npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], v: &[T]) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(shape)
        .writer(f)
        .begin_nd()
        .unwrap();
    w.extend(v.iter().copied()).unwrap();
    w.finish().unwrap();
}

fn csv(m: &[Vec<f64>], header: Option<&[String]>, names: Option<&[String]>, sep: &str) -> String {
    let mut out = String::new();
    if let Some(h) = header {
        if names.is_some() {
            out.push_str("layer");
            out.push_str(sep);
        }
        out.push_str(&h.join(sep));
        out.push('\n');
    }
    for (i, r) in m.iter().enumerate() {
        let mut cells: Vec<String> = r.iter().map(|x| format!("{x}")).collect();
        if let Some(n) = names {
            cells.insert(0, n[i].clone());
        }
        out.push_str(&cells.join(sep));
        out.push('\n');
    }
    out
}

/// The same segmentation: k, segments and layer names exactly, the loss curve to 1e-9 relative (serde_json
/// and Rust's own float parsing may round a decimal differently in the last bit).
fn same_segments(a: &str, b: &str, what: &str) {
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(a).unwrap(),
        serde_json::from_str(b).unwrap(),
    );
    for key in ["k", "segments", "segment_layers", "features"] {
        assert_eq!(a[key], b[key], "{what}: {key}");
    }
    let curve = |v: &serde_json::Value| -> Vec<f64> {
        v["loss_curve"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (ca, cb) = (curve(&a), curve(&b));
    assert_eq!(ca.len(), cb.len(), "{what}: loss curve");
    for (x, y) in ca.iter().zip(&cb) {
        assert!(
            common::rel(*x, *y) < 1e-9,
            "{what}: loss curve {ca:?} vs {cb:?}"
        );
    }
}

/// `segment` on `path`: its stdout (the segments JSON).
fn segment(path: &Path) -> String {
    let o = engine(&[
        "segment",
        "--cka",
        s(path),
        "--k",
        "3",
        "--features",
        "rows",
    ]);
    assert!(
        o.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn every_form_of_one_matrix_gives_the_same_segments() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (m, segs) = block_matrix(seed);
    let l = m.len();
    let layers = names(l);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flat: Vec<f64> = m.iter().flatten().copied().collect();

    let files = [
        ("engine.json", engine_json(&m, &layers)),
        (
            "plain.json",
            serde_json::json!({"cka": m, "layers": layers}).to_string(),
        ),
        ("bare.json", serde_json::json!({ "cka": m }).to_string()),
        ("both.csv", csv(&m, Some(&layers), Some(&layers), ",")),
        ("header.csv", csv(&m, Some(&layers), None, ",")),
        ("names.csv", csv(&m, None, Some(&layers), ",")),
        ("plain.csv", csv(&m, None, None, ",")),
        ("tabs.tsv", csv(&m, Some(&layers), Some(&layers), "\t")),
        ("spaces.txt", csv(&m, None, None, " ")),
        // pandas: `DataFrame(m).to_csv()` and `.to_csv(index=False)`.
        (
            "pandas.csv",
            csv(
                &m,
                Some(&(0..l).map(|i| i.to_string()).collect::<Vec<_>>()),
                Some(&(0..l).map(|i| i.to_string()).collect::<Vec<_>>()),
                ",",
            )
            .replacen("layer,", ",", 1),
        ),
    ];
    let reference = {
        let p = d.join(files[0].0);
        std::fs::write(&p, &files[0].1).unwrap();
        segment(&p)
    };
    let v: serde_json::Value = serde_json::from_str(&reference).unwrap();
    assert_eq!(
        v["segments"],
        serde_json::json!(segs),
        "seed {seed}: {reference}"
    );
    // Byte-identical among the JSON forms, and among the text and .npy forms (the CSV's numbers are
    // Rust's shortest round-trip decimals, read back exactly); the same segments across the two.
    let csv_reference = {
        let p = d.join("both.csv");
        std::fs::write(&p, &files[3].1).unwrap();
        segment(&p)
    };
    same_segments(
        &csv_reference,
        &reference,
        &format!("seed {seed}: both.csv"),
    );
    for (name, text) in &files[1..] {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let got = segment(&p);
        if *name == "pandas.csv" {
            // Layers named 0..L-1: the same segments and loss, other names.
            let g: serde_json::Value = serde_json::from_str(&got).unwrap();
            let c: serde_json::Value = serde_json::from_str(&csv_reference).unwrap();
            assert_eq!(g["segments"], v["segments"], "seed {seed}: {name}");
            assert_eq!(g["loss_curve"], c["loss_curve"], "seed {seed}: {name}");
            assert_eq!(g["segment_layers"][0][0], "0", "seed {seed}: {name}");
        } else if name.ends_with(".json") {
            assert_eq!(got, reference, "seed {seed}: {name}");
        } else {
            assert_eq!(got, csv_reference, "seed {seed}: {name}");
        }
    }

    // pandas' `to_csv(index=False)`: a header of column numbers.
    let p = d.join("noindex.csv");
    let header: Vec<String> = (0..l).map(|i| i.to_string()).collect();
    std::fs::write(&p, csv(&m, Some(&header), None, ",")).unwrap();
    let g: serde_json::Value = serde_json::from_str(&segment(&p)).unwrap();
    assert_eq!(g["segments"], v["segments"], "seed {seed}: noindex.csv");

    // .npy float64 (C and Fortran order: the same symmetric matrix) and without an extension.
    let p = d.join("m.npy");
    write_npy(&p, &[l as u64, l as u64], &flat);
    assert_eq!(segment(&p), csv_reference, "seed {seed}: npy f64");
    let p = d.join("matrix-without-extension");
    std::fs::copy(d.join("m.npy"), &p).unwrap();
    assert_eq!(
        segment(&p),
        csv_reference,
        "seed {seed}: npy f64, no extension"
    );

    // .npy float32: the same segments.
    let p = d.join("m32.npy");
    let f32s: Vec<f32> = flat.iter().map(|&x| x as f32).collect();
    write_npy(&p, &[l as u64, l as u64], &f32s);
    let g: serde_json::Value = serde_json::from_str(&segment(&p)).unwrap();
    assert_eq!(g["segments"], v["segments"], "seed {seed}: npy f32");
    assert_eq!(
        g["segment_layers"], v["segment_layers"],
        "seed {seed}: npy f32"
    );
}

/// Runs with a bad input: exit code 2, one line of error naming the file and holding `needle`, `out`
/// untouched.
fn assert_bad(file: &Path, needle: &str, out: &Path) {
    std::fs::write(out, "previous content").unwrap();
    let o = engine(&["segment", "--cka", s(file), "--out", s(out)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{}: {err}", file.display());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{}: {err}", file.display());
    assert!(lines[0].starts_with("error"), "{err}");
    assert!(lines[0].contains(s(file)), "{err}");
    assert!(
        lines[0].contains(needle),
        "{}: expected '{needle}' in: {err}",
        file.display()
    );
    assert_eq!(std::fs::read_to_string(out).unwrap(), "previous content");
}

#[test]
fn bad_matrices_fail_with_one_line_naming_the_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.json");
    let text = |name: &str, t: &str| {
        let p = d.join(name);
        std::fs::write(&p, t).unwrap();
        p
    };

    // Not square.
    let p = text("rect.csv", "1,0.5,0.2\n0.5,1,0.3\n");
    assert_bad(&p, "not square: 2 rows of 3 values", &out);
    let p = text("rect.json", r#"{"cka": [[1, 0.5, 0.1], [0.5, 1, 0.2]]}"#);
    assert_bad(&p, "not square", &out);
    let p = d.join("rect.npy");
    write_npy(&p, &[2, 3], &[1.0f64, 0.5, 0.2, 0.5, 1.0, 0.3]);
    assert_bad(&p, "not square: shape [2, 3]", &out);
    let p = d.join("vec.npy");
    write_npy(&p, &[4], &[1.0f64; 4]);
    assert_bad(&p, "2-D", &out);

    // Empty.
    assert_bad(&text("empty.csv", ""), "empty", &out);
    assert_bad(&text("header-only.csv", "layer,a,b\n"), "empty", &out);
    assert_bad(&text("empty.json", r#"{"cka": []}"#), "empty", &out);
    let p = d.join("empty.npy");
    write_npy::<f64>(&p, &[0, 0], &[]);
    assert_bad(&p, "empty", &out);

    // A non-finite entry, by position.
    let p = text(
        "nan.csv",
        "layer,a,b,c\na,1,0.5,0.2\nb,0.5,1,nan\nc,0.2,nan,1\n",
    );
    assert_bad(&p, "not finite at row 1, column 2 (layers 'b', 'c')", &out);
    let p = text("null.json", r#"{"cka": [[1, null], [0.5, 1]]}"#);
    assert_bad(&p, "not finite at row 0, column 1", &out);
    let p = d.join("inf.npy");
    write_npy(&p, &[2, 2], &[1.0f32, f32::INFINITY, f32::INFINITY, 1.0]);
    assert_bad(&p, "not finite at row 0, column 1", &out);

    // Not symmetric: the worst pair is named.
    let p = text("asym.csv", "1,0.5,0.2\n0.5000001,1,0.3\n0.25,0.3,1\n");
    assert_bad(&p, "not symmetric: [0][2] = 0.2 but [2][0] = 0.25", &out);
    // Within 1e-6 is accepted.
    let p = text("nearly.csv", "1,0.5,0.2\n0.5000001,1,0.3\n0.2,0.3,1\n");
    let o = engine(&["segment", "--cka", s(&p), "--k", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Ragged rows.
    let p = text("ragged.csv", "1,0.5,0.2\n0.5,1\n0.2,0.3,1\n");
    assert_bad(&p, "line 2: 2 values, but line 1 has 3", &out);
    let p = text(
        "ragged-header.csv",
        "a,b\n1,0.5,0.2\n0.5,1,0.3\n0.2,0.3,1\n",
    );
    assert_bad(&p, "line 1: the header has 2 names", &out);

    // Unparsable numbers.
    let p = text("word.csv", "1,0.5,0.2\n0.5,1,oops\n0.2,0.3,1\n");
    assert_bad(&p, "line 2, column 3: 'oops' is not a number", &out);
    let p = text("word.json", r#"{"cka": [[1, "x"], [0.5, 1]]}"#);
    assert_bad(&p, "row 0, column 1: not a number", &out);
    let p = text(
        "names.json",
        r#"{"cka": [[1, 0.5], [0.5, 1]], "layers": ["a"]}"#,
    );
    assert_bad(&p, "1 layer names for a matrix of 2 rows", &out);
    let p = text("other.json", r#"{"matrix": [[1]]}"#);
    assert_bad(&p, "'cka' key", &out);
    let p = d.join("half.npy");
    write_npy(&p, &[1, 1], &[half::f16::from_f32(1.0)]);
    assert_bad(&p, "float32 or float64", &out);
}

#[test]
fn the_engines_own_csv_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Nine layers [64, 6] in three groups of similar layers.
    let acts = d.join("acts.safetensors");
    common::write_activations(&acts, 64, 9, 6, 7, false);

    let (json, csv) = (d.join("cka.json"), d.join("cka.csv"));
    for (out, format) in [(&json, "json"), (&csv, "csv")] {
        let o = engine(&[
            "cka",
            "-i",
            s(&acts),
            "--cka-batch",
            "16",
            "--device",
            "cpu",
            "--format",
            format,
            "--out",
            s(out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(std::fs::read_to_string(&csv)
        .unwrap()
        .starts_with("layer,block0,block1"));
    let a = segment(&json);
    same_segments(&a, &segment(&csv), "cka.json vs cka.csv");
    let v: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!(v["segments"], serde_json::json!([[0, 2], [3, 5], [6, 8]]));
    assert_eq!(v["segment_layers"][1][0], "block3");
}
