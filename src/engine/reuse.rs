//! The `auto` reuse fallback: some guests (componentize-js ones, for
//! example) answer only the first request of an instance. When a request
//! fails on a reused instance, reuse is switched off and the request is
//! retried once on a fresh instance, if its body can still be replayed; if
//! the fresh instance answers, reuse stays off for the component.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi_http::WasiBody;

/// Whether instances may take another request. Workers read it in
/// `should_accept_request`; the pool writes it.
#[derive(Debug, Default)]
pub(crate) struct ReuseSwitch {
    /// Set while a suspected reuse failure is being retried, and for good
    /// once `confirmed`.
    off: AtomicBool,
    /// A fresh instance answered what a reused one failed.
    confirmed: AtomicBool,
}

impl ReuseSwitch {
    pub(crate) fn is_off(&self) -> bool {
        self.off.load(Relaxed)
    }

    pub(crate) fn is_confirmed(&self) -> bool {
        self.confirmed.load(Relaxed)
    }

    /// Stops reuse while a retry tells whether reuse is to blame.
    pub(crate) fn suspect(&self) {
        self.off.store(true, Relaxed);
    }

    /// The retry failed too: the guest fails either way, reuse is not to
    /// blame (unless another retry proved otherwise meanwhile).
    pub(crate) fn acquit(&self) {
        if !self.confirmed.load(Relaxed) {
            self.off.store(false, Relaxed);
        }
    }

    /// The retry succeeded. Returns true the first time.
    pub(crate) fn confirm(&self) -> bool {
        self.off.store(true, Relaxed);
        !self.confirmed.swap(true, Relaxed)
    }
}

/// A request body that can be taken back for a retry as long as the guest
/// has not received any of it.
pub(crate) struct ReplayableBody {
    shared: Arc<Replay>,
}

/// The caller's handle on a [`ReplayableBody`].
pub(crate) struct Replay {
    body: Mutex<Option<WasiBody>>,
    /// Some frame (data, trailers or an error) reached the guest.
    consumed: AtomicBool,
    end_stream: bool,
}

impl ReplayableBody {
    pub(crate) fn wrap(body: WasiBody) -> (WasiBody, Arc<Replay>) {
        use http_body_util::BodyExt as _;
        let shared = Arc::new(Replay {
            end_stream: http_body::Body::is_end_stream(&body),
            body: Mutex::new(Some(body)),
            consumed: AtomicBool::new(false),
        });
        let wrapper = ReplayableBody {
            shared: shared.clone(),
        };
        (wrapper.boxed_unsync(), shared)
    }
}

impl Replay {
    /// The body again, for a retry: an empty one if the request had none,
    /// the untouched original if the guest never got a frame of it, else
    /// `None` (the request cannot be replayed).
    pub(crate) fn take(&self) -> Option<WasiBody> {
        if self.end_stream {
            return Some(crate::engine::pool::empty_body());
        }
        if self.consumed.load(Relaxed) {
            return None;
        }
        self.body.lock().ok()?.take()
    }
}

impl http_body::Body for ReplayableBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let Ok(mut slot) = self.shared.body.lock() else {
            return Poll::Ready(None);
        };
        let Some(body) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        if let Poll::Ready(Some(_)) = &polled {
            self.shared.consumed.store(true, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.shared.end_stream
            || self
                .shared
                .body
                .lock()
                .map(|b| b.as_ref().is_none_or(|b| b.is_end_stream()))
                .unwrap_or(true)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.shared
            .body
            .lock()
            .ok()
            .and_then(|b| b.as_ref().map(|b| b.size_hint()))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn full(data: &'static [u8]) -> WasiBody {
        http_body_util::Full::new(Bytes::from_static(data))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    #[tokio::test]
    async fn an_unread_body_is_given_back_whole() {
        let (body, replay) = ReplayableBody::wrap(full(b"abc"));
        drop(body);
        let again = replay.take().expect("replayable");
        assert_eq!(&again.collect().await.unwrap().to_bytes()[..], b"abc");
    }

    #[tokio::test]
    async fn a_body_the_guest_read_is_not_replayed() {
        let (mut body, replay) = ReplayableBody::wrap(full(b"abc"));
        assert!(body.frame().await.is_some());
        assert!(replay.take().is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_always_replayable() {
        let (body, replay) = ReplayableBody::wrap(crate::engine::pool::empty_body());
        assert!(http_body::Body::is_end_stream(&body));
        let again = replay.take().expect("replayable");
        assert!(again.collect().await.unwrap().to_bytes().is_empty());
    }

    #[test]
    fn the_switch_stays_off_once_confirmed() {
        let s = ReuseSwitch::default();
        s.suspect();
        assert!(s.is_off());
        s.acquit();
        assert!(!s.is_off());
        s.suspect();
        assert!(s.confirm());
        assert!(!s.confirm(), "confirm reports only the first time");
        s.acquit();
        assert!(s.is_off() && s.is_confirmed());
    }
}
