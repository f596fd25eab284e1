//! A bound on the requests one connection has in flight, in place of ntex-mqtt 9.0's own
//! `InFlightService`, which does not bound whole publishes.
//!
//! ntex-mqtt's limiter lets every request through while its "publish" flag is set, so
//! that payload chunks of a streamed publish are never held behind the limit. The flag is
//! set by every publish and cleared only by the next non-chunk request, which sets it again
//! if that is a publish too: back-to-back publishes never meet the limit. A device sending
//! QoS 0 (or MQTT 3.1.1 QoS 1 with a large window) as fast as it can made Ferrule hold
//! every publish it had read (a boxed handler future of ~3.5 KiB plus the message each):
//! 1.7 GB of RSS in 3 s in `bench.py --only qos0`, and over half of the CPU spent faulting
//! in fresh pages (BENCHMARKS.md, "Performance round 2").
//!
//! This limiter counts every request except payload chunks, and `ready` waits while the
//! connection has `max` requests or `max_bytes` bytes in flight: the dispatcher stops
//! reading, TCP pushes back on the device. Chunks are never produced here (the server
//! sets the codec's minimum chunk size to its maximum packet size, so a publish arrives
//! whole), which is what makes it safe to hold the next request without knowing whether it
//! is a chunk.
//!
//! It also keeps requests from reaching ntex-mqtt's dispatcher once the connection is
//! shutting down. ntex-mqtt 9.0 spawns the handler call of every request decoded while an
//! earlier one is still running, and polls it only later; when the same read ends the
//! connection (a malformed packet after a burst of QoS 1 publishes, a DISCONNECT, a peer
//! gone), the dispatcher shuts its services down first, and each late call's readiness
//! check then met a shut-down pipeline: ntex-service panics ("Pipeline is shutding down"),
//! one panic and backtrace per request (tests/hostile, `test_mqtt_burst_ending_in_garbage`).
//! Such a call now waits instead, and ntex-mqtt drops it when its shutdown completes; the
//! request was never answered, so nothing acknowledged is lost.

use std::cell::Cell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::Poll;

use ntex_mqtt::SizedRequest;
use ntex_service::{Ctx, Middleware, Service};
use ntex_util::task::LocalWaker;

/// The middleware: one [`InFlightLimit`] per connection.
#[derive(Clone, Copy, Debug)]
pub(super) struct InFlight {
    /// Requests in flight at most.
    pub(super) max: u16,
    /// Bytes (of packets) in flight at most; one larger packet may still pass alone.
    pub(super) max_bytes: usize,
}

impl<S, St> Middleware<S, St> for InFlight {
    type Service = InFlightLimit<S>;

    fn create(&self, _: &St, service: S) -> Self::Service {
        InFlightLimit {
            service,
            counts: Rc::new(Counts {
                max: self.max.max(1),
                max_bytes: self.max_bytes,
                requests: Cell::new(0),
                bytes: Cell::new(0),
                waker: LocalWaker::new(),
                closing: Cell::new(false),
            }),
        }
    }
}

struct Counts {
    max: u16,
    max_bytes: usize,
    requests: Cell<u16>,
    bytes: Cell<usize>,
    waker: LocalWaker,
    /// Set when the connection's services begin to shut down.
    closing: Cell<bool>,
}

impl Counts {
    fn room(&self) -> bool {
        // `max_bytes` is at least 1 KiB (config), so a connection with nothing in flight
        // always has room: one packet larger than the bound still passes alone.
        self.requests.get() < self.max && self.bytes.get() < self.max_bytes
    }
}

/// Releases a request's place when its handler ends, however it ends.
struct Place {
    counts: Rc<Counts>,
    size: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        let c = &self.counts;
        c.requests.set(c.requests.get().saturating_sub(1));
        c.bytes.set(c.bytes.get().saturating_sub(self.size));
        c.waker.wake();
    }
}

/// The per-connection service: see the module documentation.
pub(super) struct InFlightLimit<S> {
    service: S,
    counts: Rc<Counts>,
}

impl<S, St, Req> Service<St, Req> for InFlightLimit<S>
where
    S: Service<St, Req>,
    Req: SizedRequest + 'static,
{
    type Res = S::Res;
    type Error = S::Error;

    async fn ready(&self, ctx: Ctx<'_, Self, St>) -> Result<(), S::Error> {
        // One thread (`Rc`, `Cell`): nothing is released between the check and the
        // registration.
        poll_fn(|cx| {
            if self.counts.room() {
                Poll::Ready(())
            } else {
                self.counts.waker.register(cx.waker());
                Poll::Pending
            }
        })
        .await;
        ctx.ready(&self.service).await
    }

    async fn call(&self, req: Req, ctx: Ctx<'_, Self, St>) -> Result<S::Res, S::Error> {
        if self.counts.closing.get() {
            // See the module documentation: ntex-mqtt ends this call when it stops.
            return std::future::pending().await;
        }
        let _place = if req.is_chunk() {
            None
        } else {
            let size = req.size() as usize;
            let c = &self.counts;
            c.requests.set(c.requests.get().saturating_add(1));
            c.bytes.set(c.bytes.get().saturating_add(size));
            Some(Place { counts: c.clone(), size })
        };
        ctx.call(&self.service, req).await
    }

    async fn shutdown(&self, ctx: Ctx<'_, Self, St>) {
        self.counts.closing.set(true);
        ctx.shutdown(&self.service).await;
    }
}
