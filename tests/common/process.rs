//! transferd as a real child process listening on port 0: its address is read from its JSON
//! log; it is killed (SIGKILL) or stopped (SIGTERM, then waited for) on demand, and killed
//! when dropped so that no test leaves a server behind.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub struct Proc {
    child: Child,
    /// `http://ADDR` of its listener (the API, or a worker's probes).
    pub base: String,
    pub addr: String,
}

impl Proc {
    /// Runs `transferd --data-dir DIR ARGS…` (ARGS name the subcommand and its flags, with
    /// `--addr 127.0.0.1:0`) with `envs` added, and waits until it listens.
    pub fn spawn(data_dir: &Path, args: &[&str], envs: &[(String, String)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_transferd"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let name = args.first().copied().unwrap_or("transferd").to_string();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                // JSON logs: one object per line.
                let Ok(event) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("[{name}] {line}");
                    continue;
                };
                let message = &event["fields"]["message"];
                if message == "listening" {
                    let _ = tx.send(event["fields"]["addr"].as_str().unwrap().to_string());
                }
                if event["level"] == "ERROR" || event["level"] == "WARN" {
                    eprintln!("[{name}] {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the process logs its address");
        Proc {
            child,
            base: format!("http://{addr}"),
            addr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        // SAFETY: kill(2) with a child's pid and a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "a clean shutdown exits 0, got {status}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}
