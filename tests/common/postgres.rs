//! A throwaway PostgreSQL cluster for the tests: `initdb` into a temporary folder, started
//! on a free loopback port with its socket in that folder, stopped when dropped. Each test
//! makes its own database in it. It needs Debian's `postgresql` server package (`.ci/run`
//! installs it); without it the tests fail and say so, they never skip.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::Connection;

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// The folder with `initdb` and `pg_ctl`.
fn server_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TRANSFERD_TEST_PG_BIN") {
        return dir.into();
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| {
            dirs.filter_map(Result::ok)
                .map(|d| d.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().expect(
        "PostgreSQL's server binaries (initdb, pg_ctl) were not found under \
         /usr/lib/postgresql: install Debian's postgresql package (.ci/run does), or set \
         TRANSFERD_TEST_PG_BIN",
    )
}

/// `program` as the `postgres` user when running as root (initdb refuses root).
fn as_server_user(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    pub fn start() -> Self {
        let bin = server_bin();
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(dir.path());
                    c
                },
                "chown of the cluster folder",
            );
        }
        let data = dir.path().join("data");
        let mut initdb = as_server_user(&bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        let cluster = Cluster {
            dir,
            bin,
            port: free_port(),
        };
        cluster.launch();
        cluster
    }

    fn launch(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let mut start = as_server_user(&self.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-o", &options, "start"]);
        run(start, "pg_ctl start");
    }

    /// Stops the server at once and starts it again on the same files and port.
    pub fn restart(&self) {
        self.kill();
        self.launch();
    }

    /// The URL of database `name` (not created).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates database `name` and returns its URL.
    pub async fn database(&self, name: &str) -> String {
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the test cluster");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        self.url(name)
    }

    /// Stops the server at once (as a crash would), keeping its files.
    pub fn kill(&self) {
        let mut stop = as_server_user(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"]);
        let _ = stop.output();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}
