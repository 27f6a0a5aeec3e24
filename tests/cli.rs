//! The command-line interface end to end: train on fixtures, then predict, as a user would.

mod common;

use std::process::Command;

fn transferd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_transferd"));
    cmd.env("TRANSFERD_WEIGHTS", common::weights_path())
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn train_then_predict_prints_json() {
    let work = tempfile::tempdir().unwrap();
    let config_path = work.path().join("config.json");
    let mut config = common::tiny_config();
    config.finetune.enabled = transferd::ml::config::When::Off;
    std::fs::write(&config_path, serde_json::to_string(&config).unwrap()).unwrap();
    let model = work.path().join("model");
    let pets = common::pets_copy();
    std::fs::write(pets.path().join("cat/notes.jpg"), b"not a photo").unwrap();
    let out = transferd()
        .args(["train", "--device", "cpu", "--data"])
        .arg(pets.path())
        .arg("--out")
        .arg(&model)
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("warmup") && l.contains("val loss")),
        "{stdout}"
    );
    let summary: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(summary["classes"], serde_json::json!(["cat", "dog"]));
    // The folder is read as an upload of it would be: skips name the user's files.
    assert_eq!(summary["skipped"][0]["name"], "cat/notes.jpg", "{summary}");
    assert!(
        summary["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("not an image")
    );
    // Mistakes name the user's photos, not staged copies that are gone after the command.
    let evaluation: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("evaluation.json")).unwrap())
            .unwrap();
    for m in evaluation["misclassified"].as_array().unwrap() {
        let path = std::path::Path::new(m["path"].as_str().unwrap());
        assert!(path.starts_with(pets.path()) && path.is_file(), "{m}");
    }
    assert!(
        summary["val_accuracy"].as_f64().unwrap() >= 0.8,
        "{summary}"
    );

    let bad = work.path().join("bad.jpg");
    std::fs::write(&bad, b"no").unwrap();
    let out = transferd()
        .args(["predict", "--device", "cpu", "--model"])
        .arg(&model)
        .arg(common::fixtures().join("samples/test_cat.jpg"))
        .arg(&bad)
        .arg(common::fixtures().join("samples/test_dog.jpg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["label"], "cat");
    assert!(rows[1]["error"].as_str().unwrap().contains("not an image"));
    assert_eq!(rows[2]["label"], "dog");
    let p = &rows[2]["probabilities"];
    assert!((p["cat"].as_f64().unwrap() + p["dog"].as_f64().unwrap() - 1.0).abs() < 1e-4);
}

#[test]
fn bad_config_names_the_field() {
    let work = tempfile::tempdir().unwrap();
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, r#"{"batch_size": 0}"#).unwrap();
    let out = transferd()
        .args(["train", "--device", "cpu", "--data"])
        .arg(common::fixtures().join("pets"))
        .arg("--out")
        .arg(work.path().join("m"))
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("batch_size"));
}

#[test]
fn missing_or_wrong_weights_say_what_to_do() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_transferd"))
        .env_remove("TRANSFERD_WEIGHTS")
        .arg("--data-dir")
        .arg(work.path())
        .args(["weights", "path"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("transferd weights fetch"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_transferd"))
        .env_remove("TRANSFERD_WEIGHTS_LITE1")
        .arg("--data-dir")
        .arg(work.path())
        .args(["weights", "path", "--backbone", "lite1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--backbone lite1") && stderr.contains("TRANSFERD_WEIGHTS_LITE1"),
        "{stderr}"
    );

    let fake = work.path().join("fake.pth");
    std::fs::write(&fake, b"not the weights").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_transferd"))
        .env("TRANSFERD_WEIGHTS", &fake)
        .args(["weights", "path"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256"));
}

#[test]
fn healthcheck_fails_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_transferd"))
        .args(["healthcheck", "--addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("connecting to"));
}

#[test]
fn an_unreachable_database_or_object_store_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::postgres::free_port();
    let serve = |extra: &[&str], env: &[(&str, String)]| {
        let mut cmd = transferd();
        cmd.arg("--data-dir")
            .arg(dir.path())
            .args(["serve", "--addr", "127.0.0.1:0", "--device", "cpu"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)));
        cmd.output().unwrap()
    };
    let db_url = format!("postgres://app:hunter2@127.0.0.1:{port}/transferd");
    let out = serve(&["--database-url", &db_url], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "cannot reach the database at postgres://app:***@127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let env = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "key".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "topsecret".to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let out = serve(&["--object-store", "s3://models/team"], &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the object store at s3://models/team failed"),
        "{err}"
    );
    assert!(!err.contains("topsecret"), "{err}");
    let out = serve(&["--object-store", "ftp://elsewhere"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid object store URL ftp://elsewhere"),
        "{err}"
    );
}
