//! The pruning-quality claim, held on the committed trained model (tests/fixtures/trained_llama: a
//! byte-level LLaMA of 12 layers trained on the Python standard library by scripts/train_fixture.py):
//! the default decision's held-out loss is no worse than the best of ShortGPT, angular distance, MPruner
//! and the random median at every budget, and within 2% perplexity of the SLEB reference.

mod common;

use common::engine;
use std::path::Path;

#[test]
fn default_sglp_beats_every_baseline_on_the_trained_llama() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trained_llama");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "compare".to_string(),
        "--model".into(),
        s(&dir),
        "--tokens".into(),
        s(&dir.join("calib.npy")),
        "--eval-tokens".into(),
        s(&dir.join("heldout.npy")),
        "--remove".into(),
        "2,4,6".into(),
        "--seeds".into(),
        "5".into(),
        "--criteria".into(),
        "sglp,shortgpt,angular,mpruner,random,sleb".into(),
        "-o".into(),
        s(&out),
    ];
    let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let o = engine(&argv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let curve = |name: &str| -> Vec<f64> {
        v["curves"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["criterion"] == name)
            .unwrap()["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["loss"].as_f64().unwrap())
            .collect()
    };
    let sglp = curve("sglp");
    let sleb = curve("sleb");
    let table = String::from_utf8_lossy(&o.stdout);
    for (i, n) in [2, 4, 6].into_iter().enumerate() {
        let best = ["shortgpt", "angular", "mpruner", "random"]
            .iter()
            .map(|c| curve(c)[i])
            .fold(f64::INFINITY, f64::min);
        assert!(
            sglp[i] <= best + 1e-9,
            "N = {n}: sglp loss {} > best baseline {best}\n{table}",
            sglp[i]
        );
        assert!(
            sglp[i] <= sleb[i] + 1.02f64.ln(),
            "N = {n}: sglp loss {} more than 2% perplexity above SLEB's {}\n{table}",
            sglp[i],
            sleb[i]
        );
    }
}
