-- transferd's schema. Timestamps are UTC RFC 3339 text with milliseconds.
-- Never edit this file once released: add a new numbered migration instead.

CREATE TABLE datasets (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    -- JSON array of class names in label order (sorted).
    classes     TEXT NOT NULL,
    image_count INTEGER NOT NULL,
    -- JSON: {"skipped": [{name, reason}], "warnings": [..]}
    report      TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row per stored image; the bytes live in <data-dir>/datasets/<dataset_id>/<sha256>.<format>.
CREATE TABLE dataset_files (
    id            INTEGER PRIMARY KEY,
    dataset_id    TEXT NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    class         TEXT NOT NULL,
    original_name TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    format        TEXT NOT NULL,
    width         INTEGER NOT NULL,
    height        INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (dataset_id, sha256)
);
CREATE INDEX dataset_files_by_dataset ON dataset_files (dataset_id, class);

-- The queue: the worker claims the oldest queued run.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    -- NULL once the dataset is deleted; the run's model stays usable.
    dataset_id       TEXT REFERENCES datasets(id) ON DELETE SET NULL,
    status           TEXT NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- JSON training config, every field filled in.
    config           TEXT NOT NULL,
    phase            TEXT,
    stage            TEXT,
    step             INTEGER,
    steps_total      INTEGER,
    epoch            INTEGER,
    epochs_total     INTEGER,
    percent          REAL NOT NULL DEFAULT 0,
    eta_seconds      REAL,
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    started_at       TEXT,
    finished_at      TEXT,
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX runs_queue ON runs (status, created_at);
CREATE INDEX runs_by_dataset ON runs (dataset_id, status);

-- Each phase of a run (warmup, finetune, baseline) with its own status and best epoch.
CREATE TABLE run_phases (
    run_id            TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    phase             TEXT NOT NULL CHECK (phase IN ('warmup', 'finetune', 'baseline')),
    position          INTEGER NOT NULL,
    status            TEXT NOT NULL
        CHECK (status IN ('pending', 'running', 'succeeded', 'skipped', 'failed', 'cancelled')),
    epochs_planned    INTEGER NOT NULL,
    epochs_run        INTEGER NOT NULL DEFAULT 0,
    best_epoch        INTEGER,
    best_val_loss     REAL,
    best_val_accuracy REAL,
    seconds           REAL,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, phase)
);

CREATE TABLE epoch_metrics (
    run_id         TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    phase          TEXT NOT NULL,
    epoch          INTEGER NOT NULL,
    train_loss     REAL NOT NULL,
    train_accuracy REAL NOT NULL,
    val_loss       REAL NOT NULL,
    val_accuracy   REAL NOT NULL,
    learning_rate  REAL NOT NULL,
    seconds        REAL NOT NULL,
    created_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (run_id, phase, epoch)
);

CREATE TABLE evaluations (
    run_id     TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    accuracy   REAL NOT NULL,
    -- JSON evaluation: confusion matrix, per-class scores, calibration, misclassified files.
    report     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- A succeeded run's classifier; its id is the run's id. Files in <data-dir>/models/<id>/.
CREATE TABLE models (
    id           TEXT PRIMARY KEY REFERENCES runs(id),
    dataset_id   TEXT,
    classes      TEXT NOT NULL,
    input_size   INTEGER NOT NULL,
    val_accuracy REAL NOT NULL,
    -- Set when someone promotes the model; the most recent promotion is the default.
    promoted_at  TEXT,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
