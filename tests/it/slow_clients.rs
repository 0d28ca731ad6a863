//! Slow and greedy clients against the API's limits: a client that sends its headers byte by
//! byte is cut off after the header-read timeout, an idle connection after the idle timeout, a
//! connection over the per-address cap at once; none of them stops another client's password
//! read.
//!
//! The greedy clients connect from `127.0.0.2`, another loopback address than the one the
//! well-behaved clients use, as a second host would.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleetlaps_proto::api::DeviceLocalCredentialInfo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::apps::{READ_TOKEN, TestAgent, TestOrchestrator, trusting_client};
use crate::harness::TestNats;

/// Where the greedy clients connect from.
const GREEDY_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Where the well-behaved clients connect from.
const POLITE_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// A safety net for waits that the limits under test should end much sooner.
const SAFETY_NET: Duration = Duration::from_secs(30);

#[tokio::test]
async fn silent_and_byte_by_byte_clients_do_not_stop_a_password_read() {
    // Arrange: one address may take every connection, so only the header-read timeout frees
    // the server from the greedy clients.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_http_config(
        &nats,
        "header_read_timeout_secs = 2\nidle_timeout_secs = 30\nmax_connections = 8\nmax_connections_per_address = 8",
    )
    .await;
    let agent = TestAgent::spawn(&nats, &orchestrator).await;
    let rotated = orchestrator.wait_for_passwords(&agent.device_id, 1).await;
    let client = RawClient::new(&orchestrator);

    // Act: 4 clients that connect and say nothing and 8 that send their headers a byte every
    // 100 ms, each reconnecting as soon as it is cut off, so together they always want more
    // connections than the server serves.
    let handshakes = Arc::new(AtomicUsize::new(0));
    let mut greedy = JoinSet::new();
    for _ in 0..4 {
        let client = client.clone();
        greedy.spawn(async move {
            loop {
                let stream = client.tcp_from(GREEDY_ADDRESS).await;
                wait_closed(stream).await;
            }
        });
    }
    let (cut_offs, mut cut_off_times) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..8 {
        let client = client.clone();
        let handshakes = Arc::clone(&handshakes);
        let cut_offs = cut_offs.clone();
        greedy.spawn(async move {
            loop {
                // The handshake itself may wait in the backlog or time out: start over then.
                let Ok(stream) = client.tls_from(GREEDY_ADDRESS).await else {
                    continue;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let (lasted, answer) = send_headers_byte_by_byte(stream).await;
                let _ = cut_offs.send((lasted, answer));
            }
        });
    }
    crate::harness::wait_until("the byte-by-byte clients are served", SAFETY_NET, || async {
        (handshakes.load(Ordering::SeqCst) >= 4).then_some(())
    })
    .await;
    let started = Instant::now();
    let read = trusting_client(&orchestrator.tls_certificate)
        .get(format!(
            "{}/v1.0/directory/deviceLocalCredentials/{}?$select=credentials",
            orchestrator.base_url, agent.device_id
        ))
        .bearer_auth(READ_TOKEN)
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    let waited = started.elapsed();

    // Assert: the read got through, and the byte-by-byte clients were cut off at the timeout.
    let read = read.expect("the password read is answered while greedy clients keep connecting");
    assert_eq!(read.status(), reqwest::StatusCode::OK, "after {waited:?}");
    let info: DeviceLocalCredentialInfo = read.json().await.expect("deviceLocalCredentialInfo");
    let newest = info.credentials.unwrap_or_default()[0]
        .password_base64
        .decode()
        .expect("passwordBase64 decodes");
    assert_eq!(newest.expose(), rotated[0].expose(), "the answer holds the password");
    let (lasted, answer) = tokio::time::timeout(SAFETY_NET, cut_off_times.recv())
        .await
        .expect("a byte-by-byte client is cut off")
        .expect("the greedy clients run");
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(8)).contains(&lasted),
        "cut off after {lasted:?}, with a header-read timeout of 2 s"
    );
    assert!(
        answer.is_empty(),
        "a request never completed gets no answer: {answer:?}"
    );
    assert!(
        orchestrator
            .metric("fleetlaps_http_connections_dropped_total{reason=\"header_read_timeout\"}")
            .await
            >= 1.0
    );
    greedy.abort_all();
}

#[tokio::test]
async fn a_client_sending_its_headers_byte_by_byte_is_cut_off_after_the_header_read_timeout() {
    let nats = TestNats::start();
    let orchestrator =
        TestOrchestrator::spawn_with_http_config(&nats, "header_read_timeout_secs = 2\nidle_timeout_secs = 30").await;
    let client = RawClient::new(&orchestrator);

    // A slow client that finishes its request head within the timeout is answered.
    let mut slow = client.tls_from(POLITE_ADDRESS).await.expect("handshake");
    for byte in HEALTHZ_REQUEST.bytes() {
        slow.write_all(&[byte]).await.expect("writing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = read_response(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // One that never finishes it is cut off.
    let stream = client.tls_from(POLITE_ADDRESS).await.expect("handshake");
    let (lasted, answer) = send_headers_byte_by_byte(stream).await;

    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(8)).contains(&lasted),
        "cut off after {lasted:?}, with a header-read timeout of 2 s"
    );
    assert!(
        answer.is_empty(),
        "a request never completed gets no answer: {answer:?}"
    );
    assert_eq!(
        orchestrator
            .metric("fleetlaps_http_connections_dropped_total{reason=\"header_read_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn over_the_per_address_cap_a_connection_is_closed_and_the_open_ones_work_until_idle() {
    // Arrange: a long header-read timeout, so a prompt close can only be the cap's.
    let nats = TestNats::start();
    let orchestrator = TestOrchestrator::spawn_with_http_config(
        &nats,
        "header_read_timeout_secs = 20\nidle_timeout_secs = 3\nmax_connections_per_address = 4",
    )
    .await;
    let client = RawClient::new(&orchestrator);
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut stream = client.tls_from(GREEDY_ADDRESS).await.expect("handshake");
        let answer = request_healthz(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        open.push(stream);
    }

    // Act: a fifth connection from the same address.
    let started = Instant::now();
    let fifth = client.tls_from(GREEDY_ADDRESS).await;

    // Assert: it is closed at once, before its handshake, and the four still work.
    assert!(fifth.is_err(), "the fifth connection is refused");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}, not at a timeout",
        started.elapsed()
    );
    for stream in &mut open {
        let answer = request_healthz(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let idle_since = Instant::now();
    let other_address = trusting_client(&orchestrator.tls_certificate)
        .get(format!("{}/healthz", orchestrator.base_url))
        .send()
        .await
        .expect("another address is not refused");
    assert_eq!(other_address.status(), reqwest::StatusCode::OK);
    assert_eq!(
        orchestrator
            .metric("fleetlaps_http_connections_dropped_total{reason=\"per_address_limit\"}")
            .await,
        1.0
    );

    // Then, sending nothing, the four are closed after the idle timeout, which frees their
    // address's slots.
    for stream in open {
        wait_closed(stream).await;
        let idled = idle_since.elapsed();
        assert!(
            (Duration::from_millis(2500)..Duration::from_secs(10)).contains(&idled),
            "closed after {idled:?} idle, with an idle timeout of 3 s"
        );
    }
    let mut again = client.tls_from(GREEDY_ADDRESS).await.expect("handshake");
    let answer = request_healthz(&mut again).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        orchestrator
            .metric("fleetlaps_http_connections_dropped_total{reason=\"idle_timeout\"}")
            .await
            >= 4.0
    );
}

/// A complete request for the liveness probe, keeping the connection open.
const HEALTHZ_REQUEST: &str = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// Connects to the test orchestrator's API from a chosen loopback address, over TCP or TLS.
#[derive(Clone)]
struct RawClient {
    /// The API's address.
    api: SocketAddr,
    /// Trusts only the API's certificate.
    connector: TlsConnector,
}

impl RawClient {
    fn new(orchestrator: &TestOrchestrator) -> Self {
        let api = orchestrator
            .base_url
            .strip_prefix("https://")
            .expect("the test orchestrator serves TLS")
            .parse()
            .expect("host:port");
        Self {
            api,
            connector: connector(&orchestrator.tls_certificate),
        }
    }

    /// A TCP connection from `source`.
    async fn tcp_from(&self, source: IpAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("binding a loopback address");
        socket.connect(self.api).await.expect("connecting to the API")
    }

    /// A TLS connection from `source`; an error when the server closes it before the handshake
    /// ends.
    async fn tls_from(&self, source: IpAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let stream = self.tcp_from(source).await;
        let name = ServerName::IpAddress(self.api.ip().into());
        tokio::time::timeout(SAFETY_NET, self.connector.connect(name, stream))
            .await
            .expect("the handshake ends within the safety net")
    }
}

/// A TLS connector trusting only `certificate` (PEM).
fn connector(certificate: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(certificate).expect("reading the API's certificate") {
        roots
            .add(certificate.expect("a PEM certificate"))
            .expect("a valid certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// Sends a request line and then header bytes one every 100 ms, never ending the head, until
/// the server cuts the connection off; returns how long that took from the first byte, and what
/// the server answered meanwhile.
async fn send_headers_byte_by_byte(stream: TlsStream<TcpStream>) -> (Duration, String) {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let started = Instant::now();
    let answer = tokio::spawn(async move {
        let mut answer = Vec::new();
        // An error or the end of the stream: either way the server closed the connection.
        let _ = reader.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    });
    let head = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        .bytes()
        .chain(std::iter::repeat(b'a'));
    let writing = async {
        for byte in head {
            if writer.write_all(&[byte]).await.is_err() || writer.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let answer = tokio::time::timeout(SAFETY_NET, async {
        tokio::select! {
            answer = answer => answer.expect("the reader does not panic"),
            () = writing => String::new(),
        }
    })
    .await
    .expect("the byte-by-byte client is cut off within the safety net");
    (started.elapsed(), answer)
}

/// Sends [`HEALTHZ_REQUEST`] and returns the response.
async fn request_healthz(stream: &mut TlsStream<TcpStream>) -> String {
    stream.write_all(HEALTHZ_REQUEST.as_bytes()).await.expect("writing");
    read_response(stream).await
}

/// Reads one response with a `content-length`, leaving the connection open.
async fn read_response(stream: &mut TlsStream<TcpStream>) -> String {
    let reading = async {
        let mut response = Vec::new();
        let mut buffer = [0_u8; 4096];
        loop {
            let read = stream.read(&mut buffer).await.expect("reading the response");
            assert!(read > 0, "the connection closed mid-response: {response:?}");
            response.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&response).into_owned();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let content_length: usize = text[..head_end]
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .expect("a content-length");
                if response.len() >= head_end + 4 + content_length {
                    return text;
                }
            }
        }
    };
    tokio::time::timeout(SAFETY_NET, reading)
        .await
        .expect("the response arrives within the safety net")
}

/// Waits until the server closes the connection (end of stream or an error).
async fn wait_closed(mut stream: impl AsyncRead + Unpin) {
    let mut buffer = [0_u8; 1024];
    tokio::time::timeout(SAFETY_NET, async {
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                return;
            }
        }
    })
    .await
    .expect("the server closes the connection within the safety net");
}
