//! Serving the API's connections, over TLS or plain HTTP, with the limits that keep slow and
//! greedy clients from starving everyone else ([`HttpLimits`]).
//!
//! `axum::serve` has no header-read timeout and no connection caps, so [`serve`] runs the accept
//! loop itself and serves each connection with hyper's HTTP/1 server:
//! - **Connection caps.** At most `max_connections` connections are served at once: the loop
//!   accepts only while a slot is free, so further clients wait in the kernel's backlog. At most
//!   `max_connections_per_address` come from one IP address; a further one is closed as soon as
//!   it is accepted, and the connections already open are not disturbed.
//! - **Header-read timeout.** A new connection has `header_read_timeout` to finish its TLS
//!   handshake, then again to send its first request head; a later request has it from its first
//!   byte. A client that sends its headers byte by byte is cut off then.
//! - **Idle timeout.** A connection between requests that sends nothing (or does not read its
//!   answer) for `idle_timeout` is closed.
//! - **Request timeout.** A request that takes longer than `request_timeout` to be answered,
//!   reading its body included, is answered 503 ([`ApiError::RequestTimeout`]) by
//!   [`limit_request_time`], a middleware of the router, so the request metrics count it.
//!
//! hyper's own `header_read_timeout` is not used: it runs from the moment the server waits for a
//! request, so it would also cut idle keep-alive connections at the header timeout. [`GuardedIo`]
//! times the phases apart instead, knowing from the service whether a request is in progress.
//!
//! Each refused or timed-out connection is counted in `fleetlaps_http_connections_dropped_total`
//! by reason, and logged at debug level only, since anyone who can connect can cause one.
//! Graceful shutdown stops accepting, lets requests in progress finish, and closes idle
//! connections.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::ApiError;
use crate::config::HttpLimits;
use crate::metrics::{ConnectionDropReason, Metrics};

/// The address a request came from, as the audit records it: the connection's peer, over TLS or
/// plain HTTP. [`serve`] puts it in every request's extensions as `ConnectInfo<PeerAddr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Where the absolute links the API answers with (`@odata.nextLink`) start, in each request's
/// extensions: the configured `http.public_url`, else, over TLS, the origin the client addressed
/// (plain HTTP carries none: links stay relative).
#[derive(Debug, Clone)]
pub(super) enum LinkOrigin {
    /// `http.public_url`.
    Configured(Arc<str>),
    /// `https://` and the authority the request addressed.
    Addressed,
}

/// What [`serve`] needs besides the listener and the router.
pub struct ServeOptions {
    /// The TLS configuration; `None` serves plain HTTP (`http.plain_http = true`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The timeouts and connection caps.
    pub limits: HttpLimits,
    /// Where refused and timed-out connections are counted.
    pub metrics: Metrics,
    /// `http.public_url`, checked ([`crate::config::HttpConfig::public_url`]).
    pub public_url: Option<String>,
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for the open connections to finish their requests in progress.
pub async fn serve(listener: TcpListener, router: Router, options: ServeOptions, shutdown: CancellationToken) {
    let ServeOptions {
        tls,
        limits,
        metrics,
        public_url,
    } = options;
    let link_origin = match (public_url, &tls) {
        (Some(public_url), _) => Some(LinkOrigin::Configured(public_url.into())),
        (None, Some(_)) => Some(LinkOrigin::Addressed),
        (None, None) => None,
    };
    let shared = Arc::new(Shared {
        router,
        tls: tls.map(TlsAcceptor::from),
        limits,
        metrics,
        link_origin,
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = PerAddress::new(limits.max_connections_per_address);
    let mut listener = listener;
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // A slot first, so that over the global cap clients wait in the backlog, unaccepted.
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the connection semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            // axum's accept, which retries after errors such as running out of file descriptors.
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        let Some(address_slot) = per_address.claim(peer.ip()) else {
            shared
                .metrics
                .http_connections_dropped
                .with_label_values(&[ConnectionDropReason::PerAddressLimit.as_str()])
                .inc();
            tracing::debug!(%peer, "connection refused: too many connections from this address");
            // Dropping the stream closes it; the slot is freed with it.
            continue;
        };
        let connection = Connection {
            shared: Arc::clone(&shared),
            peer,
            _slot: slot,
            _address_slot: address_slot,
        };
        connections.spawn(connection.run(stream, shutdown.clone()));
    }
    // Closing the listener makes the kernel refuse new connections while the open ones finish.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Answers 503 ([`ApiError::RequestTimeout`]) when the rest of the stack takes longer than
/// `request_timeout` to answer; the handler is then dropped, as when its client goes away.
pub(super) async fn limit_request_time(
    State(request_timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_elapsed) => ApiError::RequestTimeout(request_timeout).into_response(),
    }
}

/// What every connection of one server shares.
struct Shared {
    /// The API.
    router: Router,
    /// Present when the API serves TLS.
    tls: Option<TlsAcceptor>,
    /// The timeouts and caps.
    limits: HttpLimits,
    /// Where dropped connections are counted.
    metrics: Metrics,
    /// Where absolute links start, given to every request.
    link_origin: Option<LinkOrigin>,
}

/// One accepted connection, holding its slots until it ends.
struct Connection {
    /// The server's shared parts.
    shared: Arc<Shared>,
    /// The client's address, for the handlers and the logs.
    peer: SocketAddr,
    /// Its place under `max_connections`, freed when the connection ends.
    _slot: OwnedSemaphorePermit,
    /// Its place under `max_connections_per_address`, freed when the connection ends.
    _address_slot: AddressSlot,
}

impl Connection {
    /// Handshakes (over TLS) within the header-read timeout, then serves HTTP/1 requests until
    /// the client leaves, a limit closes the connection, or shutdown.
    async fn run(self, stream: TcpStream, shutdown: CancellationToken) {
        let Some(acceptor) = self.shared.tls.clone() else {
            return self.serve_http(stream, shutdown).await;
        };
        let handshake = tokio::select! {
            () = shutdown.cancelled() => return,
            handshake = tokio::time::timeout(self.shared.limits.header_read_timeout, acceptor.accept(stream)) => handshake,
        };
        match handshake {
            Ok(Ok(tls)) => self.serve_http(tls, shutdown).await,
            Ok(Err(err)) => tracing::debug!(peer = %self.peer, error = %err, "TLS handshake failed"),
            Err(_elapsed) => {
                self.shared
                    .metrics
                    .http_connections_dropped
                    .with_label_values(&[ConnectionDropReason::TlsHandshakeTimeout.as_str()])
                    .inc();
                tracing::debug!(peer = %self.peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve_http<T>(self, io: T, shutdown: CancellationToken)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let requests = Arc::new(RequestCount::default());
        let io = GuardedIo::new(
            io,
            self.shared.limits,
            Arc::clone(&requests),
            self.shared.metrics.clone(),
        );
        let router = self.shared.router.clone();
        let peer = self.peer;
        let link_origin = self.shared.link_origin.clone();
        let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
            if let Some(link_origin) = &link_origin {
                request.extensions_mut().insert(link_origin.clone());
            }
            let in_progress = InProgress::enter(&requests);
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await;
                drop(in_progress);
                response
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // GuardedIo times the request head; hyper's timer would also cut idle connections short.
        builder.header_read_timeout(None);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            () = shutdown.cancelled() => {
                // Finishes the request in progress, if any, then closes.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(err) = served {
            tracing::debug!(peer = %self.peer, error = %err, "connection ended with an error");
        }
    }
}

/// Counts the connections open from each IP address.
#[derive(Clone)]
struct PerAddress {
    /// The most connections one address may have open.
    limit: usize,
    /// Open connections by address; an address with none has no entry, so the map holds at most
    /// `max_connections` entries.
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection counted against its address; uncounted on drop.
struct AddressSlot {
    /// The counter it is counted in.
    per_address: PerAddress,
    /// The address it counts for.
    address: IpAddr,
}

impl PerAddress {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::default(),
        }
    }

    /// Counts one more connection from `address`, or `None` when it already has `limit`. An
    /// IPv4 address mapped into IPv6 counts as the IPv4 address.
    fn claim(&self, address: IpAddr) -> Option<AddressSlot> {
        let address = address.to_canonical();
        let mut open = self.open.lock().expect("the per-address counter is never poisoned");
        let count = open.entry(address).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            per_address: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .per_address
            .open
            .lock()
            .expect("the per-address counter is never poisoned");
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The requests of one connection that its service started and finished, so that [`GuardedIo`]
/// knows whether one is in progress, and whether one finished since it last looked (which a
/// request started and finished between two of its polls would otherwise hide).
#[derive(Debug, Default)]
struct RequestCount {
    /// Requests handed to the service.
    started: AtomicUsize,
    /// Requests answered (or dropped); never more than `started`.
    finished: AtomicUsize,
}

/// A request being handled on a connection; counted as finished when dropped.
struct InProgress(Arc<RequestCount>);

impl InProgress {
    fn enter(requests: &Arc<RequestCount>) -> Self {
        requests.started.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(requests))
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where a connection is between requests, which decides the deadline it runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head, since its first byte (or since the connection is ready):
    /// `header_read_timeout` from then.
    ReadingHead,
    /// A request is being handled: the request timeout applies, not this connection's.
    Busy,
    /// Between requests: `idle_timeout` from the last byte read or written.
    Idle,
}

/// A connection's I/O, failing with `TimedOut` when the client overruns its phase's deadline.
///
/// The deadline is checked when a read or a write would block, and its timer is armed on every
/// poll, so that it wakes the connection's task even when hyper is not reading (hyper then polls
/// the read side, which fails).
struct GuardedIo<T> {
    /// The TCP or TLS stream.
    inner: T,
    /// The timeouts.
    limits: HttpLimits,
    /// Requests started and finished on this connection, counted by the service.
    requests: Arc<RequestCount>,
    /// `requests.finished` when last looked at.
    finished_seen: usize,
    /// The current phase.
    phase: Phase,
    /// When the current phase's time runs out (ignored while [`Phase::Busy`]).
    deadline: Pin<Box<Sleep>>,
    /// Where a timeout is counted.
    metrics: Metrics,
}

impl<T> GuardedIo<T> {
    fn new(inner: T, limits: HttpLimits, requests: Arc<RequestCount>, metrics: Metrics) -> Self {
        Self {
            inner,
            limits,
            requests,
            finished_seen: 0,
            phase: Phase::ReadingHead,
            deadline: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            metrics,
        }
    }

    /// Moves to [`Phase::Busy`] while a request is handled, and to [`Phase::Idle`] after one.
    fn update_phase(&mut self) {
        let finished = self.requests.finished.load(Ordering::SeqCst);
        if self.requests.started.load(Ordering::SeqCst) > finished {
            self.phase = Phase::Busy;
        } else if finished != self.finished_seen {
            self.finished_seen = finished;
            self.enter(Phase::Idle);
        }
    }

    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        let timeout = match phase {
            Phase::ReadingHead => self.limits.header_read_timeout,
            Phase::Idle | Phase::Busy => self.limits.idle_timeout,
        };
        self.deadline.as_mut().reset(Instant::now() + timeout);
    }

    /// After the client made progress.
    fn progressed(&mut self, bytes_read: bool) {
        match self.phase {
            // The clock for a request head starts at its first byte.
            Phase::Idle if bytes_read => self.enter(Phase::ReadingHead),
            Phase::Idle => self.enter(Phase::Idle),
            Phase::ReadingHead | Phase::Busy => {}
        }
    }

    /// Registers the deadline's timer with the task, so that it is polled again when the deadline
    /// passes.
    fn arm(&mut self, cx: &mut Context<'_>) {
        if self.phase != Phase::Busy && self.deadline.as_mut().poll(cx).is_ready() {
            // Passed already: poll the task again, so that its next read fails.
            cx.waker().wake_by_ref();
        }
    }

    /// Pending while the deadline has not passed (or a request is in progress); a `TimedOut`
    /// error once it has.
    fn poll_deadline<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if self.phase == Phase::Busy || self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let (reason, message) = match self.phase {
            Phase::ReadingHead => (
                ConnectionDropReason::HeaderReadTimeout,
                "the request head was not received in time",
            ),
            Phase::Idle | Phase::Busy => (ConnectionDropReason::IdleTimeout, "the connection was idle too long"),
        };
        self.metrics
            .http_connections_dropped
            .with_label_values(&[reason.as_str()])
            .inc();
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)))
    }

    /// What a write polled on the inner stream means for the connection: bytes written are
    /// progress and re-arm the deadline; a pending write waits on the deadline too.
    fn after_write(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(written)) => {
                if written > 0 {
                    self.progressed(false);
                }
                self.arm(cx);
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => self.poll_deadline(cx),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.update_phase();
        let filled_before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > filled_before {
                    this.progressed(true);
                }
                this.arm(cx);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.update_phase();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.update_phase();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.update_phase();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.poll_deadline(cx),
            ready => {
                this.arm(cx);
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use secrecy::SecretString;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::client::{ApiClient, ClientError};
    use crate::config::TlsSource;
    use crate::http::tests::{Fixture, READ_ALL_TOKEN};

    fn limits() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            max_connections: 64,
            max_connections_per_address: 8,
        }
    }

    /// Serves `router` on a loopback port; returns the address and the shutdown token.
    async fn start(
        router: Router,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: HttpLimits,
    ) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let options = ServeOptions {
            tls,
            limits,
            metrics: Metrics::new(),
            public_url: None,
        };
        tokio::spawn(serve(listener, router, options, shutdown.clone()));
        (addr, shutdown)
    }

    #[tokio::test]
    async fn the_api_answers_over_tls_only_to_clients_trusting_its_certificate() {
        let data_dir = tempfile::tempdir().unwrap();
        let source = TlsSource::SelfSigned {
            subject_alt_names: Vec::new(),
        };
        let tls = crate::tls::load(&source, data_dir.path()).unwrap();
        let mut fixture = Fixture::new();
        fixture.back_up("dev-a", "web", "pw-a");
        let (addr, shutdown) = start(crate::http::router(fixture.state.clone()), Some(tls.config), limits()).await;
        let token = || SecretString::from(READ_ALL_TOKEN);

        let trusting = ApiClient::with_ca(&format!("https://{addr}"), token(), Some(&tls.certificate_path)).unwrap();
        assert_eq!(trusting.find_devices("web").await.unwrap().len(), 1);

        // A client that connects and never says anything holds up no one.
        let _silent = TcpStream::connect(addr).await.unwrap();
        assert_eq!(trusting.find_devices("web").await.unwrap().len(), 1);

        let untrusting = ApiClient::new(&format!("https://{addr}"), token()).unwrap();
        let refused = untrusting.find_devices("web").await.unwrap_err();
        assert!(matches!(refused, ClientError::Tls { .. }), "{refused:?}");
        assert!(
            refused.to_string().contains("certificate not trusted; pass --ca"),
            "{refused}"
        );

        let plain = ApiClient::new(&format!("http://{addr}"), token()).unwrap();
        let refused = plain.find_devices("web").await.unwrap_err();
        assert!(
            matches!(refused, ClientError::Transport(_)),
            "plain HTTP to the TLS port gets no API answer: {refused:?}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn handlers_see_the_peer_address_over_plain_http() {
        let router = Router::new().route(
            "/peer",
            get(|ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>| async move { peer.to_string() }),
        );
        let (addr, shutdown) = start(router, None, limits()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        stream
            .write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&local.to_string()), "{answer}");
        shutdown.cancel();
    }

    /// A router with `/healthz` answering `ok`.
    fn healthz() -> Router {
        Router::new().route("/healthz", get(|| async { "ok" }))
    }

    /// Sends a `/healthz` request and reads its answer, leaving the connection open.
    async fn ask(stream: &mut TcpStream) -> String {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buffer = [0_u8; 1024];
        while !answer.ends_with(b"ok") {
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "closed mid-answer: {answer:?}");
            answer.extend_from_slice(&buffer[..read]);
        }
        String::from_utf8(answer).unwrap()
    }

    /// How long until the server closes `stream`.
    async fn time_to_close(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buffer = [0_u8; 1024];
        let closing = async {
            while let Ok(read) = stream.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), closing)
            .await
            .expect("closed within the safety net");
        started.elapsed()
    }

    #[tokio::test]
    async fn over_plain_http_a_head_sent_byte_by_byte_and_an_idle_connection_are_cut_off_at_their_timeouts() {
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            ..limits()
        };
        let (addr, shutdown) = start(healthz(), None, limits).await;

        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let dripping = async {
            for byte in b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: "
                .iter()
                .chain(std::iter::repeat(&b'a'))
            {
                if slow.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), dripping)
            .await
            .expect("the writer is cut off within the safety net");
        let cut_off = started.elapsed();
        assert!(
            (Duration::from_millis(900)..Duration::from_secs(2)).contains(&cut_off),
            "{cut_off:?}"
        );

        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert!(ask(&mut idle).await.starts_with("HTTP/1.1 200"));
        let idled = time_to_close(&mut idle).await;
        assert!(
            (Duration::from_millis(1800)..Duration::from_secs(4)).contains(&idled),
            "{idled:?}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn over_the_global_cap_a_connection_waits_until_one_closes() {
        let limits = HttpLimits {
            max_connections: 2,
            max_connections_per_address: 2,
            ..limits()
        };
        let (addr, shutdown) = start(healthz(), None, limits).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(ask(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(ask(&mut second).await.starts_with("HTTP/1.1 200"));

        let mut third = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(500), ask(&mut third)).await;
        assert!(waiting.is_err(), "a third connection is not served while two are open");
        drop(first);

        let answer = tokio::time::timeout(Duration::from_secs(10), ask(&mut third))
            .await
            .expect("served once a connection closed");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            ask(&mut second).await.starts_with("HTTP/1.1 200"),
            "the open one still works"
        );
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_over_its_time_is_answered_503_with_an_odata_error() {
        let router = Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    "too late"
                }),
            )
            .layer(axum::middleware::from_fn_with_state(
                Duration::from_secs(5),
                limit_request_time,
            ));
        let request = Request::builder().uri("/slow").body(axum::body::Body::empty()).unwrap();

        let response = router.oneshot(request).await.unwrap();

        assert_eq!(response.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "RequestTimeout");
        assert_eq!(
            body["error"]["message"],
            "the request was not answered within 5 seconds; try again later"
        );
    }

    #[test]
    fn an_address_gets_its_limit_of_slots_and_each_is_given_back_on_drop() {
        let per_address = PerAddress::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let a_mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();

        let first = per_address.claim(a).expect("first");
        let second = per_address
            .claim(a_mapped)
            .expect("second, the same address mapped into IPv6");
        assert!(per_address.claim(a).is_none(), "a third is over the limit");
        assert!(per_address.claim(b).is_some(), "another address has its own count");

        drop(first);
        let third = per_address.claim(a).expect("a slot given back is free again");
        drop((second, third));
        assert!(
            per_address.open.lock().unwrap().is_empty(),
            "no entry is kept for an address with none open"
        );
    }
}
