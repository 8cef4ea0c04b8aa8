//! `gradnorm` and `capture` end to end on the PyTorch fixtures, and `CaptureSource` against the same
//! reference hidden states.

mod common;

use common::{engine, engine_ok, fixture as dir, write_tokens};
use safetensors::SafeTensors;
use sglp_engine::io::{ActivationSource, TokenMode};
use sglp_engine::runtime::{CaptureSource, Model, Tokens};
use std::path::Path;

fn ref_tensor(name: &str, key: &str) -> Vec<f64> {
    common::reference_tensor(name, key).1
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()))
        / scale
}

/// `command` on fixture `name` and its tokens, two sequences per batch, into `out`; it must succeed.
/// With f32 products on a GPU too (bf16 is the GPU's default): the results are held to PyTorch's f32.
fn on_fixture(command: &str, name: &str, out: &Path) {
    let d = dir(name);
    engine_ok(&[
        command,
        "--matmul",
        "f32",
        "--model",
        d.to_str().unwrap(),
        "--tokens",
        d.join("tokens.npy").to_str().unwrap(),
        "--batch",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
}

#[test]
fn gradnorm_command_matches_pytorch_batch_means() {
    for (name, tied) in [("llama_llama3_rope", false), ("llama_bf16_tied", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("g.json");
        on_fixture("gradnorm", name, &out);
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(j["format"], "sglp-gradnorm/1");
        assert_eq!(j["batches"], 2);
        let (g0, g1) = (
            ref_tensor(name, "gradnorm.b0"),
            ref_tensor(name, "gradnorm.b1"),
        );
        let layers = j["layers"].as_array().unwrap();
        assert_eq!(layers.len(), g0.len());
        assert_eq!(layers[0], "model.layers.0");
        for (l, v) in j["gradnorm"].as_array().unwrap().iter().enumerate() {
            let want = (g0[l] + g1[l]) / 2.0;
            let got = v.as_f64().unwrap();
            assert!(
                (got - want).abs() / want < 1e-4,
                "{name} layer {l}: {got} vs {want}"
            );
        }
        let want_loss = (ref_tensor(name, "loss.b0")[0] + ref_tensor(name, "loss.b1")[0]) / 2.0;
        let got_loss = j["loss"].as_f64().unwrap();
        assert!((got_loss - want_loss).abs() / want_loss < 1e-5);
        assert_eq!(j["extra"].get("lm_head").is_none(), tied, "{name}");
        assert!(j["extra"]["embed_tokens"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn capture_command_writes_cka_input() {
    let name = "mistral_sharded";
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("h.safetensors");
    on_fixture("capture", name, &out);
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().unwrap()["layers"],
        "model.layers.0,model.layers.1,model.layers.2"
    );
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for l in 0..3 {
        let t = st.tensor(&format!("model.layers.{l}")).unwrap();
        assert_eq!(t.shape(), &[3, 16, 32]);
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
        let want = ref_tensor(name, &format!("hidden.{}", l + 1));
        assert!(max_rel(&got, &want) < 1e-5, "layer {l}");
    }
}

#[test]
fn bad_tokens_exit_2_naming_the_position() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tmp.path().join("t.npy");
    write_tokens(&tok, 2, 4, &[1, 2, 3, 4, 5, 6, 999, 7]);
    let d = dir("llama_llama3_rope");
    let o = engine(&[
        "gradnorm",
        "--model",
        d.to_str().unwrap(),
        "--tokens",
        tok.to_str().unwrap(),
        "--out",
        tmp.path().join("g.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("sequence 1, token 2"), "{err}");
}

#[test]
fn capture_source_yields_every_layer_in_chunks() {
    let name = "qwen2_f16_bias";
    let model = Model::load(&dir(name)).unwrap();
    let tokens = Tokens::load_npy(&dir(name).join("tokens.npy")).unwrap();
    let mut src = CaptureSource::new(&model, &tokens, 2, TokenMode::Samples);
    assert_eq!(src.n_samples_hint(), Some(48));
    let names: Vec<_> = src.layers().iter().map(|l| l.name.clone()).collect();
    assert_eq!(names, ["model.layers.0", "model.layers.1"]);
    let h = model.hidden_size();
    let mut per_layer: Vec<Vec<f32>> = vec![Vec::new(); 2];
    // 20-row chunks straddle the 32-row model batches.
    while let Some(chunk) = src.next_chunk(20).unwrap() {
        assert!(chunk.rows <= 20 && chunk.rows > 0);
        for (l, block) in chunk.layers.iter().enumerate() {
            assert_eq!(block.cols, h);
            per_layer[l].extend_from_slice(bytemuck::cast_slice(&block.data));
        }
    }
    for (l, got) in per_layer.iter().enumerate() {
        let want = ref_tensor(name, &format!("hidden.{}", l + 1));
        assert!(max_rel(got, &want) < 1e-5, "layer {l}");
    }
}

#[test]
fn capture_source_features_mode_flattens_tokens() {
    let name = "llama_bf16_tied";
    let model = Model::load(&dir(name)).unwrap();
    let tokens = Tokens::load_npy(&dir(name).join("tokens.npy")).unwrap();
    let h = model.hidden_size();
    let mut src = CaptureSource::new(&model, &tokens, 2, TokenMode::Features);
    assert_eq!(src.n_samples_hint(), Some(3));
    assert_eq!(src.layers()[0].cols, tokens.len * h);
    let mut rows = 0;
    let mut last: Vec<f32> = Vec::new();
    while let Some(chunk) = src.next_chunk(1).unwrap() {
        assert_eq!(chunk.rows, 1);
        rows += 1;
        last.extend_from_slice(bytemuck::cast_slice(&chunk.layers[1].data));
    }
    assert_eq!(rows, 3);
    // Sequence-major rows of [tokens * hidden] are the [sequences, tokens, hidden] tensor.
    let want = ref_tensor(name, "hidden.2");
    assert!(max_rel(&last, &want) < 1e-5);
}

/// `--device`: `cpu` and `auto` give the same gradient norms here (auto falls back to the CPU without a
/// GPU); `cuda` without a GPU is a one-line error (exit 2), never a panic; a CNN refuses `cuda`.
#[test]
fn device_flag_on_runtime_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let d = dir("llama_llama3_rope");
    let tokens = d.join("tokens.npy").to_str().unwrap().to_string();
    let run_with = |device: &str, out: &str, extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend([
            "-q",
            "gradnorm",
            "--model",
            d.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--batch",
            "2",
            "--device",
            device,
            "--out",
        ]);
        let out = tmp.path().join(out).to_str().unwrap().to_string();
        args.push(&out);
        engine(&args)
    };
    let run = |device: &str, out: &str| run_with(device, out, &[]);
    let gpu = matches!(sglp_engine::similarity::cuda::list_devices(), Ok(d) if !d.is_empty());
    assert!(run("cpu", "cpu.json").status.success());
    let grads = |f: &str| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join(f)).unwrap()).unwrap();
        v["gradnorm"].clone()
    };
    if !gpu {
        assert!(run("auto", "auto.json").status.success());
        assert_eq!(grads("cpu.json"), grads("auto.json"));
        let o = run("cuda", "cuda.json");
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!tmp.path().join("cuda.json").exists());
    } else {
        // The GPU through the CLI: f32 products within the self-check's tolerance of the CPU, bf16
        // products (the default) within bf16 tolerances (ops in detail: tests/runtime_cuda.rs).
        let close = |f: &str, tol: f64| {
            let (a, b) = (grads("cpu.json"), grads(f));
            let (a, b) = (a.as_array().unwrap(), b.as_array().unwrap());
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!((x - y).abs() <= tol * x.abs(), "{f}: {y} vs cpu {x}");
            }
        };
        assert!(run_with("cuda", "f32.json", &["--matmul", "f32"])
            .status
            .success());
        close("f32.json", 1e-4);
        assert!(run("cuda", "bf16.json").status.success());
        close("bf16.json", 5e-2);
    }
    let o = run_with("cpu", "bad.json", &["--matmul", "f8"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown --matmul is a usage error"
    );
    let o = engine(&[
        "gradnorm",
        "--model",
        "m.safetensors",
        "--arch",
        "cifar-resnet20",
        "--images",
        "x.npy",
        "--labels",
        "y.npy",
        "--device",
        "cuda",
        "--out",
        tmp.path().join("c.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("CPU only"));
}
