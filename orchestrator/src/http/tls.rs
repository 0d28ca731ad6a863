//! Serving the API over TLS with `axum::serve`: [`TlsListener`] accepts TCP connections and hands
//! axum only those whose TLS handshake succeeded.
//!
//! Each handshake runs in its own task with a deadline, so a client that connects and then says
//! nothing holds up no one else, and a bounded number run at once. A failed handshake (a client
//! that does not trust the certificate, plain HTTP sent to the TLS port, a scanner) closes that
//! connection and is logged at debug level only, since anyone who can connect can cause one.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client has to complete the TLS handshake after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may be in progress at once; further connections wait in the kernel's
/// backlog.
const MAX_CONCURRENT_HANDSHAKES: usize = 256;
/// Established connections waiting for axum to take them.
const ESTABLISHED_QUEUE: usize = 64;

/// A TCP listener that yields TLS streams, for `axum::serve`.
pub struct TlsListener {
    /// The bound address, kept because the TCP listener moved into the accept task.
    local_addr: SocketAddr,
    /// Connections whose handshake succeeded, with the peer's address.
    established: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    /// The accept task, which owns the TCP listener and the handshakes in progress. Dropping the
    /// listener (axum does when graceful shutdown begins) stops it and them.
    accept_task: AbortOnDrop,
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl TlsListener {
    /// Starts accepting on `listener`, handshaking with `config`. Must be called within a Tokio
    /// runtime.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (sender, established) = mpsc::channel(ESTABLISHED_QUEUE);
        let accept_task = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), sender));
        Ok(Self {
            local_addr,
            established,
            accept_task: AbortOnDrop(accept_task),
        })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.established.recv().await {
            Some(connection) => connection,
            None => {
                // The accept loop never ends on its own; it is aborted only with this listener.
                tracing::error!(
                    finished = self.accept_task.0.is_finished(),
                    "the TLS accept task stopped"
                );
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Accepts connections for ever, handshaking each in a task of its own and sending the
/// established ones to `established`.
async fn accept_loop(
    mut listener: TcpListener,
    acceptor: TlsAcceptor,
    established: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        if handshakes.len() >= MAX_CONCURRENT_HANDSHAKES {
            handshakes.join_next().await;
            continue;
        }
        // axum's own accept, which retries after errors such as running out of file descriptors.
        let (stream, peer) = Listener::accept(&mut listener).await;
        let acceptor = acceptor.clone();
        let established = established.clone();
        handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the server is shutting down; the connection is then dropped.
                    let _ = established.send((tls, peer)).await;
                }
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::future::IntoFuture as _;

    use secrecy::SecretString;

    use super::*;
    use crate::client::{ApiClient, ClientError};
    use crate::config::TlsSource;
    use crate::http::tests::{Fixture, READ_ALL_TOKEN};

    #[tokio::test]
    async fn the_api_answers_over_tls_only_to_clients_trusting_its_certificate() {
        let data_dir = tempfile::tempdir().unwrap();
        let source = TlsSource::SelfSigned {
            subject_alt_names: Vec::new(),
        };
        let tls = crate::tls::load(&source, data_dir.path()).unwrap();
        let mut fixture = Fixture::new();
        fixture.back_up("dev-a", "web", "pw-a");
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = TlsListener::new(tcp, tls.config).unwrap();
        let server = tokio::spawn(axum::serve(listener, crate::http::router(fixture.state.clone())).into_future());
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
        server.abort();
    }
}

/// The address a request came from, as the audit records it: the connection's peer, over TLS or
/// plain HTTP. Serve with `into_make_service_with_connect_info::<PeerAddr>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for PeerAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}
