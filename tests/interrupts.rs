//! Interrupts and partial failure (issue 13): every writing command is killed with SIGINT or SIGTERM at
//! random moments (100 trials in all) and must leave, under each output's name, nothing, the old content
//! untouched, or a complete valid file; no staging file; exit code 130 / 143 when the signal found it
//! running. Then full disks, read-only targets, and two runs writing one output at once.
//!
//! The seed is printed; `SGLP_INTERRUPT_SEED=N` replays a run.

mod common;

use common::{fixture, write_activations, write_tokens};
use npyz::WriterBuilder;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MARKER: &str = ".sglp-partial-";
const OLD: &[u8] = b"the old output, which must survive\n";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What kind of output a path holds, to validate it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Json,
    Safetensors,
    Png,
    Html,
    /// A pruned checkpoint directory with its report.
    Checkpoint,
}

/// A command's arguments, given the trial directory.
type ArgsFor = Box<dyn Fn(&Path) -> Vec<String>>;

/// One writing command: its arguments (given the output root in the trial's directory) and what it writes.
struct Case {
    name: &'static str,
    trials: usize,
    /// `--out FILE`/`--out DIR` or `--out-dir DIR`, relative to the trial directory.
    args: ArgsFor,
    /// The outputs, relative to the trial directory.
    outputs: Vec<(&'static str, Kind)>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Every staging path under `dir` (recursively).
fn staging_left(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().contains(MARKER) {
                found.push(p.clone());
            }
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    found
}

/// Is `path` a complete, valid output of `kind`?
fn complete(path: &Path, kind: Kind) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    match kind {
        Kind::Json => {
            let v: serde_json::Value = serde_json::from_slice(&read(path)?)
                .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
            v.get("format")
                .ok_or(format!("{}: no format key", path.display()))?;
        }
        Kind::Safetensors => {
            let b = read(path)?;
            safetensors::SafeTensors::deserialize(&b)
                .map_err(|e| format!("{}: {e:?}", path.display()))?;
        }
        Kind::Png => {
            let b = read(path)?;
            if !(b.starts_with(b"\x89PNG\r\n\x1a\n") && b.ends_with(b"IEND\xae\x42\x60\x82")) {
                return Err(format!("{}: not a whole PNG", path.display()));
            }
        }
        Kind::Html => {
            let b = String::from_utf8(read(path)?).map_err(|e| e.to_string())?;
            if !b.trim_end().ends_with("</html>") {
                return Err(format!("{}: not a whole page", path.display()));
            }
        }
        Kind::Checkpoint => {
            let c: serde_json::Value = serde_json::from_slice(&read(&path.join("config.json"))?)
                .map_err(|e| e.to_string())?;
            c.get("num_hidden_layers").ok_or("no layer count")?;
            complete(&path.join("model.safetensors"), Kind::Safetensors)?;
            complete(&path.join("sglp-report.json"), Kind::Json)?;
            complete(&path.join("sglp-report.html"), Kind::Html)?;
        }
    }
    Ok(())
}

/// Put the old content at `path` (a file, or for a checkpoint a directory holding one file).
fn plant_old(path: &Path, kind: Kind) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    match kind {
        Kind::Checkpoint => {
            std::fs::create_dir_all(path).unwrap();
            std::fs::write(path.join("OLD"), OLD).unwrap();
        }
        _ => std::fs::write(path, OLD).unwrap(),
    }
}

fn is_old(path: &Path, kind: Kind) -> bool {
    match kind {
        Kind::Checkpoint => {
            std::fs::read(path.join("OLD")).ok().as_deref() == Some(OLD)
                && std::fs::read_dir(path).unwrap().count() == 1
        }
        _ => std::fs::read(path).ok().as_deref() == Some(OLD),
    }
}

fn cases(work: &Path) -> Vec<Case> {
    // Inputs sized so that a run lasts a few tenths of a second in a test build: long enough for the
    // signals to land inside the work, short enough for 100 trials.
    let acts = work.join("acts.safetensors");
    write_activations(&acts, 2048, 12, 96, 7, true);
    let tokens = work.join("tokens.npy");
    let ids: Vec<i64> = (0..12 * 24).map(|i| (i * 37 % 251) as i64).collect();
    write_tokens(&tokens, 12, 24, &ids);
    // `segment` on a CKA of the 12 layers above takes 2–3 ms, too short for a signal to land inside it
    // reliably: it gets a 1,200-layer similarity matrix (.npy) instead, a few hundred ms in a test build.
    let big = work.join("similarity.npy");
    let l = 1200usize;
    let m: Vec<f64> = (0..l * l)
        .map(|x| (-((x / l) as f64 - (x % l) as f64).abs() / 80.0).exp())
        .collect();
    let f = std::fs::File::create(&big).unwrap();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[l as u64, l as u64])
        .writer(f)
        .begin_nd()
        .unwrap();
    w.extend(m.iter().copied()).unwrap();
    w.finish().unwrap();
    let (a, c) = (s(&acts).to_string(), s(&big).to_string());
    let trained = fixture("trained_llama");
    let llama = fixture("llama_llama3_rope");
    let (m, mt) = (s(&trained).to_string(), s(&tokens).to_string());
    let (l, lt) = (
        s(&llama).to_string(),
        s(&llama.join("tokens.npy")).to_string(),
    );
    let (m2, mt2, l2, lt2) = (m.clone(), mt.clone(), l.clone(), lt.clone());
    let a2 = a.clone();
    vec![
        Case {
            name: "cka",
            trials: 15,
            args: Box::new(move |d| {
                let out = d.join("out.json");
                strings(&["cka", "--input", &a, "--cka-batch", "128", "--out", s(&out)])
            }),
            outputs: vec![("out.json", Kind::Json)],
        },
        Case {
            name: "segment",
            trials: 10,
            args: Box::new(move |d| {
                let out = d.join("seg.json");
                strings(&["segment", "--cka", &c, "--k", "3", "--out", s(&out)])
            }),
            outputs: vec![("seg.json", Kind::Json)],
        },
        Case {
            name: "run",
            trials: 15,
            args: Box::new(move |d| {
                let out = d.join("run");
                strings(&[
                    "run",
                    "--input",
                    &a2,
                    "--cka-batch",
                    "128",
                    "--out-dir",
                    s(&out),
                ])
            }),
            outputs: vec![
                ("run/cka.json", Kind::Json),
                ("run/segments.json", Kind::Json),
            ],
        },
        Case {
            name: "capture",
            trials: 15,
            args: Box::new(move |d| {
                let out = d.join("h.safetensors");
                strings(&[
                    "capture",
                    "--model",
                    &m,
                    "--tokens",
                    &mt,
                    "--batch",
                    "2",
                    "--out",
                    s(&out),
                ])
            }),
            outputs: vec![("h.safetensors", Kind::Safetensors)],
        },
        Case {
            name: "gradnorm",
            trials: 15,
            args: Box::new(move |d| {
                let out = d.join("g.json");
                strings(&[
                    "gradnorm",
                    "--model",
                    &m2,
                    "--tokens",
                    &mt2,
                    "--batch",
                    "2",
                    "--out",
                    s(&out),
                ])
            }),
            outputs: vec![("g.json", Kind::Json)],
        },
        Case {
            name: "prune",
            trials: 18,
            args: Box::new(move |d| {
                let out = d.join("pruned");
                strings(&[
                    "prune",
                    "--model",
                    &l,
                    "--tokens",
                    &lt,
                    "--cka-batch",
                    "16",
                    "--batch",
                    "2",
                    "--remove",
                    "1",
                    "--force",
                    "--out",
                    s(&out),
                ])
            }),
            outputs: vec![("pruned", Kind::Checkpoint)],
        },
        Case {
            name: "compare",
            trials: 12,
            args: Box::new(move |d| {
                let out = d.join("cmp");
                strings(&[
                    "compare",
                    "--model",
                    &l2,
                    "--tokens",
                    &lt2,
                    "--eval-tokens",
                    &lt2,
                    "--remove",
                    "1",
                    "--seeds",
                    "2",
                    "--cka-batch",
                    "16",
                    "--batch",
                    "2",
                    "--out-dir",
                    s(&out),
                ])
            }),
            outputs: vec![
                ("cmp/sglp-compare.json", Kind::Json),
                ("cmp/sglp-compare.png", Kind::Png),
                ("cmp/sglp-compare.html", Kind::Html),
            ],
        },
    ]
}

/// How one trial ended.
struct Ended {
    status: ExitStatus,
    stderr: String,
}

/// Run `args` in `dir`; send `sig` after `delay`, or (`on_staging`) as soon as a staging path appears
/// under `dir`.
fn run_and_kill(args: &[String], dir: &Path, sig: i32, delay: Duration, on_staging: bool) -> Ended {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
        .args(args)
        .arg("-q")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let due = if on_staging {
            !staging_left(dir).is_empty() || t0.elapsed() > Duration::from_secs(30)
        } else {
            t0.elapsed() >= delay
        };
        if due {
            // SAFETY: a plain syscall on our own child's pid (not yet reaped, so the pid is still ours).
            unsafe { libc::kill(child.id() as i32, sig) };
            break;
        }
        std::thread::sleep(Duration::from_micros(if on_staging { 100 } else { 500 }));
    }
    let out = child.wait_with_output().unwrap();
    Ended {
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn seed() -> u64 {
    let seed = std::env::var("SGLP_INTERRUPT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("SGLP_INTERRUPT_SEED={seed}");
    seed
}

#[test]
fn interrupts_at_random_moments_leave_old_or_complete_outputs_and_no_staging() {
    let mut rng = StdRng::seed_from_u64(seed());
    let work = tempfile::tempdir().unwrap();
    let cases = cases(work.path());
    assert_eq!(cases.iter().map(|c| c.trials).sum::<usize>(), 100);
    let mut summary = Vec::new();
    let mut total_before_handler = 0;
    for case in &cases {
        // How long an uninterrupted run takes, to spread the signals over it: the fastest of three, so
        // that one slow run (a cold cache, a busy machine) does not push every signal past the end.
        let mut full = std::time::Duration::MAX;
        for run in 0..3 {
            let dir = work.path().join(format!("{}-clean-{run}", case.name));
            std::fs::create_dir(&dir).unwrap();
            let t0 = Instant::now();
            let o = Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
                .args((case.args)(&dir))
                .arg("-q")
                .current_dir(&dir)
                .output()
                .unwrap();
            full = full.min(t0.elapsed());
            assert!(
                o.status.success(),
                "{}: {}",
                case.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let (mut interrupted, mut finished, mut before_handler) = (0, 0, 0);
        for trial in 0..case.trials {
            let dir = work.path().join(format!("{}-{trial}", case.name));
            std::fs::create_dir(&dir).unwrap();
            let with_old = rng.random_bool(0.5);
            if with_old {
                for (rel, kind) in &case.outputs {
                    plant_old(&dir.join(rel), *kind);
                }
            }
            let sig = if rng.random_bool(0.5) {
                libc::SIGINT
            } else {
                libc::SIGTERM
            };
            // A third of the trials strike the moment a staging file exists (inside a write); the others
            // at a uniform moment of the run, or near its end, where the outputs are written.
            let on_staging = trial % 3 == 0;
            let frac = if rng.random_bool(0.5) {
                rng.random_range(0.02..1.1)
            } else {
                rng.random_range(0.75..1.05)
            };
            let delay = full.mul_f64(frac);
            let what = format!(
                "{} trial {trial} ({}, {} ms{}, old output: {with_old})",
                case.name,
                if sig == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                },
                delay.as_millis(),
                if on_staging { ", on staging" } else { "" }
            );
            let ended = run_and_kill(&(case.args)(&dir), &dir, sig, delay, on_staging);
            let code = ended.status.code();
            match code {
                Some(c) if c == 128 + sig => interrupted += 1,
                Some(0) => finished += 1,
                // Before `main` installed the handler the default action kills the process: nothing
                // can have been staged yet, so never once a staging file was seen.
                None if ended.status.signal() == Some(sig) && !on_staging => before_handler += 1,
                _ => panic!("{what}: exit {:?}: {}", ended.status, ended.stderr),
            }
            let left = staging_left(&dir);
            assert!(left.is_empty(), "{what}: staging left: {left:?}");
            // Nothing but the outputs' own names (no aside copies or temporary files of other names).
            let allowed: Vec<&str> = case
                .outputs
                .iter()
                .map(|(rel, _)| rel.split('/').next().unwrap())
                .collect();
            let stray: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !allowed.contains(&n.as_str()))
                .collect();
            assert!(stray.is_empty(), "{what}: left behind: {stray:?}");
            for (rel, kind) in &case.outputs {
                let p = dir.join(rel);
                let ok = (!with_old && !p.exists())
                    || (with_old && is_old(&p, *kind))
                    || complete(&p, *kind).is_ok();
                assert!(
                    ok,
                    "{what}: {rel} is neither absent, old nor complete: {:?}",
                    complete(&p, *kind)
                );
                if code == Some(0) {
                    assert!(
                        complete(&p, *kind).is_ok(),
                        "{what}: finished, {rel} incomplete"
                    );
                }
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
        summary.push(format!(
            "{}: {} interrupted, {} finished first, {} killed before the handler was installed (a \
             clean run takes {} ms)",
            case.name,
            interrupted,
            finished,
            before_handler,
            full.as_millis()
        ));
        assert!(interrupted > 0, "{}: no trial was interrupted", case.name);
        total_before_handler += before_handler;
    }
    eprintln!("{}", summary.join("\n"));
    // The window before the handler is the process's first millisecond or so: a handler that is missing
    // (or installed late) shows here, and in the trials that strike on a staging file.
    assert!(
        total_before_handler <= 10,
        "{total_before_handler} of 100 trials died of the signal itself"
    );
}

/// Run a capture into `out` with `setup` run in the child before exec.
fn capture_into(out: &Path, fsize_limit: Option<u64>) -> std::process::Output {
    let m = fixture("mistral_sharded");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sglp-engine"));
    cmd.args(["capture", "--model", s(&m), "--tokens"])
        .arg(m.join("tokens.npy"))
        .args(["--batch", "1", "--out"])
        .arg(out);
    if let Some(limit) = fsize_limit {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A write past the limit fails with EFBIG, as a full disk fails with ENOSPC; ignored, the
                // SIGXFSZ that comes with it would kill the process instead.
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.output().unwrap()
}

fn assert_one_line_naming(o: &std::process::Output, path: &Path) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(s(path)), "{err}");
}

#[test]
fn a_full_disk_fails_with_one_line_naming_the_output_and_removes_the_staging_file() {
    // A file-size limit fails writes the way a full disk does, on any machine and without root.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("h.safetensors");
    std::fs::write(&out, OLD).unwrap();
    let o = capture_into(&out, Some(4096));
    assert_one_line_naming(&o, &out);
    assert!(staging_left(dir.path()).is_empty());
    assert_eq!(std::fs::read(&out).unwrap(), OLD);

    // A really full file system, where this process may mount one (root in a container that allows it).
    let mnt = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
        .arg(mnt.path())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped the tmpfs part: mounting a 16 KiB tmpfs is not permitted here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.path().to_path_buf());
    let out = mnt.path().join("h.safetensors");
    let o = capture_into(&out, None);
    assert_one_line_naming(&o, &out);
    assert!(String::from_utf8_lossy(&o.stderr).contains("No space left"));
    assert!(staging_left(mnt.path()).is_empty() && !out.exists());

    // Read-only: the same file system remounted read-only.
    let ro = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if ro {
        let o = capture_into(&out, None);
        assert_one_line_naming(&o, &out);
        assert!(String::from_utf8_lossy(&o.stderr).contains("Read-only"));
    }
}

#[test]
fn a_read_only_directory_fails_with_one_line_naming_the_output() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: a plain syscall.
    if unsafe { libc::geteuid() } == 0 {
        eprintln!(
            "skipped: root writes into read-only directories (the read-only case runs on a \
             read-only tmpfs in the full-disk test)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = ro.join("h.safetensors");
    let o = capture_into(&out, None);
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_one_line_naming(&o, &out);
    assert!(staging_left(dir.path()).is_empty() && !out.exists());
}

#[test]
fn two_runs_writing_one_output_at_once_never_mix() {
    let work = tempfile::tempdir().unwrap();
    // Two inputs with different CKA, so the two complete outputs differ.
    let inputs: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = work.path().join(format!("acts{i}.safetensors"));
            write_activations(&p, 512, 8, 64, 100 + i, true);
            p
        })
        .collect();
    let cka_args = |input: &Path, out: &Path| {
        strings(&[
            "cka",
            "--input",
            s(input),
            "--cka-batch",
            "64",
            "--out",
            s(out),
        ])
    };
    // What each run alone writes.
    let alone: Vec<Vec<u8>> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let out = work.path().join(format!("alone{i}.json"));
            let o = Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
                .args(cka_args(input, &out))
                .output()
                .unwrap();
            assert!(o.status.success());
            std::fs::read(out).unwrap()
        })
        .collect();
    assert_ne!(alone[0], alone[1]);
    let m = fixture("mistral_sharded");
    for round in 0..6 {
        let out_cka = work.path().join("both.json");
        let out_cap = work.path().join("both.safetensors");
        let spawn = |args: Vec<String>| {
            Command::new(env!("CARGO_BIN_EXE_sglp-engine"))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let cap_args = strings(&[
            "capture",
            "--model",
            s(&m),
            "--tokens",
            s(&m.join("tokens.npy")),
            "--batch",
            "1",
            "--out",
            s(&out_cap),
        ]);
        let children = vec![
            spawn(cka_args(&inputs[0], &out_cka)),
            spawn(cka_args(&inputs[1], &out_cka)),
            spawn(cap_args.clone()),
            spawn(cap_args),
        ];
        let outs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for pair in outs.chunks(2) {
            assert!(
                pair.iter().any(|o| o.status.success()),
                "round {round}: neither won"
            );
            for o in pair {
                if !o.status.success() {
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert_eq!(o.status.code(), Some(2), "{err}");
                    assert!(err.contains("another process"), "{err}");
                }
            }
        }
        let got = std::fs::read(&out_cka).unwrap();
        assert!(
            got == alone[0] || got == alone[1],
            "round {round}: a mixed file"
        );
        complete(&out_cap, Kind::Safetensors).unwrap();
        assert!(staging_left(work.path()).is_empty());
        std::fs::remove_file(&out_cka).unwrap();
        std::fs::remove_file(&out_cap).unwrap();
    }
}
