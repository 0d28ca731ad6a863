//! The local control socket: how `fleetlaps-agent reset` and `process-now` reach the running
//! agent. A Unix stream socket in the state directory, owner-only (0600), one JSON request line
//! and one JSON answer line per connection.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "control.sock";

/// A request from the socket, with where to send the answer.
pub type Request = (ControlRequest, oneshot::Sender<ControlResponse>);

/// The socket path for a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// Binds the socket, replacing a stale one, and restricts it to the owner.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting control socket {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections and forwards their requests to `requests` until the receiver is gone.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Request>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "accepting a control connection failed");
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, requests).await {
                tracing::warn!(error = %err, "control connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, requests: mpsc::Sender<Request>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let response = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            requests
                .send((request, reply))
                .await
                .context("the agent is shutting down")?;
            answer.await.context("the agent dropped the request")?
        }
        Err(err) => ControlResponse::Refused {
            message: format!(
                "malformed request: {err}; allowed: {{\"request\":\"reset\"}} or {{\"request\":\"process_now\"}}"
            ),
        },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

/// Sends one request to the agent whose state directory is `state_dir` and returns its answer.
pub async fn send(state_dir: &Path, request: &ControlRequest) -> anyhow::Result<ControlResponse> {
    let path = socket_path(state_dir);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "connecting to the agent's control socket {}; is the agent running?",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).with_context(|| "the agent's answer is not valid".to_owned())
}
