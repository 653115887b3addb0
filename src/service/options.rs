//! What `serve` was asked to do: the flags and the config file, merged
//! ("settled") at start-up and again on every reload.

use crate::config::{AccessLogArg, FileConfig, KnobArgs, Knobs, defaults};
use crate::http::listener::ListenSpec;
use crate::http::tls::TlsFiles;
use crate::http::{ListenAddr, Listener};
use crate::telemetry::{access, trace};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Duration;

/// What `serve` was asked to do (flags; the config file is re-read on reload).
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub component: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub listen: Vec<ListenSpec>,
    pub knobs: KnobArgs,
    pub drain_timeout: Option<Duration>,
    pub shutdown_delay: Option<Duration>,
    pub exit_idle_after: Option<Duration>,
    pub metrics_listen: Option<ListenAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_sockets: Vec<String>,
    pub plain_sockets: Vec<String>,
    pub access_log: Option<crate::config::AccessLogArg>,
    pub access_log_buffer: Option<u64>,
    pub access_log_flush: Option<Duration>,
}

/// The flags and the config file, merged.
pub(crate) struct Settled {
    pub(crate) component: PathBuf,
    pub(crate) knobs: Knobs,
    pub(crate) listen: Vec<ListenSpec>,
    /// No `listen` was given: `listen` is [`defaults::LISTEN`].
    pub(crate) listen_defaulted: bool,
    pub(crate) drain_timeout: Duration,
    /// `None`: the default, which depends on whether sockets are inherited
    /// (see [`Settled::shutdown_delay`]).
    shutdown_delay: Option<Duration>,
    pub(crate) exit_idle_after: Option<Duration>,
    pub(crate) metrics_listen: Option<ListenAddr>,
    pub(crate) tls: Option<TlsFiles>,
    tls_sockets: Vec<String>,
    plain_sockets: Vec<String>,
    /// `None`: off.
    pub(crate) access_log: Option<access::Settings>,
    pub(crate) trace: trace::Settings,
}

impl ServeOptions {
    pub(crate) fn settle(&self) -> Result<Settled> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let knobs = file.knobs.clone().overlay(self.knobs.clone()).resolve()?;
        let Some(component) = self.component.clone().or(file.component.clone()) else {
            bail!("no component given: pass COMPONENT or set `component` in the config file");
        };
        let listen = if !self.listen.is_empty() {
            self.listen.clone()
        } else if !file.listen.is_empty() {
            file.listen
                .iter()
                .map(|s| s.parse::<ListenSpec>().map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?
        } else {
            vec![ListenSpec::from(
                defaults::LISTEN
                    .parse::<ListenAddr>()
                    .expect("default address parses"),
            )]
        };
        let metrics_listen = match (&self.metrics_listen, &file.metrics_listen) {
            (Some(a), _) => Some(a.clone()),
            (None, Some(s)) => Some(s.parse::<ListenAddr>().map_err(anyhow::Error::msg)?),
            (None, None) => None,
        };
        let tls = match (
            self.tls_cert.clone().or(file.tls_cert.clone()),
            self.tls_key.clone().or(file.tls_key.clone()),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => bail!("tls-cert needs tls-key (the certificate's private key)"),
            (None, Some(_)) => bail!("tls-key needs tls-cert (its certificate chain)"),
        };
        let tls_sockets = [&self.tls_sockets[..], &file.tls_sockets[..]].concat();
        let plain_sockets = [&self.plain_sockets[..], &file.plain_sockets[..]].concat();
        if tls.is_none() {
            if let Some(s) = listen.iter().find(|s| s.tls == Some(true)) {
                bail!(
                    "cannot listen on https://{}: TLS needs tls-cert and tls-key",
                    match &s.addr {
                        ListenAddr::Tcp(a) => a.to_string(),
                        ListenAddr::Unix(p) => p.display().to_string(),
                    }
                );
            }
            if let Some(name) = tls_sockets.first() {
                bail!("tls-socket `{name}`: TLS needs tls-cert and tls-key");
            }
        }
        if let Some(name) = tls_sockets.iter().find(|n| plain_sockets.contains(n)) {
            bail!("socket `{name}` is named both in tls-socket and in plain-socket");
        }
        let trace =
            trace::Settings::from_env_and_file(file.trace_context.unwrap_or(true), &file.otel)?;
        Ok(Settled {
            trace,
            component,
            knobs,
            listen_defaulted: self.listen.is_empty() && file.listen.is_empty(),
            listen,
            drain_timeout: self
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(Duration::from_secs(30)),
            shutdown_delay: self.shutdown_delay.or(file.shutdown_delay),
            exit_idle_after: self.exit_idle_after.or(file.exit_idle_after),
            metrics_listen,
            tls,
            tls_sockets,
            plain_sockets,
            access_log: access_settings(
                self.access_log.clone().or(file.access_log.clone()),
                self.access_log_buffer.or(file.access_log_buffer),
                self.access_log_flush.or(file.access_log_flush),
            )?,
        })
    }
}

/// The access log knobs, with their defaults.
fn access_settings(
    arg: Option<AccessLogArg>,
    buffer: Option<u64>,
    flush: Option<Duration>,
) -> Result<Option<access::Settings>> {
    let destination = match arg.unwrap_or(AccessLogArg::On) {
        AccessLogArg::Off => return Ok(None),
        AccessLogArg::Stderr => access::Destination::Stderr,
        // systemd's LogsDirectory=.
        AccessLogArg::On => match crate::config::systemd_directory("LOGS_DIRECTORY") {
            Some(dir) => access::Destination::File(dir.join("access.log")),
            None => access::Destination::Stderr,
        },
        AccessLogArg::File(p) => {
            let p = if p.is_relative() {
                std::env::current_dir()
                    .context("access-log: cannot resolve a relative path")?
                    .join(p)
            } else {
                p
            };
            access::Destination::File(p)
        }
    };
    let buffer = match buffer {
        Some(b) => usize::try_from(b)
            .ok()
            .filter(|&b| b <= 16 << 20)
            .ok_or_else(|| anyhow::anyhow!("access-log-buffer: at most 16MiB"))?,
        None => access::DEFAULT_BUFFER,
    };
    Ok(Some(access::Settings {
        destination,
        buffer,
        flush: flush.unwrap_or(access::DEFAULT_FLUSH),
    }))
}

/// The shutdown delay when sockets are bound here: long enough for a load
/// balancer polling `/readyz` to see 503 and stop sending (the HAProxy
/// example checks every second and gives up after two failures, so about
/// 3 s), and for Kubernetes to take the pod out of its Service endpoints
/// (usually a second or two; the endpoints' watchers follow), with room to
/// spare. systemd socket activation needs none: systemd holds the
/// listening socket, and connections wait in its backlog for the next start.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

impl Settled {
    /// How long to keep serving after SIGTERM before the listeners close.
    pub(crate) fn shutdown_delay(&self, socket_activated: bool) -> Duration {
        self.shutdown_delay.unwrap_or(if socket_activated {
            Duration::ZERO
        } else {
            DEFAULT_SHUTDOWN_DELAY
        })
    }

    /// Whether a bound listener serves TLS: as its `https://` or `http://`
    /// says, else TCP ones do when a certificate is configured.
    pub(crate) fn bound_tls(&self, spec: &ListenSpec) -> bool {
        spec.tls
            .unwrap_or(self.tls.is_some() && matches!(spec.addr, ListenAddr::Tcp(_)))
    }

    /// Whether an inherited socket serves TLS: when a certificate is
    /// configured, the sockets named in `tls-socket` if any are named,
    /// else every TCP socket not named in `plain-socket`.
    pub(crate) fn inherited_tls(&self, name: &str, listener: &Listener) -> bool {
        if self.tls.is_none() {
            return false;
        }
        if !self.tls_sockets.is_empty() {
            return self.tls_sockets.iter().any(|n| n == name);
        }
        !listener.is_unix() && !self.plain_sockets.iter().any(|n| n == name)
    }
}
