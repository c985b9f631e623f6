//! The session's worker threads: created once, handed one job at a time.
//!
//! A job is a range cut into chunks, and whichever thread is running claims
//! the next chunk from one counter; the caller returns when every chunk is
//! finished, not when every thread has checked in. On a busy machine a
//! descheduled worker then costs at most the chunk it holds, where a fixed
//! share per thread stalled every job of a step for a scheduler time slice.
//! A decode step of a small model is a few milliseconds split into ~150
//! jobs, so a hand-off must cost microseconds: claiming is one `fetch_add`
//! per chunk, workers spin briefly on the job counter before parking, and
//! the caller works on chunks instead of waiting.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// How long an idle worker spins (~100 µs) before it starts yielding: enough
/// to bridge the gap between two jobs of one step.
const SPIN_ITERATIONS: u32 = 1 << 12;

/// How many times an idle worker then yields before parking: on an idle
/// core a yield returns at once, so this still bridges short gaps, but on a
/// busy one it hands the core to a thread with work (the caller, say)
/// instead of burning the time slice.
const YIELD_ITERATIONS: u32 = 1 << 8;

/// How long the caller spins for the chunks still running elsewhere before
/// it yields its core: those are the last microseconds of a job, unless
/// their thread was descheduled, and then it may need our core more than we
/// do (a yield with nothing else to run costs a system call, no more).
const WAIT_SPINS: u32 = 1 << 8;

/// Chunks per thread: enough that a thread that falls behind leaves little
/// for the others to wait on, few enough that claiming stays a small cost.
const CHUNKS_PER_THREAD: usize = 8;

/// Jobs over which the pool counts those its workers came late to.
const LATE_WINDOW: u32 = 64;

/// Late jobs in a window that make the caller run the next jobs alone: the
/// workers then cost more (waking, waiting for a descheduled one) than they
/// bring, as on a 2-core machine shared with a busy process.
const LATE_LIMIT: u32 = LATE_WINDOW / 2;

/// Jobs the caller then runs alone before it tries the workers again (a few
/// decode steps of a small model).
const SOLO_JOBS: u32 = 512;

/// A job: called with a chunk of the range and the index of the thread
/// running it (0 is the caller), which picks the thread's own scratch.
type Job<'a> = &'a (dyn Fn(Range<usize>, usize) + Sync);

/// One job as the threads see it, on the caller's stack.
struct Task<'a> {
    job: Job<'a>,
    len: usize,
    /// Elements per chunk, a multiple of the alignment (the last chunk may
    /// be shorter).
    size: usize,
    chunks: usize,
}

impl Task<'_> {
    /// Claim and run chunks until none are left; returns how many this
    /// thread finished (a panicking one counts: it will not be retried) and
    /// the first panic, after which the thread goes on claiming so that no
    /// chunk waits for a thread that might never come.
    fn claim(&self, next: &AtomicUsize, thread: usize) -> (usize, Option<PanicPayload>) {
        let mut finished = 0;
        let mut panic = None;
        loop {
            let r = catch_unwind(AssertUnwindSafe(|| loop {
                // Relaxed: the chunks are disjoint, and what they read was
                // published with the task.
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= self.chunks {
                    break;
                }
                let start = c * self.size;
                (self.job)(start..(start + self.size).min(self.len), thread);
                finished += 1;
            }));
            match r {
                Ok(()) => return (finished, panic),
                Err(p) => {
                    finished += 1;
                    panic.get_or_insert(p);
                }
            }
        }
    }
}

type PanicPayload = Box<dyn std::any::Any + Send>;

/// Keeps a counter on its own cache line, so the threads claiming chunks do
/// not slow the ones reading the task, and the other way round.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    /// The current job, lifetime erased, or null between jobs. A worker
    /// reads it only while counted in `active`, and the caller nulls it and
    /// waits for `active` to reach zero before the job goes away, so a late
    /// worker finds null instead of a finished job.
    task: Padded<AtomicPtr<Task<'static>>>,
    /// Bumped for every job; idle workers watch it.
    generation: Padded<AtomicUsize>,
    /// The next chunk to claim.
    next: Padded<AtomicUsize>,
    /// Chunks finished by workers (the caller counts its own).
    done: Padded<AtomicUsize>,
    /// Workers that may be reading the current task.
    active: Padded<AtomicUsize>,
    /// A worker's chunk panicked.
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Workers parked or about to park; the caller takes the lock to wake
    /// them only when this is not zero.
    parked: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    #[cfg(test)]
    gate: tests::Gate,
}

/// A fixed set of threads that run jobs together with the calling thread.
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    pace: Pace,
}

/// How the workers have kept up lately, seen by the caller only (atomics
/// keep the pool `Sync`; relaxed, since one thread reads and writes them).
#[derive(Default)]
struct Pace {
    /// Jobs run with the workers in the current window.
    jobs: AtomicU32,
    /// Of those, jobs the workers came late to: the caller waited for them
    /// longer than it worked, or ran every chunk itself.
    late: AtomicU32,
    /// Jobs left for the caller to run alone.
    solo_left: AtomicU32,
    /// Jobs run alone so far.
    solo_total: AtomicU64,
}

impl Pace {
    /// Take a job alone instead of with the workers?
    fn solo(&self) -> bool {
        let left = self.solo_left.load(Ordering::Relaxed);
        if left == 0 {
            return false;
        }
        self.solo_left.store(left - 1, Ordering::Relaxed);
        self.solo_total.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Count a job run with the workers; a window with too many late ones
    /// sends the next [`SOLO_JOBS`] to the caller alone.
    fn record(&self, late: bool) {
        let jobs = self.jobs.load(Ordering::Relaxed) + 1;
        let lates = self.late.load(Ordering::Relaxed) + late as u32;
        if jobs < LATE_WINDOW {
            self.jobs.store(jobs, Ordering::Relaxed);
            self.late.store(lates, Ordering::Relaxed);
            return;
        }
        self.jobs.store(0, Ordering::Relaxed);
        self.late.store(0, Ordering::Relaxed);
        if lates >= LATE_LIMIT {
            self.solo_left.store(SOLO_JOBS, Ordering::Relaxed);
        }
    }
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
            task: Padded(AtomicPtr::new(std::ptr::null_mut())),
            generation: Padded(AtomicUsize::new(0)),
            next: Padded(AtomicUsize::new(0)),
            done: Padded(AtomicUsize::new(0)),
            active: Padded(AtomicUsize::new(0)),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            #[cfg(test)]
            gate: tests::Gate::default(),
        });
        let n = threads.max(1);
        let workers = (1..n)
            .map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("lorafold-{index}"))
                    .spawn(move || worker(&shared, index))
                    .expect("spawning a worker thread")
            })
            .collect();
        WorkerPool {
            shared,
            workers,
            pace: Pace::default(),
        }
    }

    /// Jobs the caller ran alone because the workers kept coming late.
    pub fn solo_jobs(&self) -> u64 {
        self.pace.solo_total.load(Ordering::Relaxed)
    }

    /// Threads that run each job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Run `job(range, thread)` over chunks of `0..len` that together cover
    /// it once, each starting at a multiple of `align`, on whichever threads
    /// come (the caller is thread 0; `thread` is below [`Self::threads`]),
    /// and return when all are done. A panic in a chunk is re-raised here.
    pub fn run_chunks(&self, len: usize, align: usize, job: &(dyn Fn(Range<usize>, usize) + Sync)) {
        let n = self.threads();
        let units = len.div_ceil(align.max(1));
        // A whole unit per chunk at least: tiny jobs are not split finer
        // than the caller can bear.
        let per = units.div_ceil(n * CHUNKS_PER_THREAD).max(1);
        let chunks = units.div_ceil(per);
        if chunks <= 1 || n == 1 || self.pace.solo() {
            if len > 0 {
                job(0..len, 0);
            }
            return;
        }
        let shared = &*self.shared;
        // SAFETY: workers dereference the erased job only between loading
        // `task` and decrementing `active`, and this function nulls `task`
        // and waits for `active` to reach zero before returning.
        let job: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        let task = Task {
            job,
            len,
            size: per * align.max(1),
            chunks,
        };
        // No worker touches these now: the last job ended with `active` at
        // zero, and a worker registers before it claims.
        shared.next.store(0, Ordering::Relaxed);
        shared.done.store(0, Ordering::Relaxed);
        shared
            .task
            .store(&task as *const Task as *mut Task<'static>, Ordering::SeqCst);
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if shared.parked.load(Ordering::SeqCst) > 0 {
            let _lock = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            shared.wake.notify_all();
        }
        let start = std::time::Instant::now();
        let (mine, panic) = task.claim(&shared.next, 0);
        let worked = start.elapsed();
        // Every chunk is claimed; wait for those still running elsewhere.
        wait(|| shared.done.load(Ordering::Acquire) + mine == chunks);
        self.pace
            .record(mine == chunks || start.elapsed() > worked * 2);
        // SeqCst on both sides: either a worker's registration is seen here,
        // or that worker sees the null.
        shared.task.store(std::ptr::null_mut(), Ordering::SeqCst);
        wait(|| shared.active.load(Ordering::SeqCst) == 0);
        if let Some(p) = panic {
            std::panic::resume_unwind(p);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a worker thread panicked");
        }
    }
}

/// Spin briefly until `ready`, then yield the core between checks: on a busy
/// machine the thread we wait for may need it.
fn wait(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        if spins < WAIT_SPINS {
            spins += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0usize;
    loop {
        // Wait for a new generation: spin, yield, then park.
        let mut spins = 0u32;
        let generation = loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen || shared.stop.load(Ordering::Acquire) {
                break g;
            }
            if spins < SPIN_ITERATIONS + YIELD_ITERATIONS {
                spins += 1;
                if spins <= SPIN_ITERATIONS {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            let mut lock = shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            // SeqCst, as the caller's bump and load: either it sees us
            // parked and notifies under the lock, or we see its bump.
            shared.parked.fetch_add(1, Ordering::SeqCst);
            while shared.generation.load(Ordering::SeqCst) == seen
                && !shared.stop.load(Ordering::Acquire)
            {
                lock = shared.wake.wait(lock).unwrap_or_else(|p| p.into_inner());
            }
            shared.parked.fetch_sub(1, Ordering::SeqCst);
        };
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        seen = generation;
        #[cfg(test)]
        shared.gate.pass(index);
        shared.active.fetch_add(1, Ordering::SeqCst);
        let task = shared.task.load(Ordering::SeqCst);
        if !task.is_null() {
            // SAFETY: non-null while we are counted in `active`, so the
            // caller is still inside `run_chunks` (this job's or a later
            // one's) and the task lives.
            let (finished, panic) = unsafe { &*task }.claim(&shared.next, index);
            if panic.is_some() {
                shared.panicked.store(true, Ordering::Release);
            }
            shared.done.fetch_add(finished, Ordering::Release);
        }
        shared.active.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _lock = self.shared.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        #[cfg(test)]
        self.shared.gate.open();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Holds one worker between seeing a job and registering for it, as a
    /// scheduler that never runs that thread would.
    #[derive(Default)]
    pub(super) struct Gate {
        /// The worker held, and how many times a worker arrived held.
        state: Mutex<(Option<usize>, usize)>,
        opened: Condvar,
    }

    impl Gate {
        pub(super) fn pass(&self, index: usize) {
            let mut s = self.state.lock().unwrap();
            if s.0 == Some(index) {
                s.1 += 1;
                self.opened.notify_all();
            }
            while s.0 == Some(index) {
                s = self.opened.wait(s).unwrap();
            }
        }

        fn hold(&self, index: usize) {
            self.state.lock().unwrap().0 = Some(index);
        }

        pub(super) fn open(&self) {
            self.state.lock().unwrap().0 = None;
            self.opened.notify_all();
        }

        /// Block until the held worker has arrived at the gate.
        fn arrived(&self) {
            let mut s = self.state.lock().unwrap();
            while s.1 == 0 {
                s = self.opened.wait(s).unwrap();
            }
        }
    }

    /// Run `f` on a thread and fail (instead of hanging) if it has not
    /// finished in a minute: the designs these tests rule out deadlock.
    fn watchdog(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(()) => t.join().unwrap(),
            // The thread panicked: re-raise its panic.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(t.join().unwrap_err())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the pool hung"),
        }
    }

    /// Count, per element, how many times a job touched it.
    fn cover(pool: &WorkerPool, len: usize, align: usize) -> Vec<usize> {
        let hits: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
        pool.run_chunks(len, align, &|r, thread| {
            assert!(thread < pool.threads());
            assert!(r.start.is_multiple_of(align) && r.start < r.end && r.end <= len);
            for h in &hits[r] {
                h.fetch_add(1, Ordering::Relaxed);
            }
        });
        hits.into_iter().map(|h| h.into_inner()).collect()
    }

    #[test]
    fn every_element_is_processed_once() {
        watchdog(|| {
            for threads in 1..=4 {
                let pool = WorkerPool::new(threads);
                for (len, align) in [
                    (0, 1),
                    (0, 16),
                    (1, 1),
                    (5, 4),
                    (17, 16),
                    (576, 16),
                    (1000, 16),
                    (49157, 16),
                    (9, 1),
                    (3, 1),
                ] {
                    for round in 0..20 {
                        let hits = cover(&pool, len, align);
                        assert!(
                            hits.iter().all(|&h| h == 1),
                            "{threads} threads, {len} by {align}, round {round}"
                        );
                    }
                }
            }
        });
    }

    #[test]
    fn many_small_jobs_in_a_row() {
        watchdog(|| {
            let pool = WorkerPool::new(3);
            let sum = AtomicUsize::new(0);
            for _ in 0..20_000 {
                pool.run_chunks(64, 1, &|r, _| {
                    sum.fetch_add(r.len(), Ordering::Relaxed);
                });
            }
            assert_eq!(sum.into_inner(), 64 * 20_000);
        });
    }

    #[test]
    fn a_panic_in_the_callers_chunk_reaches_the_caller() {
        watchdog(|| {
            let pool = WorkerPool::new(2);
            // Workers hold their chunk until the caller has run one, so the
            // caller gets one and panics in it.
            let caller_ran = AtomicBool::new(false);
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run_chunks(64, 1, &|_, thread| {
                    if thread == 0 {
                        caller_ran.store(true, Ordering::Release);
                        panic!("boom {thread}");
                    }
                    while !caller_ran.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                })
            }));
            let p = r.unwrap_err();
            assert_eq!(
                p.downcast_ref::<String>().map(|s| s.as_str()),
                Some("boom 0")
            );
            assert!(cover(&pool, 100, 1).iter().all(|&h| h == 1));
        });
    }

    #[test]
    fn a_worker_panic_reaches_the_caller() {
        watchdog(|| {
            let pool = WorkerPool::new(2);
            // Two chunks: the caller holds one until a worker has taken the
            // other, so the panic is a worker's.
            let worker_ran = AtomicBool::new(false);
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run_chunks(2, 1, &|_, thread| {
                    if thread == 0 {
                        while !worker_ran.load(Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                    } else {
                        worker_ran.store(true, Ordering::Release);
                        panic!("worker {thread} fails");
                    }
                })
            }));
            assert!(r.is_err());
            // The pool still works afterwards.
            assert!(cover(&pool, 100, 1).iter().all(|&h| h == 1));
        });
    }

    /// A worker that never comes sends the jobs to the caller alone, a
    /// window of late jobs at a time, and the workers are tried again after
    /// each run of solo jobs.
    #[test]
    fn the_caller_runs_alone_while_its_workers_come_late() {
        watchdog(|| {
            let pool = WorkerPool::new(2);
            pool.shared.gate.hold(1);
            let jobs = 1000u32;
            for j in 0..jobs {
                pool.run_chunks(1000, 16, &|_, thread| assert_eq!(thread, 0));
                if j == 0 {
                    pool.shared.gate.arrived();
                }
            }
            // Windows of LATE_WINDOW late jobs, each followed by SOLO_JOBS alone.
            let (mut solo, mut at) = (0, 0);
            while at < jobs {
                at += LATE_WINDOW;
                let run = SOLO_JOBS.min(jobs.saturating_sub(at));
                solo += run;
                at += run;
            }
            assert_eq!(pool.solo_jobs(), solo as u64);
            pool.shared.gate.open();
        });
    }

    /// One worker never gets to run during many jobs (a descheduled thread
    /// on a busy machine): the others finish every job without it, and
    /// when it comes back it does not touch the jobs that are gone. A pool
    /// whose jobs wait for every thread hangs here.
    #[test]
    fn jobs_finish_while_a_worker_sleeps() {
        for threads in [2, 3] {
            watchdog(move || {
                let pool = WorkerPool::new(threads);
                pool.shared.gate.hold(1);
                let by_thread: Vec<AtomicUsize> =
                    (0..threads).map(|_| AtomicUsize::new(0)).collect();
                let count = |r: Range<usize>, thread: usize| {
                    by_thread[thread].fetch_add(r.len(), Ordering::Relaxed);
                };
                let (jobs, len) = (500, 1000);
                for j in 0..jobs {
                    pool.run_chunks(len, 16, &count);
                    if j == 0 {
                        // Every later job runs with worker 1 known held.
                        pool.shared.gate.arrived();
                    }
                }
                let held: Vec<usize> = by_thread
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect();
                assert_eq!(held.iter().sum::<usize>(), jobs * len);
                assert_eq!(held[1], 0, "the held worker ran chunks: {held:?}");
                // Let it go; it must find no job (or a live one) and rejoin.
                pool.shared.gate.open();
                // The caller went solo meanwhile (it ran every chunk): this
                // job needs the workers.
                pool.pace.solo_left.store(0, Ordering::Relaxed);
                // The other threads each hold one chunk until worker 1 has
                // run one, so it gets this job whoever is faster.
                let after = AtomicBool::new(false);
                pool.run_chunks(len, 16, &|_, thread| {
                    if thread == 1 {
                        after.store(true, Ordering::Release);
                    }
                    while !after.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                });
                // It has run a new job, so it is past its stale one, which
                // it did not run.
                assert_eq!(by_thread[1].load(Ordering::Relaxed), 0);
                assert!(cover(&pool, len, 16).iter().all(|&h| h == 1));
            });
        }
    }
}
