//! Settings of `transferd serve`: every one a flag with a `TRANSFERD_*` environment variable
//! and a default that works on a laptop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::ingest::Limits;
use crate::keys::{Access, ApiKey};
use crate::ml::device::DeviceChoice;

/// Most images one prediction request may carry.
pub const MAX_PREDICT_IMAGES: usize = 64;

/// How `transferd serve` runs.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TRANSFERD_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Database URL: `sqlite://FILE` (default `sqlite://<data-dir>/transferd.db`, one
    /// machine) or `postgres://USER:PASSWORD@HOST/DB` (several processes and machines).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Where datasets, checkpoints and models are kept: the data directory (default), or a
    /// store every process shares, `s3://BUCKET/PREFIX` (endpoint and credentials from the
    /// standard `AWS_*` variables: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, …) or
    /// `file:///FOLDER`. With a store, the data directory is only a cache.
    #[arg(long, env = "TRANSFERD_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// With `--object-store`: most bytes of datasets and models this process keeps copies
    /// of in its data directory (least recently used ones are deleted beyond it; those in
    /// use stay).
    #[arg(long, env = "TRANSFERD_LOCAL_CACHE_BYTES", default_value_t = 20 << 30)]
    pub local_cache_bytes: u64,
    /// Largest accepted upload (the zip as sent), in bytes.
    #[arg(long, env = "TRANSFERD_MAX_UPLOAD_BYTES", default_value_t = 2 << 30)]
    pub max_upload_bytes: u64,
    /// Most entries (files and folders) a dataset zip may hold.
    #[arg(long, env = "TRANSFERD_MAX_ZIP_ENTRIES", default_value_t = Limits::DEFAULT.max_entries)]
    pub max_zip_entries: usize,
    /// Most bytes a dataset zip may inflate to in total, counted as really inflated.
    #[arg(long, env = "TRANSFERD_MAX_UNCOMPRESSED_BYTES", default_value_t = Limits::DEFAULT.max_total_bytes)]
    pub max_uncompressed_bytes: u64,
    /// Most bytes one zip entry may inflate to.
    #[arg(long, env = "TRANSFERD_MAX_ENTRY_BYTES", default_value_t = Limits::DEFAULT.max_entry_bytes)]
    pub max_entry_bytes: u64,
    /// Images whose header declares a larger width or height are skipped or refused.
    #[arg(long, env = "TRANSFERD_MAX_IMAGE_DIMENSION", default_value_t = Limits::DEFAULT.max_image_dimension)]
    pub max_image_dimension: u32,
    /// Fewest usable images a class needs for a dataset to be accepted.
    #[arg(long, env = "TRANSFERD_MIN_IMAGES_PER_CLASS", default_value_t = Limits::DEFAULT.min_images_per_class)]
    pub min_images_per_class: usize,
    /// Most classes (class folders) a dataset may have.
    #[arg(long, env = "TRANSFERD_MAX_CLASSES", default_value_t = Limits::DEFAULT.max_classes)]
    pub max_classes: usize,
    /// Runs that train at the same time in this process.
    #[arg(long, env = "TRANSFERD_CONCURRENT_RUNS", default_value_t = 1)]
    pub concurrent_runs: usize,
    /// `serve` only: train nothing here (an API replica; `transferd worker` processes train).
    #[arg(long, env = "TRANSFERD_NO_WORKER")]
    pub no_worker: bool,
    /// How long a worker's claim on a run lasts without a heartbeat (it renews it every
    /// third of this, at most every 2 s). A run whose worker died is trained again after
    /// this long.
    #[arg(long, env = "TRANSFERD_LEASE_SECONDS", default_value = "30", value_parser = seconds)]
    pub lease_seconds: std::time::Duration,
    /// Trained models kept loaded for prediction.
    #[arg(long, env = "TRANSFERD_MODEL_CACHE", default_value_t = 4)]
    pub model_cache: usize,
    /// Most images predicted in one forward pass when requests are micro-batched.
    #[arg(long, env = "TRANSFERD_PREDICT_BATCH", default_value_t = 32)]
    pub predict_batch: usize,
    /// Most images waiting for, or in, a forward pass; a prediction that does not fit is
    /// refused at once with 503 and `Retry-After`. Default: 2 × `--predict-batch`, and at
    /// least the 64 images one request may carry.
    #[arg(long, env = "TRANSFERD_PREDICT_QUEUE")]
    pub predict_queue: Option<usize>,
    /// Bytes that must stay free on the data disk besides what an upload may take (it is
    /// refused with 507 otherwise).
    #[arg(long, env = "TRANSFERD_MIN_FREE_BYTES", default_value_t = 1 << 30)]
    pub min_free_bytes: u64,
    /// Most bytes datasets and models may take in the data directory (none by default).
    #[arg(long, env = "TRANSFERD_DATA_QUOTA_BYTES")]
    pub data_quota_bytes: Option<u64>,
    /// Most open HTTP connections; more wait in the listen backlog until one closes.
    #[arg(long, env = "TRANSFERD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers; an idle connection is closed after
    /// as long.
    #[arg(long, env = "TRANSFERD_HEADER_READ_TIMEOUT", default_value = "10", value_parser = seconds)]
    pub header_read_timeout: std::time::Duration,
    /// Most live event streams (SSE) open at once; more are refused with 503.
    #[arg(long, env = "TRANSFERD_MAX_EVENT_STREAMS", default_value_t = 256)]
    pub max_event_streams: usize,
    /// Most runs waiting in the queue; more are refused with 429.
    #[arg(long, env = "TRANSFERD_MAX_QUEUED_RUNS", default_value_t = 100)]
    pub max_queued_runs: usize,
    /// Most bytes a run's frozen pass may cache (features and activations, estimated from the
    /// dataset and the config when the run is queued; over it, 422). Default: half the
    /// machine's memory, shared by `--concurrent-runs`.
    #[arg(long, env = "TRANSFERD_MAX_CACHE_BYTES")]
    pub max_cache_bytes: Option<u64>,
    /// Most bytes one image sent for prediction may have.
    #[arg(long, env = "TRANSFERD_MAX_PREDICT_IMAGE_BYTES", default_value_t = 20 << 20)]
    pub max_predict_image_bytes: u64,
    /// Most pixels (width × height, from the header, before decoding) of an image sent for
    /// prediction.
    #[arg(
        long,
        env = "TRANSFERD_MAX_PREDICT_PIXELS",
        default_value_t = 40_000_000
    )]
    pub max_predict_pixels: u64,
    /// Seconds a request may take before it is answered 503 (every route except uploads and
    /// the live event stream, which run as long as the data takes).
    #[arg(long, env = "TRANSFERD_REQUEST_TIMEOUT", default_value = "30", value_parser = seconds)]
    pub request_timeout: std::time::Duration,
    /// Seconds an upload may send nothing before it is abandoned (408).
    #[arg(long, env = "TRANSFERD_UPLOAD_STALL_TIMEOUT", default_value = "60", value_parser = seconds)]
    pub upload_stall_timeout: std::time::Duration,
    /// `auto` uses wgpu on a real GPU and the flex CPU backend otherwise.
    #[arg(long, env = "TRANSFERD_DEVICE", value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    /// Pretrained weights file to use instead of `<data-dir>/weights/` (checked by sha256).
    #[arg(long, env = "TRANSFERD_WEIGHTS")]
    pub weights: Option<PathBuf>,
    /// Folder of the web page served at `/`.
    #[arg(long, env = "TRANSFERD_STATIC_DIR", default_value = "static")]
    pub static_dir: PathBuf,
    /// API keys (16+ characters; repeat the flag or separate with commas). When set, every
    /// write route needs `Authorization: Bearer <key>`.
    #[arg(
        long = "api-key",
        env = "TRANSFERD_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<ApiKey>,
    /// With API keys: predictions need a key too.
    #[arg(long, env = "TRANSFERD_PROTECT_PREDICT")]
    pub protect_predict: bool,
    /// With API keys: reads (GET) under `/api` need a key too.
    #[arg(long, env = "TRANSFERD_PROTECT_READS")]
    pub protect_reads: bool,
    /// Origins allowed to call the API from a browser (CORS), comma-separated; `*` for any.
    /// Off by default.
    #[arg(
        long = "cors-origin",
        env = "TRANSFERD_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Host names this server answers to besides loopback ones (comma-separated). Bound to
    /// loopback, other `Host` headers are refused (DNS rebinding); bound elsewhere, the list
    /// (when given) is enforced.
    #[arg(
        long = "public-host",
        env = "TRANSFERD_PUBLIC_HOSTS",
        value_delimiter = ','
    )]
    pub public_hosts: Vec<String>,
}

/// What a process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `transferd serve`: the HTTP API, and `workers` training workers unless `--no-worker`.
    Api,
    /// `transferd worker`: training workers only; it listens only for `/healthz`, `/readyz`
    /// and `/metrics`.
    Worker,
}

/// Everything the running service needs to know, resolved from [`ServeArgs`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub role: Role,
    pub data_dir: PathBuf,
    /// The address `serve` listens on.
    pub addr: SocketAddr,
    pub public_hosts: Vec<String>,
    pub database_url: String,
    /// `--object-store`; `None`: the data directory.
    pub object_store: Option<String>,
    pub local_cache_bytes: u64,
    pub limits: Limits,
    pub max_upload_bytes: u64,
    /// Runs this process trains at once; 0 for an API replica.
    pub workers: usize,
    pub lease: std::time::Duration,
    pub model_cache: usize,
    pub predict_batch: usize,
    /// Images the prediction queue holds.
    pub predict_queue: usize,
    pub max_predict_image_bytes: u64,
    pub max_predict_pixels: u64,
    /// The frozen-pass cache budget of one run.
    pub max_cache_bytes: u64,
    pub min_free_bytes: u64,
    pub data_quota_bytes: Option<u64>,
    pub max_queued_runs: usize,
    pub header_read_timeout: std::time::Duration,
    pub max_connections: usize,
    pub max_event_streams: usize,
    /// How long a (non-streaming) request may take.
    pub request_timeout: std::time::Duration,
    /// How long an upload may stall.
    pub upload_stall_timeout: std::time::Duration,
    pub device: DeviceChoice,
    /// Folder served at `/`.
    pub static_dir: PathBuf,
    /// Explicit pretrained weights file.
    pub weights: Option<PathBuf>,
    pub access: Access,
    pub cors_origins: Vec<String>,
}

impl Settings {
    pub fn new(data_dir: &Path, args: &ServeArgs) -> Self {
        let database_url = args
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("transferd.db").display()));
        Self {
            role: Role::Api,
            data_dir: data_dir.to_path_buf(),
            addr: args.addr,
            public_hosts: args.public_hosts.clone(),
            database_url,
            object_store: args.object_store.clone(),
            local_cache_bytes: args.local_cache_bytes,
            limits: Limits {
                max_entries: args.max_zip_entries,
                max_total_bytes: args.max_uncompressed_bytes,
                max_entry_bytes: args.max_entry_bytes,
                max_image_dimension: args.max_image_dimension,
                min_images_per_class: args.min_images_per_class,
                max_classes: args.max_classes,
            },
            max_upload_bytes: args.max_upload_bytes,
            workers: if args.no_worker {
                0
            } else {
                args.concurrent_runs.max(1)
            },
            lease: args
                .lease_seconds
                .max(std::time::Duration::from_millis(300)),
            model_cache: args.model_cache.max(1),
            predict_batch: args.predict_batch.max(1),
            predict_queue: args
                .predict_queue
                .unwrap_or_else(|| (2 * args.predict_batch.max(1)).max(MAX_PREDICT_IMAGES)),
            // Runs training at once share the default budget.
            max_cache_bytes: args
                .max_cache_bytes
                .unwrap_or_else(|| half_the_memory() / args.concurrent_runs.max(1) as u64),
            max_queued_runs: args.max_queued_runs,
            max_connections: args.max_connections,
            header_read_timeout: args.header_read_timeout,
            max_event_streams: args.max_event_streams,
            min_free_bytes: args.min_free_bytes,
            data_quota_bytes: args.data_quota_bytes,
            max_predict_image_bytes: args.max_predict_image_bytes,
            max_predict_pixels: args.max_predict_pixels,
            request_timeout: args.request_timeout,
            upload_stall_timeout: args.upload_stall_timeout,
            device: args.device,
            static_dir: args.static_dir.clone(),
            weights: args.weights.clone(),
            access: Access {
                keys: args.api_keys.clone(),
                protect_predict: args.protect_predict,
                protect_reads: args.protect_reads,
            },
            cors_origins: args.cors_origins.clone(),
        }
    }

    /// Default settings rooted at `data_dir`, as `serve` would use them without flags or
    /// environment variables (so tests do not pick up the caller's `TRANSFERD_*`).
    pub fn defaults(data_dir: &Path) -> Self {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ServeArgs,
        }
        let matches = Wrapper::command()
            .mut_args(|a| a.env(None::<&str>))
            .get_matches_from(["transferd"]);
        let w = Wrapper::from_arg_matches(&matches).expect("defaults parse");
        Self::new(data_dir, &w.args)
    }
}

/// A positive, finite number of seconds (fractions allowed), at most a year.
fn seconds(s: &str) -> Result<std::time::Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 365.0 * 86_400.0) {
        return Err(format!(
            "{s:?}: give a number of seconds above 0 and at most a year"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// Half of `MemTotal` (8 GiB when it cannot be read): room for the cache next to the model,
/// the batches and the other runs' and predictions' memory.
fn half_the_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024 / 2)
}
