//! Start-up and the run loop: a cycle at start, then one every processing interval, and one
//! whenever the control socket asks; each cycle ends with a heartbeat. The optional metrics
//! listener runs beside the loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use fleetlaps_proto::command::Command;
use fleetlaps_proto::control::{ControlRequest, ControlResponse};
use fleetlaps_proto::event::RotationReason;
use fleetlaps_proto::ids::{DeviceId, DeviceName};
use fleetlaps_proto::policy::{Policy, PolicySource};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, mpsc};

use crate::account::{self, AccountBackend};
use crate::bus::{ConnectSettings, Publisher};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::control;
use crate::fault::Faults;
use crate::identity::Identity;
use crate::metrics::{self, Metrics};
use crate::postauth::PostAuth;
use crate::rotation::{CycleOutcome, Processor, ProcessorParts};
use crate::state::AgentState;

/// How soon to try again while events wait in the outbox (NATS unreachable).
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// A built agent, ready to run.
pub struct App {
    /// The device's cycle, schedule and interval.
    agent: Agent,
    /// The control socket, bound.
    control: UnixListener,
    /// The metrics listener, bound, when `[metrics] listen` asks for one.
    metrics_listener: Option<TcpListener>,
    /// What the listener serves.
    metrics: Metrics,
}

impl App {
    /// Builds the agent with the system clock (and, in a build with the `fault-injection`
    /// feature, the kill point its environment arms).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, Arc::new(SystemClock), Faults::from_environment()).await
    }

    /// Builds the agent with a given clock (tests move time forward) and faults (tests arm them).
    pub async fn build_with(config: Config, clock: Arc<dyn Clock>, faults: Faults) -> anyhow::Result<Self> {
        let identity = Identity::load(&config.state_dir)?.ok_or_else(|| {
            anyhow::anyhow!(
                "not enrolled: run fleetlaps-agent enroll --orchestrator URL --token ENROLLMENT_TOKEN [--ca FILE] \
                 (no {})",
                Identity::path(&config.state_dir).display()
            )
        })?;
        // A bad policy or escrow key is refused before the state is opened or NATS reached.
        effective_policy(&config, &identity)?;
        check_escrow_key(&config, &identity)?;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
        let state = AgentState::open(&config.state_dir, &identity.device_id)
            .with_context(|| format!("opening sled db in {}", config.state_dir.display()))?
            .with_faults(faults.clone())
            .with_outbox_limit(config.outbox_limit);
        let device_name = match config.device_name.clone() {
            Some(name) => name,
            None => system_hostname()?,
        };
        let publisher = Publisher::connect(ConnectSettings {
            url: &config.nats.url,
            ca_file: config.nats.ca_file.as_deref(),
            ack_timeout: Duration::from_secs(config.nats.ack_timeout_secs),
            device_id: state.device_id(),
            nkey_seed_file: config.nats.nkey_seed_file.as_deref(),
            signing_key: identity.signing_key.clone(),
        })
        .await?;
        let control = control::bind(&control::socket_path(&config.state_dir))?;
        let metrics_listener = match config.metrics.listen {
            Some(listen) => Some(metrics::bind(listen).await?),
            None => None,
        };
        let metrics = Metrics::new();
        let agent = Agent::assemble(
            &config,
            AgentParts {
                identity,
                state,
                publisher,
                backend: account::backend(&config.account),
                device_name,
                clock,
                faults,
                metrics: metrics.clone(),
            },
        )?;
        Ok(Self {
            agent,
            control,
            metrics_listener,
            metrics,
        })
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.agent.processor.device_id().clone()
    }

    /// Where the metrics are served (`[metrics] listen`, with port 0 resolved), if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .map(|listener| listener.local_addr().expect("a bound listener has an address"))
    }

    /// Runs cycles until `shutdown` completes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            agent,
            control,
            metrics_listener,
            metrics,
        } = self;
        let (requests, incoming_requests) = mpsc::channel::<control::Request>(8);
        let control_task = tokio::spawn(control::serve(control, requests));
        let metrics_task = metrics_listener.map(|listener| {
            if let Ok(address) = listener.local_addr() {
                tracing::info!(%address, "serving the agent's metrics at /metrics");
            }
            tokio::spawn(metrics::serve(listener, metrics, std::future::pending()))
        });
        let result = agent.run(incoming_requests, shutdown).await;
        control_task.abort();
        if let Some(metrics_task) = metrics_task {
            metrics_task.abort();
        }
        result
    }
}

/// What one device's [`Agent`] is made of, beside the config.
pub(crate) struct AgentParts {
    /// The enrolled identity.
    pub(crate) identity: Identity,
    /// Its durable state, opened for `identity`'s device.
    pub(crate) state: AgentState,
    /// Its way to NATS, signing with `identity`'s key.
    pub(crate) publisher: Publisher,
    /// Where the managed account's password lives.
    pub(crate) backend: Arc<dyn AccountBackend>,
    /// Its host name.
    pub(crate) device_name: DeviceName,
    /// Now.
    pub(crate) clock: Arc<dyn Clock>,
    /// Kill points a test armed; none in production.
    pub(crate) faults: Faults,
    /// Where its rotations, backups and heartbeats are counted.
    pub(crate) metrics: Metrics,
}

/// One device's agent without its control socket: what [`App`] runs, and what the fleet
/// simulator ([`crate::simulate`]) runs for each simulated device, so both run the same loop.
pub(crate) struct Agent {
    /// The cycle and its state.
    pub(crate) processor: Processor,
    /// Time between cycles.
    interval: Duration,
    /// The post-authentication schedule (LAPS PostAuthenticationActions).
    post_auth: PostAuth,
}

impl Agent {
    /// Assembles a device's agent from `parts` and the settings of `config` (its policy, its
    /// timings, its post-authentication commands). Refuses an escrow key in the config other
    /// than the enrolled one.
    pub(crate) fn assemble(config: &Config, parts: AgentParts) -> anyhow::Result<Self> {
        let AgentParts {
            identity,
            state,
            publisher,
            backend,
            device_name,
            clock,
            faults,
            metrics,
        } = parts;
        let (policy, policy_source) = effective_policy(config, &identity)?;
        check_escrow_key(config, &identity)?;
        let post_auth = PostAuth::load(&state, config.post_authentication.clone())
            .context("loading the post-authentication schedule")?;
        let (confirmations, _) = broadcast::channel(64);
        let processor = Processor::new(ProcessorParts {
            state,
            publisher,
            confirmations,
            backend,
            clock,
            policy,
            policy_source,
            device_name,
            escrow: identity.escrow_public_key,
            recovery: identity.escrow_recovery_public_key,
            settings: config.processor_settings(),
            faults,
            metrics,
        });
        Ok(Self {
            processor,
            interval: config.processing_interval(),
            post_auth,
        })
    }

    /// Runs cycles, answering `incoming_requests` (the control socket's, or the simulator's),
    /// until `shutdown` completes.
    pub(crate) async fn run(
        self,
        mut incoming_requests: mpsc::Receiver<control::Request>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let Self {
            mut processor,
            interval,
            mut post_auth,
        } = self;
        let device_id = processor.device_id().clone();
        tracing::info!(%device_id, device_name = %processor.device_name(), "agent started");
        let (commands_in, mut commands) = mpsc::channel::<Command>(64);
        let mut confirmations = processor.subscribe_confirmations();
        processor.listen(commands_in).await?;
        tokio::pin!(shutdown);

        // Before anything is emitted: a restored device starts its new generation first.
        if let Err(err) = processor.start().await {
            tracing::error!(error = %err, "checking the state against the centre's failed");
        }
        if let Err(err) = processor.announce_policy().await {
            tracing::error!(error = %err, "recording the policy failed");
        }
        // Failures are logged inside; the loop retries them.
        let _outcome = run_cycle(&mut processor, None).await;
        check_last_command(&mut processor).await;
        // The next cycle's time is kept across wake-ups, so frequent requests (status polls,
        // confirmations) never postpone it.
        let mut next_cycle = tokio::time::Instant::now() + interval;
        loop {
            if processor.busy()? {
                next_cycle = next_cycle.min(tokio::time::Instant::now() + RETRY_INTERVAL.min(interval));
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(next_cycle) => {
                    next_cycle = tokio::time::Instant::now() + interval;
                    let _outcome = run_cycle(&mut processor, None).await;
                    check_last_command(&mut processor).await;
                }
                Some((request, reply)) = incoming_requests.recv() => {
                    let response = match request {
                        ControlRequest::Reset => answer(processor.reset().await),
                        ControlRequest::ProcessNow => {
                            let response = answer(run_cycle(&mut processor, None).await);
                            check_last_command(&mut processor).await;
                            response
                        }
                        ControlRequest::Status => match processor.status() {
                            Ok(mut report) => {
                                report.post_authentication_reset_at = post_auth.next_deadline();
                                ControlResponse::Status(Box::new(report))
                            }
                            Err(err) => ControlResponse::Refused { message: err.to_string() },
                        },
                        ControlRequest::Authentication(report) => {
                            let now = processor.now();
                            match post_auth.on_authentication(report, &processor, now).await {
                                Ok(response) => response,
                                Err(err) => ControlResponse::Refused { message: err.to_string() },
                            }
                        }
                    };
                    // The asker may have gone away; the work was done regardless.
                    let _ = reply.send(response);
                    // What the request queued (an authentication's event) leaves after the answer,
                    // so the PAM hook never waits for NATS.
                    processor.publish_outbox().await;
                }
                // Post-authentication: also re-evaluated after every other wake-up, so a clock moved
                // forward (tests) takes effect at the next control request.
                () = sleep_until(post_auth.next_wake(), processor.now()) => {
                    let now = processor.now();
                    if let Err(err) = post_auth.run_due(&mut processor, now).await {
                        tracing::error!(error = %err, "recording the post-authentication actions failed");
                    }
                }
                Ok(confirmation) = confirmations.recv() => {
                    if let Err(err) = processor.confirmed(&confirmation) {
                        tracing::error!(error = %err, "recording a backup confirmation failed");
                    }
                }
                Some(command) = commands.recv() => execute(&mut processor, command).await,
            }
        }
        tracing::info!(%device_id, "agent stopped");
        Ok(())
    }
}

/// Sleeps until `deadline` of the agent's clock (`now` is that clock's time), or for ever
/// without one.
async fn sleep_until(deadline: Option<DateTime<Utc>>, now: DateTime<Utc>) {
    match deadline {
        Some(deadline) => tokio::time::sleep((deadline - now).to_std().unwrap_or_default()).await,
        None => std::future::pending().await,
    }
}

fn answer<E: std::fmt::Display>(result: Result<CycleOutcome, E>) -> ControlResponse {
    match result {
        Ok(outcome) => ControlResponse::Done {
            message: describe(outcome),
        },
        Err(err) => ControlResponse::Refused {
            message: err.to_string(),
        },
    }
}

/// Executes the last command kept for this device, if it was not executed yet: how a device
/// that was offline when a command was issued catches up.
async fn check_last_command(processor: &mut Processor) {
    match processor.last_command().await {
        Ok(Some(command)) => execute(processor, command).await,
        Ok(None) => {}
        Err(err) => tracing::debug!(error = %err, "reading the last command failed; will retry"),
    }
}

async fn execute(processor: &mut Processor, command: Command) {
    let command_id = command.id;
    match processor.execute(command).await {
        Ok(Some(outcome)) => tracing::info!(%command_id, ?outcome, "command executed"),
        Ok(None) => {}
        Err(err) => tracing::warn!(%command_id, error = %err, "command failed; will retry"),
    }
}

/// Runs one cycle, then puts the device's heartbeat, whatever the cycle's outcome: a device
/// whose rotations fail is alive all the same.
async fn run_cycle(processor: &mut Processor, force: Option<RotationReason>) -> Result<CycleOutcome, String> {
    let outcome = processor.process(force).await.map_err(|err| err.to_string());
    processor.heartbeat().await;
    outcome
}

fn describe(outcome: CycleOutcome) -> String {
    match outcome {
        CycleOutcome::Disabled => "BackupDirectory is 0: the agent manages nothing".to_owned(),
        CycleOutcome::NotDue { expires_at } => format!("password not due; it expires at {expires_at}"),
        CycleOutcome::Rotated { rotation_id, .. } => format!("password rotated and backed up (rotation {rotation_id})"),
    }
}

/// Refuses an `escrow_public_key` in the config other than the one the orchestrator gave at
/// enrollment.
fn check_escrow_key(config: &Config, identity: &Identity) -> anyhow::Result<()> {
    if let Some(configured) = config.escrow_public_key
        && configured != identity.escrow_public_key
    {
        anyhow::bail!(
            "escrow_public_key {configured} differs from the key the orchestrator gave at enrollment ({}); \
             remove it from the config or fix it",
            identity.escrow_public_key
        );
    }
    Ok(())
}

/// The policy in force and where it came from: the orchestrator's, sent at enrollment, wins over
/// the local `[policy]`, as LAPS's CSP policy wins over local configuration.
pub fn effective_policy(config: &Config, identity: &Identity) -> anyhow::Result<(Policy, PolicySource)> {
    match &identity.policy {
        Some(policy) => Ok((policy.clone(), PolicySource::Orchestrator)),
        None => Ok((config.policy()?, PolicySource::LocalConfig)),
    }
}

/// The kernel's host name, as a device name.
pub fn system_hostname() -> anyhow::Result<DeviceName> {
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
