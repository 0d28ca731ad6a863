//! Start-up and the run loop: binds the listeners, connects to NATS, opens the projections, then
//! runs the consumer and the HTTP servers until the shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetlaps_proto::seal::EscrowPublicKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenStore;
use crate::bus::{self, Consumer};
use crate::config::Config;
use crate::escrow;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::projection::Projections;

/// A built orchestrator, listening but not yet serving.
pub struct App {
    /// The API listener, already bound (so port 0 is resolved).
    http_listener: TcpListener,
    /// The metrics listener, already bound.
    metrics_listener: TcpListener,
    /// Shared with the HTTP handlers.
    state: AppState,
    /// The projection consumer, bound at the projections' position.
    consumer: Consumer,
}

/// How long running tasks get to finish after shutdown is signalled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl App {
    /// Opens everything the orchestrator needs; fails with a message naming what is wrong.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let escrow = escrow::load_or_create(&config.data_dir.join(escrow::KEY_FILE))?;
        let projections_path = config.data_dir.join("projections");
        let projections = Projections::open(&projections_path)
            .with_context(|| format!("opening sled db at {}", projections_path.display()))?;
        let metrics = Metrics::new();

        let jetstream = bus::connect(&config.nats.url).await?;
        let stream = bus::ensure_events_stream(&jetstream).await?;
        bus::ensure_commands_stream(&jetstream).await?;
        let consumer = Consumer::bind(
            &jetstream,
            &stream,
            &config.nats.consumer,
            projections.clone(),
            metrics.clone(),
        )
        .await?;

        let http_listener = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding http.listen {}", config.http.listen))?;
        let metrics_listener = TcpListener::bind(config.metrics.listen)
            .await
            .with_context(|| format!("binding metrics.listen {}", config.metrics.listen))?;
        let state = AppState {
            projections,
            escrow: Arc::new(escrow),
            tokens: Arc::new(TokenStore::from_config(&config.tokens)),
            metrics,
        };
        Ok(Self {
            http_listener,
            metrics_listener,
            state,
            consumer,
        })
    }

    /// Where the API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The escrow public key that agents seal passwords to.
    pub fn escrow_public_key(&self) -> EscrowPublicKey {
        self.state.escrow.public_key()
    }

    /// The projections (for tools and tests: digests, rebuild checks).
    pub fn projections(&self) -> Projections {
        self.state.projections.clone()
    }

    /// Serves until `shutdown` completes, then stops every task and waits for them to drain.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        tracing::info!(http = %self.http_addr(), metrics = %self.metrics_addr(), "orchestrator started");

        let api = axum::serve(self.http_listener, http::router(self.state.clone()))
            .with_graceful_shutdown(cancel.clone().cancelled_owned());
        let metrics = axum::serve(self.metrics_listener, http::metrics_router(self.state.metrics.clone()))
            .with_graceful_shutdown(cancel.clone().cancelled_owned());
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move { api.await.context("serving the API") });
        tasks.spawn(async move { metrics.await.context("serving metrics") });
        let consumer_cancel = cancel.clone();
        tasks.spawn(async move { self.consumer.run(consumer_cancel).await.context("consuming events") });

        // Stop at the signal, or as soon as any task fails.
        let mut outcome = Ok(());
        tokio::select! {
            () = shutdown => tracing::info!("shutting down"),
            Some(joined) = tasks.join_next() => {
                outcome = joined.context("a task panicked").and_then(|result| result);
                if let Err(err) = &outcome {
                    tracing::error!(error = %err, details = ?err, "a task stopped; shutting down");
                }
            }
        }
        cancel.cancel();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(joined) = tasks.join_next().await {
                if let Ok(Err(err)) = joined {
                    tracing::warn!(error = %err, "task ended with an error during shutdown");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("tasks did not drain in time; stopping them");
            tasks.abort_all();
        }
        outcome
    }
}

/// Completes at Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
