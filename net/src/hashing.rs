//! One bounded pool for password verification and hashing, shared by everything that
//! checks a password: device logins (registry), management writes (hashing new
//! secrets) and AMQP application logins (SASL PLAIN).
//!
//! At most `size` jobs run at once; jobs beyond that wait in one queue whose length is
//! bounded too, so a login storm on any listener is refused ("busy") instead of queueing
//! without limit or taking every core from message traffic. Async callers wait on the
//! semaphore; synchronous callers (fe2o3-amqp's SASL acceptor is synchronous) wait in
//! `block_in_place`, and at most `size` of them may wait at a time, so they cannot pin
//! the runtime's threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Jobs allowed to wait per pool slot before [`PoolError::Busy`].
pub const QUEUE_PER_SLOT: usize = 256;

/// Why a job did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Too many jobs are already waiting.
    #[error("password hashing is overloaded; retry later")]
    Busy,
    /// The pool was shut down or the job panicked.
    #[error("password hashing is unavailable")]
    Closed,
}

/// A bounded pool for CPU-heavy hashing; cheap to clone (clones share the bound).
#[derive(Clone, Debug)]
pub struct HashPool {
    permits: Arc<Semaphore>,
    /// Jobs waiting or running.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    /// Synchronous callers waiting or running (each holds a thread while it waits).
    blocking: Arc<AtomicUsize>,
    max_blocking: usize,
}

/// Decrements its counter when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place under `max`, or `None` if all are taken.
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        let slot = Self(counter.clone());
        (counter.fetch_add(1, Ordering::AcqRel) < max).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HashPool {
    /// A pool running at most `size` (at least 1) jobs at once, with up to
    /// [`QUEUE_PER_SLOT`] × `size` waiting.
    pub fn new(size: usize) -> Self {
        Self::with_queue(size, size.max(1) * QUEUE_PER_SLOT)
    }

    /// A pool running at most `size` jobs at once with at most `max_queued` jobs waiting
    /// or running.
    pub fn with_queue(size: usize, max_queued: usize) -> Self {
        let size = size.max(1);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued: max_queued.max(size),
            blocking: Arc::new(AtomicUsize::new(0)),
            max_blocking: size,
        }
    }

    /// Jobs that may run at once.
    pub fn size(&self) -> usize {
        self.max_blocking
    }

    /// Jobs waiting or running now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Runs `f` on a blocking thread once a permit is free.
    ///
    /// # Cancel safety
    /// Cancelling while waiting for a permit is safe; once started, `f` runs to the end
    /// even if the caller goes away (its permit is released when it finishes).
    ///
    /// # Errors
    /// [`PoolError::Busy`] if too many jobs are queued; [`PoolError::Closed`] if `f`
    /// panicked.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let slot = self.enter()?;
        let permit = self.permits.clone().acquire_owned().await.map_err(|_| PoolError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(permit);
            drop(slot);
            r
        })
        .await
        .map_err(|_| PoolError::Closed)
    }

    /// Runs `f` on the calling thread once a permit is free, for synchronous callers
    /// inside the runtime. On a multi-threaded runtime the wait and the work happen in
    /// `block_in_place`, so the worker's other tasks move elsewhere; elsewhere (a
    /// current-thread runtime or no runtime) only a free permit is taken, never waited for.
    ///
    /// # Errors
    /// [`PoolError::Busy`] if too many jobs are queued, `size` synchronous callers are
    /// already waiting, or (without a multi-threaded runtime) no permit is free.
    pub fn run_blocking<R>(&self, f: impl FnOnce() -> R) -> Result<R, PoolError> {
        let _slot = self.enter()?;
        let _blocking = Slot::take(&self.blocking, self.max_blocking).ok_or(PoolError::Busy)?;
        if let Ok(permit) = self.permits.try_acquire() {
            let run = || {
                let r = f();
                drop(permit);
                r
            };
            return Ok(match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(run)
                }
                _ => run(),
            });
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    let permit =
                        handle.block_on(self.permits.acquire()).map_err(|_| PoolError::Closed)?;
                    let r = f();
                    drop(permit);
                    Ok(r)
                })
            }
            _ => Err(PoolError::Busy),
        }
    }

    fn enter(&self) -> Result<Slot, PoolError> {
        match Slot::take(&self.queued, self.max_queued) {
            Some(slot) => Ok(slot),
            None => {
                metrics::counter!("ferrule_hash_pool_refused_total").increment(1);
                Err(PoolError::Busy)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn refuses_when_queue_is_full() {
        let pool = HashPool::with_queue(1, 2);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let mut held = Vec::new();
        for _ in 0..2 {
            let (p, r) = (pool.clone(), rx.clone());
            held.push(tokio::spawn(
                async move { p.run(move || r.lock().unwrap().recv().ok()).await },
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.run(|| ()).await, Err(PoolError::Busy));
        assert_eq!(pool.run_blocking(|| ()), Err(PoolError::Busy));
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        for h in held {
            assert_eq!(h.await.unwrap(), Ok(Some(())));
        }
        assert_eq!(pool.run(|| 7).await, Ok(7));
        assert_eq!(pool.queued(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sync_callers_share_the_bound_with_async_ones() {
        let pool = HashPool::new(1);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let job = |running: Arc<AtomicUsize>, most: Arc<AtomicUsize>| {
            move || {
                let now = running.fetch_add(1, Ordering::AcqRel) + 1;
                most.fetch_max(now, Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::AcqRel);
            }
        };
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (p, j) = (pool.clone(), job(running.clone(), most.clone()));
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    p.run(j).await
                } else {
                    p.run_blocking(j)
                }
            }));
        }
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => {}
                Err(PoolError::Busy) => busy += 1, // a second synchronous waiter
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(most.load(Ordering::Acquire), 1, "never more than one job at once");
        assert!(busy < 3, "async jobs queue rather than fail");
        assert_eq!(pool.queued(), 0);
    }
}
