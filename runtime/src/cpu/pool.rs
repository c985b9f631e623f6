//! The session's worker threads: created once, handed one job at a time,
//! each job ending in one barrier. A decode step of a small model is a few
//! milliseconds split into ~150 jobs, so a hand-off must cost microseconds:
//! workers spin briefly on the job counter before parking, and the caller
//! works on its own share instead of waiting.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How long an idle worker spins before parking: enough to bridge the gap
/// between two matmuls of one step, short enough not to burn a core between
/// tokens.
const SPIN_ITERATIONS: u32 = 1 << 16;

/// A job: called once per thread with (thread index, thread count).
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

struct Shared {
    /// The current job, lifetime erased; valid while `pending` > 0.
    job: Mutex<Option<Job<'static>>>,
    /// Bumped for every job; workers watch it.
    generation: AtomicUsize,
    /// Workers still running the current job.
    pending: AtomicUsize,
    /// A worker's job panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
    wake: Condvar,
    parked: Mutex<usize>,
}

/// A fixed set of threads that run jobs together with the calling thread.
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl WorkerPool {
    /// A pool of `threads` in all: the caller plus `threads - 1` workers.
    pub fn new(threads: usize) -> WorkerPool {
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            generation: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake: Condvar::new(),
            parked: Mutex::new(0),
        });
        let n = threads.max(1);
        let workers = (1..n)
            .map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lorafold-{index}"))
                    .spawn(move || worker(&shared, index, n))
                    .expect("spawning a worker thread")
            })
            .collect();
        WorkerPool { shared, workers }
    }

    /// Threads that run each job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `job(i, n)` on every thread (the caller is thread 0) and return
    /// when all are done. A panic in a worker is re-raised here.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.threads();
        if n == 1 {
            job(0, 1);
            return;
        }
        // SAFETY: the erased reference is only used by workers between the
        // generation bump below and their decrement of `pending`, and this
        // function does not return before `pending` reaches zero.
        let erased: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        *self.shared.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(erased);
        self.shared.pending.store(n - 1, Ordering::Release);
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        if *self.shared.parked.lock().unwrap_or_else(|p| p.into_inner()) > 0 {
            self.shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0, n)));
        // Spin for the common case (the others finish within microseconds),
        // then yield: on a busy machine a descheduled worker needs our core.
        let mut spins = 0u32;
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            if spins < SPIN_ITERATIONS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *self.shared.job.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a worker thread panicked");
        }
    }
}

fn worker(shared: &Shared, index: usize, n: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin, then park.
        let mut spins = 0u32;
        let generation = loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen || shared.stop.load(Ordering::Acquire) {
                break g;
            }
            if spins < SPIN_ITERATIONS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut parked = shared.parked.lock().unwrap_or_else(|p| p.into_inner());
            *parked += 1;
            while shared.generation.load(Ordering::Acquire) == seen
                && !shared.stop.load(Ordering::Acquire)
            {
                parked = shared.wake.wait(parked).unwrap_or_else(|p| p.into_inner());
            }
            *parked -= 1;
        };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        seen = generation;
        let job = *shared.job.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = job {
            if catch_unwind(AssertUnwindSafe(|| job(index, n))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _parked = self.shared.parked.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The part of `0..len` that thread `i` of `n` takes, in whole multiples of
/// `align` (the last thread takes the remainder).
pub fn share(len: usize, align: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(align);
    let per = units / n;
    let extra = units % n;
    let start = (i * per + i.min(extra)) * align;
    let end = ((i + 1) * per + (i + 1).min(extra)) * align;
    start.min(len)..end.min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job_once() {
        for threads in [1, 2, 3] {
            let pool = WorkerPool::new(threads);
            for round in 0..200 {
                let hits = AtomicUsize::new(0);
                let mask = AtomicUsize::new(0);
                pool.run(&|i, n| {
                    assert_eq!(n, threads);
                    hits.fetch_add(1, Ordering::Relaxed);
                    mask.fetch_or(1 << i, Ordering::Relaxed);
                });
                assert_eq!(hits.load(Ordering::Relaxed), threads, "round {round}");
                assert_eq!(mask.load(Ordering::Relaxed), (1 << threads) - 1);
            }
        }
    }

    #[test]
    fn shares_cover_the_range_in_aligned_pieces() {
        for (len, align, n) in [(576, 4, 2), (49152, 16, 3), (5, 4, 4), (0, 4, 2)] {
            let mut next = 0;
            for i in 0..n {
                let r = share(len, align, i, n);
                assert_eq!(r.start, next);
                assert!(r.start == len || r.start.is_multiple_of(align));
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        let pool = WorkerPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let hits = AtomicUsize::new(0);
        pool.run(&|_, _| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
