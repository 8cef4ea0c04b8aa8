//! Writing the pruned model as a Hugging Face checkpoint directory.
//!
//! * `config.json`: `num_hidden_layers` (GPT-2: `n_layer`) set to the kept count; every per-layer list
//!   (an array whose key names layers, or HunYuan MoE's `moe_topk` and kin, and whose length is the old
//!   layer count, e.g. `layer_types`) keeps
//!   the kept entries (a layer pattern the config only implies, Gemma's and OLMo 3's `layer_types`,
//!   SmolLM3's and Llama 4's `no_rope_layers`, written out first); Qwen-MoE's dense layers
//!   (`mlp_only_layers`) and Llama 4's sparse ones (`moe_layers`) listed by their new indices. In a vision-language checkpoint's config, this happens in its `text_config`
//!   only.
//! * weights: each input safetensors file becomes one output file of the same name holding its surviving
//!   tensors (a `torch.save` file, `pytorch_model….bin`, becomes `model….safetensors`), `model.layers.{old}.…` renamed to `model.layers.{new}.…` (kept layers renumbered in order;
//!   the prefix is the decoder's, [`crate::runtime::TensorNames::layers_prefix`]; other tensors, a vision
//!   tower's included, are kept as they are),
//!   dtype, shape and bytes unchanged, the file's `__metadata__` kept. A sharded checkpoint keeps its
//!   sharding (a shard left empty is dropped) and gets a rewritten `model.safetensors.index.json`
//!   (`total_size`, and `total_parameters` where the original recorded it).
//! * the tokenizer and generation files (tokenizer*, special_tokens_map, generation_config, chat
//!   template, vocab/merges, …) are copied as is.
//!
//! The directory is built in a staging directory beside OUTDIR and renamed into place at the end
//! ([`StagedDir`]), so an interrupted run leaves no half-written OUTDIR.

use crate::error::{Error, Result};
use crate::io::output::{rename_dir, Staging};
use crate::runtime::config::{
    ernie_moe_sparse_layers, gpt_neo_attention_layers, llama4_moe_layers, mlp_layer_types,
    nope_rotary_layers, pattern_layer_kinds, qwen_moe_sparse_layers, text_config, ModelConfig,
};
use crate::runtime::weights::{
    file_metadata, map_weights, stored_weights, tensor_view, weight_files, StoredWeight,
    WeightFormat, INDEX_FILE,
};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// An output directory being built: a staging directory beside the destination (registered with
/// [`crate::io::output`], so an interrupt removes it), renamed over it by [`StagedDir::commit`]. Dropped
/// without commit, it is deleted.
pub struct StagedDir {
    staging: Staging,
    dest: PathBuf,
    force: bool,
}

impl StagedDir {
    /// Refuses an existing `dest` unless `force`. Call it before long work, so the user hears at once;
    /// [`StagedDir::new`] checks again.
    pub fn check_dest(dest: &Path, force: bool) -> Result<()> {
        if dest.exists() && !force {
            return Err(Error::invalid(format!(
                "{}: already exists (pass --force to replace it)",
                dest.display()
            )));
        }
        Ok(())
    }

    /// Create the staging directory (refusing an existing `dest` unless `force`). Create it just before
    /// writing: a run interrupted before then leaves nothing behind.
    pub fn new(dest: &Path, force: bool) -> Result<Self> {
        Self::check_dest(dest, force)?;
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let (staging, ()) = Staging::create(dest, |p| std::fs::create_dir(p))?;
        Ok(StagedDir {
            staging,
            dest: dest.to_path_buf(),
            force,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Move the directory into place. With `force`, an existing destination is exchanged with the new one
    /// in one step (it never goes missing) and deleted after.
    pub fn commit(self) -> Result<PathBuf> {
        set_public_modes(self.staging.path())?;
        let StagedDir {
            staging,
            dest,
            force,
        } = self;
        staging.commit(|staged| {
            rename_dir(staged, &dest, force).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::invalid(format!(
                        "{}: appeared while pruning (pass --force to replace it)",
                        dest.display()
                    ))
                } else {
                    Error::io(&dest, e)
                }
            })?;
            // What was replaced is now at the staging path.
            let old = match std::fs::symlink_metadata(staged) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(staged),
                Ok(_) => std::fs::remove_file(staged),
                Err(_) => Ok(()),
            };
            old.map_err(|e| Error::io(staged, e))
        })?;
        Ok(dest)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::format(path, e.to_string()))?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Write per-layer flags into `obj[key]` as the config class names the two kinds (`[true, false]`): a
/// list the config only implied, made explicit so that the kept layers keep their kinds once it is sliced.
fn insert_layer_kinds(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    flags: &[bool],
    [yes, no]: [&str; 2],
) {
    let kinds: Vec<serde_json::Value> = flags
        .iter()
        .map(|&f| if f { yes } else { no }.into())
        .collect();
    obj.insert(key.into(), kinds.into());
}

/// The config with the decoder's layer count and per-layer lists updated: the config's own or, for a
/// vision-language checkpoint, its `text_config`'s (where a field the class defaults, such as
/// `num_hidden_layers`, may be absent; it is written) or, for a flat 4.x Qwen-VL config, the top level's
/// (the vision config's layers are another count). `kept`: old layer indices, sorted.
pub fn pruned_config(
    config: &serde_json::Value,
    kept: &[usize],
    path: &Path,
) -> Result<serde_json::Value> {
    let resolved = text_config(config, path)?;
    // The decoder's settings, class defaults filled in, read; the file's own section edited.
    let decoder = resolved.as_ref().map_or(config, |t| &t.text);
    let mut c = config.clone();
    let section = match &resolved {
        Some(t) if t.nested => c.get_mut("text_config"),
        _ => Some(&mut c),
    };
    let obj = section
        .and_then(|s| s.as_object_mut())
        .ok_or_else(|| Error::format(path, "config is not a JSON object"))?;
    let model_type = decoder.get("model_type").and_then(|v| v.as_str());
    // GPT2Config, GPTBigCodeConfig, BloomConfig, GPTJConfig and CodeGenConfig name the layer count `n_layer`, as Falcon's hub configs
    // (RWConfig's names, which FalconConfig maps) do; MptConfig `n_layers`.
    let count_key = match model_type {
        Some("gpt2" | "gpt_bigcode" | "bloom" | "gptj" | "codegen") => "n_layer",
        Some("mpt") => "n_layers",
        // GPTNeoConfig's name.
        Some("gpt_neo") => "num_layers",
        Some("falcon") if decoder.get("num_hidden_layers").is_none() => "n_layer",
        // EXAONE's hub configs name it `num_layers` (ExaoneConfig's attribute_map).
        Some("exaone") if decoder.get("num_hidden_layers").is_none() => "num_layers",
        _ => "num_hidden_layers",
    };
    let old = decoder
        .get(count_key)
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::format(path, format!("no integer \"{count_key}\"")))?
        as usize;
    // Gemma 2 and 3 without `layer_types` derive each layer's kind from its position: write the kinds
    // out, so that the kept layers keep theirs.
    if obj.get("layer_types").is_none_or(|v| v.is_null()) {
        if let Some(kinds) = pattern_layer_kinds(decoder, model_type.unwrap_or(""), old, path)? {
            let names = ["sliding_attention", "full_attention"];
            insert_layer_kinds(obj, "layer_types", &kinds, names);
        }
    }
    // GPT-Neo states its layers' kinds as runs (`attention_types`): restate the kept layers', one run.
    if model_type == Some("gpt_neo") {
        let local = gpt_neo_attention_layers(decoder, path)?;
        let kinds: Vec<&str> = (kept.iter())
            .map(|&l| ["global", "local"][local.get(l).copied().unwrap_or(false) as usize])
            .collect();
        obj.insert("attention_types".into(), serde_json::json!([[kinds, 1]]));
    }
    // MiniCPM3 scales each residual branch by scale_depth / √layers: keep the kept layers' scale.
    if model_type == Some("minicpm3") {
        match obj.get("scale_depth") {
            Some(serde_json::Value::Null) => {}
            depth => {
                let depth = depth.and_then(|d| d.as_f64()).unwrap_or(1.4);
                let kept_depth = depth * (kept.len() as f64 / old as f64).sqrt();
                obj.insert("scale_depth".into(), kept_depth.into());
            }
        }
    }
    // GLM-4.7-Flash and HY V3 without `mlp_layer_types` make every layer but the first sparse: write the
    // kinds out.
    if matches!(model_type, Some("glm4_moe_lite" | "hy_v3"))
        && obj.get("mlp_layer_types").is_none_or(|v| v.is_null())
    {
        let sparse = mlp_layer_types(decoder, old, path)?;
        insert_layer_kinds(obj, "mlp_layer_types", &sparse, ["sparse", "dense"]);
    }
    // MiniCPM 5 MoE without `mlp_layer_types` takes them from `first_k_dense_replace` (a keyword its
    // class drops): write them out.
    if model_type == Some("minicpm5_moe") && obj.get("mlp_layer_types").is_none_or(|v| v.is_null())
    {
        let c = ModelConfig::from_json(decoder, path)?;
        let sparse = c.moe.map(|m| m.sparse_layers).unwrap_or_default();
        insert_layer_kinds(obj, "mlp_layer_types", &sparse, ["sparse", "dense"]);
    }
    // SmolLM3 and Llama 4 without `no_rope_layers` (Llama 4: or with an empty one) derive each layer's
    // rotary embedding from its position: write them out too.
    let stated = |v: &serde_json::Value| v.as_array().is_some_and(|a| !a.is_empty());
    if matches!(model_type, Some("smollm3" | "llama4_text"))
        && !obj.get("no_rope_layers").is_some_and(stated)
    {
        let rotary = nope_rotary_layers(decoder, old, path)?;
        let flags: Vec<serde_json::Value> = rotary.iter().map(|&r| u8::from(r).into()).collect();
        obj.insert("no_rope_layers".into(), flags.into());
    }
    // HunYuan MoE's per-layer lists do not say "layer" in their names.
    const PER_LAYER: [&str; 4] = [
        "moe_topk",
        "num_experts",
        "moe_intermediate_size",
        "num_shared_expert",
    ];
    for (key, v) in obj.iter_mut() {
        if let serde_json::Value::Array(items) = v {
            let per_layer = key.contains("layer") || PER_LAYER.contains(&key.as_str());
            if per_layer && items.len() == old {
                *items = kept.iter().map(|&i| items[i].clone()).collect();
            }
        }
    }
    // Qwen2 and Qwen3 window layer l when l ≥ max_window_layers (without `layer_types`); GLM-4.5 and
    // DeepSeek-V2 and V3 make layer l sparse when l ≥ first_k_dense_replace. Kept layers stay in order, so
    // counting the kept layers below the old bound keeps every layer's own kind.
    let bounds: &[(&str, u64)] = match model_type {
        Some("qwen2" | "qwen3") => &[("max_window_layers", 28)],
        Some("dots1") => &[("max_window_layers", 62), ("first_k_dense_replace", 0)],
        Some("glm4_moe" | "exaone_moe") => &[("first_k_dense_replace", 1)],
        Some("afmoe") => &[("num_dense_layers", 1)],
        Some("deepseek_v3") => &[("first_k_dense_replace", 3)],
        Some("deepseek_v2" | "mistral4") => &[("first_k_dense_replace", 0)],
        _ => &[],
    };
    for &(key, default) in bounds {
        let bound = obj.get(key).and_then(|v| v.as_u64()).unwrap_or(default) as usize;
        let below = kept.iter().filter(|&&i| i < bound).count();
        obj.insert(key.into(), below.into());
    }
    // Llama 4's sparse layers (`moe_layers`, or every `interleave_moe_layer_step`-th): list the kept
    // ones by their new indices (after the per-layer lists: `moe_layers` may be as long as the old
    // layer count, and is no per-layer list).
    if model_type == Some("llama4_text") {
        let sparse = llama4_moe_layers(decoder, old, path)?;
        obj.insert("moe_layers".into(), new_indices(kept, &sparse, true).into());
    }
    // Qwen2-MoE and Qwen3-MoE make layer l dense when it is in `mlp_only_layers` or (l + 1) is not a
    // multiple of `decoder_sparse_step`: list the kept dense layers by their new indices, step 1, so
    // that every kept layer keeps its kind.
    if matches!(model_type, Some("qwen2_moe" | "qwen3_moe")) {
        let sparse = qwen_moe_sparse_layers(decoder, old, path)?;
        obj.insert("decoder_sparse_step".into(), 1.into());
        obj.insert(
            "mlp_only_layers".into(),
            new_indices(kept, &sparse, false).into(),
        );
    }
    // ERNIE 4.5 MoE places its sparse layers by a start, an end and an interval: restate them for the
    // kept layers (a run, interval 1; none: a start past the last layer).
    if model_type == Some("ernie4_5_moe") {
        let sparse = ernie_moe_sparse_layers(decoder, old, path)?;
        let new = new_indices(kept, &sparse, true);
        let (start, end) = match (new.first(), new.last()) {
            (Some(&a), Some(&b)) => (a, b),
            _ => (kept.len(), kept.len()),
        };
        if !new.is_empty() && new.len() != end - start + 1 {
            return Err(Error::format(
                path,
                format!(
                    "the kept layers' mixtures of experts (new layers {new:?}) are not one run: \
                     moe_layer_start_index / moe_layer_end_index cannot state them"
                ),
            ));
        }
        obj.insert("moe_layer_start_index".into(), start.into());
        obj.insert("moe_layer_end_index".into(), end.into());
        obj.insert("moe_layer_interval".into(), 1.into());
    }
    // FP8 checkpoints may name modules left unquantized by layer (`model.layers.3.mlp.gate`): renumber
    // the kept layers' and drop the removed ones'.
    if let Some(list) = obj
        .get_mut("quantization_config")
        .and_then(|q| q.get_mut("modules_to_not_convert"))
        .and_then(|m| m.as_array_mut())
    {
        let layer = regex::Regex::new(r"(^|\.)layers\.(\d+)(\.|$)").expect("a valid pattern");
        list.retain_mut(|m| {
            let Some(name) = m.as_str() else { return true };
            let Some(c) = layer.captures(name) else {
                return true;
            };
            let old: usize = c[2].parse().unwrap_or(usize::MAX);
            match kept.iter().position(|&k| k == old) {
                Some(new) => {
                    let at = c.get(2).expect("the layer index");
                    *m = format!("{}{new}{}", &name[..at.start()], &name[at.end()..]).into();
                    true
                }
                None => false,
            }
        });
    }
    obj.insert(count_key.into(), kept.len().into());
    Ok(c)
}

/// The new indices of the kept layers (`kept`: old indices, in order) whose flag (by old index) is `want`.
fn new_indices(kept: &[usize], flags: &[bool], want: bool) -> Vec<usize> {
    (kept.iter().enumerate())
        .filter(|&(_, &l)| flags[l] == want)
        .map(|(new, _)| new)
        .collect()
}

/// The new name of a tensor: `None` when it belongs to a removed layer. `layers`: the decoder layers'
/// prefix (`model.layers.`); `renumber[old] = Some(new)`. A layer past the decoder's (GLM-4.5's and
/// DeepSeek-V3's multi-token-prediction layer, `model.layers.{num_hidden_layers}`, which transformers
/// does not load and vLLM finds after the last decoder layer) follows the kept layers.
pub fn renamed_tensor(name: &str, layers: &str, renumber: &[Option<usize>]) -> Option<String> {
    let Some(rest) = name.strip_prefix(layers) else {
        return Some(name.to_string());
    };
    let (num, tail) = rest.split_once('.').unwrap_or((rest, ""));
    match num.parse::<usize>() {
        Ok(old) => {
            let new = match renumber.get(old) {
                Some(new) => (*new)?,
                None => renumber.iter().flatten().count() + (old - renumber.len()),
            };
            Some(if tail.is_empty() {
                format!("{layers}{new}")
            } else {
                format!("{layers}{new}.{tail}")
            })
        }
        Err(_) => Some(name.to_string()),
    }
}

/// Parameter count of a checkpoint, split into decoder layers (tensors under `layers`, the decoder
/// layers' prefix) and the rest; from the headers only.
pub fn parameter_counts(
    model_dir: &Path,
    layers: &str,
    num_layers: usize,
) -> Result<(usize, Vec<usize>)> {
    let mut per_layer = vec![0usize; num_layers];
    let mut other = 0usize;
    for f in weight_files(model_dir)?.files {
        let path = model_dir.join(&f);
        let map = map_weights(&path)?;
        let mut seen = HashSet::new();
        for t in stored_weights(&map, &path)?
            .into_iter()
            .filter(|t| is_new_parameter(t, &mut seen))
        {
            let n: usize = t.shape.iter().product();
            match layer_of(&t.name, layers).filter(|&l| l < num_layers) {
                Some(l) => per_layer[l] += n,
                None => other += n,
            }
        }
    }
    Ok((other, per_layer))
}

/// Whether a stored tensor is a buffer some checkpoints carry, not a parameter: a rotary embedding's
/// `inv_freq`, GPT-2's causal masks (`h.{l}.attn.bias`, `attn.masked_bias`). Not counted, not read.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
}

/// Whether stored tensor `t` of one file counts as parameters not yet counted (`seen`: the byte ranges of
/// those counted): not a buffer, and not a tied tensor `torch.save` stored once under two names.
fn is_new_parameter(t: &StoredWeight, seen: &mut HashSet<(usize, usize)>) -> bool {
    !is_buffer(&t.name) && seen.insert((t.start, t.end))
}

/// The decoder layer a tensor name belongs to (`layers`: the decoder layers' prefix).
pub fn layer_of(name: &str, layers: &str) -> Option<usize> {
    let rest = name.strip_prefix(layers)?;
    rest.split('.').next()?.parse().ok()
}

/// What was written.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WrittenCheckpoint {
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: u64,
}

/// Write the pruned checkpoint of `model_dir` into `out` (an existing, empty directory: the staging
/// directory). `layers`: the decoder layers' prefix ([`crate::runtime::TensorNames::layers_prefix`]);
/// `kept`: old layer indices to keep, sorted; `num_layers`: the old count.
pub fn write_pruned_checkpoint(
    model_dir: &Path,
    out: &Path,
    layers: &str,
    num_layers: usize,
    kept: &[usize],
) -> Result<WrittenCheckpoint> {
    let mut renumber = vec![None; num_layers];
    for (new, &old) in kept.iter().enumerate() {
        if old >= num_layers {
            return Err(Error::invalid(format!(
                "layer {old} does not exist ({num_layers} layers)"
            )));
        }
        renumber[old] = Some(new);
    }
    let config_path = model_dir.join("config.json");
    let config = read_json(&config_path)?;
    write_json(
        &out.join("config.json"),
        &pruned_config(&config, kept, &config_path)?,
    )?;

    let weights = weight_files(model_dir)?;
    let mut written = WrittenCheckpoint {
        files: Vec::new(),
        tensors: 0,
        bytes: 0,
    };
    let mut weight_map = BTreeMap::new();
    let mut total_size: u64 = 0;
    // Parameters written (see `is_new_parameter`).
    let mut total_parameters = 0usize;
    for f in &weights.files {
        let src = model_dir.join(f);
        let map = map_weights(&src)?;
        // A torch.save checkpoint is written as safetensors: the format transformers prefers, and the
        // only one this writer produces.
        let dst_name = match weights.format {
            WeightFormat::Safetensors => f.clone(),
            WeightFormat::Torch => safetensors_name(f),
        };
        let mut info = file_metadata(&map, &src)?;
        let mut keep = Vec::new();
        let mut seen = HashSet::new();
        for t in stored_weights(&map, &src)? {
            if let Some(new) = renamed_tensor(&t.name, layers, &renumber) {
                if is_new_parameter(&t, &mut seen) {
                    total_parameters += t.shape.iter().product::<usize>();
                }
                let view = tensor_view(&map, &t, &src)?;
                total_size += view.data().len() as u64;
                weight_map.insert(new.clone(), dst_name.clone());
                keep.push((new, view));
            }
        }
        if keep.is_empty() && weights.sharded {
            continue;
        }
        // transformers refuses safetensors files without a "format" entry.
        info.entry("format".into()).or_insert_with(|| "pt".into());
        let dst = out.join(&dst_name);
        written.tensors += keep.len();
        safetensors::serialize_to_file(keep, Some(info), &dst)
            .map_err(|e| Error::format(&dst, e.to_string()))?;
        written.bytes += std::fs::metadata(&dst)
            .map_err(|e| Error::io(&dst, e))?
            .len();
        written.files.push(dst_name);
    }
    if weights.sharded {
        let index_path = model_dir.join(weights.index_file());
        let mut index = read_json(&index_path)?;
        let obj = index
            .as_object_mut()
            .ok_or_else(|| Error::format(&index_path, "index is not a JSON object"))?;
        let mut metadata = obj
            .get("metadata")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(m) = metadata.as_object_mut() {
            m.insert("total_size".into(), total_size.into());
            // transformers ≥ 4.56 records it; a stale count would describe the unpruned model.
            if m.contains_key("total_parameters") {
                m.insert("total_parameters".into(), total_parameters.into());
            }
        }
        obj.insert("metadata".into(), metadata);
        obj.insert(
            "weight_map".into(),
            serde_json::to_value(&weight_map).unwrap(),
        );
        write_json(&out.join(INDEX_FILE), &index)?;
        written.files.push(INDEX_FILE.into());
    }
    copy_other_files(model_dir, out)?;
    Ok(written)
}

/// The safetensors file a `torch.save` weights file is written as: `pytorch_model.bin` →
/// `model.safetensors`, `pytorch_model-00001-of-00004.bin` → `model-00001-of-00004.safetensors`.
fn safetensors_name(torch_file: &str) -> String {
    let stem = torch_file.strip_suffix(".bin").unwrap_or(torch_file);
    match stem.strip_prefix("pytorch_model") {
        Some(rest) => format!("model{rest}.safetensors"),
        None => format!("{stem}.safetensors"),
    }
}

/// Whether a file of a checkpoint directory is a tokenizer or generation file to copy as is.
fn is_companion_file(name: &str) -> bool {
    const PREFIXES: [&str; 10] = [
        "tokenizer",
        "special_tokens_map",
        "added_tokens",
        "generation_config",
        "chat_template",
        "vocab",
        "merges",
        "spiece",
        "preprocessor_config",
        "processor_config",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || name.ends_with(".tiktoken")
}

/// Copy the tokenizer and generation files (see [`is_companion_file`]).
fn copy_other_files(model_dir: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(model_dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_companion_file(&name) && path.is_file() {
            std::fs::copy(&path, out.join(&name)).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Give the staged directory and its files the usual modes (temporary files are created private).
#[cfg(unix)]
fn set_public_modes(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(p, e))
    };
    set(dir, 0o755)?;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() {
            set(&path, 0o644)?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_public_modes(_dir: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;
    use std::collections::HashMap;

    /// A plain decoder's layers prefix.
    const L: &str = "model.layers.";

    #[test]
    fn tensor_renaming() {
        let ren = vec![Some(0), None, Some(1), None];
        assert_eq!(
            renamed_tensor("model.layers.2.mlp.up_proj.weight", L, &ren).as_deref(),
            Some("model.layers.1.mlp.up_proj.weight")
        );
        assert_eq!(
            renamed_tensor("model.layers.1.self_attn.q_proj.weight", L, &ren),
            None
        );
        assert_eq!(
            renamed_tensor("model.embed_tokens.weight", L, &ren).as_deref(),
            Some("model.embed_tokens.weight")
        );
        // "model.layers.12" must not be read as layer 1; past the 4 decoder layers (a multi-token
        // prediction layer), it follows the 2 kept.
        assert_eq!(
            renamed_tensor("model.layers.12.x", L, &ren).as_deref(),
            Some("model.layers.10.x")
        );
        assert_eq!(
            renamed_tensor("model.layers.4.eh_proj.weight", L, &ren).as_deref(),
            Some("model.layers.2.eh_proj.weight")
        );
        // A vision-language checkpoint: the language model's layers renumbered, the vision tower's kept.
        let lm = "language_model.model.layers.";
        assert_eq!(
            renamed_tensor("language_model.model.layers.2.mlp.up_proj.weight", lm, &ren).as_deref(),
            Some("language_model.model.layers.1.mlp.up_proj.weight")
        );
        let vision = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight";
        assert_eq!(renamed_tensor(vision, lm, &ren).as_deref(), Some(vision));
        assert_eq!(layer_of(vision, lm), None);
        assert_eq!(layer_of("language_model.model.layers.3.x", lm), Some(3));
        // GPT-2 as the hub stores it: layers `h.{l}.`, no prefix; its mask buffers move with their layer.
        assert_eq!(
            renamed_tensor("h.2.attn.c_attn.weight", "h.", &ren).as_deref(),
            Some("h.1.attn.c_attn.weight")
        );
        assert_eq!(
            renamed_tensor("h.0.attn.bias", "h.", &ren).as_deref(),
            Some("h.0.attn.bias")
        );
        assert_eq!(renamed_tensor("h.3.ln_1.weight", "h.", &ren), None);
        assert_eq!(
            renamed_tensor("wte.weight", "h.", &ren).as_deref(),
            Some("wte.weight")
        );
        assert!(is_buffer("h.0.attn.bias") && is_buffer("transformer.h.0.attn.masked_bias"));
        assert!(!is_buffer("h.0.attn.c_attn.bias"));
    }

    /// A hub-style Gemma 3 vision-language config: `text_config` omits what the class defaults
    /// (`num_hidden_layers` 26, the layer pattern 6); the pruned one states the kept count and kinds there
    /// and leaves the vision config's layers alone.
    #[test]
    fn multimodal_config_prunes_the_text_config() {
        let c = serde_json::json!({
            "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "model_type": "gemma3_text"},
            "vision_config": {"num_hidden_layers": 27, "model_type": "siglip_vision_model"},
        });
        let kept: Vec<usize> = (0..26).filter(|&i| i != 5 && i != 7).collect();
        let p = pruned_config(&c, &kept, Path::new("config.json")).unwrap();
        assert_eq!(p["text_config"]["num_hidden_layers"], 24);
        assert_eq!(p["vision_config"]["num_hidden_layers"], 27);
        assert!(p.get("num_hidden_layers").is_none() && p.get("layer_types").is_none());
        let kinds = p["text_config"]["layer_types"].as_array().unwrap();
        let full: Vec<usize> = (0..kinds.len())
            .filter(|&i| kinds[i] == "full_attention")
            .collect();
        // Old full layers 5, 11, 17, 23: 5 removed; 11, 17, 23 are now 9, 15, 21.
        assert_eq!(full, [9, 15, 21]);

        // A flat 4.x Qwen2.5-VL config: the top level is the language model's; its window bound counts
        // the kept layers below it; the vision config keeps its depth.
        let flat = serde_json::json!({
            "model_type": "qwen2_5_vl", "num_hidden_layers": 4, "max_window_layers": 2,
            "vision_config": {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31]}
        });
        let p = pruned_config(&flat, &[0, 2, 3], Path::new("config.json")).unwrap();
        assert_eq!(
            (
                p["num_hidden_layers"].as_u64(),
                p["max_window_layers"].as_u64()
            ),
            (Some(3), Some(1))
        );
        assert_eq!(p["vision_config"], flat["vision_config"]);
        assert!(p.get("text_config").is_none());
    }

    #[test]
    fn gpt_neo_attention_types_are_restated() {
        let c = serde_json::json!({"model_type": "gpt_neo", "num_layers": 3,
            "attention_types": [[["global", "local"], 1], [["global"], 1]],
            "attention_layers": ["global", "local", "global"]});
        let p = pruned_config(&c, &[1, 2], Path::new("config.json")).unwrap();
        assert_eq!(
            p["attention_types"],
            serde_json::json!([[["local", "global"], 1]])
        );
        assert_eq!(
            p["attention_layers"],
            serde_json::json!(["local", "global"])
        );
        assert_eq!(p["num_layers"], 2);
        // Without attention_types, GPTNeoConfig's default pattern (global, local, …).
        let d = serde_json::json!({"model_type": "gpt_neo", "num_layers": 24});
        let p = pruned_config(&d, &[1, 3, 4], Path::new("config.json")).unwrap();
        assert_eq!(
            p["attention_types"],
            serde_json::json!([[["local", "local", "global"], 1]])
        );
    }

    #[test]
    fn hunyuan_moe_lists_keep_the_kept_layers() {
        let c = serde_json::json!({"model_type": "hunyuan_v1_moe", "num_hidden_layers": 3,
            "moe_topk": [8, 8, 8], "num_shared_expert": [1, 1, 2], "num_experts": 64});
        let p = pruned_config(&c, &[0, 2], Path::new("config.json")).unwrap();
        assert_eq!(p["moe_topk"], serde_json::json!([8, 8]));
        assert_eq!(p["num_shared_expert"], serde_json::json!([1, 2]));
        assert_eq!(p["num_experts"], serde_json::json!(64));
    }

    #[test]
    fn fp8_modules_left_unquantized_follow_their_layers() {
        let c = serde_json::json!({"model_type": "qwen3", "num_hidden_layers": 4,
            "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
            "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate",
            "model.layers.2.mlp.gate", "model.layers.3.self_attn", "layers.10.x"]}});
        let p = pruned_config(&c, &[0, 3], Path::new("config.json")).unwrap();
        assert_eq!(
            p["quantization_config"]["modules_to_not_convert"],
            serde_json::json!([
                "lm_head",
                "model.layers.0.mlp.gate",
                "model.layers.1.self_attn"
            ])
        );
        assert_eq!(
            p["quantization_config"]["weight_block_size"],
            serde_json::json!([128, 128])
        );
    }

    #[test]
    fn config_update() {
        let c = serde_json::json!({
            "num_hidden_layers": 4,
            "layer_types": ["a", "b", "c", "d"],
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 8
        });
        let p = pruned_config(&c, &[0, 3], Path::new("config.json")).unwrap();
        assert_eq!(p["num_hidden_layers"], 2);
        assert_eq!(p["layer_types"], serde_json::json!(["a", "d"]));
        assert_eq!(p["architectures"], c["architectures"]);
        // BLOOM's, GPT-2's and the hub's Falcon configs count layers in `n_layer`; transformers'
        // FalconConfig saves `num_hidden_layers`.
        // ERNIE 4.5 MoE's sparse layers restated as a run of the new indices, or refused.
        let ernie = serde_json::json!({"model_type": "ernie4_5_moe", "num_hidden_layers": 6,
                                       "moe_layer_start_index": 2, "moe_layer_end_index": -1});
        for (kept, run) in [
            (&[0, 2, 5][..], (1, 2)),
            (&[0, 1][..], (2, 2)),
            (&[3, 4][..], (0, 1)),
        ] {
            let p = pruned_config(&ernie, kept, Path::new("config.json")).unwrap();
            let got = (
                p["moe_layer_start_index"].as_u64(),
                p["moe_layer_end_index"].as_u64(),
            );
            assert_eq!(got, (Some(run.0), Some(run.1)), "{kept:?}");
            assert_eq!(p["moe_layer_interval"], 1);
        }
        let every_other = serde_json::json!({"model_type": "ernie4_5_moe", "num_hidden_layers": 6,
                                             "moe_layer_interval": 2});
        let e = pruned_config(&every_other, &[1, 2, 3], Path::new("config.json")).unwrap_err();
        assert!(e.to_string().contains("not one run"), "{e}");
        // GLM-4.5's dense layers are the first first_k_dense_replace: those kept stay first.
        let glm = serde_json::json!({"model_type": "glm4_moe", "num_hidden_layers": 5,
                                     "first_k_dense_replace": 2});
        for (kept, dense) in [(&[0, 3][..], 1), (&[2, 3, 4], 0), (&[0, 1, 4], 2)] {
            let p = pruned_config(&glm, kept, Path::new("config.json")).unwrap();
            assert_eq!(p["first_k_dense_replace"], dense, "{kept:?}");
        }
        let bare = serde_json::json!({"model_type": "glm4_moe", "num_hidden_layers": 5});
        let p = pruned_config(&bare, &[1, 2], Path::new("config.json")).unwrap();
        assert_eq!(
            p["first_k_dense_replace"], 0,
            "the class default 1: layer 0 removed"
        );
        // GLM-4.7-Flash without mlp_layer_types: the kinds written out (layer 0 dense), then sliced.
        let flash = serde_json::json!({"model_type": "glm4_moe_lite", "num_hidden_layers": 4});
        let p = pruned_config(&flash, &[1, 2], Path::new("config.json")).unwrap();
        assert_eq!(
            p["mlp_layer_types"],
            serde_json::json!(["sparse", "sparse"])
        );
        let p = pruned_config(&flash, &[0, 3], Path::new("config.json")).unwrap();
        assert_eq!(p["mlp_layer_types"], serde_json::json!(["dense", "sparse"]));
        // dots1: both bounds.
        let dots = serde_json::json!({"model_type": "dots1", "num_hidden_layers": 4,
                                      "first_k_dense_replace": 1, "max_window_layers": 2});
        let p = pruned_config(&dots, &[0, 3], Path::new("config.json")).unwrap();
        assert_eq!(
            (&p["first_k_dense_replace"], &p["max_window_layers"]),
            (&1.into(), &1.into())
        );
        // MiniCPM3: scale_depth / √layers kept (absent: the class default 1.4); null stays null.
        let minicpm = serde_json::json!({"model_type": "minicpm3", "num_hidden_layers": 8});
        let p = pruned_config(&minicpm, &[0, 2, 5, 7], Path::new("config.json")).unwrap();
        let kept_scale = p["scale_depth"].as_f64().unwrap() / 4f64.sqrt();
        assert!(
            (kept_scale - 1.4 / 8f64.sqrt()).abs() < 1e-15,
            "{kept_scale}"
        );
        let null = serde_json::json!({"model_type": "minicpm3", "num_hidden_layers": 8,
                                      "scale_depth": null});
        let p = pruned_config(&null, &[0, 2], Path::new("config.json")).unwrap();
        assert!(p["scale_depth"].is_null());
        // CWM without layer_types: the class's kinds written out (layer 0 full), then sliced.
        let cwm = serde_json::json!({"model_type": "cwm", "num_hidden_layers": 8});
        let p = pruned_config(&cwm, &[1, 2, 4], Path::new("config.json")).unwrap();
        assert_eq!(
            p["layer_types"],
            serde_json::json!(["sliding_attention", "sliding_attention", "full_attention"])
        );
        // EXAONE's hub configs count the layers as num_layers.
        let exaone = serde_json::json!({"model_type": "exaone", "num_layers": 30});
        let p = pruned_config(&exaone, &[0, 1, 2], Path::new("config.json")).unwrap();
        assert_eq!(
            (&p["num_layers"], p.get("num_hidden_layers")),
            (&3.into(), None)
        );
        // DeepSeek-V3's class default is 3.
        let bare = serde_json::json!({"model_type": "deepseek_v3", "num_hidden_layers": 6});
        let p = pruned_config(&bare, &[0, 2, 3, 5], Path::new("config.json")).unwrap();
        assert_eq!(
            p["first_k_dense_replace"], 2,
            "layers 0 and 2 of the first 3"
        );
        for (model_type, key) in [
            ("bloom", "n_layer"),
            ("gpt2", "n_layer"),
            ("gpt_bigcode", "n_layer"),
            ("codegen", "n_layer"),
            ("falcon", "n_layer"),
            ("falcon", "num_hidden_layers"),
        ] {
            let c = serde_json::json!({"model_type": model_type, key: 4});
            let p = pruned_config(&c, &[0, 3], Path::new("config.json")).unwrap();
            assert_eq!(p[key], 2, "{model_type} {key}");
        }
    }

    #[test]
    fn qwen_max_window_layers_counts_the_kept_layers_below_it() {
        // Layers 0–2 full attention, 3–5 windowed (max_window_layers 3, no layer_types); keeping 1, 2, 4
        // must keep 1, 2 full and 4 windowed: the bound becomes 2. A llama config's field means nothing
        // and is left as it was.
        for (model_type, want) in [("qwen2", 2), ("qwen3", 2), ("llama", 3)] {
            let c = serde_json::json!({
                "model_type": model_type,
                "num_hidden_layers": 6,
                "max_window_layers": 3,
            });
            let p = pruned_config(&c, &[1, 2, 4], Path::new("config.json")).unwrap();
            assert_eq!(p["num_hidden_layers"], 3);
            assert_eq!(p["max_window_layers"], want, "{model_type}");
        }
    }

    #[test]
    fn qwen_moe_dense_layers_are_listed_by_their_new_indices() {
        // Step 2: layers 1, 3, 5 sparse, 0, 2, 4 dense, and 3 listed dense too. Keeping 0, 1, 3, 5 keeps
        // dense, sparse, dense, sparse: dense layers 0 and 2 of 4, under step 1. 6 layers listed dense
        // (as long as the layer count) must not be taken for a per-layer list.
        for (listed, kept, want) in [
            (vec![3], vec![0, 1, 3, 5], vec![0, 2]),
            (vec![0, 1, 2, 3, 4, 5], vec![1, 2], vec![0, 1]),
        ] {
            let c = serde_json::json!({
                "model_type": "qwen3_moe",
                "num_hidden_layers": 6,
                "decoder_sparse_step": if listed.len() == 6 { 1 } else { 2 },
                "mlp_only_layers": listed,
            });
            let p = pruned_config(&c, &kept, Path::new("config.json")).unwrap();
            assert_eq!(p["num_hidden_layers"], kept.len());
            assert_eq!(p["decoder_sparse_step"], 1);
            assert_eq!(p["mlp_only_layers"], serde_json::json!(want));
        }
    }

    #[test]
    fn llama4_sparse_and_nope_layers_are_restated_for_the_kept_layers() {
        // Scout: every layer sparse (moe_layers as long as the layer count, not a per-layer list), its
        // no_rope_layers an empty list (derived: layer 3 without a rotary embedding). Keeping 1, 3, 5:
        // sparse 0, 1, 2; rotary, NoPE, rotary. Maverick's step 2 (odd layers sparse): sparse 0, 1, 2
        // again, from layers 1, 3, 5.
        for (moe, step) in [
            (serde_json::json!([0, 1, 2, 3, 4, 5]), 1),
            (serde_json::Value::Null, 2),
        ] {
            let c = serde_json::json!({
                "model_type": "llama4",
                "text_config": {
                    "model_type": "llama4_text",
                    "num_hidden_layers": 6,
                    "moe_layers": moe,
                    "interleave_moe_layer_step": step,
                    "no_rope_layers": [],
                },
            });
            let p = pruned_config(&c, &[1, 3, 5], Path::new("config.json")).unwrap();
            let t = &p["text_config"];
            assert_eq!(t["num_hidden_layers"], 3);
            assert_eq!(t["moe_layers"], serde_json::json!([0, 1, 2]));
            assert_eq!(t["no_rope_layers"], serde_json::json!([1, 0, 1]));
        }
    }

    #[test]
    fn gemma3_layer_kinds_derived_from_the_pattern_are_written_out() {
        // Pattern 3: layers 0, 1 sliding, 2 full, 3, 4 sliding, 5 full. Keeping 0, 2, 3 must keep their
        // kinds, which the pattern alone would no longer give (it would make the new layer 2 full).
        let c = serde_json::json!({
            "model_type": "gemma3_text",
            "num_hidden_layers": 6,
            "sliding_window_pattern": 3,
        });
        let p = pruned_config(&c, &[0, 2, 3], Path::new("config.json")).unwrap();
        assert_eq!(
            p["layer_types"],
            serde_json::json!(["sliding_attention", "full_attention", "sliding_attention"])
        );
        // Gemma 2 alternates, the first layer windowed.
        let g2 = serde_json::json!({"model_type": "gemma2", "num_hidden_layers": 4});
        let p = pruned_config(&g2, &[1, 2], Path::new("config.json")).unwrap();
        assert_eq!(
            p["layer_types"],
            serde_json::json!(["full_attention", "sliding_attention"])
        );
        // Given kinds are sliced as they are.
        let mut c = c;
        c["layer_types"] = serde_json::json!(vec!["full_attention"; 6]);
        let p = pruned_config(&c, &[0, 2, 3], Path::new("config.json")).unwrap();
        assert_eq!(
            p["layer_types"],
            serde_json::json!(vec!["full_attention"; 3])
        );
    }

    /// A 3-layer sharded checkpoint: shard 1 holds the embedding and layer 0 (bf16), shard 2 layers 1-2
    /// (f32) and the final norm.
    fn fake_sharded_model(dir: &Path) {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let bytes = |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| (i as u8) ^ seed).collect() };
        let e = bytes(4 * 2 * 2, 1);
        let l0 = bytes(2 * 2 * 2, 2);
        let l1 = bytes(2 * 2 * 4, 3);
        let l2 = bytes(2 * 2 * 4, 4);
        let nrm = bytes(2 * 4, 5);
        let s1 = vec![
            (
                "model.embed_tokens.weight",
                TensorView::new(Dtype::BF16, vec![4, 2], &e).unwrap(),
            ),
            (
                "model.layers.0.mlp.w",
                TensorView::new(Dtype::BF16, vec![2, 2], &l0).unwrap(),
            ),
        ];
        let s2 = vec![
            (
                "model.layers.1.mlp.w",
                TensorView::new(Dtype::F32, vec![2, 2], &l1).unwrap(),
            ),
            (
                "model.layers.2.mlp.w",
                TensorView::new(Dtype::F32, vec![2, 2], &l2).unwrap(),
            ),
            (
                "model.norm.weight",
                TensorView::new(Dtype::F32, vec![2], &nrm).unwrap(),
            ),
        ];
        let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize_to_file(s1, Some(meta.clone()), &dir.join("a-1.safetensors"))
            .unwrap();
        safetensors::serialize_to_file(s2, Some(meta), &dir.join("a-2.safetensors")).unwrap();
        let index = serde_json::json!({
            "metadata": {"total_size": 0},
            "weight_map": {
                "model.embed_tokens.weight": "a-1.safetensors",
                "model.layers.0.mlp.w": "a-1.safetensors",
                "model.layers.1.mlp.w": "a-2.safetensors",
                "model.layers.2.mlp.w": "a-2.safetensors",
                "model.norm.weight": "a-2.safetensors"
            }
        });
        write_json(&dir.join(INDEX_FILE), &index).unwrap();
        write_json(
            &dir.join("config.json"),
            &serde_json::json!({"num_hidden_layers": 3, "hidden_size": 2}),
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
    }

    #[test]
    fn sharded_checkpoint_keeps_sharding_dtype_and_bytes() {
        let src = tempfile::tempdir().unwrap();
        fake_sharded_model(src.path());
        let out = tempfile::tempdir().unwrap();
        let w = write_pruned_checkpoint(src.path(), out.path(), L, 3, &[1, 2]).unwrap();
        // Shard 1 still holds the embedding; layer 0 is gone.
        assert_eq!(w.tensors, 4);
        let read = |f: &str| std::fs::read(out.path().join(f)).unwrap();
        let b1 = read("a-1.safetensors");
        let s1 = SafeTensors::deserialize(&b1).unwrap();
        assert_eq!(s1.names(), vec!["model.embed_tokens.weight"]);
        let b2 = read("a-2.safetensors");
        let s2 = SafeTensors::deserialize(&b2).unwrap();
        let orig = std::fs::read(src.path().join("a-2.safetensors")).unwrap();
        let o2 = SafeTensors::deserialize(&orig).unwrap();
        let t = s2.tensor("model.layers.0.mlp.w").unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        assert_eq!(t.data(), o2.tensor("model.layers.1.mlp.w").unwrap().data());
        assert_eq!(
            s2.tensor("model.layers.1.mlp.w").unwrap().data(),
            o2.tensor("model.layers.2.mlp.w").unwrap().data()
        );
        let index = read_json(&out.path().join(INDEX_FILE)).unwrap();
        assert_eq!(
            index["weight_map"]["model.layers.1.mlp.w"],
            "a-2.safetensors"
        );
        assert!(index["weight_map"].get("model.layers.2.mlp.w").is_none());
        assert_eq!(index["metadata"]["total_size"], 16 + 16 + 16 + 8);
        let cfg = read_json(&out.path().join("config.json")).unwrap();
        assert_eq!(cfg["num_hidden_layers"], 2);
        assert!(out.path().join("tokenizer.json").exists());
        let (other, per_layer) = parameter_counts(out.path(), L, 2).unwrap();
        assert_eq!((other, per_layer), (8 + 2, vec![4, 4]));
    }

    /// A torch.save checkpoint (the fixtures made by scripts/make_fixtures.py from the same models as
    /// their safetensors twins) is pruned into safetensors: the same tensors, bytes and index as pruning
    /// the twin, but for the tied lm_head and the inv_freq buffers the torch files also carry.
    #[test]
    fn torch_checkpoints_are_pruned_into_safetensors() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let prefix = "model.layers.";
        for (torch, twin, layers, kept) in [
            ("llama_torch_bin", "llama_bf16_tied", 2, &[1][..]),
            ("mistral_torch_sharded", "mistral_sharded", 3, &[0, 2][..]),
        ] {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let wa = write_pruned_checkpoint(&fixtures.join(torch), a.path(), prefix, layers, kept)
                .unwrap();
            let wb = write_pruned_checkpoint(&fixtures.join(twin), b.path(), prefix, layers, kept)
                .unwrap();
            assert_eq!(wa.files, wb.files, "{torch}");
            let extra = |n: &str| n == "lm_head.weight" || n.ends_with("rotary_emb.inv_freq");
            for f in wa.files.iter().filter(|f| f.ends_with(".safetensors")) {
                let (fa, fb) = (
                    std::fs::read(a.path().join(f)).unwrap(),
                    std::fs::read(b.path().join(f)).unwrap(),
                );
                let (sa, sb) = (
                    SafeTensors::deserialize(&fa).unwrap(),
                    SafeTensors::deserialize(&fb).unwrap(),
                );
                for (name, t) in sb.tensors() {
                    let u = sa.tensor(&name).unwrap();
                    assert_eq!(
                        (u.dtype(), u.shape(), u.data()),
                        (t.dtype(), t.shape(), t.data())
                    );
                }
                for name in sa.names() {
                    assert!(sb.tensor(name).is_ok() || extra(name), "{torch}: {name}");
                }
            }
            let (pa, pb) = (
                parameter_counts(a.path(), prefix, kept.len()).unwrap(),
                parameter_counts(b.path(), prefix, kept.len()).unwrap(),
            );
            if torch == "llama_torch_bin" {
                // Written as safetensors, the tied lm_head is a tensor of its own.
                assert_eq!(pa.0, pb.0 + 100 * 48);
                let original = parameter_counts(&fixtures.join(torch), prefix, layers).unwrap();
                let twin_original = parameter_counts(&fixtures.join(twin), prefix, layers).unwrap();
                assert_eq!(original, twin_original, "a tied tensor is counted once");
            } else {
                assert_eq!(pa, pb);
                let (ia, ib) = (
                    read_json(&a.path().join(INDEX_FILE)).unwrap(),
                    read_json(&b.path().join(INDEX_FILE)).unwrap(),
                );
                assert_eq!(ia, ib);
                let kept_params = pb.0 + pb.1.iter().sum::<usize>();
                assert_eq!(ia["metadata"]["total_parameters"], kept_params);
            }
        }
    }

    #[test]
    fn staged_dir_refuses_existing_and_replaces_with_force() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("old.txt"), "old").unwrap();
        assert!(StagedDir::new(&dest, false).is_err());
        let s = StagedDir::new(&dest, true).unwrap();
        std::fs::write(s.path().join("new.txt"), "new").unwrap();
        s.commit().unwrap();
        assert!(dest.join("new.txt").exists());
        assert!(!dest.join("old.txt").exists());
        // Only `out` is left in the parent: no temp or aside directories.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
        // Dropped without commit: nothing appears.
        let dest2 = root.path().join("out2");
        let s = StagedDir::new(&dest2, false).unwrap();
        std::fs::write(s.path().join("x"), "x").unwrap();
        drop(s);
        assert!(!dest2.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
