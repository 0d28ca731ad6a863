//! The harness itself works: nats-server starts with JetStream, restarts with its store, and is
//! gone after drop.

use std::net::{Ipv4Addr, TcpStream};

use async_nats::jetstream::{self, stream};

use crate::harness::{TestNats, init_tracing};

const STREAM: &str = "SMOKE";

async fn connect(nats: &TestNats) -> jetstream::Context {
    jetstream::new(nats.client().await)
}

fn accepts_connections(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
}

async fn create_stream(js: &jetstream::Context) {
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["smoke.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("creating the stream");
}

async fn publish_with_id(js: &jetstream::Context, msg_id: &str) -> jetstream::publish::PublishAck {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    js.publish_with_headers("smoke.one", headers, "hello".into())
        .await
        .expect("publishing")
        .await
        .expect("waiting for the publish ack")
}

async fn message_count(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream(STREAM).await.expect("getting the stream");
    stream.info().await.expect("reading stream info").state.messages
}

#[tokio::test]
async fn nats_server_starts_with_jetstream_and_stops_on_drop() {
    init_tracing();
    let nats = TestNats::start();
    let port = nats.port();
    let js = connect(&nats).await;
    create_stream(&js).await;

    let first = publish_with_id(&js, "smoke-1").await;
    let again = publish_with_id(&js, "smoke-1").await;

    assert_eq!(first.stream, STREAM);
    assert_eq!(first.sequence, 1);
    assert!(!first.duplicate);
    assert!(again.duplicate, "the same Nats-Msg-Id is deduplicated");
    drop(js);
    drop(nats);
    assert!(!accepts_connections(port), "the server is gone after drop");
}

#[tokio::test]
async fn nats_server_keeps_its_store_across_stop_kill_and_restart() {
    init_tracing();
    let mut nats = TestNats::start();
    let port = nats.port();
    let js = connect(&nats).await;
    create_stream(&js).await;
    publish_with_id(&js, "smoke-1").await;
    drop(js);

    nats.stop();
    assert!(!accepts_connections(port), "the server is gone after stop");
    nats.restart();
    assert_eq!(nats.port(), port);
    let js = connect(&nats).await;
    assert_eq!(message_count(&js).await, 1, "after stop and restart");
    publish_with_id(&js, "smoke-2").await;
    drop(js);

    nats.kill();
    assert!(!accepts_connections(port), "the server is gone after kill");
    nats.restart();
    let js = connect(&nats).await;
    assert_eq!(message_count(&js).await, 2, "after kill and restart");
    assert!(nats.store_dir().join("jetstream").is_dir());
}
