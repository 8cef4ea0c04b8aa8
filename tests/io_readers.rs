//! Activation readers: safetensors files and npy directories, token modes, shards, and bad input.
//!
//! Files are written in tempdirs with the `safetensors` serializer and `npyz`'s writer (corrupt ones by
//! hand). Values are drawn from a seeded RNG as multiples of 1/16 in [-8, 8], which f16, bf16, f32 and
//! f64 all represent exactly, so every round trip is compared for exact equality in f64.

use half::{bf16, f16};
use npyz::WriterBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sglp_engine::io::{ActivationSet, ActivationSource, DType, ReadOptions, TokenMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `n` values exactly representable in every supported dtype (bf16 has 8 significant bits).
fn exact_values(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(-128i32..=128) as f64 / 16.0)
        .collect()
}

/// Little-endian bytes of `vals` stored as `dtype`.
fn encode(vals: &[f64], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(vals.len() * dtype.size());
    for &v in vals {
        match dtype {
            DType::F32 => out.extend((v as f32).to_le_bytes()),
            DType::F64 => out.extend(v.to_le_bytes()),
            DType::F16 => out.extend(f16::from_f64(v).to_le_bytes()),
            DType::BF16 => out.extend(bf16::from_f64(v).to_le_bytes()),
        }
    }
    out
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// A tensor to write: name, stored dtype, shape, values (row-major).
struct T {
    name: &'static str,
    dtype: DType,
    shape: Vec<usize>,
    vals: Vec<f64>,
}

fn t(name: &'static str, dtype: DType, shape: &[usize], seed: u64) -> T {
    let n = shape.iter().product();
    T {
        name,
        dtype,
        shape: shape.to_vec(),
        vals: exact_values(n, seed),
    }
}

fn write_st(path: &Path, tensors: &[T], layers_key: Option<&str>) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| encode(&t.vals, t.dtype)).collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let view = TensorView::new(st_dtype(t.dtype), t.shape.clone(), b).unwrap();
            (t.name, view)
        })
        .collect();
    let meta = layers_key.map(|l| HashMap::from([("layers".to_string(), l.to_string())]));
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn write_npy(path: &Path, t: &T) {
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    let file = std::fs::File::create(path).unwrap();
    match t.dtype {
        DType::F32 => {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(file)
                .begin_nd()
                .unwrap();
            w.extend(t.vals.iter().map(|&v| v as f32)).unwrap();
            w.finish().unwrap();
        }
        DType::F64 => {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(file)
                .begin_nd()
                .unwrap();
            w.extend(t.vals.iter().copied()).unwrap();
            w.finish().unwrap();
        }
        DType::F16 => {
            let mut w = npyz::WriteOptions::new()
                .default_dtype()
                .shape(&shape)
                .writer(file)
                .begin_nd()
                .unwrap();
            w.extend(t.vals.iter().map(|&v| f16::from_f64(v))).unwrap();
            w.finish().unwrap();
        }
        DType::BF16 => panic!("npy has no bf16"),
    }
}

fn write_npy_dir(dir: &Path, tensors: &[T]) {
    std::fs::create_dir_all(dir).unwrap();
    for t in tensors {
        write_npy(&dir.join(format!("{}.npy", t.name)), t);
    }
}

fn paths<P: AsRef<Path>>(inputs: &[P]) -> Vec<PathBuf> {
    inputs.iter().map(|p| p.as_ref().to_path_buf()).collect()
}

fn open<P: AsRef<Path>>(inputs: &[P]) -> sglp_engine::Result<ActivationSet> {
    ActivationSet::open(&paths(inputs), &ReadOptions::default())
}

fn open_with<P: AsRef<Path>>(
    inputs: &[P],
    tokens: TokenMode,
    re: Option<&str>,
) -> sglp_engine::Result<ActivationSet> {
    let opts = ReadOptions {
        tokens,
        layers: re.map(|r| regex::Regex::new(r).unwrap()),
    };
    ActivationSet::open(&paths(inputs), &opts)
}

/// Stream the whole set with `max_rows` (checking each chunk is read in place); per layer, every row
/// converted to f64, and the chunk sizes.
fn read_all(set: &mut ActivationSet, max_rows: usize) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut per_layer = vec![Vec::new(); set.layers().len()];
    let mut sizes = Vec::new();
    while let Some(b) = set.next_chunk(max_rows).unwrap() {
        assert!(b.rows >= 1 && b.rows <= max_rows);
        // Files are read in place: each layer's rows are a range of the shard's map, not a copy.
        assert!(
            b.layers.iter().all(|l| l.data.is_mapped()),
            "a copied chunk"
        );
        sizes.push(b.rows);
        let r = b.as_ref();
        for (dst, l) in per_layer.iter_mut().zip(&r.layers) {
            let mut v = vec![0f64; b.rows * l.cols];
            l.to_vec_into(&mut v);
            dst.extend(v);
        }
    }
    (per_layer, sizes)
}

fn names(set: &ActivationSet) -> Vec<&str> {
    set.layers().iter().map(|l| l.name.as_str()).collect()
}

fn err_of(r: sglp_engine::Result<ActivationSet>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "error is not one line: {s}");
            s
        }
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------------------
// Reading

#[test]
fn safetensors_every_dtype_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("acts.safetensors");
    let ts = vec![
        t("a_f32", DType::F32, &[6, 5], 1),
        t("b_f64", DType::F64, &[6, 3], 2),
        t("c_f16", DType::F16, &[6, 4], 3),
        t("d_bf16", DType::BF16, &[6, 1, 2, 2], 4),
    ];
    write_st(&p, &ts, None);
    let mut set = open(&[&p]).unwrap();
    assert_eq!(names(&set), ["a_f32", "b_f64", "c_f16", "d_bf16"]);
    let dtypes: Vec<DType> = set.layers().iter().map(|l| l.dtype).collect();
    assert_eq!(dtypes, [DType::F32, DType::F64, DType::F16, DType::BF16]);
    assert_eq!(set.layers()[3].cols, 4);
    assert_eq!(set.layers()[3].shape, [6, 1, 2, 2]);
    assert_eq!(set.n_samples_hint(), Some(6));
    let (got, sizes) = read_all(&mut set, 4);
    assert_eq!(sizes, [4, 2]);
    for (g, t) in got.iter().zip(&ts) {
        assert_eq!(g, &t.vals, "layer {}", t.name);
    }
}

#[test]
fn npy_dir_every_dtype_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("acts");
    let ts = vec![
        t("x_f16", DType::F16, &[9, 3], 5),
        t("x_f32", DType::F32, &[9, 7], 6),
        t("x_f64", DType::F64, &[9], 7),
    ];
    write_npy_dir(&d, &ts);
    std::fs::write(d.join("README.txt"), "not a layer").unwrap();
    let mut set = open(&[&d]).unwrap();
    assert_eq!(names(&set), ["x_f16", "x_f32", "x_f64"]);
    assert_eq!(set.layers()[2].cols, 1, "1-D means one feature");
    let (got, sizes) = read_all(&mut set, 100);
    assert_eq!(sizes, [9]);
    for (g, t) in got.iter().zip(&ts) {
        assert_eq!(g, &t.vals, "layer {}", t.name);
    }
}

#[test]
fn layer_order_is_metadata_then_natural() {
    let dir = tempfile::tempdir().unwrap();
    let mk = || {
        vec![
            t("layer10", DType::F32, &[3, 2], 10),
            t("layer2", DType::F32, &[3, 2], 11),
            t("layer1", DType::F32, &[3, 2], 12),
        ]
    };
    let natural = dir.path().join("natural.safetensors");
    write_st(&natural, &mk(), None);
    assert_eq!(
        names(&open(&[&natural]).unwrap()),
        ["layer1", "layer2", "layer10"]
    );

    let listed = dir.path().join("listed.safetensors");
    write_st(&listed, &mk(), Some("layer10, layer1"));
    let mut set = open(&[&listed]).unwrap();
    assert_eq!(
        names(&set),
        ["layer10", "layer1"],
        "metadata order, unlisted tensors ignored"
    );
    let (got, _) = read_all(&mut set, 8);
    assert_eq!(got[0], mk()[0].vals);
    assert_eq!(got[1], mk()[2].vals);

    let npy = dir.path().join("npy");
    write_npy_dir(&npy, &mk());
    assert_eq!(
        names(&open(&[&npy]).unwrap()),
        ["layer1", "layer2", "layer10"]
    );
}

#[test]
fn regex_keeps_matching_layers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.safetensors");
    let ts = vec![
        t("block1.conv", DType::F32, &[4, 2], 20),
        t("block1.relu", DType::F32, &[4, 3], 21),
        t("block2.conv", DType::F32, &[4, 2], 22),
    ];
    write_st(&p, &ts, None);
    let mut set = open_with(&[&p], TokenMode::Samples, Some(r"\.conv$")).unwrap();
    assert_eq!(names(&set), ["block1.conv", "block2.conv"]);
    let (got, _) = read_all(&mut set, 3);
    assert_eq!(got, [ts[0].vals.clone(), ts[2].vals.clone()]);

    let e = err_of(open_with(&[&p], TokenMode::Samples, Some("^fc")));
    assert!(
        e.contains(&path_str(&p)) && e.contains("no layer matches"),
        "{e}"
    );
}

#[test]
fn token_modes_reshape_3d_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("seq.safetensors");
    let ts = vec![
        t("h0", DType::F32, &[2, 3, 4], 30),
        t("h1", DType::BF16, &[2, 3, 5], 31),
    ];
    write_st(&p, &ts, None);

    let mut samples = open_with(&[&p], TokenMode::Samples, None).unwrap();
    assert_eq!(samples.n_samples_hint(), Some(6));
    assert_eq!((samples.layers()[0].cols, samples.layers()[1].cols), (4, 5));
    let (got, sizes) = read_all(&mut samples, 4);
    assert_eq!(sizes, [4, 2]);
    assert_eq!(got, [ts[0].vals.clone(), ts[1].vals.clone()]);

    let mut features = open_with(&[&p], TokenMode::Features, None).unwrap();
    assert_eq!(features.n_samples_hint(), Some(2));
    assert_eq!(
        (features.layers()[0].cols, features.layers()[1].cols),
        (12, 15)
    );
    let b = features.next_chunk(1).unwrap().unwrap();
    let mut row = vec![0f64; 15];
    b.as_ref().layers[1].row_into(0, &mut row);
    assert_eq!(row, ts[1].vals[..15]);
    let b = features.next_chunk(1).unwrap().unwrap();
    b.as_ref().layers[1].row_into(0, &mut row);
    assert_eq!(row, ts[1].vals[15..]);
    assert!(features.next_chunk(1).unwrap().is_none());
}

#[test]
fn unequal_shards_stream_in_order_without_spanning_shards() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [7usize, 3, 12, 0, 5];
    let mut inputs = Vec::new();
    let mut expect = vec![Vec::new(), Vec::new()];
    for (i, &n) in rows.iter().enumerate() {
        let ts = vec![
            t("enc.1", DType::F16, &[n, 3], 100 + i as u64),
            t("enc.2", DType::F64, &[n, 2, 1, 2], 200 + i as u64),
        ];
        expect[0].extend(ts[0].vals.iter().copied());
        expect[1].extend(ts[1].vals.iter().copied());
        // Shard 2 is an npy directory: formats may mix as long as the layers agree.
        let p = if i == 2 {
            let d = dir.path().join("shard2");
            write_npy_dir(&d, &ts);
            d
        } else {
            let p = dir.path().join(format!("shard{i}.safetensors"));
            write_st(&p, &ts, None);
            p
        };
        inputs.push(p);
    }
    let mut set = open(&inputs).unwrap();
    assert_eq!(set.shard_rows(), rows);
    assert_eq!(set.n_samples_hint(), Some(27));
    assert_eq!(set.layers()[1].shape, [27, 2, 1, 2]);
    assert_eq!(set.describe()[2].format, "npy-dir");
    assert_eq!(set.describe()[1].layers[1].shape, [3, 2, 1, 2]);
    let (got, sizes) = read_all(&mut set, 4);
    assert_eq!(sizes, [4, 3, 3, 4, 4, 4, 4, 1]);
    assert_eq!(got, expect);
    assert!(set.next_chunk(4).unwrap().is_none());

    set.rewind();
    let (again, sizes) = read_all(&mut set, 1000);
    assert_eq!(sizes, [7, 3, 12, 5]);
    assert_eq!(again, expect);
}

#[test]
fn nan_and_inf_name_layer_global_sample_and_shard() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write_st(
        &a,
        &[
            t("l1", DType::F32, &[5, 2], 1),
            t("l2", DType::F16, &[5, 2], 2),
        ],
        None,
    );
    let mut bad = t("l2", DType::F16, &[6, 2], 3);
    bad.vals[3 * 2 + 1] = f64::NAN; // local row 3 of shard b → global sample 8
    bad.vals[5 * 2] = f64::INFINITY;
    write_st(&b, &[t("l1", DType::F32, &[6, 2], 4), bad], None);
    let mut set = open(&[&a, &b]).unwrap();
    let mut err = None;
    for _ in 0..10 {
        match set.next_chunk(2) {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => {
                err = Some(e.to_string());
                break;
            }
        }
    }
    let e = err.expect("NaN not reported");
    assert!(e.contains(&path_str(&b)), "{e}");
    assert!(
        e.contains("layer 'l2'") && e.contains("first bad sample: 8"),
        "{e}"
    );

    // Inf alone, found inside a larger chunk.
    let c = dir.path().join("c.safetensors");
    let mut inf = t("l1", DType::BF16, &[4, 3], 5);
    inf.vals[2 * 3 + 2] = f64::NEG_INFINITY;
    write_st(&c, &[inf], None);
    let mut set = open(&[&c]).unwrap();
    let e = set.next_chunk(100).unwrap_err().to_string();
    assert!(
        e.contains(&path_str(&c)) && e.contains("layer 'l1'") && e.contains("first bad sample: 2"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Bad input: one-line errors naming the file (and layer), never a panic.

/// A valid two-layer safetensors file's bytes, for corrupting.
fn valid_st_bytes(dir: &Path) -> Vec<u8> {
    let p = dir.join("valid.safetensors");
    write_st(
        &p,
        &[
            t("a", DType::F32, &[4, 2], 1),
            t("b", DType::F32, &[4, 3], 2),
        ],
        None,
    );
    std::fs::read(p).unwrap()
}

fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn missing_and_wrong_kind_of_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let e = err_of(open(&[&missing]));
    assert!(e.contains(&path_str(&missing)), "{e}");

    let txt = dir.path().join("acts.txt");
    std::fs::write(&txt, "hello").unwrap();
    let e = err_of(open(&[&txt]));
    assert!(
        e.contains(&path_str(&txt))
            && e.contains("not a .safetensors file, a torch.save file (.pt, .bin) or a directory"),
        "{e}"
    );

    let single_npy = dir.path().join("x.npy");
    write_npy(&single_npy, &t("x", DType::F32, &[2, 2], 1));
    let e = err_of(open(&[&single_npy]));
    assert!(e.contains(&path_str(&single_npy)), "{e}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = err_of(open(&[&empty]));
    assert!(
        e.contains(&path_str(&empty)) && e.contains("no .npy"),
        "{e}"
    );
    std::fs::write(empty.join("notes.md"), "x").unwrap();
    std::fs::create_dir(empty.join("sub.npy")).unwrap();
    let e = err_of(open(&[&empty]));
    assert!(e.contains("no .npy"), "{e}");

    let e = err_of(open::<PathBuf>(&[]));
    assert!(e.contains("no input"), "{e}");
}

#[test]
fn corrupt_safetensors_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = valid_st_bytes(dir.path());
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let check = |p: PathBuf, what: &str| {
        let e = err_of(open(&[&p]));
        assert!(e.contains(&path_str(&p)), "{what}: {e}");
        e
    };

    // Truncated: data cut short, header cut short, shorter than the length prefix, empty.
    let e = check(
        write("t1.safetensors", &good[..good.len() - 5]),
        "truncated data",
    );
    assert!(e.contains("truncated"), "{e}");
    let e = check(
        write("t2.safetensors", &good[..8 + header_len(&good) / 2]),
        "truncated header",
    );
    assert!(e.contains("truncated"), "{e}");
    check(write("t3.safetensors", &good[..5]), "5 bytes");
    check(write("t4.safetensors", &[]), "empty");

    // A header length far beyond the file (must not be allocated).
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
    let e = check(write("huge.safetensors", &huge), "huge header length");
    assert!(e.contains("exceeds the file size"), "{e}");

    // Corrupt JSON.
    let mut junk = good.clone();
    junk[8] = b'#';
    let e = check(write("junk.safetensors", &junk), "corrupt json");
    assert!(e.contains("corrupt safetensors header"), "{e}");

    // Offsets past the end of the data: rewrite the header by hand, padded to the same length.
    let n = header_len(&good);
    let text = std::str::from_utf8(&good[8..8 + n]).unwrap();
    let json: serde_json::Value = serde_json::from_str(text).unwrap();
    let mut obj = json.as_object().unwrap().clone();
    // Tensor "b" (4×3 f32 = 48 bytes) claims 4×300 elements ending far past the file.
    let b = obj.get_mut("b").unwrap();
    let start = b["data_offsets"][0].as_u64().unwrap();
    b["shape"] = serde_json::json!([4, 300]);
    b["data_offsets"] = serde_json::json!([start, start + 4800]);
    let new_text = serde_json::to_string(&obj).unwrap();
    assert!(new_text.len() <= n);
    let mut past = good[..8].to_vec();
    past.extend(format!("{new_text:<n$}").as_bytes());
    past.extend(&good[8 + n..]);
    let e = check(write("past.safetensors", &past), "offsets past the end");
    assert!(e.contains("truncated or corrupt"), "{e}");

    // Offsets that do not match the shape.
    let mut obj = json.as_object().unwrap().clone();
    obj.get_mut("a").unwrap()["shape"] = serde_json::json!([4, 5]);
    let text = serde_json::to_string(&obj).unwrap();
    let mut bad = good[..8].to_vec();
    bad.extend(format!("{text:<n$}").as_bytes());
    bad.extend(&good[8 + n..]);
    check(write("shape.safetensors", &bad), "shape/offset mismatch");

    // A `layers` key naming a tensor that is not there.
    let p = dir.path().join("badkey.safetensors");
    write_st(&p, &[t("a", DType::F32, &[2, 2], 1)], Some("a,zz"));
    let e = check(p, "layers key");
    assert!(e.contains("'zz'"), "{e}");
}

#[test]
fn unsupported_safetensors_dtypes_name_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    for (dtype, elem) in [
        (Dtype::I64, 8),
        (Dtype::BOOL, 1),
        (Dtype::F8_E4M3, 1),
        (Dtype::U8, 1),
    ] {
        let p = dir.path().join(format!("{dtype:?}.safetensors"));
        let ok = encode(&exact_values(4, 1), DType::F32);
        let bad = vec![0u8; 4 * elem];
        let views = vec![
            ("good", TensorView::new(Dtype::F32, vec![4], &ok).unwrap()),
            ("weird", TensorView::new(dtype, vec![4], &bad).unwrap()),
        ];
        safetensors::serialize_to_file(views, None, &p).unwrap();
        let e = err_of(open(&[&p]));
        assert!(
            e.contains(&path_str(&p))
                && e.contains("layer 'weird'")
                && e.contains("unsupported dtype"),
            "{e}"
        );
        // Filtering the odd tensor out makes the file usable.
        let kept = open_with(&[&p], TokenMode::Samples, Some("^good$"));
        assert!(kept.is_ok(), "{dtype:?}: {}", kept.err().unwrap());
    }
}

#[test]
fn bad_shapes_and_sample_counts() {
    let dir = tempfile::tempdir().unwrap();
    // The error of a file of `ts`, which names the file.
    let case = |name: &str, ts: &[T]| {
        let p = dir.path().join(name);
        write_st(&p, ts, None);
        let e = err_of(open(&[&p]));
        assert!(e.contains(&path_str(&p)), "{e}");
        e
    };
    let e = case(
        "scalar.safetensors",
        &[t("a", DType::F32, &[3, 2], 1), t("s", DType::F32, &[], 2)],
    );
    assert!(e.contains("layer 's'") && e.contains("0-D"), "{e}");

    let e = case(
        "rows.safetensors",
        &[
            t("a", DType::F32, &[3, 2], 1),
            t("b", DType::F32, &[4, 2], 2),
        ],
    );
    assert!(e.contains("layer 'b'") && e.contains("4 samples"), "{e}");

    // Token mode decides whether a 3-D layer agrees with a 2-D one.
    let p = dir.path().join("mixed.safetensors");
    write_st(
        &p,
        &[
            t("emb", DType::F32, &[2, 3, 4], 1),
            t("pool", DType::F32, &[2, 4], 2),
        ],
        None,
    );
    assert!(open_with(&[&p], TokenMode::Features, None).is_ok());
    let e = err_of(open_with(&[&p], TokenMode::Samples, None));
    assert!(e.contains("samples"), "{e}");

    let p = dir.path().join("nofeat.safetensors");
    write_st(&p, &[t("a", DType::F32, &[3, 0], 1)], None);
    let e = err_of(open(&[&p]));
    assert!(e.contains("layer 'a'") && e.contains("no features"), "{e}");
}

#[test]
fn shards_must_agree_on_layers() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.safetensors");
    write_st(
        &base,
        &[
            t("a", DType::F32, &[3, 2], 1),
            t("b", DType::F16, &[3, 4], 2),
        ],
        None,
    );
    let case = |name: &str, ts: &[T]| {
        let p = dir.path().join(name);
        write_st(&p, ts, None);
        let e = err_of(open(&[&base, &p]));
        assert!(e.contains(&path_str(&p)), "{e}");
        e
    };
    let e = case(
        "names.safetensors",
        &[
            t("a", DType::F32, &[5, 2], 1),
            t("c", DType::F16, &[5, 4], 2),
        ],
    );
    assert!(e.contains("layers differ") && e.contains("[a, c]"), "{e}");
    let e = case("count.safetensors", &[t("a", DType::F32, &[5, 2], 1)]);
    assert!(e.contains("layers differ"), "{e}");
    let e = case(
        "width.safetensors",
        &[
            t("a", DType::F32, &[5, 2], 1),
            t("b", DType::F16, &[5, 5], 2),
        ],
    );
    assert!(
        e.contains("layer 'b'") && e.contains("5 features") && e.contains("but 4"),
        "{e}"
    );
    let e = case(
        "dtype.safetensors",
        &[
            t("a", DType::F64, &[5, 2], 1),
            t("b", DType::F16, &[5, 4], 2),
        ],
    );
    assert!(
        e.contains("layer 'a'") && e.contains("dtype f64") && e.contains("but f32"),
        "{e}"
    );
}

#[test]
fn corrupt_and_unsupported_npy_files() {
    let dir = tempfile::tempdir().unwrap();
    let mk_dir = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        write_npy(&d.join("ok.npy"), &t("ok", DType::F32, &[4, 2], 1));
        d
    };
    let check = |d: &Path, file: &Path, what: &str| {
        let e = err_of(open(&[&d]));
        assert!(e.contains(&path_str(file)), "{what}: {e}");
        e
    };

    // int64.
    let d = mk_dir("int");
    let f = d.join("ids.npy");
    npyz::to_file_1d(&f, vec![1i64, 2, 3, 4]).unwrap();
    let e = check(&d, &f, "int64");
    assert!(
        e.contains("layer 'ids'") && e.contains("unsupported npy dtype"),
        "{e}"
    );

    // Truncated data.
    let d = mk_dir("trunc");
    let f = d.join("x.npy");
    write_npy(&f, &t("x", DType::F64, &[4, 3], 2));
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 8]).unwrap();
    let e = check(&d, &f, "truncated");
    assert!(e.contains("truncated"), "{e}");

    // Truncated inside the header, and a bare magic.
    std::fs::write(&f, &bytes[..20]).unwrap();
    check(&d, &f, "truncated header");
    std::fs::write(&f, b"\x93NUMPY").unwrap();
    check(&d, &f, "magic only");
    std::fs::write(&f, b"PK\x03\x04 not numpy at all").unwrap();
    let e = check(&d, &f, "not npy");
    assert!(e.contains("magic"), "{e}");

    // A version-2 header declaring a 4 GB header text.
    let mut huge = b"\x93NUMPY\x02\x00".to_vec();
    huge.extend(0xFFFF_FFF0u32.to_le_bytes());
    huge.extend(b"{'descr': '<f4'}");
    std::fs::write(&f, &huge).unwrap();
    let e = check(&d, &f, "huge header");
    assert!(e.contains("exceeds the file size"), "{e}");

    // Hand-written headers whose shapes declare far more data than the file holds (or overflow).
    for shape in [
        "(1000000000000, 4)",
        "(18446744073709551615, 18446744073709551615)",
    ] {
        let text = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        let pad = 64 - (10 + text.len() + 1) % 64;
        npy.extend(((text.len() + pad + 1) as u16).to_le_bytes());
        npy.extend(text.as_bytes());
        npy.extend(std::iter::repeat_n(b' ', pad));
        npy.push(b'\n');
        npy.extend([0u8; 16]);
        std::fs::write(&f, &npy).unwrap();
        let e = check(&d, &f, shape);
        if shape.starts_with("(1844") {
            // The element count itself overflows: refused by the header check, before any reader.
            assert!(e.contains("does not fit in 64 bits"), "{e}");
        } else {
            assert!(
                e.contains("layer 'x'") && e.contains("truncated or corrupt"),
                "{e}"
            );
        }
    }

    // Fortran order (2-D, both axes > 1), and big-endian.
    let d = mk_dir("fortran");
    let f = d.join("f.npy");
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .order(npyz::Order::Fortran)
        .shape(&[4, 3])
        .writer(std::fs::File::create(&f).unwrap())
        .begin_nd()
        .unwrap();
    w.extend((0..12).map(|i| i as f32)).unwrap();
    w.finish().unwrap();
    let e = check(&d, &f, "fortran");
    assert!(e.contains("layer 'f'") && e.contains("Fortran"), "{e}");

    let d = mk_dir("bigendian");
    let f = d.join("be.npy");
    let mut w = npyz::WriteOptions::new()
        .dtype(npyz::DType::Plain(">f4".parse().unwrap()))
        .shape(&[4, 3])
        .writer(std::fs::File::create(&f).unwrap())
        .begin_nd()
        .unwrap();
    w.extend((0..12).map(|i| i as f32)).unwrap();
    w.finish().unwrap();
    let e = check(&d, &f, "big-endian");
    assert!(e.contains("big-endian"), "{e}");

    // Layers of one directory with different sample counts.
    let d = mk_dir("rows");
    let f = d.join("zz.npy");
    write_npy(&f, &t("zz", DType::F32, &[5, 2], 3));
    let e = check(&d, &f, "rows");
    assert!(e.contains("layer 'zz'") && e.contains("5 samples"), "{e}");
}

#[test]
fn file_shrunk_after_open_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write_st(&a, &[t("l", DType::F32, &[3, 2], 1)], None);
    write_st(&b, &[t("l", DType::F32, &[3, 2], 2)], None);
    let mut set = open(&[&a, &b]).unwrap();
    assert_eq!(set.next_chunk(10).unwrap().unwrap().rows, 3);
    let bytes = std::fs::read(&b).unwrap();
    std::fs::write(&b, &bytes[..bytes.len() - 4]).unwrap();
    let e = set.next_chunk(10).unwrap_err().to_string();
    assert!(
        e.contains(&path_str(&b)) && e.contains("changed since it was opened"),
        "{e}"
    );
}

#[test]
fn inputs_without_samples_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    write_st(&a, &[t("l", DType::F32, &[0, 3], 1)], None);
    write_st(&b, &[t("l", DType::F32, &[0, 3], 2)], None);
    let e = err_of(open(&[&a, &b]));
    assert!(e.contains(&path_str(&a)) && e.contains("no samples"), "{e}");
    // An empty shard among others is fine (skipped when streaming: see the unequal-shards test).
    let c = dir.path().join("c.safetensors");
    write_st(&c, &[t("l", DType::F32, &[2, 3], 3)], None);
    assert_eq!(open(&[&a, &c, &b]).unwrap().n_samples(), 2);
}

/// Random byte damage and truncation anywhere in a file: always an error or a readable set, never a panic.
#[test]
fn damaged_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("valid.safetensors");
    write_st(
        &st,
        &[
            t("a", DType::F16, &[5, 3], 1),
            t("b", DType::F32, &[5, 2, 2], 2),
        ],
        Some("b,a"),
    );
    let npy_dir = dir.path().join("npy");
    write_npy_dir(&npy_dir, &[t("a", DType::F64, &[5, 3], 3)]);
    let npy = npy_dir.join("a.npy");
    let mut rng = StdRng::seed_from_u64(42);
    for (target, input) in [(&st, &st), (&npy, &npy_dir)] {
        let good = std::fs::read(target).unwrap();
        for trial in 0..200 {
            let mut bytes = good.clone();
            if trial % 3 == 0 {
                bytes.truncate(rng.random_range(0..good.len()));
            } else {
                // Mostly in the header, where the interesting parsing happens.
                let span = if trial % 3 == 1 {
                    160.min(good.len())
                } else {
                    good.len()
                };
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..span);
                    bytes[i] = rng.random();
                }
            }
            std::fs::write(target, &bytes).unwrap();
            if let Ok(mut set) = open(&[input]) {
                while let Ok(Some(_)) = set.next_chunk(2) {}
            }
        }
        std::fs::write(target, &good).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------
// torch.save files (tests/fixtures/torch_save, written by scripts/make_torch_save_fixtures.py with PyTorch)

fn torch_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch_save")
        .join(name)
}

/// Every layer of a torch.save file reads as exactly the values of its safetensors twin (same bytes
/// from PyTorch), in the order the saved dict holds them; non-tensor entries are skipped; a list is
/// `layer0..`, a slice with a storage offset and an `nn.Parameter` read like any tensor; pickle
/// protocols 2 (torch.save's default) and 4 alike.
#[test]
fn torch_save_files_read_as_their_safetensors_twins() {
    for (pt, twin, layers) in [
        (
            "acts.pt",
            "acts.safetensors",
            &["blocks.1", "blocks.0", "embed", "head"][..],
        ),
        (
            "acts_proto4.pt",
            "acts.safetensors",
            &["blocks.1", "blocks.0", "embed", "head"][..],
        ),
        (
            "acts_list.pt",
            "acts_list.safetensors",
            &["layer0", "layer1", "layer2"][..],
        ),
    ] {
        let mut set = open(&[torch_fixture(pt)]).unwrap();
        let mut reference = open(&[torch_fixture(twin)]).unwrap();
        assert_eq!(names(&set), layers, "{pt}");
        assert_eq!(names(&reference), layers, "{twin}");
        assert_eq!(set.layers(), reference.layers(), "{pt}: dtypes and shapes");
        assert_eq!(set.n_samples_hint(), Some(20));
        let (got, sizes) = read_all(&mut set, 7);
        assert_eq!(sizes, [7, 7, 6]);
        let (want, _) = read_all(&mut reference, 7);
        assert_eq!(got, want, "{pt}");
        assert!(got.iter().all(|l| l.iter().any(|&v| v != 0.0)), "{pt}");
    }
    let set = open(&[torch_fixture("acts.pt")]).unwrap();
    assert_eq!(set.layers()[1].shape, [20, 3, 2, 1]);
    assert_eq!(set.layers()[1].dtype, DType::F16);
    // --layers filters torch files as any other.
    let set = open_with(
        &[torch_fixture("acts.pt")],
        TokenMode::Samples,
        Some("^blocks"),
    )
    .unwrap();
    assert_eq!(names(&set), ["blocks.1", "blocks.0"]);
}

#[test]
fn torch_save_files_are_refused_with_their_reason() {
    for (file, want) in [
        ("bad_view.pt", "layer 'b': a view that is not contiguous"),
        ("bad_int.pt", "layer 'b': unsupported dtype I64"),
        ("bad_single.pt", "holds a single tensor"),
        ("bad_legacy.pt", "legacy format (PyTorch < 1.6)"),
    ] {
        let path = torch_fixture(file);
        let e = err_of(open(&[&path]));
        assert!(
            e.contains(want) && e.contains(&path_str(&path)),
            "{file}: {e}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("acts.pt");
    std::fs::write(&other, b"plain text, no tensors").unwrap();
    let e = err_of(open(&[&other]));
    assert!(
        e.contains("not a .safetensors file, a torch.save file"),
        "{e}"
    );
}

/// Random corruption of a torch.save file (its pickle, its zip directory, its data) gives an error or a
/// readable set, never a panic.
#[test]
fn corrupt_torch_files_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("acts.pt");
    let good = std::fs::read(torch_fixture("acts.pt")).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut errors = 0;
    for trial in 0..600 {
        let mut bytes = good.clone();
        if trial % 4 == 0 {
            bytes.truncate(rng.random_range(0..good.len()));
        } else {
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..good.len());
                bytes[i] = rng.random();
            }
        }
        std::fs::write(&target, &bytes).unwrap();
        match open(&[&target]) {
            Ok(mut set) => while let Ok(Some(_)) = set.next_chunk(3) {},
            Err(e) => {
                assert!(!e.to_string().contains('\n'));
                errors += 1;
            }
        }
    }
    assert!(
        errors > 100,
        "only {errors} of 600 corrupted files were refused"
    );
}
