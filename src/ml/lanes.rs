//! Data-parallel forward passes on the CPU backend.
//!
//! flex spreads its GEMMs and depthwise convolutions over the rayon pool, but its element-wise
//! kernels (ReLU6, BatchNorm's scale and shift, residual adds, bias adds) run on the calling
//! thread, so a single forward pass of Lite0 leaves part of a multi-core CPU idle. Running
//! independent slices of a batch on one thread per core fills those gaps (on the 2-core
//! development machine, Lite0's forward pass went from about 26 to 42 images/s). A GPU runs
//! the whole batch as one piece, so there this is a plain call.
//!
//! Training is background work: while a prediction runs, its passes take one lane and leave
//! the other cores to the prediction that a person is waiting for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use burn::prelude::*;

thread_local! {
    static IN_LANE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is one of several lanes of [`map_slices`]: every core already has its
/// own slice, so the fused kernels (`kernels`) run their loops on this thread rather than
/// handing them to the shared rayon pool, where the lanes would queue behind each other.
pub fn in_lane() -> bool {
    IN_LANE.with(|l| l.get())
}

/// Runs `f` on each `size`-long chunk of `out` with its index: on this thread when it is one
/// of several lanes ([`in_lane`]), else spread over the rayon pool. With [`each_task`] and
/// [`threads_for_one_task`], the one place the kernels make that choice.
pub fn each_chunk<T: Send>(out: &mut [T], size: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    use rayon::prelude::*;
    let size = size.max(1);
    if in_lane() {
        out.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// How many threads one large task that splits itself (a GEMM) should use: 1 on a lane, else
/// the rayon pool's.
pub fn threads_for_one_task() -> usize {
    if in_lane() {
        1
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `f` for every task in `0..tasks`, as [`each_chunk`] runs its chunks.
pub fn each_task(tasks: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    if in_lane() {
        (0..tasks).for_each(f);
    } else {
        (0..tasks).into_par_iter().for_each(f);
    }
}

/// Images per slice: small slices keep a slice's activations in the cache between layers and
/// bound each thread's memory. With the fused kernels, Lite0 at batch 32 on 2 cores took
/// 23.6–25.0 ms per image with slices of 8 and 17–21 ms with slices of 1 or 2 (alternated
/// runs; before the fused kernels, 2 threads of 4–8 images had beaten 2 of 16).
const SLICE: usize = 2;

/// How many threads a forward pass on `device` should use: one per core for the CPU backend
/// (at most 8), one for anything else.
pub fn lanes(device: &Device) -> usize {
    // `available_parallelism` reads the cgroup CPU quota from /proc on every call (so a
    // container's limit is respected); once per process is enough.
    static CORES: OnceLock<usize> = OnceLock::new();
    if *device == Device::flex() {
        *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
    } else {
        1
    }
}

/// Who is predicting: training reads it to step aside. One per process ([`ACTIVITY`]);
/// tests make their own.
#[derive(Debug, Default)]
pub struct Activity {
    predicting: AtomicUsize,
}

/// The process's predictions.
static ACTIVITY: Activity = Activity {
    predicting: AtomicUsize::new(0),
};

/// Marks a prediction as running until it is dropped.
pub struct Predicting<'a>(&'a Activity);

impl Activity {
    pub fn begin(&self) -> Predicting<'_> {
        self.predicting.fetch_add(1, Ordering::Relaxed);
        Predicting(self)
    }

    /// `lanes` for background work (training): one while any prediction is running.
    pub fn background(&self, lanes: usize) -> usize {
        if self.predicting.load(Ordering::Relaxed) > 0 {
            1
        } else {
            lanes
        }
    }
}

impl Drop for Predicting<'_> {
    fn drop(&mut self) {
        self.0.predicting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Marks a prediction of this process as running until the guard is dropped.
pub fn predicting() -> Predicting<'static> {
    ACTIVITY.begin()
}

/// [`Activity::background`] for this process.
pub fn background(lanes: usize) -> usize {
    ACTIVITY.background(lanes)
}

/// Whose pass [`map_slices`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A prediction someone is waiting for.
    Foreground,
    /// Training: the frozen pass, fine-tune steps.
    Background,
}

/// Calls `f` on consecutive slices of `items` and returns the results in order. With more
/// than one lane the slices (at most [`SLICE`] items each) are shared out to `lanes` scoped
/// threads as each finishes its last, and a single item of [`Work::Foreground`] runs on a
/// thread of the rayon pool; with one lane `f` sees all of `items` at once, on the calling
/// thread.
pub fn map_slices<T: Sync, R: Send>(
    items: &[T],
    lanes: usize,
    work: Work,
    f: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    if items.is_empty() {
        return Vec::new();
    }
    if lanes <= 1 {
        return vec![f(items)];
    }
    if items.len() == 1 {
        if work == Work::Foreground {
            // One slice on a CPU with several cores: the kernels spread each layer over the
            // rayon pool. Run the whole pass on one of its threads, which then takes a share
            // of every layer itself, rather than here, where this thread would hand each layer
            // to the pool and sleep until it is done (a wake-up per layer). Only for
            // predictions: a pool thread waiting inside a layer may pick up a whole injected
            // pass, and a prediction must not wait behind one of training's.
            return vec![rayon::scope(|_| f(items))];
        }
        return vec![f(items)];
    }
    let size = items.len().div_ceil(lanes).clamp(1, SLICE);
    let slices: Vec<&[T]> = items.chunks(size).collect();
    let results: Vec<Mutex<Option<R>>> = slices.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..lanes.min(slices.len()) {
            scope.spawn(|| {
                IN_LANE.with(|l| l.set(true));
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slice) = slices.get(i) else { break };
                    let r = f(slice);
                    *results[i].lock().expect("no panics while held") = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .expect("no panics while held")
                .expect("every slice ran")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_items_in_order() {
        let items: Vec<usize> = (0..37).collect();
        for lanes in [1, 2, 3, 8] {
            let out = map_slices(&items, lanes, Work::Background, |s| s.to_vec());
            assert_eq!(out.concat(), items, "lanes {lanes}");
            if lanes > 1 {
                assert!(out.iter().all(|s| s.len() <= SLICE));
            } else {
                assert_eq!(out.len(), 1);
            }
        }
        assert!(map_slices(&[] as &[u8], 2, Work::Background, |s| s.len()).is_empty());
        for work in [Work::Foreground, Work::Background] {
            assert_eq!(map_slices(&[5u8], 4, work, |s| s.to_vec()), vec![vec![5]]);
        }
    }

    #[test]
    fn background_work_steps_aside_while_any_prediction_runs() {
        // Its own activity: other tests predicting in this process cannot disturb it.
        let activity = Activity::default();
        assert_eq!(activity.background(4), 4);
        let first = activity.begin();
        let second = activity.begin();
        assert_eq!(activity.background(4), 1);
        drop(first);
        assert_eq!(activity.background(4), 1, "one prediction still runs");
        drop(second);
        assert_eq!(activity.background(4), 4);
    }

    #[test]
    fn a_cpu_forward_pass_runs_its_lanes_at_the_same_time() {
        // Each thread's first slice waits until every lane has started one (or 10 s pass):
        // with `lanes` threads really running together, all arrive and `lanes` distinct
        // threads are seen.
        let lanes = lanes(&Device::flex());
        assert!((1..=8).contains(&lanes));
        if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
            assert!(lanes >= 2, "a multi-core CPU gets more than one lane");
        }
        let items: Vec<usize> = (0..lanes * SLICE * 2).collect();
        let arrived = AtomicUsize::new(0);
        let threads = Mutex::new(std::collections::HashSet::new());
        thread_local!(static FIRST: std::cell::Cell<bool> = const { std::cell::Cell::new(true) });
        let out = map_slices(&items, lanes, Work::Background, |s| {
            threads.lock().unwrap().insert(std::thread::current().id());
            if FIRST.with(|f| f.replace(false)) {
                arrived.fetch_add(1, Ordering::SeqCst);
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while arrived.load(Ordering::SeqCst) < lanes && std::time::Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
            }
            s.len()
        });
        assert_eq!(out.iter().sum::<usize>(), items.len());
        assert_eq!(arrived.load(Ordering::SeqCst), lanes);
        assert_eq!(threads.lock().unwrap().len(), lanes);
    }
}
