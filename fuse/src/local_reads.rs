//! The threads that answer reads of bytes held locally ([`LayerSource::read_local`]), shared
//! by every mount of the process. Their number is fixed, so the memory reads hold at once is
//! bounded by it times the largest read (1 MiB), whatever the readers do: the kernel keeps up
//! to [`MAX_BACKGROUND`](crate::fs) readahead requests in flight per mount, and a thread for
//! each (as a general-purpose blocking pool would start) would hold a buffer each and leave
//! the allocator's per-thread arenas behind. Each thread keeps one [`ReadBuf`] for every read
//! it answers. Waiting reads queue as small closures.
//!
//! [`LayerSource::read_local`]: crate::LayerSource::read_local

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::ReadBuf;

/// A read to answer, given the running thread's buffer.
pub(crate) type Job = Box<dyn FnOnce(&mut ReadBuf) + Send + 'static>;

/// Threads reading local bytes, at most: the disk and the copy into the reply are the work,
/// and more threads than cores only add buffers.
const MAX_THREADS: usize = 8;

static POOL: OnceLock<Option<Sender<Job>>> = OnceLock::new();

/// Runs `job` on one of the local-read threads; `Err(job)` when none could be started (the
/// caller then runs it elsewhere).
pub(crate) fn submit(job: Job) -> Result<(), Job> {
    match POOL.get_or_init(start) {
        Some(sender) => sender.send(job).map_err(|refused| refused.0),
        None => Err(job),
    }
}

fn start() -> Option<Sender<Job>> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(2, MAX_THREADS);
    let (sender, receiver) = channel::<Job>();
    let receiver = Arc::new(Mutex::new(receiver));
    let mut started = 0;
    for i in 0..threads {
        let receiver = Arc::clone(&receiver);
        let spawned = std::thread::Builder::new()
            .name(format!("fuse-local-read-{i}"))
            .spawn(move || work(&receiver));
        if spawned.is_ok() {
            started += 1;
        }
    }
    (started > 0).then_some(sender)
}

fn work(receiver: &Mutex<Receiver<Job>>) {
    let mut buf = ReadBuf::new();
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        match job {
            // A job that panics has dropped its reply, which answers EIO; the thread lives on.
            Ok(job) => drop(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                || {
                    job(&mut buf);
                },
            ))),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn runs_every_job_on_a_bounded_set_of_threads() {
        let names = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let done = Arc::new(AtomicUsize::new(0));
        let all = Arc::new(Barrier::new(2));
        for i in 0..200 {
            let (names, done, all) = (names.clone(), done.clone(), all.clone());
            let job = move |_: &mut ReadBuf| {
                let name = std::thread::current().name().map(str::to_owned);
                names
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name);
                if done.fetch_add(1, Ordering::SeqCst) == 199 {
                    all.wait();
                }
            };
            assert!(submit(Box::new(job)).is_ok(), "job {i} refused");
        }
        all.wait();
        assert_eq!(done.load(Ordering::SeqCst), 200);
        let names = names.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(
            names.len() <= MAX_THREADS,
            "{} threads ran jobs",
            names.len()
        );
        assert!(names.iter().all(|n| n
            .as_deref()
            .is_some_and(|n| n.starts_with("fuse-local-read-"))));
    }
}
