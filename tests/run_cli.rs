//! `losscc run` end to end: golden parity through the command line, and the validation of
//! every kind of bad input (a clear message, exit status 1, nothing written).

use ndarray::{Array1, Array2};
use ndarray_npy::{read_npy, write_npy};
use std::path::{Path, PathBuf};
use std::process::Command;

fn losscc() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_losscc"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

/// Runs `losscc run` and returns (exit success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = losscc().arg("run").args(args).output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn golden_parity_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut checks = 0;
    for case in ["p8k4_d16", "p16k4_d32", "p8k8_d24", "uneven_d12"] {
        let case_dir = golden().join(case);
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case_dir.join("manifest.json")).unwrap())
                .unwrap();
        for (name, entry) in manifest["losses"].as_object().unwrap() {
            for (dtype, loss_tol, grad_tol) in [("f64", 1e-9, 1e-7), ("f32", 1e-4, 1e-4)] {
                checks += 1;
                let grad_path = dir.path().join(format!("{case}_{name}_{dtype}.npy"));
                let mut args: Vec<String> = vec![
                    format!("losses/{name}.loss"),
                    "--backend".into(),
                    "interp".into(),
                    "--dtype".into(),
                    dtype.into(),
                    "--x".into(),
                    case_dir.join("x.npy").display().to_string(),
                    "--labels".into(),
                    case_dir.join("labels.npy").display().to_string(),
                    "--grad-out".into(),
                    grad_path.display().to_string(),
                ];
                for (param, value) in entry["params"].as_object().unwrap() {
                    args.push("--set".into());
                    args.push(format!("{param}={}", value.to_string().replace(' ', "")));
                }
                if let Some(inputs) = entry.get("inputs").and_then(|i| i.as_object()) {
                    for (input, file) in inputs {
                        args.push("--input".into());
                        args.push(format!(
                            "{input}={}",
                            case_dir.join(file.as_str().unwrap()).display()
                        ));
                    }
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (ok, stdout, stderr) = run(&args);
                if !ok {
                    failures.push(format!("{case}/{name}/{dtype}: {stderr}"));
                    continue;
                }
                let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                assert_eq!(json["backend"], "interp");
                assert_eq!(json["dtype"], dtype);
                let loss = json["loss"].as_f64().unwrap();
                let expected = entry["loss"].as_f64().unwrap();
                let expected_grad: Array2<f64> =
                    read_npy(case_dir.join(entry["grad"].as_str().unwrap())).unwrap();
                let grad: Array2<f64> = if dtype == "f64" {
                    read_npy(&grad_path).unwrap()
                } else {
                    read_npy::<_, Array2<f32>>(&grad_path)
                        .unwrap()
                        .mapv(f64::from)
                };
                let scale = expected_grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let grad_error = (&grad - &expected_grad)
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs()))
                    / scale;
                let loss_error = (loss - expected).abs() / expected.abs();
                if loss_error > loss_tol || grad_error > grad_tol {
                    failures.push(format!("{case}/{name}/{dtype}: loss error {loss_error:.1e}, gradient error {grad_error:.1e}"));
                }
            }
        }
    }
    assert_eq!(checks, 264);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Writes the arrays of a bad batch and runs a loss on it: the run must fail with a
/// message containing `expect`, and write no gradient.
fn rejects(loss: &str, x: &Array2<f64>, labels: &[i64], extra: &[&str], expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let x_path = dir.path().join("x.npy");
    let labels_path = dir.path().join("labels.npy");
    let grad_path = dir.path().join("grad.npy");
    write_npy(&x_path, x).unwrap();
    write_npy(&labels_path, &Array1::from(labels.to_vec())).unwrap();
    let mut args = vec![
        loss,
        "--backend",
        "interp",
        "--x",
        x_path.to_str().unwrap(),
        "--labels",
        labels_path.to_str().unwrap(),
        "--grad-out",
        grad_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = run(&args);
    assert!(!ok, "{loss} {extra:?} should fail, printed {stdout}");
    assert!(stdout.is_empty(), "nothing on stdout on failure: {stdout}");
    assert!(stderr.contains(expect), "expected `{expect}` in:\n{stderr}");
    assert!(!grad_path.exists(), "no gradient is written on failure");
}

fn sample_batch(n: usize, d: usize) -> (Array2<f64>, Vec<i64>) {
    let x = Array2::from_shape_fn((n, d), |(i, k)| {
        ((i * 31 + k * 17) % 11) as f64 / 11.0 - 0.4
    });
    let labels = (0..n).map(|i| (i / 4) as i64).collect();
    (x, labels)
}

#[test]
fn bad_inputs_are_rejected_clearly() {
    let (x, labels) = sample_batch(16, 8);
    rejects(
        "losses/bin_deviance.loss",
        &x,
        &labels[..15],
        &[],
        "x has 16 rows but there are 15 labels",
    );
    let mut bad = x.clone();
    bad[(3, 5)] = f64::NAN;
    rejects(
        "losses/bin_deviance.loss",
        &bad,
        &labels,
        &[],
        "x[3, 5] is NaN",
    );
    bad[(3, 5)] = f64::INFINITY;
    rejects(
        "losses/bin_deviance.loss",
        &bad,
        &labels,
        &[],
        "x[3, 5] is inf",
    );
    rejects(
        "losses/bin_deviance.loss",
        &Array2::zeros((0, 8)),
        &[],
        &[],
        "0 rows",
    );
    rejects(
        "losses/bin_deviance.loss",
        &x,
        &labels,
        &["--set", "marign=0.3"],
        "has no parameter `marign`",
    );
    rejects(
        "losses/bin_deviance.loss",
        &x,
        &labels,
        &["--set", "margin=[1,2]"],
        "is a number, not a list",
    );
    rejects(
        "losses/bin_deviance.loss",
        &x,
        &labels,
        &["--set", "margin=abc"],
        "not a finite number",
    );
    rejects(
        "losses/knn_softmax.loss",
        &x,
        &labels,
        &["--set", "k=100"],
        "rank 100 of a set of 15 members",
    );
    rejects(
        "losses/knn_softmax.loss",
        &x,
        &labels,
        &["--set", "k=2.5"],
        "must be a non-negative integer",
    );
    rejects(
        "losses/bin_branch.loss",
        &x,
        &labels,
        &[],
        "columns 0..170 do not fit an embedding of 8 columns",
    );
    rejects(
        "losses/bin_branch.loss",
        &x,
        &labels,
        &["--set", "slices=[0,4,4]"],
        "strictly increasing",
    );
    rejects(
        "losses/ensemble_dw_neighbour.loss",
        &x,
        &labels,
        &[],
        "does not fit an embedding of 8 columns",
    );
    rejects(
        "losses/cluster_nca.loss",
        &x,
        &labels,
        &["--input", "groups=/nonexistent.npy"],
        "cannot read",
    );
    rejects(
        "losses/bin_deviance.loss",
        &x,
        &labels,
        &["--input", "groups=/nonexistent.npy"],
        "cannot read",
    );

    // Arrays of the wrong rank or type.
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("flat.npy");
    write_npy(&flat, &Array1::from(vec![1.0f64, 2.0])).unwrap();
    let labels_path = dir.path().join("labels.npy");
    write_npy(&labels_path, &Array1::from(vec![0i64, 1])).unwrap();
    let (ok, _, stderr) = run(&[
        "losses/bin_deviance.loss",
        "--x",
        flat.to_str().unwrap(),
        "--labels",
        labels_path.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("embeddings must be 2-D"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "losses/bin_deviance.loss",
        "--x",
        flat.to_str().unwrap(),
        "--labels",
        flat.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("must be 2-D"), "{stderr}");
}

#[test]
fn unknown_inputs_and_wrong_lengths() {
    let (x, labels) = sample_batch(16, 8);
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short.npy");
    write_npy(&short, &Array1::from(vec![0i64; 5])).unwrap();
    let arg = format!("groups={}", short.display());
    rejects(
        "losses/cluster_nca.loss",
        &x,
        &labels,
        &["--input", &arg, "--set", "n_cluster=4"],
        "input `groups` has 5 entries but x has 16 rows",
    );
    rejects(
        "losses/bin_deviance.loss",
        &x,
        &labels,
        &["--input", &arg],
        "has no input named `groups`",
    );
}

#[test]
fn demo_batch_and_json_shape() {
    let (ok, stdout, stderr) = run(&["losses/multi_similarity.loss", "--backend", "interp"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("built-in demo batch"), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(json["loss"].as_f64().unwrap().is_finite());
    assert!(json["stats"]["skipped"].as_f64().is_some());
    assert_eq!(json["dtype"], "f32");
}
