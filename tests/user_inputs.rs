//! What users bring (issue 14): text instead of token arrays (`--text`, the same ids as Python's
//! `tokenizers`), precomputed gradient norms (`--gradnorm FILE`), one vocabulary of flags (old spellings
//! refused with the new one), `info` using or refusing its flags, a closed pipe, notes once per machine,
//! and the `--k auto` cap.

mod common;

use common::{engine, engine_ok, fixture, fixtures, read_json, write_activations};
use sglp_engine::runtime::text::{tokenize_text, TextSpec};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_exit2(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
}

fn tok_dir() -> PathBuf {
    fixtures().join("tokenizer")
}

fn expected(name: &str) -> (Vec<i64>, usize, usize) {
    let bytes = std::fs::read(tok_dir().join(name)).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    let data = npy.into_vec::<i64>().unwrap();
    (data, shape[0] as usize, shape[1] as usize)
}

fn spec(file: &str, field: Option<&str>, max: Option<usize>) -> TextSpec {
    TextSpec {
        path: tok_dir().join(file),
        field: field.map(String::from),
        seq_len: 16,
        max_sequences: max,
    }
}

#[test]
fn text_gives_the_ids_of_python_tokenizers() {
    let tj = tok_dir().join("tokenizer.json");
    for (file, field, want) in [
        ("sample.txt", None, "expected_text.npy"),
        ("sample.jsonl", None, "expected_jsonl_text.npy"),
        ("sample.jsonl", Some("body"), "expected_jsonl_body.npy"),
    ] {
        let (ids, seqs, len) = expected(want);
        let t = tokenize_text(&tj, &spec(file, field, None)).unwrap();
        assert_eq!((t.sequences, t.len), (seqs, len), "{file} {field:?}");
        assert_eq!(t.data, ids, "{file} {field:?}");
        // The template's BOS (id 0 here) starts the text: the engine adds nothing of its own.
        assert_eq!(t.data[0], 0);
    }
    // --max-sequences keeps the leading sequences.
    let (ids, _, len) = expected("expected_text.npy");
    let t = tokenize_text(&tj, &spec("sample.txt", None, Some(3))).unwrap();
    assert_eq!(t.sequences, 3);
    assert_eq!(t.data, ids[..3 * len]);
}

#[test]
fn bad_text_inputs_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tj = tok_dir().join("tokenizer.json");
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let cases: Vec<(PathBuf, Option<&str>, &str)> = vec![
        (write("bad.txt", b"ok \xff\xfe"), None, "not UTF-8"),
        (write("short.txt", b"hi"), None, "fewer than one sequence"),
        (
            write("a.jsonl", b"{\"text\": \"x\"}\n[1,2]\n"),
            None,
            "line 2: not a JSON object",
        ),
        (
            write("b.jsonl", b"{\"body\": \"x\"}\n"),
            None,
            "line 1: no field 'text' (fields: body)",
        ),
        (
            write("c.jsonl", b"{\"text\": 3}\n"),
            None,
            "field 'text' is not a string",
        ),
        (
            write("d.jsonl", b"{\"text\": \"x\"\n"),
            None,
            "line 1: not JSON",
        ),
    ];
    for (path, field, needle) in cases {
        let spec = TextSpec {
            path: path.clone(),
            field: field.map(String::from),
            seq_len: 16,
            max_sequences: None,
        };
        let e = tokenize_text(&tj, &spec).unwrap_err().to_string();
        assert!(e.contains(needle), "{}: {e}", path.display());
        assert!(e.contains(s(&path)), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn text_on_a_checkpoint_equals_its_token_array() {
    // The trained fixture is byte-level (token = byte, no BOS) and ships a tokenizer.json that says so:
    // eval on the text equals eval on the bytes written as tokens.
    let m = fixture("trained_llama");
    let tmp = tempfile::tempdir().unwrap();
    let text = "def add(a, b):\n    return a + b  # sum — of two\n".repeat(8);
    let txt = tmp.path().join("calib.txt");
    std::fs::write(&txt, &text).unwrap();
    let bytes: Vec<i64> = text.bytes().map(i64::from).collect();
    let n = bytes.len() / 64;
    let npy = tmp.path().join("calib.npy");
    common::write_tokens(&npy, n as u64, 64, &bytes[..n * 64]);
    let eval = |args: &[&str], out: &Path| {
        let mut all = vec!["eval", "--model", s(&m), "-o", s(out)];
        all.extend_from_slice(args);
        engine_ok(&all);
        let j = read_json(out);
        j["loss"].as_f64().unwrap()
    };
    let a = eval(
        &["--text", s(&txt), "--seq-len", "64"],
        &tmp.path().join("a.json"),
    );
    let b = eval(&["--tokens", s(&npy)], &tmp.path().join("b.json"));
    assert_eq!(a, b);

    // No tokenizer.json: one line naming it.
    let o = engine(&[
        "eval",
        "--model",
        s(&fixture("llama_bf16_tied")),
        "--text",
        s(&txt),
    ]);
    assert_exit2(&o, "tokenizer.json: not found");
    // Text flags without text, and both inputs at once, are refused.
    let o = engine(&[
        "eval",
        "--model",
        s(&m),
        "--tokens",
        s(&npy),
        "--seq-len",
        "8",
    ]);
    assert_exit2(&o, "--seq-len applies to --text");
    let o = engine(&[
        "eval",
        "--model",
        s(&m),
        "--tokens",
        s(&npy),
        "--text",
        s(&txt),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn old_flag_spellings_are_refused_with_the_new_one() {
    for (args, needle) in [
        (
            vec!["cka", "-i", "x.safetensors", "--batch-size", "8"],
            "--cka-batch",
        ),
        (
            vec!["gradnorm", "--model", "m", "--batch-size", "2"],
            "now --batch (sequences",
        ),
        (
            vec!["cka", "--model", "m", "--capture-batch=2"],
            "now --batch",
        ),
        (vec!["prune", "--forward-batch", "2"], "now --batch"),
        (
            vec!["cka", "-i", "x.safetensors", "--tokens", "features"],
            "--token-mode",
        ),
        (vec!["run", "-i", "x", "--tokens=samples"], "--token-mode"),
    ] {
        assert_exit2(&engine(&args), needle);
    }
    // A kernel that is not one is refused by name (no silent fallback to linear).
    let o = engine(&["cka", "-i", "x.safetensors", "--kernel", "rbff"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("rbff"), "{}", stderr(&o));
    let o = engine(&["segment", "--cka", "x.json", "--k", "two"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("'two'"), "{}", stderr(&o));
}

#[test]
fn info_uses_or_refuses_every_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_activations(&acts, 16, 5, 4, 1, true);
    let o = engine_ok(&[
        "info",
        "-i",
        s(&acts),
        "--token-mode",
        "features",
        "--layers",
        "1",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("--token-mode features, --layers 1"), "{out}");
    assert!(out.contains("1 layers"), "{out}");

    let m = fixture("trained_llama");
    let calib = m.join("calib.npy");
    let o = engine_ok(&["info", "--model", s(&m), "--tokens", s(&calib)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("12 decoder layers"), "{out}");
    assert!(out.contains("32 sequences × 128 tokens"), "{out}");
    assert!(out.contains("tokenizer.json: present"), "{out}");

    assert_exit2(
        &engine(&["info", "--tokens", s(&calib)]),
        "--tokens applies to --model",
    );
    assert_exit2(
        &engine(&["info", "--model", s(&m), "--layers", "1"]),
        "apply to activation files",
    );
}

#[test]
fn a_closed_pipe_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    // Enough layers that the listing outgrows a pipe buffer that nobody reads.
    write_activations(&acts, 8, 3000, 4, 1, true);
    let mut child = Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
        .args(["info", "-i", s(&acts)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // `| head -0`: the reader is gone
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn device_fallback_note_once_per_machine_and_q_silences_it() {
    if sglp_engine::similarity::cuda::list_devices().is_ok_and(|d| !d.is_empty()) {
        println!("skipped: a GPU is present, so --device auto does not fall back");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_activations(&acts, 16, 4, 4, 1, true);
    let cache = tmp.path().join("cache");
    let run = |extra: &[&str]| {
        let mut args = vec!["cka", "-i", s(&acts), "--cka-batch", "8", "-o"];
        let out = tmp.path().join("c.json");
        args.push(s(&out));
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
            .args(&args)
            .env("SGLP_ENGINE_CACHE_DIR", &cache)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    // Warnings (about the result) still show with -q; notes do not.
    let quiet = run(&["-q"]);
    assert!(!quiet.contains("note:"), "-q prints no note: {quiet}");
    let first = run(&[]);
    assert!(first.contains("using the CPU"), "{first}");
    let second = run(&[]);
    assert!(
        !second.contains("using the CPU"),
        "the second run is quiet: {second}"
    );
    assert!(run(&["-v"]).contains("using the CPU"));
}

#[test]
fn segment_with_precomputed_gradnorm_plans_the_removal() {
    let tmp = tempfile::tempdir().unwrap();
    let acts = tmp.path().join("acts.safetensors");
    write_activations(&acts, 96, 12, 10, 1, true);
    let cka = tmp.path().join("cka.json");
    engine_ok(&[
        "cka",
        "-i",
        s(&acts),
        "--cka-batch",
        "32",
        "-q",
        "-o",
        s(&cka),
    ]);
    let cka_json = read_json(&cka);
    let layers: Vec<String> = serde_json::from_value(cka_json["layers"].clone()).unwrap();
    // Importance: distinct values, so the lowest in each segment are known.
    let g: Vec<f64> = (0..12).map(|i| ((i * 7) % 12) as f64 + 0.5).collect();
    let gj = tmp.path().join("g.json");
    std::fs::write(
        &gj,
        serde_json::json!({"format": "sglp-gradnorm/1", "layers": layers, "gradnorm": g})
            .to_string(),
    )
    .unwrap();
    let gn = tmp.path().join("g.npy");
    {
        use npyz::WriterBuilder;
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&[12])
            .writer(std::fs::File::create(&gn).unwrap())
            .begin_nd()
            .unwrap();
        w.extend(g.iter().copied()).unwrap();
        w.finish().unwrap();
    }
    let mut plans = Vec::new();
    for file in [&gj, &gn] {
        let out = tmp.path().join("seg.json");
        engine_ok(&[
            "segment",
            "--cka",
            s(&cka),
            "--k",
            "3",
            "--gradnorm",
            s(file),
            "--remove",
            "3",
            "-o",
            s(&out),
        ]);
        let j = read_json(&out);
        plans.push(j["plan"].clone());
        // Proportional: one per segment of 4, the lowest importance of each.
        let segs: Vec<[usize; 2]> = serde_json::from_value(j["segments"].clone()).unwrap();
        let removed: Vec<usize> = serde_json::from_value(j["plan"]["removed"].clone()).unwrap();
        let mut want: Vec<usize> = segs
            .iter()
            .map(|&[a, b]| (a..=b).min_by(|&x, &y| g[x].total_cmp(&g[y])).unwrap())
            .collect();
        want.sort();
        assert_eq!(removed, want);
    }
    assert_eq!(plans[0], plans[1]);

    // Wrong length, bad names, non-finite: one line each.
    let bad = tmp.path().join("bad.json");
    for (text, needle) in [
        ("[1, 2, 3]".to_string(), "3 gradient norms for 12 layers"),
        ("[1, 2, null]".to_string(), "is not a number"),
        (
            serde_json::json!({"gradnorm": g, "layers": (0..12).map(|i| format!("x{i}")).collect::<Vec<_>>()})
                .to_string(),
            "layer 0 is 'x0' in this file",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let o = engine(&[
            "segment", "--cka", s(&cka), "--gradnorm", s(&bad), "--remove", "2",
        ]);
        assert_exit2(&o, needle);
    }
}

#[test]
fn prune_with_precomputed_gradnorm_runs_no_backward_and_follows_the_file() {
    let m = fixture("trained_llama");
    let tmp = tempfile::tempdir().unwrap();
    // Layers 3 and 8 are the least important by this file.
    let mut g = vec![5.0f64; 12];
    g[3] = 0.1;
    g[8] = 0.2;
    let gj = tmp.path().join("g.json");
    std::fs::write(&gj, serde_json::json!({ "gradnorm": g }).to_string()).unwrap();
    let out = tmp.path().join("pruned");
    engine_ok(&[
        "prune",
        "--model",
        s(&m),
        "--text",
        s(&tok_dir().join("sample.txt")),
        "--seq-len",
        "64",
        "--gradnorm",
        s(&gj),
        "--k",
        "2",
        "--remove",
        "2",
        "--allocation",
        "adaptive",
        "--out",
        s(&out),
        "-q",
    ]);
    let r = read_json(&out.join("sglp-report.json"));
    assert_eq!(r["removed"], serde_json::json!([3, 8]));
    assert_eq!(r["gradnorm"], serde_json::json!(g));
    assert_eq!(r["timings"]["gradnorm_s"].as_f64(), Some(0.0));
    // A selection that does not use the file is refused.
    let o = engine(&[
        "prune",
        "--model",
        s(&m),
        "--tokens",
        s(&m.join("calib.npy")),
        "--gradnorm",
        s(&gj),
        "--selection",
        "loss",
        "--remove",
        "2",
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert_exit2(&o, "--gradnorm FILE");
}

#[test]
fn auto_k_stops_below_the_number_of_layers_and_says_when_it_hits_k_max() {
    // Six layers, each unlike the others: every split gains, so --k auto runs to its cap.
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.json");
    let l = 6;
    let cka: Vec<Vec<f64>> = (0..l)
        .map(|i| {
            (0..l)
                .map(|j| {
                    if i == j {
                        1.0
                    } else {
                        0.1 * ((i + j) % 3) as f64
                    }
                })
                .collect()
        })
        .collect();
    std::fs::write(&m, serde_json::json!({ "cka": cka }).to_string()).unwrap();
    let out = tmp.path().join("s.json");
    let o = engine_ok(&[
        "segment",
        "--cka",
        s(&m),
        "--k",
        "auto",
        "--k-max",
        "8",
        "-o",
        s(&out),
    ]);
    let j = read_json(&out);
    let k = j["k"].as_u64().unwrap() as usize;
    assert!(k < l, "k = {k} must stay below L = {l}");
    if k == l - 1 {
        assert!(
            stderr(&o).contains("--k auto stopped at k"),
            "{}",
            stderr(&o)
        );
    }
}
