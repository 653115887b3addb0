//! Running a pushed request on the pushing thread (`wasmpool_config_set_inline`).
//!
//! A host with its own event loop (nginx) pushes a request and gets its
//! callback from `wasmpool_handler_poll` on the same thread. Handing every
//! request to an engine thread and back costs two thread wake-ups (a futex
//! and the completion fd), and on a small guest those cost more than the
//! guest. Here the push polls the request's future itself, under the
//! runtime's context, until it completes or has to wait for something
//! (an instance, the request body, outbound I/O, a guest that yielded at an
//! epoch tick): only then is it handed to the engine threads, which poll it
//! from there on. A short request never leaves the host's thread.
//!
//! Invariant: the future is polled by exactly one thread at a time (here
//! until [`run`] returns, then by the runtime), and the runtime always
//! polls it once after the hand-over, so a wake-up sent to the waker used
//! here before the hand-over is not lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

/// The longest a push keeps polling a request that woke itself (a guest
/// that yields at an epoch tick, a task that yields to others): past it
/// the request goes to the engine threads, so a busy guest holds the
/// host's thread for at most about one epoch tick.
pub(crate) const SLICE: Duration = Duration::from_millis(1);

pub(crate) type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Set when the future asked to be polled again.
struct Woken(AtomicBool);

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// Polls `task` on this thread until it completes, waits for something
/// else, or has run [`SLICE`]; hands what is left to `rt`. A panic in the
/// task stays here: the unwinding drops what the task held (its drop
/// guards see `std::thread::panicking()`, as on a runtime thread), and the
/// caller goes on.
pub(crate) fn run(rt: &tokio::runtime::Handle, mut task: Task) {
    let _in = rt.enter();
    let woken = Arc::new(Woken(AtomicBool::new(false)));
    let waker = Waker::from(woken.clone());
    let mut cx = Context::from_waker(&waker);
    let start = Instant::now();
    loop {
        woken.0.store(false, Ordering::Relaxed);
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.as_mut().poll(&mut cx)));
        match polled {
            Ok(std::task::Poll::Ready(())) => return,
            Ok(std::task::Poll::Pending) => {}
            Err(_) => return,
        }
        if !woken.0.load(Ordering::Acquire) || start.elapsed() >= SLICE {
            break;
        }
    }
    rt.spawn(task);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_ready_task_completes_on_this_thread() {
        let rt = runtime();
        let here = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        run(
            rt.handle(),
            Box::pin(async move {
                tokio::task::yield_now().await; // woke itself: polled again here
                tx.send(std::thread::current().id()).unwrap();
            }),
        );
        assert_eq!(rx.try_recv().unwrap(), here);
    }

    #[test]
    fn a_waiting_task_goes_to_the_runtime_and_completes_there() {
        let rt = runtime();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let polls = Arc::new(AtomicUsize::new(0));
        let p = polls.clone();
        run(
            rt.handle(),
            Box::pin(async move {
                p.fetch_add(1, Ordering::Relaxed);
                wait.await.unwrap();
                tx.send(std::thread::current().id()).unwrap();
            }),
        );
        assert!(rx.try_recv().is_err(), "it must wait for the signal");
        go.send(()).unwrap();
        let there = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(there, std::thread::current().id());
    }

    #[test]
    fn a_task_that_keeps_yielding_is_handed_over_after_the_slice() {
        let rt = runtime();
        let (tx, rx) = std::sync::mpsc::channel();
        let started = Instant::now();
        run(
            rt.handle(),
            Box::pin(async move {
                let t = Instant::now();
                while t.elapsed() < SLICE * 20 {
                    tokio::task::yield_now().await;
                }
                tx.send(std::thread::current().id()).unwrap();
            }),
        );
        assert!(started.elapsed() < SLICE * 10, "{:?}", started.elapsed());
        let there = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_ne!(there, std::thread::current().id());
    }

    #[test]
    fn a_panic_drops_the_task_as_panicked_and_stays_here() {
        struct Guard(std::sync::mpsc::Sender<bool>);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.send(std::thread::panicking());
            }
        }
        let rt = runtime();
        let (tx, rx) = std::sync::mpsc::channel();
        run(
            rt.handle(),
            Box::pin(async move {
                let _g = Guard(tx);
                panic!("boom");
            }),
        );
        // The guard went with the unwinding (panicking() was true then).
        assert!(rx.try_recv().unwrap());
        assert!(!std::thread::panicking());
    }

    #[test]
    fn timers_and_spawns_work_under_the_runtime_context() {
        let rt = runtime();
        let (tx, rx) = std::sync::mpsc::channel();
        run(
            rt.handle(),
            Box::pin(async move {
                let inner = tokio::spawn(async { 7 });
                tokio::time::sleep(Duration::from_millis(5)).await;
                tx.send(inner.await.unwrap()).unwrap();
            }),
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 7);
    }
}
