//! Start-up and the run loop: locks the data directory, connects to NATS, checks the orchestrator
//! key and then the escrow key against the history, binds the listeners, opens the projections, then runs the consumer and
//! the HTTP servers until the shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetlaps_proto::seal::EscrowPublicKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenStore;
use crate::bus::{self, Consumer, JetStreamJournal};
use crate::campaigns::{CampaignRunner, SignalDesk};
use crate::config::{ApiTransport, Config, HttpLimits};
use crate::data_dir::DataDirLock;
use crate::detectors::{DetectorParts, Detectors};
use crate::health::Health;
use crate::http::{self, AppState, ServeOptions};
use crate::key_ceremony;
use crate::liveness::Liveness;
use crate::metrics::Metrics;
use crate::orchestrator_key;
use crate::projection::Projections;
use crate::tls::{self, ServerTls};

/// A built orchestrator, listening but not yet serving.
pub struct App {
    /// The API listener, already bound (so port 0 is resolved).
    http_listener: TcpListener,
    /// The API's TLS; `None` only when the config asked for plain HTTP (`http.plain_http`).
    api_tls: Option<ServerTls>,
    /// The API's timeouts and connection caps (`[http]`).
    http_limits: HttpLimits,
    /// `http.public_url`, checked.
    public_url: Option<String>,
    /// The metrics listener, already bound.
    metrics_listener: TcpListener,
    /// Shared with the HTTP handlers.
    state: AppState,
    /// The projection consumer, bound at the projections' position.
    consumer: Consumer,
    /// The breach campaign runner.
    campaigns: CampaignRunner,
    /// Takes breach signals over NATS.
    signals: (async_nats::Client, Arc<SignalDesk>),
    /// The detectors, when any is on.
    detectors: Option<Detectors>,
    /// Watches the liveness bucket into the devices' last heartbeats.
    heartbeats: (async_nats::jetstream::Context, Liveness),
    /// The data directory's lock, held while this orchestrator runs.
    lock: DataDirLock,
}

/// How long running tasks get to finish after shutdown is signalled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl App {
    /// Opens everything the orchestrator needs; fails with a message naming what is wrong.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let policy = config.policy()?;
        let escrow_recovery_public_key = config.escrow_recovery_public_key()?;
        let http_limits = config.http.limits()?;
        let public_url = config.http.public_url()?;
        let api_tls = match config.http.transport()? {
            ApiTransport::Tls(source) => Some(tls::load(&source, &config.data_dir)?),
            ApiTransport::PlainHttp => {
                tracing::warn!(
                    "the API serves plain HTTP (http.plain_http = true): tokens and passwords cross the network in clear"
                );
                None
            }
        };
        let projections_path = config.data_dir.join("projections");
        let projections = Projections::open(&projections_path)
            .with_context(|| format!("opening sled db at {}", projections_path.display()))?
            .with_quarantine_max_entries(config.quarantine.max_entries);
        let metrics = Metrics::new();
        metrics.observe_quarantine(projections.clone());

        let (jetstream, nats) = bus::connect(&config).await?;
        let mut stream = bus::ensure_events_stream(&jetstream).await?;
        bus::ensure_commands_stream(&jetstream).await?;
        bus::ensure_password_versions_stream(&jetstream).await?;
        bus::ensure_liveness_bucket(&jetstream).await?;
        let liveness = Liveness::new(config.monitoring.silent_after());
        metrics.observe_fleet(projections.clone(), liveness.clone());
        // Before anything is served: the keys must be the ones the history names, the orchestrator
        // key first, since it signs the escrow key's record.
        let history = bus::History::open(&jetstream).await?;
        let signing_key = orchestrator_key::open(&config, &history).await?;
        let escrow = key_ceremony::open_keyring(&config, &history, &signing_key).await?;
        let escrow = Arc::new(escrow);
        // Measured after the key checks, which may have recorded events: the projections hold
        // authority once they have folded everything on the stream now.
        let start_horizon = bus::last_sequence(&mut stream).await?;
        let health = Arc::new(Health::new(start_horizon, projections.clone(), metrics.clone()));
        if health.authority().is_err() {
            tracing::info!(
                applied = projections.applied_sequence(),
                start_horizon,
                "the projections are behind the history: tokens are refused (503) until they catch up"
            );
        }
        let journal: Arc<dyn bus::Journal> =
            Arc::new(JetStreamJournal::new(jetstream.clone(), Arc::clone(&signing_key)));
        let campaign_wake: Arc<tokio::sync::Notify> = Arc::default();
        let (detectors, detector_feed) = match Detectors::new(
            &config.detectors,
            DetectorParts {
                projections: projections.clone(),
                journal: Arc::clone(&journal),
                health: Arc::clone(&health),
                metrics: metrics.clone(),
                campaign_wake: Arc::clone(&campaign_wake),
            },
        )? {
            Some((detectors, feed)) => (Some(detectors), Some(feed)),
            None => (None, None),
        };
        let consumer = Consumer::bind(
            &stream,
            &config.nats.consumer,
            &jetstream,
            bus::ConsumerParts {
                projections: projections.clone(),
                metrics: metrics.clone(),
                escrow: Arc::clone(&escrow),
                recovery_public_key: escrow_recovery_public_key,
                signing_key: Arc::clone(&signing_key),
                health: Arc::clone(&health),
                detectors: detector_feed,
                campaign_wake: Arc::clone(&campaign_wake),
                signatures_verified_every: config.history.signatures_verified_every,
            },
        )
        .await?;

        let http_listener = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding http.listen {}", config.http.listen))?;
        let metrics_listener = TcpListener::bind(config.metrics.listen)
            .await
            .with_context(|| format!("binding metrics.listen {}", config.metrics.listen))?;
        let state = AppState {
            projections: projections.clone(),
            escrow,
            escrow_recovery_public_key,
            tokens: Arc::new(TokenStore::new(
                &config.tokens,
                config
                    .bootstrap_admin_token
                    .as_ref()
                    .map(|token| (token, config.bootstrap_admin_token_expires_at)),
                projections.clone(),
            )),
            journal,
            device_events: Arc::new(history),
            rotate_min_interval: Duration::from_secs(config.http.rotate_min_interval_secs),
            rotate_requests: Arc::default(),
            policy,
            enrollments_in_flight: Arc::default(),
            metrics,
            nats,
            health,
            token_issuance: Arc::default(),
            campaign_wake,
            request_timeout: http_limits.request_timeout,
            liveness: liveness.clone(),
        };
        let campaigns = CampaignRunner::new(
            state.projections.clone(),
            Arc::clone(&state.journal),
            Arc::clone(&state.health),
            config.campaigns.wave_devices_per_second,
            Arc::clone(&state.campaign_wake),
        );
        let signals = (
            jetstream.client(),
            Arc::new(SignalDesk {
                projections: state.projections.clone(),
                journal: Arc::clone(&state.journal),
                tokens: Arc::clone(&state.tokens),
                health: Arc::clone(&state.health),
                wake: Arc::clone(&state.campaign_wake),
            }),
        );
        Ok(Self {
            campaigns,
            signals,
            detectors,
            heartbeats: (jetstream, liveness),
            http_listener,
            api_tls,
            http_limits,
            public_url,
            metrics_listener,
            state,
            consumer,
            lock,
        })
    }

    /// Where the API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The API's base URL: `https://<http_addr>`, or `http://` when plain HTTP was asked for.
    pub fn api_url(&self) -> String {
        let scheme = if self.api_tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr())
    }

    /// The certificate file the API presents, when it serves TLS. With `self_signed = true` it is
    /// the certificate clients trust (`lapsctl --ca`); with `cert_file`, it is that file.
    pub fn tls_certificate_path(&self) -> Option<&Path> {
        self.api_tls.as_ref().map(|tls| tls.certificate_path.as_path())
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

    /// Each device's last heartbeat, as the orchestrator watches it (for tools and tests).
    pub fn liveness(&self) -> Liveness {
        self.heartbeats.1.clone()
    }

    /// Serves until `shutdown` completes, then stops every task and waits for them to drain.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        tracing::info!(api = %self.api_url(), metrics = %self.metrics_addr(), "orchestrator started");
        // Released when this returns, once every task has stopped.
        let _lock = self.lock;

        let mut tasks = tokio::task::JoinSet::new();
        // The API's own serving loop: over TLS or plain HTTP, with the same timeouts and caps; it
        // gives handlers the peer address, which the audit records.
        let api = http::serve(
            self.http_listener,
            http::router(self.state.clone()),
            ServeOptions {
                tls: self.api_tls.map(|api_tls| api_tls.config),
                limits: self.http_limits,
                metrics: self.state.metrics.clone(),
                public_url: self.public_url,
            },
            cancel.clone(),
        );
        tasks.spawn(async move {
            api.await;
            Ok(())
        });
        // Plain HTTP on purpose: Prometheus scrapes this listener locally (it binds loopback by
        // default), and it serves counters, never tokens or passwords.
        let metrics = axum::serve(self.metrics_listener, http::metrics_router(self.state.metrics.clone()))
            .with_graceful_shutdown(cancel.clone().cancelled_owned());
        tasks.spawn(async move { metrics.await.context("serving metrics") });
        let (signal_client, desk) = self.signals;
        let signals_cancel = cancel.clone();
        tasks.spawn(async move {
            let answer = |headers, payload| {
                let desk = Arc::clone(&desk);
                async move { desk.answer(headers, payload).await }
            };
            bus::serve_requests(
                signal_client,
                fleetlaps_proto::subject::BREACH_SIGNALS,
                answer,
                signals_cancel,
            )
            .await
            .context("taking breach signals")
        });
        let campaigns_cancel = cancel.clone();
        tasks.spawn(async move {
            self.campaigns.run(campaigns_cancel).await;
            Ok(())
        });
        if let Some(detectors) = self.detectors {
            let detectors_cancel = cancel.clone();
            tasks.spawn(async move {
                detectors.run(detectors_cancel).await;
                Ok(())
            });
        }
        let (heartbeats_jetstream, liveness) = self.heartbeats;
        let heartbeats_cancel = cancel.clone();
        tasks.spawn(async move {
            bus::watch_heartbeats(heartbeats_jetstream, liveness, heartbeats_cancel).await;
            Ok(())
        });
        let consumer_cancel = cancel.clone();
        tasks.spawn(async move {
            // A failing batch is retried and reported in /healthz, never the end of the API.
            self.consumer.run(consumer_cancel).await;
            Ok(())
        });

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
