//! Start-up and the run loop: a cycle at start, then one every processing interval, and one
//! whenever the control socket asks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::RotationReason;
use fleetlaps_proto::ids::{DeviceId, DeviceName};
use fleetlaps_proto::policy::PolicySource;
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use crate::account::{AccountBackend, FileAccounts};
use crate::bus::Publisher;
use crate::clock::{Clock, SystemClock};
use crate::config::{AccountConfig, Config};
use crate::control;
use crate::rotation::{CycleOutcome, Processor};
use crate::state::AgentState;

/// How soon to try again while events wait in the outbox (NATS unreachable).
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// A built agent, ready to run.
pub struct App {
    /// The cycle and its state.
    processor: Processor,
    /// The control socket, bound.
    control: UnixListener,
    /// Time between cycles.
    interval: Duration,
}

impl App {
    /// Builds the agent with the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Builds the agent with a given clock (tests move time forward).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let policy = config.policy()?;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
        let state = AgentState::open(&config.state_dir)
            .with_context(|| format!("opening sled db in {}", config.state_dir.display()))?;
        let device_name = match config.device_name.clone() {
            Some(name) => name,
            None => system_hostname()?,
        };
        let backend: Arc<dyn AccountBackend> = match &config.account {
            AccountConfig::File { path } => Arc::new(FileAccounts::new(path)),
        };
        let publisher = Publisher::connect(&config.nats.url, Duration::from_secs(config.nats.ack_timeout_secs)).await?;
        let control = control::bind(&control::socket_path(&config.state_dir))?;
        let processor = Processor {
            state,
            publisher,
            backend,
            clock,
            policy,
            policy_source: PolicySource::LocalConfig,
            device_name,
            escrow: config.escrow_public_key,
            in_flight: None,
        };
        Ok(Self {
            processor,
            control,
            interval: config.processing_interval(),
        })
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.processor.state.device_id().clone()
    }

    /// Runs cycles until `shutdown` completes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            mut processor,
            control,
            interval,
        } = self;
        tracing::info!(device_id = %processor.state.device_id(), device_name = %processor.device_name, "agent started");
        let (requests, mut incoming) = mpsc::channel::<control::Request>(8);
        let control_task = tokio::spawn(control::serve(control, requests));
        tokio::pin!(shutdown);

        if let Err(err) = processor.announce_policy().await {
            tracing::error!(error = %err, "recording the policy failed");
        }
        // Failures are logged inside; the loop retries them.
        let _outcome = run_cycle(&mut processor, None).await;
        loop {
            let wait = if processor.state.outbox_len() > 0 || processor.state.pending()?.is_some() {
                RETRY_INTERVAL.min(interval)
            } else {
                interval
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait) => {
                    let _outcome = run_cycle(&mut processor, None).await;
                }
                Some((request, reply)) = incoming.recv() => {
                    let force = match request {
                        ControlRequest::Reset => Some(RotationReason::Manual),
                        ControlRequest::ProcessNow => None,
                    };
                    let response = match run_cycle(&mut processor, force).await {
                        Ok(outcome) => ControlResponse::Done { message: describe(outcome) },
                        Err(message) => ControlResponse::Refused { message },
                    };
                    // The asker may have gone away; the cycle ran regardless.
                    let _ = reply.send(response);
                }
            }
        }
        control_task.abort();
        tracing::info!("agent stopped");
        Ok(())
    }
}

async fn run_cycle(processor: &mut Processor, force: Option<RotationReason>) -> Result<CycleOutcome, String> {
    match processor.process(force).await {
        Ok(outcome) => {
            tracing::debug!(?outcome, "processing cycle finished");
            Ok(outcome)
        }
        Err(err) => {
            tracing::warn!(error = %err, "processing cycle failed");
            Err(err.to_string())
        }
    }
}

fn describe(outcome: CycleOutcome) -> String {
    match outcome {
        CycleOutcome::Disabled => "BackupDirectory is 0: the agent manages nothing".to_owned(),
        CycleOutcome::NotDue { expires_at } => format!("password not due; it expires at {expires_at}"),
        CycleOutcome::Rotated { rotation_id, .. } => format!("password rotated and backed up (rotation {rotation_id})"),
    }
}

fn system_hostname() -> anyhow::Result<DeviceName> {
    let text = std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    DeviceName::parse(text.trim()).context("the host name is not usable as a device name; set device_name")
}

/// Completes at Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
