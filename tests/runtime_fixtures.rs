//! The runtime against PyTorch: tiny random checkpoints made by scripts/make_fixtures.py (HF transformers,
//! float64 reference). Loss and hidden states within 1e-5 relative, gradient norms within 1e-4 relative.
//! Fixtures cover llama (llama3 rope scaling, 4.x config), llama bf16 with tied embeddings and int32 tokens,
//! mistral sharded with an index file and single-kv-head GQA, qwen2 f16 with q/k/v biases and head_dim,
//! qwen2 with sliding-window attention (window 5 < 16 tokens) on the layers from max_window_layers on,
//! qwen3 bf16 with per-head q/k RMSNorm, head_dim ≠ hidden / heads, biases on q/k/v/o and tied embeddings,
//! phi3 with fused qkv / gate_up projections, partial rotary, LongRoPE and a sliding window on every layer,
//! gemma bf16 (embedding × √hidden, norms × (1 + w), tanh-GELU, pad_token_id 0), gemma3_text (sandwich
//! norms, q/k norms, query_pre_attn_scalar, per-kind rotary, sliding_window_pattern), gemma2 bf16
//! (soft-capped attention scores and logits, windows on the even layers), olmo2 (norms after the attention
//! and the MLP only, q/k norms over the whole projections); the others are listed in
//! `common::DECODER_FIXTURES` and described in scripts/make_fixtures.py.

mod common;

use common::{fixture as dir, reference, rel, DECODER_FIXTURES as FIXTURES};
use sglp_engine::runtime::ops::Activation;
use sglp_engine::runtime::{Model, RopeScaling, Tokens};
use std::path::Path;

fn load(name: &str) -> (Model, Tokens) {
    let model = Model::load(&dir(name)).unwrap();
    let tpath = dir(name).join("tokens.npy");
    let tokens = Tokens::load_npy(&tpath).unwrap();
    tokens.check_vocab(model.config.vocab_size, &tpath).unwrap();
    (model, tokens)
}

/// A copy of fixture `name` in a temporary directory, its config.json edited by `edit`.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir(name)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    tmp
}

/// Fixture `name`'s windows are exercised: with its config edited by `unwindow` (no window, or one longer
/// than the sequences) the loss is PyTorch's `loss_full_attention`, measurably different from the
/// windowed loss. Returns the unwindowed model.
fn window_matters(name: &str, unwindow: impl FnOnce(&mut serde_json::Value)) -> Model {
    let (model, tokens) = load(name);
    let (refs, _) = reference(name);
    let windowed = model.forward(&tokens, &[], None).unwrap();
    let tmp = edited_copy(name, unwindow);
    let full_model = Model::load(tmp.path()).unwrap();
    let full = full_model.forward(&tokens, &[], None).unwrap();
    let want = refs["loss_full_attention"][0];
    assert!(
        rel(full, want) < 1e-5,
        "{name} without the window: {full} vs {want}"
    );
    eprintln!(
        "{name} without the window: loss rel err {:.2e}; the window moves the loss by {:.2e}",
        rel(full, want),
        rel(windowed, full)
    );
    assert!(
        rel(windowed, full) > 1e-3,
        "{name}: the window changes nothing: {windowed} vs {full}"
    );
    full_model
}

#[test]
fn hidden_states_and_loss_match_pytorch() {
    for name in FIXTURES {
        let (model, tokens) = load(name);
        let (refs, _) = reference(name);
        let mut seen = vec![false; model.num_layers() + 1];
        let mut worst = 0f64;
        let loss = model
            .forward(
                &tokens,
                &[],
                Some(&mut |i, h| {
                    let want = &refs[&format!("hidden.{i}")];
                    assert_eq!(h.len(), want.len(), "{name}: hidden {i} size");
                    // Relative to the tensor's scale: max |Δ| / max |ref|.
                    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let err = h
                        .iter()
                        .zip(want)
                        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
                    assert!(
                        err / scale < 1e-5,
                        "{name}: hidden {i}: rel err {:.2e}",
                        err / scale
                    );
                    seen[i] = true;
                    worst = worst.max(err / scale);
                }),
            )
            .unwrap();
        assert!(
            seen.iter().all(|&s| s),
            "{name}: not every hidden state reported"
        );
        // The whole set's loss: the reference gives per-batch means; recombine by predicted-token counts.
        let (_, batch) = reference(name);
        let (mut sum, mut count) = (0f64, 0usize);
        for (k, start) in (0..tokens.sequences).step_by(batch).enumerate() {
            let n = (tokens.sequences - start).min(batch) * (tokens.len - 1);
            sum += refs[&format!("loss.b{k}")][0] * n as f64;
            count += n;
        }
        let want = sum / count as f64;
        assert!(rel(loss, want) < 1e-5, "{name}: loss {loss} vs {want}");
        eprintln!(
            "{name}: hidden max rel err {worst:.2e}, loss rel err {:.2e}",
            rel(loss, want)
        );
    }
}

#[test]
fn gradient_norms_match_pytorch() {
    for name in FIXTURES {
        let (model, tokens) = load(name);
        let (refs, batch) = reference(name);
        let mut worst = 0f64;
        for (k, start) in (0..tokens.sequences).step_by(batch).enumerate() {
            let g = model.grad_norms(&tokens.batch(start, batch), &[]).unwrap();
            let want_loss = refs[&format!("loss.b{k}")][0];
            assert!(
                rel(g.loss, want_loss) < 1e-5,
                "{name} b{k}: loss {} vs {want_loss}",
                g.loss
            );
            let want = &refs[&format!("gradnorm.b{k}")];
            for (l, (&got, &w)) in g.per_layer.iter().zip(want).enumerate() {
                assert!(rel(got, w) < 1e-4, "{name} b{k} layer {l}: {got} vs {w}");
                worst = worst.max(rel(got, w));
            }
            let extra = &refs[&format!("extra.b{k}")];
            assert!(
                rel(g.embed_tokens, extra[0]) < 1e-4,
                "{name} b{k}: embed {} vs {}",
                g.embed_tokens,
                extra[0]
            );
            assert!(
                rel(g.norm, extra[1]) < 1e-4,
                "{name} b{k}: norm {} vs {}",
                g.norm,
                extra[1]
            );
            match g.lm_head {
                Some(h) => assert!(
                    rel(h, extra[2]) < 1e-4,
                    "{name} b{k}: lm_head {h} vs {}",
                    extra[2]
                ),
                None => assert!(extra[2] < 0.0, "{name}: lm_head missing but untied"),
            }
        }
        eprintln!("{name}: layer gradient norm max rel err {worst:.2e}");
    }
}

#[test]
fn skipping_a_layer_matches_pytorch_without_it() {
    for name in FIXTURES {
        let (model, tokens) = load(name);
        let (refs, _) = reference(name);
        let mut last_two: Vec<Vec<f32>> = vec![Vec::new(); 3];
        let loss = model
            .forward(
                &tokens,
                &[1],
                Some(&mut |i, h| {
                    if i <= 2 {
                        last_two[i] = h.to_vec();
                    }
                }),
            )
            .unwrap();
        // A skipped layer reports its input unchanged.
        assert_eq!(last_two[1], last_two[2], "{name}");
        let want = refs["loss_skip1"][0];
        assert!(rel(loss, want) < 1e-5, "{name}: skip loss {loss} vs {want}");
        let g = model.grad_norms(&tokens, &[1]).unwrap();
        assert_eq!(g.per_layer[1], 0.0);
        assert!(g.per_layer[0] > 0.0);
        assert!(rel(g.loss, want) < 1e-5);
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let (model, tokens) = load("llama_llama3_rope");
    let e = tokens
        .check_vocab(10, Path::new("tokens.npy"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sequence 0") && e.contains("outside the vocabulary"),
        "{e}"
    );
    let e = model.forward(&tokens, &[7], None).unwrap_err().to_string();
    assert!(e.contains("layer 7"), "{e}");
    // A config naming an unsupported model type.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(dir("llama_llama3_rope").join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"model_type\": \"llama\"", "\"model_type\": \"t5\""),
    )
    .unwrap();
    let e = Model::load(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("model_type 't5' is not supported") && e.contains("gpt_neox"),
        "{e}"
    );
    // Attention kinds Qwen2Model has no mask for.
    let tmp = edited_copy("qwen2_sliding", |c| {
        c["layer_types"] =
            serde_json::json!(["full_attention", "chunked_attention", "sliding_attention"]);
    });
    let e = Model::load(tmp.path()).err().unwrap().to_string();
    assert!(
        e.contains("layer_types") && e.contains("chunked_attention"),
        "{e}"
    );
    // Mixture-of-experts settings the runtime does not read, or that cannot route.
    for (name, key, value, want) in [
        (
            "olmoe_experts",
            "clip_qkv",
            serde_json::json!(-1.0),
            "'clip_qkv' is -1, not a positive number",
        ),
        (
            "qwen2_moe_shared",
            "use_sliding_window",
            serde_json::json!(true),
            "'use_sliding_window' is true",
        ),
        (
            "mixtral_moe",
            "num_experts_per_tok",
            serde_json::json!(5),
            "num_experts_per_tok (5) must be between 1 and the number of experts (4)",
        ),
        (
            "qwen3_moe_step",
            "decoder_sparse_step",
            serde_json::json!(0),
            "'decoder_sparse_step' is 0",
        ),
    ] {
        let tmp = edited_copy(name, |c| c[key] = value);
        let e = Model::load(tmp.path()).err().unwrap().to_string();
        assert!(e.contains(want), "{name}, {key}: {e}");
    }
    // GPT-2 on sequences longer than its learned positions; its inverse-layer-index score scaling.
    let (gpt2, tokens) = load("gpt2_hub_layout");
    let long = Tokens {
        data: tokens.data.clone(),
        sequences: 1,
        len: tokens.data.len(),
    };
    let e = gpt2.forward(&long, &[], None).unwrap_err().to_string();
    assert!(
        e.contains("48 tokens") && e.contains("24 learned positions"),
        "{e}"
    );
    let tmp = edited_copy("gpt2_hub_layout", |c| {
        c["scale_attn_by_inverse_layer_idx"] = true.into()
    });
    let e = Model::load(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("scale_attn_by_inverse_layer_idx"), "{e}");
    // Experts the config names but the checkpoint lacks.
    let tmp = edited_copy("mixtral_moe", |c| c["num_local_experts"] = 5.into());
    let e = Model::load(tmp.path()).err().unwrap().to_string();
    assert!(e.contains("block_sparse_moe"), "{e}");
}

/// Every fixture's checkpoint is read whole; the same Qwen3 weights declared as Qwen2 load (every tensor
/// Qwen2 needs is there) but leave the q/k norms and the o_proj biases unread, which `unused_tensors`
/// lists and the CLI warns of.
#[test]
fn tensors_the_decoder_does_not_read_are_listed() {
    for name in FIXTURES {
        let (model, _) = load(name);
        assert_eq!(model.unused_tensors(), Vec::<String>::new(), "{name}");
    }
    let tmp = edited_copy("qwen3_qk_norm", |c| c["model_type"] = "qwen2".into());
    let model = Model::load(tmp.path()).unwrap();
    let unused = model.unused_tensors();
    let mut want: Vec<String> = (0..3)
        .flat_map(|l| {
            [
                "self_attn.k_norm.weight",
                "self_attn.o_proj.bias",
                "self_attn.q_norm.weight",
            ]
            .map(|t| format!("model.layers.{l}.{t}"))
        })
        .collect();
    want.sort();
    assert_eq!(unused, want);
    let out = common::engine_ok(&["info", "--model", tmp.path().to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:")
            && err.contains("9 tensor(s)")
            && err.contains("qwen2 decoder")
            && err.contains("model.layers.0.self_attn.k_norm.weight"),
        "{err}"
    );
}

/// The window is exercised: the same weights with full attention give PyTorch's full-attention loss,
/// measurably different from the windowed one; a Mistral window shorter than the sequences changes the
/// loss and the gradients too.
#[test]
fn sliding_window_changes_the_result() {
    let full_model = window_matters("qwen2_sliding", |c| c["use_sliding_window"] = false.into());
    assert!((0..3).all(|l| full_model.config.layer_window(l).is_none()));
    // StarCoder2 windows every layer when sliding_window is set (null: none, the class default).
    let (sc2, _) = load("starcoder2_window");
    assert!((0..3).all(|l| sc2.config.layer_window(l) == Some(6)));
    let full_model = window_matters("starcoder2_window", |c| {
        c["sliding_window"] = serde_json::Value::Null
    });
    assert!((0..3).all(|l| full_model.config.layer_window(l).is_none()));

    // Mistral windows every layer. PyTorch's numbers for the first two sequences with sliding_window 5,
    // from transformers 5.23 (eager, float64):
    //   cfg = AutoConfig.from_pretrained(dir, sliding_window=5, attn_implementation="eager")
    //   AutoModelForCausalLM.from_pretrained(dir, config=cfg).double(), loss as make_fixtures.py.
    let (want_loss, want_norms) = (
        5.400952366602074,
        [2.4277645768874985, 1.6091360120189924, 1.104077525961388],
    );
    let (mistral, mtokens) = load("mistral_sharded");
    assert_eq!(mistral.config.layer_window(0), Some(4096));
    let tmp = edited_copy("mistral_sharded", |c| c["sliding_window"] = 5.into());
    let narrow = Model::load(tmp.path()).unwrap();
    let (a, b) = (
        mistral.grad_norms(&mtokens.batch(0, 2), &[]).unwrap(),
        narrow.grad_norms(&mtokens.batch(0, 2), &[]).unwrap(),
    );
    assert!(rel(b.loss, want_loss) < 1e-5, "{} vs {want_loss}", b.loss);
    assert!(rel(a.loss, b.loss) > 1e-3, "{} vs {}", a.loss, b.loss);
    for (l, (x, y)) in a.per_layer.iter().zip(&b.per_layer).enumerate() {
        assert!(
            rel(*y, want_norms[l]) < 1e-4,
            "layer {l}: {y} vs {}",
            want_norms[l]
        );
        assert!(rel(*x, *y) > 1e-4, "layer {l}: {x} vs {y}");
    }
    eprintln!(
        "mistral window 5: loss rel err {:.2e}, layer gradient norm max rel err {:.2e}",
        rel(b.loss, want_loss),
        (0..3).fold(0f64, |m, l| m.max(rel(b.per_layer[l], want_norms[l])))
    );
}

/// Ministral windows the layers `layer_types` names, CWM all but every 4th from the first, dots1 those
/// from `max_window_layers` on (CWM's and dots1's config.json have no `layer_types`); without the windows the loss is PyTorch's full-attention one.
/// Ministral 3 refuses sequences past the positions its queries are not scaled at.
#[test]
fn ministral_cwm_dots1_windows_and_ministral3_scaling() {
    let (m, _) = load("ministral_layer_types");
    let windows: Vec<_> = (0..3).map(|l| m.config.layer_window(l)).collect();
    assert_eq!(windows, [Some(6), None, Some(6)]);
    window_matters("ministral_layer_types", |c| {
        c["sliding_window"] = 4096.into()
    });
    let (w, _) = load("cwm_layer_pattern");
    let windows: Vec<_> = (0..4).map(|l| w.config.layer_window(l)).collect();
    assert_eq!(windows, [None, Some(6), Some(6), Some(6)]);
    window_matters("cwm_layer_pattern", |c| c["sliding_window"] = 4096.into());
    let (d, _) = load("dots1_window");
    let windows: Vec<_> = (0..3).map(|l| d.config.layer_window(l)).collect();
    assert_eq!(windows, [None, Some(6), Some(6)]);
    window_matters("dots1_window", |c| {
        c["sliding_window"] = serde_json::Value::Null
    });
    let (_, tokens) = load("ministral3_yarn");
    let tmp = edited_copy("ministral3_yarn", |c| {
        c["rope_parameters"]["original_max_position_embeddings"] = 4.into()
    });
    let e = Model::load(tmp.path())
        .unwrap()
        .forward(&tokens, &[], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("llama_4_scaling_beta"), "{e}");
}

/// Llama 4: past its chunk (`attention_chunk_size`) or where its NoPE layers' query temperature
/// (`floor_scale`) departs from 1, the runtime refuses the sequences by name; both off, it runs them.
#[test]
fn llama4_refuses_sequences_past_its_chunks_and_temperature() {
    let (_, tokens) = load("llama4_moe_nope");
    let error = |edit: fn(&mut serde_json::Value)| {
        let tmp = edited_copy("llama4_moe_nope", edit);
        let m = Model::load(tmp.path()).unwrap();
        m.forward(&tokens, &[], None).err().map(|e| e.to_string())
    };
    let e = error(|c| c["attention_chunk_size"] = 4.into()).expect("refused");
    assert!(e.contains("chunks of 4 tokens"), "{e}");
    let e = error(|c| c["floor_scale"] = 8.into()).expect("refused");
    assert!(
        e.contains("attn_temperature_tuning") && e.contains("at most 7"),
        "{e}"
    );
    let off = error(|c| {
        c["attention_chunk_size"] = serde_json::Value::Null;
        c["floor_scale"] = 8.into();
        c["attn_temperature_tuning"] = false.into();
    });
    assert_eq!(off, None);
}

/// Phi-3's rotary settings and window are exercised: 16-token sequences use LongRoPE's long factors (the
/// fixture's whole-set references), 8-token prefixes (≤ original_max_position_embeddings) the short ones,
/// against PyTorch's loss on those prefixes; without the window the loss is PyTorch's full-attention one,
/// and the window moves it.
#[test]
fn phi3_longrope_factors_and_window_match_pytorch() {
    let (model, tokens) = load("phi3_longrope");
    let (refs, _) = reference("phi3_longrope");
    assert_eq!(model.config.rotary_dim, 12);
    let short_len = 8;
    let short = Tokens {
        data: (0..tokens.sequences)
            .flat_map(|s| tokens.data[s * tokens.len..s * tokens.len + short_len].to_vec())
            .collect(),
        sequences: tokens.sequences,
        len: short_len,
    };
    let got = model.forward(&short, &[], None).unwrap();
    let want = refs["loss_short"][0];
    assert!(rel(got, want) < 1e-5, "short factors: {got} vs {want}");
    // The same prefixes with the long factors (original_max_position_embeddings 4 < 8) differ.
    let tmp = edited_copy("phi3_longrope", |c| {
        c["rope_parameters"]["original_max_position_embeddings"] = 4.into();
        c["rope_parameters"]["attention_factor"] = std::f64::consts::SQRT_2.into();
    });
    let long = Model::load(tmp.path())
        .unwrap()
        .forward(&short, &[], None)
        .unwrap();
    assert!(
        rel(long, got) > 1e-3,
        "long vs short factors: {long} vs {got}"
    );

    window_matters("phi3_longrope", |c| {
        c["sliding_window"] = serde_json::Value::Null
    });
}

/// Gemma 3's windows follow `sliding_window_pattern` (config.json has no `layer_types`): with a window
/// longer than the sequences the loss is PyTorch's, and the window of 5 moves it.
#[test]
fn gemma3_pattern_windows_match_pytorch() {
    let (model, _) = load("gemma3_sandwich");
    let windows: Vec<_> = (0..4).map(|l| model.config.layer_window(l)).collect();
    assert_eq!(windows, [Some(5), Some(5), None, Some(5)]);
    window_matters("gemma3_sandwich", |c| c["sliding_window"] = 4096.into());
}

/// The loss of fixture `name` with its config edited by `edit`, and the unedited loss.
fn loss_edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (f64, f64) {
    let (model, tokens) = load(name);
    let tmp = edited_copy(name, edit);
    let edited = Model::load(tmp.path()).unwrap();
    (
        edited.forward(&tokens, &[], None).unwrap(),
        model.forward(&tokens, &[], None).unwrap(),
    )
}

/// OLMo 3 windows every layer but each 4th (config.json has no `layer_types`) and puts YaRN on the
/// full-attention layer only (the 4.x form: top-level rope_scaling); both bite. SmolLM3 derives its NoPE
/// layers from `no_rope_layer_interval` and windows exactly those; dynamic NTK grows θ past
/// max_position_embeddings; all three bite.
#[test]
fn olmo3_and_smollm3_layer_patterns_match_pytorch() {
    let (olmo3, _) = load("olmo3_yarn_window");
    let windows: Vec<_> = (0..4).map(|l| olmo3.config.layer_window(l)).collect();
    assert_eq!(windows, [Some(5), Some(5), Some(5), None]);
    assert!(matches!(
        olmo3.config.rope_scaling,
        RopeScaling::Yarn { factor: 4.0, .. }
    ));
    assert_eq!(
        olmo3.config.sliding_rope,
        Some((500000.0, RopeScaling::Default))
    );
    window_matters("olmo3_yarn_window", |c| c["sliding_window"] = 4096.into());
    let (plain, yarn) = loss_edited("olmo3_yarn_window", |c| {
        c["rope_scaling"] = serde_json::Value::Null
    });
    // One layer of four has it: it moves the loss by ~5e-4, where the engine agrees with PyTorch to 1e-8.
    assert!(
        rel(plain, yarn) > 1e-4,
        "YaRN changes nothing: {plain} vs {yarn}"
    );

    let (smollm3, _) = load("smollm3_nope");
    assert_eq!(smollm3.config.rotary_layers, [true, false, true, false]);
    let windows: Vec<_> = (0..4).map(|l| smollm3.config.layer_window(l)).collect();
    assert_eq!(windows, [None, Some(5), None, Some(5)]);
    window_matters("smollm3_nope", |c| c["use_sliding_window"] = false.into());
    let (plain, dynamic) = loss_edited("smollm3_nope", |c| {
        c["rope_parameters"]["rope_type"] = "default".into()
    });
    assert!(
        rel(plain, dynamic) > 1e-3,
        "dynamic NTK changes nothing: {plain} vs {dynamic}"
    );
    let (rotated, nope) = loss_edited("smollm3_nope", |c| {
        c["no_rope_layers"] = serde_json::json!([1, 1, 1, 1]);
        c["use_sliding_window"] = false.into();
    });
    let (unwindowed, _) = loss_edited("smollm3_nope", |c| c["use_sliding_window"] = false.into());
    assert!(
        rel(rotated, unwindowed) > 1e-3,
        "the NoPE layers change nothing: {rotated} vs {unwindowed} ({nope} windowed)"
    );
}

/// Cohere 2 windows the layers of its pattern (`sliding_window_pattern` 2, no `layer_types`) and
/// rotates only those: with a window longer than the sequences the loss is PyTorch's. AFMoE likewise
/// (`global_attn_every_n_layers` 2), and its gate on the attention's output bites.
#[test]
fn cohere2_windows_and_nope_layers_match_pytorch() {
    for (name, w) in [("cohere2_nope_window", 5), ("afmoe_gated_window", 6)] {
        let (model, _) = load(name);
        let windows: Vec<_> = (0..4).map(|l| model.config.layer_window(l)).collect();
        assert_eq!(windows, [Some(w), None, Some(w), None], "{name}");
        assert_eq!(model.config.rotary_layers, [true, false, true, false]);
        window_matters(name, |c| c["sliding_window"] = 4096.into());
    }
    let (mut model, tokens) = load("afmoe_gated_window");
    let gated = model.forward(&tokens, &[], None).unwrap();
    model.config.attention_output_gate = None;
    let ungated = model.forward(&tokens, &[], None).unwrap();
    // The gate halves the attention's output on average: ~7e-4 of the loss here, where the engine and
    // PyTorch agree to 1e-9.
    assert!(rel(gated, ungated) > 1e-4, "{gated} vs {ungated}");
}

/// EXAONE 4 windows the layers of its pattern (`sliding_window_pattern` 2, no `layer_types`) and rotates
/// only those, and so does EXAONE MoE (its mixture from `first_k_dense_replace` on); InternLM3's dynamic
/// NTK (as its hub config has it) bites past max_position_embeddings.
#[test]
fn exaone4_and_internlm3_match_pytorch() {
    let (model, _) = load("exaone4_window");
    let windows: Vec<_> = (0..4).map(|l| model.config.layer_window(l)).collect();
    assert_eq!(windows, [Some(5), None, Some(5), None]);
    assert_eq!(model.config.rotary_layers, [true, false, true, false]);
    window_matters("exaone4_window", |c| c["sliding_window"] = 4096.into());
    let (moe, _) = load("exaone_moe_window");
    let windows: Vec<_> = (0..4).map(|l| moe.config.layer_window(l)).collect();
    assert_eq!(windows, [Some(6), None, Some(6), None]);
    assert_eq!(moe.config.rotary_layers, [true, false, true, false]);
    let sparse = &moe.config.moe.as_ref().unwrap().sparse_layers;
    assert_eq!(sparse, &[false, false, true, true]);
    window_matters("exaone_moe_window", |c| c["sliding_window"] = 4096.into());
    let (plain, dynamic) = loss_edited("internlm3_dynamic", |c| {
        c["rope_scaling"] = serde_json::Value::Null
    });
    // θ is 5·10⁷ already: growing it moves the loss by ~5e-4, where the engine agrees with PyTorch to
    // 1e-8.
    assert!(
        rel(plain, dynamic) > 1e-4,
        "dynamic NTK changes nothing: {plain} vs {dynamic}"
    );
}

/// Arcee's YaRN (on every layer) bites: plain RoPE gives another loss (PyTorch's is YaRN's); its MLP
/// is up → ReLU² → down.
#[test]
fn arcee_relu2_and_yarn_match_pytorch() {
    let (model, _) = load("arcee_relu2");
    assert_eq!(model.config.activation, Activation::Relu2);
    let (plain, yarn) = loss_edited("arcee_relu2", |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0})
    });
    assert!(
        rel(plain, yarn) > 1e-3,
        "YaRN changes nothing: {plain} vs {yarn}"
    );
}

/// OLMo's, OLMoE's and MPT's clip_qkv bite: the same weights unclamped give another loss (PyTorch's
/// numbers are the clamped ones).
/// What the DeepSeek fixtures check against PyTorch bites: DeepSeek-V2's group-limited choice (greedy
/// over every expert routes otherwise), the softmax scale's mscale² (`mscale_all_dim`), V3's
/// interleaved rotary pairs.
#[test]
fn deepseek_groups_scale_and_pairs_change_the_result() {
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, &str, Edit); 4] = [
        ("deepseek_v2_grouped", "topk_method", |c| {
            c["topk_method"] = "greedy".into()
        }),
        ("deepseek_v2_grouped", "mscale_all_dim", |c| {
            c["rope_parameters"]["mscale_all_dim"] = 0.into()
        }),
        ("deepseek_v3_mla", "rope_interleave", |c| {
            c["rope_interleave"] = false.into()
        }),
        ("mistral4_mla", "n_group", |c| {
            c["n_group"] = 1.into();
            c["topk_group"] = 1.into()
        }),
    ];
    for (name, what, edit) in edits {
        let (edited, original) = loss_edited(name, edit);
        assert!(
            rel(edited, original) > 1e-4,
            "{name}: {what} changes nothing: {edited} vs {original}"
        );
    }
}

#[test]
fn clip_qkv_changes_the_result() {
    for name in ["olmo_clip_qkv", "olmoe_experts", "mpt_alibi_clip"] {
        let (unclamped, clamped) = loss_edited(name, |c| {
            c["clip_qkv"] = serde_json::Value::Null;
            if let Some(a) = c.get_mut("attn_config") {
                a["clip_qkv"] = serde_json::Value::Null;
            }
        });
        assert!(
            rel(unclamped, clamped) > 1e-3,
            "{name}: clip_qkv changes nothing: {unclamped} vs {clamped}"
        );
    }
}

/// Gemma 2 windows its even layers (config.json has no `layer_types`); soft-capping bites: the same
/// weights with the caps lifted far above the scores give another loss.
#[test]
fn gemma2_windows_and_soft_caps_match_pytorch() {
    let (model, tokens) = load("gemma2_softcap");
    let windows: Vec<_> = (0..4).map(|l| model.config.layer_window(l)).collect();
    assert_eq!(windows, [Some(5), None, Some(5), None]);
    assert_eq!(
        (model.config.attn_softcap, model.config.final_softcap),
        (Some(2.0), Some(5.0))
    );
    window_matters("gemma2_softcap", |c| c["sliding_window"] = 4096.into());
    let capped = model.forward(&tokens, &[], None).unwrap();
    for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
        let tmp = edited_copy("gemma2_softcap", |c| c[key] = 1e6.into());
        let loose = Model::load(tmp.path())
            .unwrap()
            .forward(&tokens, &[], None)
            .unwrap();
        assert!(rel(loose, capped) > 1e-3, "{key}: {loose} vs {capped}");
    }
}

/// `info` names a decoder's attention particulars: which layers are windowed, the score scale, the caps,
/// the rotary embeddings.
#[test]
fn info_describes_windows_caps_and_rotary() {
    for (name, want) in [
        (
            "opt_hub_layout",
            "block: LayerNorms with biases; MLP fc1 → ReLU → fc2; learned positions, no rotary \
             embedding\nattention: causal, no window; learned positions (up to 20 tokens, from row 2), \
             no rotary",
        ),
        (
            "gpt2_hub_layout",
            "parameters: 43040 (12704 per decoder layer, 4928 outside them)\nblock: LayerNorms with \
             biases; Conv1D projections (read transposed), q/k/v fused; MLP c_fc → tanh-GELU → c_proj; \
             learned positions, no rotary embedding\nattention: causal, no window; learned positions \
             (up to 24 tokens), no rotary",
        ),
        (
            "qwen2_moe_shared",
            "mixture of experts: 5 experts of intermediate size 24, top 2 per token, a shared expert \
             of 40 gated by σ on 2 of 3 layers (the others a dense MLP)",
        ),
        (
            "qwen3_moe_step",
            "parameters: 73504 (12384–20256 per decoder layer, 8224 outside them)\nblock: 2 RMSNorms; \
             gated MLP (SiLU gate)\nmixture of experts: 6 experts of intermediate size 24, top 3 per \
             token (weights renormalised) on 2 of 4 layers (the others a dense MLP)",
        ),
        (
            "gemma2_softcap",
            "attention: window 5 on 2 of 4 layers (0, 2); scores × 0.204124; scores soft-capped at 2; \
             logits soft-capped at 5; rotary θ 10000, default on 16 of 16 values",
        ),
        (
            "phi3_longrope",
            "attention: window 5 on 3 of 3 layers (0, 1, 2); rotary θ 10000, longrope (long factors \
             past 8 tokens) on 12 of 16 values",
        ),
        (
            "gemma3_sandwich",
            "windowed layers' rotary θ 10000, default",
        ),
        (
            "olmo3_yarn_window",
            "attention: window 5 on 3 of 4 layers (0, 1, 2); rotary θ 500000, yarn ×4 from 64 tokens, \
             cos/sin × 1.138629 on 16 of 16 values; windowed layers' rotary θ 500000, default",
        ),
        (
            "stablelm_sequential",
            "block: 2 LayerNorms with biases; gated MLP (SiLU gate)\nattention: causal, no window; \
             rotary θ 10000, default on 4 of 16 values",
        ),
        (
            "stablelm_parallel",
            "block: one LayerNorm (with a bias) shared by the attention and the MLP, in parallel (x + \
             attn(ln x) + mlp(ln x)); gated MLP (SiLU gate)",
        ),
        (
            "cohere_interleaved",
            "block: one LayerNorm (no bias) shared by the attention and the MLP, in parallel (x + \
             attn(ln x) + mlp(ln x)); gated MLP (SiLU gate); logits × 0.25\nattention: causal, no \
             window; rotary θ 10000, default on 8 of 8 values (interleaved pairs)",
        ),
        (
            "cohere2_nope_window",
            "attention: window 5 on 2 of 4 layers (0, 2); rotary θ 10000, default on 8 of 8 values \
             (interleaved pairs); no rotary embedding on 2 of 4 layers (1, 3)",
        ),
        (
            "glm4_sandwich",
            "block: 4 RMSNorms; gated MLP (SiLU gate)\nattention: causal, no window; rotary θ 10000, \
             default on 8 of 16 values (interleaved pairs)",
        ),
        (
            "exaone4_window",
            "attention: window 5 on 2 of 4 layers (0, 2); rotary θ 1000000, default on 8 of 8 values; \
             no rotary embedding on 2 of 4 layers (1, 3)",
        ),
        (
            "falcon_multi_query",
            "block: LayerNorms with biases; q/k/v fused per key/value group; MLP dense_h_to_4h → GELU \
             → dense_4h_to_h; attention and MLP in parallel on one norm (x + attn(ln x) + mlp(ln x))",
        ),
        (
            "falcon_new_arch",
            "4 heads (2 key/value) of 8",
        ),
        (
            "olmo_clip_qkv",
            "block: 2 LayerNorms without parameters; gated MLP (SiLU gate); q, k, v clamped to ±1.5",
        ),
        (
            "smollm3_nope",
            "attention: window 5 on 2 of 4 layers (1, 3); rotary θ 10000, dynamic NTK ×2 past 8 tokens \
             on 8 of 8 values; no rotary embedding on 2 of 4 layers (1, 3)",
        ),
        // The hub-style sparse text_config's class defaults: pattern 6, 1/√256, θ 10⁶ and 10⁴.
        (
            "gemma3_vision",
            "attention: window 5 on 6 of 7 layers (0, 1, 2, 3, 4, 6); scores × 0.062500; rotary θ \
             1000000, linear ×8 on 16 of 16 values; windowed layers' rotary θ 10000, default\n\
             vision-language checkpoint (gemma3): its language model is the decoder (tensors \
             'language_model.model.…'); 50 other tensors",
        ),
        (
            "neox_parallel",
            "block: LayerNorms with biases; q/k/v fused per head; MLP up → GELU → down; attention \
             and MLP in parallel (x + attn(ln₁ x) + mlp(ln₂ x))\nattention: causal, no window; rotary \
             θ 10000, default on 4 of 16 values",
        ),
        (
            "granite_multipliers",
            "block: 2 RMSNorms; gated MLP (SiLU gate); embeddings × 3; attention and MLP outputs × 0.4 \
             before the residual adds; logits × 0.4\nattention: causal, no window; scores × 0.300000",
        ),
        (
            "qwen2_5_vl_flat",
            "vision-language checkpoint (qwen2_5_vl): its language model is the decoder (tensors \
             'model.…'); 18 other tensors",
        ),
        (
            "phi_parallel",
            "block: one LayerNorm (with a bias) shared by the attention and the MLP, in parallel (x + \
             attn(ln x) + mlp(ln x)); MLP fc1 → tanh-GELU → fc2; lm_head with a bias\nattention: \
             causal, no window; rotary θ 10000, default on 6 of 16 values",
        ),
        (
            "starcoder2_window",
            "block: LayerNorms with biases; MLP c_fc → tanh-GELU → c_proj; attention and MLP one \
             after the other\nattention: window 6 on 3 of 3 layers",
        ),
        (
            "neox_sequential",
            "attention and MLP one after the other",
        ),
        (
            "mistral3_vision",
            "vision-language checkpoint (mistral3): its language model is the decoder (tensors \
             'model.language_model.…'); 15 other tensors",
        ),
    ] {
        let out = common::engine_ok(&["info", "--model", dir(name).to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(want), "{name}: {text}");
    }
}

/// InternLM2 (its names, its per-group wqkv, its 4.x config; made from a LLaMA whose PyTorch numbers
/// are the reference): dynamic NTK bites, and the pruned checkpoint (layer 1 removed, written in
/// InternLM2's names) gives PyTorch's loss without layer 1.
#[test]
fn internlm2_matches_pytorch_and_prunes() {
    let name = "internlm2_wqkv";
    let (model, tokens) = load(name);
    assert_eq!(model.names.embed, "model.tok_embeddings.weight");
    assert_eq!(model.names.lm_head, "output.weight");
    assert!(matches!(
        model.config.rope_scaling,
        RopeScaling::Dynamic { .. }
    ));
    let (plain, dynamic) = loss_edited(name, |c| c["rope_scaling"] = serde_json::Value::Null);
    assert!(
        rel(plain, dynamic) > 1e-4,
        "dynamic NTK changes nothing: {plain} vs {dynamic}"
    );
    let out = tempfile::tempdir().unwrap();
    sglp_engine::pruning::checkpoint::write_pruned_checkpoint(
        &dir(name),
        out.path(),
        &model.names.layers_prefix(),
        3,
        &[0, 2],
    )
    .unwrap();
    let pruned = Model::load(out.path()).unwrap();
    assert_eq!(pruned.config.num_hidden_layers, 2);
    let (refs, _) = reference(name);
    let want = refs["loss_skip1"][0];
    let loss = pruned.forward(&tokens, &[], None).unwrap();
    assert!(rel(loss, want) < 1e-5, "pruned loss {loss} vs {want}");
}

/// ALiBi bites: Falcon-RW without it (the rotary embedding instead) gives another loss; the slopes
/// differ per head (6 heads: past the largest power of two too).
#[test]
fn alibi_bites() {
    for name in ["falcon_rw_alibi", "bloom_alibi", "mpt_alibi_clip"] {
        let (model, _) = load(name);
        let a = model.config.alibi.expect("ALiBi");
        let heads = model.config.num_attention_heads;
        let slopes: Vec<f32> = (0..heads).map(|h| a.slope(h, heads)).collect();
        assert!(
            slopes.windows(2).all(|w| w[0] != w[1]),
            "{name}: {slopes:?}"
        );
    }
    let (rotary, alibi) = loss_edited("falcon_rw_alibi", |c| c["alibi"] = false.into());
    assert!(rel(rotary, alibi) > 1e-4, "{rotary} vs {alibi}");
}

/// Command R+'s q/k norms: LayerNorms over each head with weights of its own (`[heads, head_dim]`),
/// which differ between heads in the fixture (so that reading one row for all of them would not match
/// PyTorch above); without them (`use_qk_norm` false) the loss moves.
#[test]
fn cohere_qk_norms_have_weights_per_head() {
    let (model, _) = load("cohere_qk_norm");
    let (hd, heads) = (model.config.head_dim, model.config.num_attention_heads);
    assert_eq!(
        model.config.qk_norm_rows(),
        Some([(hd, heads), (hd, model.config.num_key_value_heads)])
    );
    let bytes = std::fs::read(dir("cohere_qk_norm").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let q = st.tensor("model.layers.0.self_attn.q_norm.weight").unwrap();
    assert_eq!(q.shape(), [heads, hd]);
    let w: Vec<f32> = bytemuck::pod_collect_to_vec(q.data());
    assert!((1..heads).all(|h| w[h * hd..(h + 1) * hd] != w[..hd]));
    let (without, with) = loss_edited("cohere_qk_norm", |c| c["use_qk_norm"] = false.into());
    assert!(rel(without, with) > 1e-4, "{without} vs {with}");
}
