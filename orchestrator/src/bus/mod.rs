//! Everything that talks to NATS: the event stream's definition and the projection consumer.
//!
//! Boundary: this is the only module of the orchestrator that knows async-nats.

mod breach_signals;
mod commands;
mod connection;
mod consumer;
mod history;
mod journal;
mod liveness;
mod password_versions;
mod stream;

pub use breach_signals::serve_requests;
pub use commands::{ensure_commands_stream, issue_command, send_command};
pub use connection::{NatsFacts, NatsStatus, connect, durability_of};
pub use consumer::{BusError, Consumer, ConsumerParts};
pub use history::{DeviceEvents, History, HistoryMessage, HistoryReader, last_audit_event};
pub use journal::{JetStreamJournal, Journal};
pub use liveness::{ensure_liveness_bucket, watch_heartbeats};
pub use password_versions::{ensure_password_versions_stream, publish_password_versions};
pub use stream::{ensure_events_stream, last_sequence};

/// A stored message's `Fleetlaps-Signature` header, if it has one.
fn signature_header(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers
        .and_then(|headers| headers.get(fleetlaps_proto::api::SIGNATURE_HEADER))
        .map(AsRef::<str>::as_ref)
}
