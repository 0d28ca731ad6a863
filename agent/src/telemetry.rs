//! Logging: `tracing` with an `EnvFilter` from `RUST_LOG`, human-readable or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// The filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,sled=warn,async_nats=warn";

/// Installs the global subscriber once. Later calls do nothing.
pub fn init(config: &LogConfig) {
    init_with_default(config, DEFAULT_FILTER);
}

/// [`init`] with `default_filter` when `RUST_LOG` is not set (the simulator's devices log
/// warnings only: info lines times thousands of devices drown the progress).
pub fn init_with_default(config: &LogConfig, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _already_installed = match config.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
