//! The HTTP path: ports whose protocol is `http`, `http2` or `grpc` are routed per
//! request, not per connection.
//!
//! - `egress`: the import listener terminates HTTP/1.1 and h2 (prior knowledge, or an
//!   HTTP/1.1 `Upgrade: h2c`, [`h2c`]) with hyper, picks a site for each request, and sends it over a few h2 connections per
//!   (site, caller), each inside a tunnel stream (QUIC or h2 CONNECT: the same open,
//!   the same decision at the far side). A request that was not sent, or an idempotent
//!   one answered 502–504 or lost, is tried again at the next site, within a retry
//!   budget. A WebSocket handshake goes as HTTP/1.1 over a tunnel stream of its own,
//!   which carries the WebSocket's bytes after the `101`.
//! - `ingress`: the far side serves HTTP on that stream and forwards each request to an
//!   endpoint over pooled connections (a WebSocket's handshake over a connection that
//!   becomes its bytes).
//! - `decide` (pure): retry eligibility, the retry budget, outlier ejection; `headers` (pure): what
//!   changes at each hop; `io`: a tunnel stream as a byte stream for hyper, and an
//!   upgraded connection's copy.
//!
//! A client connection holds its slot among the import listeners' clients
//! ([`ClientHold`]) until it, and what it was upgraded to (h2c, a WebSocket), ends.
//!
//! Errors a gateway answers itself carry `meshfed-error: <stable code>` (the refusal
//! codes of the wire protocol, and `endpoint_reset`, `unsupported_protocol`) and the reason as the
//! body; the same code is the metric label.

pub mod decide;
pub mod egress;
pub mod h2c;
pub mod headers;
pub mod ingress;
pub mod io;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;

/// The body type both halves pass on: streamed from the other side, or buffered.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header carrying the code of an error a gateway answered itself.
pub const ERROR_HEADER: &str = "meshfed-error";
/// A request the endpoint connection lost after it was sent.
pub const ENDPOINT_RESET: &str = "endpoint_reset";
/// An h2 extended CONNECT (RFC 8441) for a protocol other than `websocket`.
pub const UNSUPPORTED_PROTOCOL: &str = "unsupported_protocol";

/// How long a client has to send a request's headers (HTTP/1.1), and how often an idle h2
/// connection is pinged; a client that sends its headers a byte at a time is cut, so an
/// unauthenticated connection holds its buffer for a bounded time.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Requests in flight on one connection, and when the last one ended: what its idle
/// timeout looks at; and how many of its requests the client reset prematurely, which
/// can cut it ([`decide::too_many_premature_resets`]). Clones share the counts (one
/// `Arc`: a mark per request clones it).
#[derive(Clone)]
pub(crate) struct Activity(Arc<Counts>);

struct Counts {
    busy: AtomicU32,
    /// ms since `start`.
    last_used: AtomicU64,
    start: std::time::Instant,
    /// Requests ended, and those of them reset prematurely.
    ended: AtomicU64,
    premature: AtomicU64,
    /// Given a permit once the premature resets are too many.
    abusive: tokio::sync::Notify,
}

/// One request in flight on a connection ([`Activity::mark`]), until dropped: carried in
/// its answer's body ([`Marked`]) until that has been sent. Dropped before
/// [`Busy::answered`] and within [`decide::PREMATURE_RESET_WITHIN`] of its start, it
/// counts as a premature reset (the client gave up on it).
pub(crate) struct Busy {
    activity: Activity,
    /// ms since the activity's start.
    started: u64,
    answered: bool,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Counts {
            busy: AtomicU32::new(0),
            last_used: AtomicU64::new(0),
            start: std::time::Instant::now(),
            ended: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            abusive: tokio::sync::Notify::new(),
        }))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request begins; it is in flight until the mark is dropped.
    pub(crate) fn mark(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::AcqRel);
        Busy {
            activity: self.clone(),
            started: self.now_ms(),
            answered: false,
        }
    }

    /// Resolves once the client has reset too many of this connection's requests
    /// prematurely ([`decide::too_many_premature_resets`]).
    pub(crate) async fn abusive(&self) {
        self.0.abusive.notified().await
    }

    /// Resolves once the connection has had no request in flight for `idle`
    /// ([`decide::idle_until`]).
    pub(crate) async fn idle_for(&self, idle: std::time::Duration) {
        loop {
            let now = self.now_ms();
            let Some(at) = decide::idle_until(
                self.0.busy.load(Ordering::Acquire),
                self.0.last_used.load(Ordering::Acquire),
                now,
                idle,
            ) else {
                return;
            };
            tokio::time::sleep(std::time::Duration::from_millis(at.saturating_sub(now))).await;
        }
    }
}

impl Busy {
    /// The connection's activity this request counts on.
    pub(crate) fn activity(&self) -> &Activity {
        &self.activity
    }

    /// The request's answer was sent whole: its end is not a reset.
    pub(crate) fn answered(&mut self) {
        self.answered = true;
    }
}

/// An answer's body carrying its request's [`Busy`] mark: the request is in flight
/// until the body has been sent, and a body dropped before its end (the client reset
/// the stream, or closed the connection) leaves the request unanswered.
pub(crate) struct Marked {
    body: Body,
    busy: Option<Busy>,
    ended: bool,
}

impl Marked {
    /// `answer` to `method`, with its request's mark. An answer that carries no body
    /// (to a HEAD, a 204 or 304, or with an empty body) is answered already: hyper may
    /// drop such a body unread.
    pub(crate) fn answer(
        answer: http::Response<Body>,
        method: &http::Method,
        mut busy: Option<Busy>,
    ) -> http::Response<Marked> {
        let status = answer.status();
        if let Some(busy) = &mut busy
            && (method == http::Method::HEAD
                || status == http::StatusCode::NO_CONTENT
                || status == http::StatusCode::NOT_MODIFIED
                || status.is_informational()
                || answer.body().is_end_stream())
        {
            busy.answered();
        }
        answer.map(|body| Marked {
            body,
            busy,
            ended: false,
        })
    }
}

impl hyper::body::Body for Marked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let frame = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(None) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Marked {
    fn drop(&mut self) {
        if let Some(mut busy) = self.busy.take()
            && (self.ended || self.body.is_end_stream())
        {
            busy.answered();
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let counts = &self.activity.0;
        let now = self.activity.now_ms();
        counts.last_used.store(now, Ordering::Release);
        counts.busy.fetch_sub(1, Ordering::AcqRel);
        let ended = counts
            .ended
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let within = u64::try_from(decide::PREMATURE_RESET_WITHIN.as_millis()).unwrap_or(0);
        if !self.answered && now.saturating_sub(self.started) < within {
            let premature = counts.premature.fetch_add(1, Ordering::Relaxed) + 1;
            if decide::too_many_premature_resets(ended, premature) {
                counts.abusive.notify_one();
            }
        }
    }
}

/// The HTTP server both halves use: HTTP/1.1 and h2 (prior knowledge), with the header
/// timeout in force (hyper applies none without a timer).
pub(crate) fn server_builder()
-> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(30));
    b
}

/// How many streams an egress's link may reset before they were accepted, waiting
/// together, before h2 cuts it. h2's default, 20, is for an unknown client; a link
/// carries many clients' requests (up to hyper's 200 at once), and cutting it fails
/// them all. More than a link's streams in flight, and still a bound on the state an
/// authenticated peer pins (× [`crate::admission::LINKS_PER_PEER`]). Each client's
/// rapid resets are cut at its egress ([`decide::too_many_premature_resets`]).
pub(crate) const LINK_RESETS_PENDING_ACCEPT: usize = 256;

/// A service whose futures are boxed. hyper moves each h2 request's future into a task
/// of its own, and a task's future is copied as it is built, spawned and finished; the
/// gateways' request futures are 5 KiB (egress) and 9 KiB (ingress), and a box is a
/// pointer (measured under h2 load: memmove fell from 9.7 % to 6.8 % of the gateways'
/// samples; CPU per request moved within the noise). On HTTP/1.1 connections, which
/// spawn no task per request, it is one allocation per request.
struct Boxed<S>(S);

impl<S, R> hyper::service::Service<R> for Boxed<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<S::Future>>;

    fn call(&self, req: R) -> Self::Future {
        Box::pin(self.0.call(req))
    }
}

/// Serves one connection with `svc` until it ends, or until `stop` (the drain), which
/// lets its requests in flight finish. A `101` the service answers hands the connection
/// over (the egress's h2c upgrade, [`h2c`]). With `idle` (a time, and the activity the
/// service marks its requests on, [`Activity::mark`]), a connection with no request in
/// flight for that long is shut down the same
/// graceful way (h2: GOAWAY, streams still open finish), and one whose client reset
/// too many requests prematurely ([`Activity::abusive`]) is cut at once, as Envoy does.
/// Without `idle` the connection is an egress's link ([`LINK_RESETS_PENDING_ACCEPT`]),
/// which ends [`Ended::PrematureResets`] only when it passes that bound.
/// With `websockets_over_h2`, h2 clients may open WebSockets (RFC 8441: the server
/// sends `SETTINGS_ENABLE_CONNECT_PROTOCOL`); the service takes them.
pub(crate) async fn serve_connection<IO, S, B>(
    io: IO,
    svc: S,
    stop: tokio_util::sync::CancellationToken,
    (idle, websockets_over_h2): (Option<(Option<std::time::Duration>, Activity)>, bool),
    what: &'static str,
) -> Ended
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
{
    let mut builder = server_builder();
    if idle.is_none() {
        // An egress's link: its resets are its clients' cancels, each client policed at
        // its egress, and arrive in bursts when this side is slow to accept.
        builder
            .http2()
            .max_pending_accept_reset_streams(LINK_RESETS_PENDING_ACCEPT);
    }
    if websockets_over_h2 {
        builder.http2().enable_connect_protocol();
    }
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), Boxed(svc));
    tokio::pin!(conn);
    let idle_for = async {
        match &idle {
            Some((Some(d), activity)) => activity.idle_for(*d).await,
            _ => std::future::pending().await,
        }
    };
    let abusive = async {
        match &idle {
            Some((_, activity)) => activity.abusive().await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        r = conn.as_mut() => {
            return match r {
                Ok(()) => Ended::Closed,
                // h2's own bound on the same attack: resets of streams not yet accepted
                // (a link's is LINK_RESETS_PENDING_ACCEPT).
                Err(e) if cut_by_h2_for_resets(&*e) => Ended::PrematureResets,
                Err(e) => {
                    tracing::debug!(error = %e, "{what} ended");
                    Ended::Closed
                }
            };
        }
        // Dropping the connection closes it: its streams are reset.
        () = abusive => return Ended::PrematureResets,
        _ = stop.cancelled() => Ended::Drained,
        _ = idle_for => {
            tracing::debug!(idle = ?idle.as_ref().map(|i| i.0), "{what} idle: closed");
            Ended::Idle
        }
    };
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
    ended
}

/// Whether a connection's error is h2 cutting it (GOAWAY `ENHANCE_YOUR_CALM`, from
/// this side) because its client reset more streams than h2 lets wait to be accepted:
/// "rapid reset" caught before [`decide::too_many_premature_resets`] could be, which
/// happens when the server is slow to accept (a loaded host). The same reason, so the
/// same count. Pure.
fn cut_by_h2_for_resets(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .filter_map(|e| e.downcast_ref::<h2::Error>())
        .any(|e| {
            e.is_go_away() && !e.is_remote() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
        })
}

/// What one client connection of an HTTP import holds while it lives: its slot among
/// the import listeners' clients ([`crate::admission::client_connections`]) and the
/// drain. What outlives the connection's first server (the h2 server after an h2c
/// upgrade, a WebSocket's bytes) runs through [`ClientHold::spawn`], and keeps the slot
/// until it ends too: an upgraded connection is still one client's descriptor.
#[derive(Clone)]
pub struct ClientHold {
    _slot: Arc<tokio::sync::OwnedSemaphorePermit>,
    drain: meshfed_lifecycle::drain::DrainWatcher,
}

impl ClientHold {
    pub fn new(
        slot: tokio::sync::OwnedSemaphorePermit,
        drain: meshfed_lifecycle::drain::DrainWatcher,
    ) -> Self {
        Self {
            _slot: Arc::new(slot),
            drain,
        }
    }

    /// The drain's start, for the connection's graceful shutdown.
    pub(crate) fn stop(&self) -> tokio_util::sync::CancellationToken {
        self.drain.token()
    }

    /// Runs `fut` as work the drain waits for, holding the client's slot until it ends.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let hold = self.clone();
        self.drain.spawn(async move {
            fut.await;
            drop(hold);
        });
    }
}

/// A warning given at most every `secs` seconds (cuts for premature resets: each took
/// at least 250 of a client's requests, and a client can reconnect).
pub(crate) struct WarnEvery {
    start: std::time::Instant,
    /// When it was last given (s since `start`, plus one; 0: never).
    last: AtomicU64,
    secs: u64,
}

impl WarnEvery {
    pub(crate) fn new(secs: u64) -> Self {
        Self {
            start: std::time::Instant::now(),
            last: AtomicU64::new(0),
            secs,
        }
    }

    /// Whether the warning is due now (and, if so, it counts as given).
    pub(crate) fn due(&self) -> bool {
        let now = self.start.elapsed().as_secs().saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= self.secs)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Why [`serve_connection`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// By the client, or an error.
    Closed,
    /// The drain: requests in flight finished.
    Drained,
    /// The idle timeout.
    Idle,
    /// Cut: the client reset too many requests prematurely (by the rule, or by h2's own
    /// bound, [`cut_by_h2_for_resets`]).
    PrematureResets,
}

pub(crate) fn boxed_err<E: Into<BoxError>>(e: E) -> BoxError {
    e.into()
}

pub(crate) fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// An answer from the gateway itself: `status`, `meshfed-error: code`, the message as
/// the body.
pub(crate) fn error_response(
    status: u16,
    code: &'static str,
    message: &str,
) -> http::Response<Body> {
    let mut r = http::Response::new(full(Bytes::from(format!("{code}: {message}\n"))));
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
    r.headers_mut()
        .insert(ERROR_HEADER, http::HeaderValue::from_static(code));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The upgraded connection behind a `101` answer (a WebSocket's), with the answer's
/// upgrade headers kept for the client; `None` when `answer` is not a `101`. A `101`
/// that came without one (an h2 peer's, which h2 forbids, or a connection that did not
/// upgrade) becomes a 502 `endpoint_reset` saying `why`, and `None`.
pub(crate) fn take_upgrade(
    answer: &mut http::Response<Body>,
    why: &str,
) -> Option<hyper::upgrade::OnUpgrade> {
    if answer.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    let Some(upgraded) = answer
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        *answer = error_response(502, ENDPOINT_RESET, why);
        return None;
    };
    headers::keep_websocket_upgrade(answer.headers_mut());
    Some(upgraded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrapper as hyper's own error is: the h2 error as its source.
    #[derive(Debug)]
    struct Wrapped(h2::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("http2 error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A real h2 server that is not accepting streams (a loaded host) and a client that
    /// opens and cancels more than it lets wait: h2 cuts the connection, and that error
    /// is told apart from others (a client's own GOAWAY, a reset, a closed socket).
    #[tokio::test]
    async fn h2s_own_cut_for_resets_is_told_apart() {
        let (c, s) = tokio::io::duplex(1 << 16);
        let server = async {
            let mut conn = h2::server::Builder::new()
                .max_pending_accept_reset_streams(2)
                .handshake::<_, Bytes>(s)
                .await
                .unwrap();
            std::future::poll_fn(|cx| conn.poll_closed(cx)).await
        };
        let client = async {
            let (mut send, conn) = h2::client::handshake(c).await.unwrap();
            tokio::spawn(conn);
            for _ in 0..10 {
                let Ok(ready) = send.clone().ready().await else {
                    break;
                };
                send = ready;
                let req = http::Request::get("http://web.demo/").body(()).unwrap();
                let Ok((_, mut stream)) = send.send_request(req, false) else {
                    break;
                };
                stream.send_reset(h2::Reason::CANCEL);
            }
            std::future::pending::<()>().await
        };
        let cut = tokio::select! {
            r = server => r.expect_err("h2 cuts the connection"),
            () = client => unreachable!(),
        };
        assert!(cut_by_h2_for_resets(&cut), "{cut:?}");
        assert!(cut_by_h2_for_resets(&Wrapped(cut)));
        let others = [
            h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM),
            h2::Error::from(h2::Reason::CANCEL),
        ];
        for e in others {
            assert!(!cut_by_h2_for_resets(&Wrapped(e)));
        }
        assert!(!cut_by_h2_for_resets(&std::io::Error::other("closed")));
    }

    #[test]
    fn a_warning_is_due_once_per_period() {
        let w = WarnEvery::new(10);
        assert!(w.due());
        assert!(!w.due());
        assert!(!w.due());
        // Ten seconds on.
        w.last.store(1, Ordering::Relaxed);
        let w = WarnEvery {
            start: std::time::Instant::now() - std::time::Duration::from_secs(10),
            ..w
        };
        assert!(w.due());
        assert!(!w.due());
    }

    /// A request dropped unanswered within a second counts as a premature reset; one
    /// answered whole, or whose answer has no body, does not; the 250th premature
    /// reset of a connection makes it abusive.
    /// `n` requests from an h2 client (the h2 crate), each reset at once, reaching the
    /// server together, so its streams are reset before they are accepted; then one
    /// request answered. The status, or `None` when the connection was cut.
    async fn resets_then_a_request(io: tokio::io::DuplexStream, n: usize) -> Option<u16> {
        let (send, conn) = h2::client::handshake(io).await.unwrap();
        let mut send = send.ready().await.unwrap();
        // Queued, not written: the connection task runs after.
        for _ in 0..n {
            let req = http::Request::get("http://web.demo/").body(()).unwrap();
            let (_, mut stream) = send.send_request(req, true).unwrap();
            stream.send_reset(h2::Reason::CANCEL);
        }
        tokio::spawn(conn);
        let req = http::Request::get("http://web.demo/").body(()).unwrap();
        let (answer, _) = send.ready().await.ok()?.send_request(req, true).ok()?;
        Some(answer.await.ok()?.status().as_u16())
    }

    fn ok_service() -> impl hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Send
    + 'static {
        hyper::service::service_fn(|_| async {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            Ok::<_, std::convert::Infallible>(error_response(200, "x", ""))
        })
    }

    /// An egress's link (served without `idle`) carries many clients' requests, whose
    /// cancels arrive in bursts when the far side is slow to accept: h2's bound of 20
    /// resets waiting to be accepted would cut the whole link, and every client's
    /// requests on it. A client connection (with `idle`) is cut by that bound, and the
    /// cut counts as premature resets.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_burst_of_resets_cuts_a_client_connection_and_not_a_link() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (c, s) = tokio::io::duplex(1 << 20);
        let link = tokio::spawn(serve_connection(
            s,
            ok_service(),
            stop.clone(),
            (None, false),
            "link",
        ));
        assert_eq!(resets_then_a_request(c, 100).await, Some(200));
        assert!(!link.is_finished());

        let (c, s) = tokio::io::duplex(1 << 20);
        let idle = Some((None, Activity::new()));
        let client = tokio::spawn(serve_connection(
            s,
            ok_service(),
            stop.clone(),
            (idle, false),
            "client",
        ));
        assert_eq!(resets_then_a_request(c, 100).await, None);
        assert!(client.await.unwrap() == Ended::PrematureResets);
        stop.cancel();
        // Ended by its client's close (or the drain), not cut.
        assert!(link.await.unwrap() != Ended::PrematureResets);

        // Past its own bound a link is cut too, and says why.
        let (c, s) = tokio::io::duplex(1 << 20);
        let stop = tokio_util::sync::CancellationToken::new();
        let link = tokio::spawn(serve_connection(
            s,
            ok_service(),
            stop,
            (None, false),
            "link",
        ));
        let n = LINK_RESETS_PENDING_ACCEPT + 50;
        assert_eq!(resets_then_a_request(c, n).await, None);
        assert!(link.await.unwrap() == Ended::PrematureResets);
    }

    #[tokio::test]
    async fn unanswered_requests_count_as_premature_resets() {
        let a = Activity::new();
        let get = http::Method::GET;
        // Answered whole: an empty body, and a body read to its end.
        drop(Marked::answer(
            error_response(204, "x", ""),
            &get,
            Some(a.mark()),
        ));
        let mut whole = Marked::answer(error_response(503, "x", "m"), &get, Some(a.mark()));
        while whole.body_mut().frame().await.is_some() {}
        drop(whole);
        // A HEAD's answer is never read.
        let head = http::Method::HEAD;
        drop(Marked::answer(
            error_response(503, "x", "m"),
            &head,
            Some(a.mark()),
        ));
        assert_eq!(a.0.premature.load(Ordering::Relaxed), 0);
        // Dropped unread, and dropped before any answer.
        drop(Marked::answer(
            error_response(503, "x", "m"),
            &get,
            Some(a.mark()),
        ));
        drop(a.mark());
        assert_eq!(a.0.premature.load(Ordering::Relaxed), 2);
        assert_eq!(a.0.ended.load(Ordering::Relaxed), 5);
        for _ in 2..249 {
            drop(a.mark());
        }
        let abusive = a.abusive();
        tokio::pin!(abusive);
        assert!(futures::poll!(abusive.as_mut()).is_pending());
        drop(a.mark());
        assert!(futures::poll!(abusive.as_mut()).is_ready());
    }
}
