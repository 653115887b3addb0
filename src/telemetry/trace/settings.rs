//! Trace settings, the standard way: the `OTEL_*` environment variables
//! of the OpenTelemetry specification, and the `[otel]` table of the config
//! file with the same meanings (a variable that is set wins over the file,
//! as the OpenTelemetry operator and most platforms inject them). Every bad
//! value is an error naming its variable or key.

use serde::Deserialize;
use std::time::Duration;

/// The `[otel]` table of the config file.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OtelFile {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL.
    pub endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full URL traces go to.
    pub traces_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value,...`, values URL-encoded.
    pub headers: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: Option<String>,
    /// `OTEL_RESOURCE_ATTRIBUTES`: `key=value,...`.
    pub resource_attributes: Option<String>,
    /// `OTEL_TRACES_SAMPLER`.
    pub traces_sampler: Option<String>,
    /// `OTEL_TRACES_SAMPLER_ARG`.
    pub traces_sampler_arg: Option<String>,
}

impl OtelFile {
    /// Lays `other` over this: the keys it sets win, the others stay.
    pub fn overlay(&mut self, other: OtelFile) {
        for (slot, v) in [
            (&mut self.endpoint, other.endpoint),
            (&mut self.traces_endpoint, other.traces_endpoint),
            (&mut self.headers, other.headers),
            (&mut self.service_name, other.service_name),
            (&mut self.resource_attributes, other.resource_attributes),
            (&mut self.traces_sampler, other.traces_sampler),
            (&mut self.traces_sampler_arg, other.traces_sampler_arg),
        ] {
            if v.is_some() {
                *slot = v;
            }
        }
    }
}

/// Whether and how requests are sampled (trace id and parent decide).
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// `traceidratio`: the trace id's low 8 bytes against the ratio.
    Ratio(f64),
    /// Follows a remote parent's sampled flag; roots use the inner sampler.
    ParentBased(Box<Sampler>),
}

impl Sampler {
    pub fn sample(&self, parent: Option<bool>, trace_id: &[u8; 16]) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(r) => {
                // As the OpenTelemetry SDKs do, so that every service of a
                // trace decides alike.
                let low = u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes")) >> 1;
                let bound = if *r >= 1.0 {
                    u64::MAX
                } else {
                    (r * (1u64 << 63) as f64) as u64
                };
                low < bound
            }
            Sampler::ParentBased(root) => match parent {
                Some(sampled) => sampled,
                None => root.sample(None, trace_id),
            },
        }
    }
}

/// Where spans go and how they are batched.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSettings {
    /// The full URL of the OTLP/HTTP traces endpoint.
    pub endpoint: http::Uri,
    pub headers: Vec<(String, String)>,
    /// `service.name` first, then the other resource attributes.
    pub resource: Vec<(String, String)>,
    pub sampler: Sampler,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
    pub max_batch: usize,
    /// `OTEL_BSP_SCHEDULE_DELAY`: the longest a span waits for its batch.
    pub delay: Duration,
    /// `OTEL_EXPORTER_OTLP_TIMEOUT`: one export's limit.
    pub timeout: Duration,
}

/// The settings of tracing as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// W3C trace context: continue an incoming `traceparent` and carry it
    /// to the guest's outbound requests (`trace-context`, default on).
    pub propagate: bool,
    /// `None`: no spans are exported.
    pub export: Option<ExportSettings>,
}

/// A bad value, named by its variable or key.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {message}")]
pub struct SettingsError {
    pub name: String,
    pub message: String,
}

/// One setting's value and the name of where it came from.
struct Found {
    name: String,
    value: String,
}

struct Sources<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Sources<'_> {
    fn get(&self, var: &str, key: &str, file: &Option<String>) -> Option<Found> {
        if let Some(v) = (self.env)(var).filter(|v| !v.trim().is_empty()) {
            return Some(Found {
                name: var.into(),
                value: v,
            });
        }
        file.clone().map(|v| Found {
            name: format!("otel.{key}"),
            value: v,
        })
    }

    fn env(&self, var: &str) -> Option<Found> {
        (self.env)(var)
            .filter(|v| !v.trim().is_empty())
            .map(|value| Found {
                name: var.into(),
                value,
            })
    }
}

fn bad(name: &str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        name: name.into(),
        message: message.into(),
    }
}

pub const DEFAULT_MAX_QUEUE: usize = 2048;
pub const DEFAULT_MAX_BATCH: usize = 512;
pub const DEFAULT_DELAY: Duration = Duration::from_millis(5000);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10000);

impl Settings {
    /// From the process's environment and the file's `[otel]` table.
    pub fn from_env_and_file(propagate: bool, file: &OtelFile) -> Result<Settings, SettingsError> {
        Settings::from_sources(propagate, file, &|v| std::env::var(v).ok())
    }

    pub fn from_sources(
        propagate: bool,
        file: &OtelFile,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings, SettingsError> {
        let src = Sources { env };
        let off = Settings {
            propagate,
            export: None,
        };
        if let Some(f) = src.env("OTEL_SDK_DISABLED") {
            match f.value.trim().to_ascii_lowercase().as_str() {
                "true" => return Ok(off),
                "false" => {}
                _ => return Err(bad(&f.name, "expected true or false")),
            }
        }
        if let Some(f) = src.env("OTEL_TRACES_EXPORTER") {
            match f.value.trim() {
                "none" => return Ok(off),
                "otlp" => {}
                other => {
                    return Err(bad(
                        &f.name,
                        format!("unsupported exporter `{other}` (expected otlp or none)"),
                    ));
                }
            }
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(f) = src.env(var) {
                if f.value.trim() != "http/protobuf" {
                    return Err(bad(
                        &f.name,
                        format!(
                            "unsupported protocol `{}` (wasmpool exports OTLP/HTTP: http/protobuf)",
                            f.value.trim()
                        ),
                    ));
                }
                break;
            }
        }
        let headers = match src
            .env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| src.get("OTEL_EXPORTER_OTLP_HEADERS", "headers", &file.headers))
        {
            Some(f) => {
                let pairs = pairs(&f)?;
                for (k, v) in &pairs {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                        || http::HeaderValue::from_str(v).is_err()
                    {
                        return Err(bad(&f.name, format!("`{k}` is not a valid HTTP header")));
                    }
                }
                pairs
            }
            None => Vec::new(),
        };
        let mut resource = match src.get(
            "OTEL_RESOURCE_ATTRIBUTES",
            "resource-attributes",
            &file.resource_attributes,
        ) {
            Some(f) => pairs(&f)?,
            None => Vec::new(),
        };
        let service = match src.get("OTEL_SERVICE_NAME", "service-name", &file.service_name) {
            Some(f) => f.value.trim().to_string(),
            None => resource
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "wasmpool".into()),
        };
        resource.retain(|(k, _)| k != "service.name");
        resource.insert(0, ("service.name".into(), service));
        let sampler = sampler(&src, file)?;
        let number = |var: &str, default: u64| -> Result<u64, SettingsError> {
            match src.env(var) {
                Some(f) => f
                    .value
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(&f.name, "expected a positive whole number")),
                None => Ok(default),
            }
        };
        let max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE as u64)?;
        let max_batch = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_BATCH as u64)?;
        if max_batch > max_queue {
            return Err(bad(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                "must not exceed OTEL_BSP_MAX_QUEUE_SIZE",
            ));
        }
        let delay = number("OTEL_BSP_SCHEDULE_DELAY", DEFAULT_DELAY.as_millis() as u64)?;
        let timeout = match src.env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(_) => number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 0)?,
            None => number(
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                DEFAULT_TIMEOUT.as_millis() as u64,
            )?,
        };
        // Every value is checked, then: off unless an endpoint is set.
        let endpoint = match (
            src.get(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "traces-endpoint",
                &file.traces_endpoint,
            ),
            src.get("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint", &file.endpoint),
        ) {
            (Some(f), _) => endpoint(&f, false)?,
            (None, Some(f)) => endpoint(&f, true)?,
            // Off unless configured.
            (None, None) => return Ok(off),
        };
        let cap = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).min(1 << 20);
        Ok(Settings {
            propagate,
            export: Some(ExportSettings {
                endpoint,
                headers,
                resource,
                sampler,
                max_queue: cap(max_queue),
                max_batch: cap(max_batch),
                delay: Duration::from_millis(delay),
                timeout: Duration::from_millis(timeout),
            }),
        })
    }
}

/// An endpoint URL; the generic one gets the signal's path `/v1/traces`.
fn endpoint(f: &Found, generic: bool) -> Result<http::Uri, SettingsError> {
    let v = f.value.trim();
    let uri: http::Uri = v
        .parse()
        .map_err(|e| bad(&f.name, format!("`{v}` is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                &f.name,
                format!(
                    "`{v}`: https collectors are not supported; export to a local collector \
                     or agent over http:// (it forwards over TLS)"
                ),
            ));
        }
        _ => return Err(bad(&f.name, format!("`{v}`: expected an http:// URL"))),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad(&f.name, format!("`{v}`: no host")));
    }
    if !generic {
        return Ok(uri);
    }
    let base = v.trim_end_matches('/');
    format!("{base}/v1/traces")
        .parse()
        .map_err(|e| bad(&f.name, format!("`{v}` is not a URL: {e}")))
}

/// `key=value,key=value`, values percent-decoded (the W3C Baggage format
/// the specification uses for headers and resource attributes).
fn pairs(f: &Found) -> Result<Vec<(String, String)>, SettingsError> {
    let mut out = Vec::new();
    for item in f.value.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((k, v)) = item.split_once('=') else {
            return Err(bad(&f.name, format!("`{item}`: expected key=value")));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(bad(&f.name, format!("`{item}`: empty key")));
        }
        let v = percent_decode(v.trim())
            .ok_or_else(|| bad(&f.name, format!("`{item}`: bad percent-encoding")))?;
        out.push((k.to_string(), v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn sampler(src: &Sources<'_>, file: &OtelFile) -> Result<Sampler, SettingsError> {
    let arg = src.get(
        "OTEL_TRACES_SAMPLER_ARG",
        "traces-sampler-arg",
        &file.traces_sampler_arg,
    );
    let ratio = || -> Result<f64, SettingsError> {
        match &arg {
            None => Ok(1.0),
            Some(f) => f
                .value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    bad(
                        &f.name,
                        format!("`{}`: expected a ratio from 0 to 1", f.value.trim()),
                    )
                }),
        }
    };
    let Some(f) = src.get(
        "OTEL_TRACES_SAMPLER",
        "traces-sampler",
        &file.traces_sampler,
    ) else {
        // Parent-based ratio, the ratio 1 unless an argument says otherwise.
        return Ok(Sampler::ParentBased(Box::new(Sampler::Ratio(ratio()?))));
    };
    Ok(match f.value.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::Ratio(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => Sampler::ParentBased(Box::new(Sampler::Ratio(ratio()?))),
        other => {
            return Err(bad(
                &f.name,
                format!(
                    "unsupported sampler `{other}` (expected always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off or \
                     parentbased_traceidratio)"
                ),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(env: &[(&str, &str)], file: &OtelFile) -> Result<Settings, SettingsError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_sources(true, file, &move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn off_unless_an_endpoint_is_set() {
        let s = settle(&[("OTEL_SERVICE_NAME", "x")], &OtelFile::default()).unwrap();
        assert_eq!(s.export, None);
        assert!(s.propagate);
    }

    #[test]
    fn the_generic_endpoint_gets_the_signal_path_the_specific_one_does_not() {
        let s = settle(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")],
            &OtelFile::default(),
        )
        .unwrap();
        assert_eq!(s.export.unwrap().endpoint, "http://c:4318/v1/traces");
        let s = settle(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://d:1/x"),
            ],
            &OtelFile::default(),
        )
        .unwrap();
        assert_eq!(s.export.unwrap().endpoint, "http://d:1/x");
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let file = OtelFile {
            endpoint: Some("http://file:4318".into()),
            service_name: Some("from-file".into()),
            traces_sampler: Some("always_off".into()),
            ..Default::default()
        };
        let s = settle(&[("OTEL_SERVICE_NAME", "from-env")], &file).unwrap();
        let e = s.export.unwrap();
        assert_eq!(e.endpoint, "http://file:4318/v1/traces");
        assert_eq!(e.resource[0], ("service.name".into(), "from-env".into()));
        assert_eq!(e.sampler, Sampler::AlwaysOff);
    }

    #[test]
    fn headers_and_resource_attributes_are_decoded() {
        let s = settle(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=Bearer%20abc, x-team=a",
                ),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod,service.name=svc",
                ),
            ],
            &OtelFile::default(),
        )
        .unwrap();
        let e = s.export.unwrap();
        assert_eq!(
            e.headers,
            [
                ("authorization".to_string(), "Bearer abc".to_string()),
                ("x-team".into(), "a".into())
            ]
        );
        assert_eq!(
            e.resource,
            [
                ("service.name".to_string(), "svc".to_string()),
                ("deployment.environment".into(), "prod".into())
            ]
        );
        assert_eq!(
            e.sampler,
            Sampler::ParentBased(Box::new(Sampler::Ratio(1.0)))
        );
    }

    #[test]
    fn bad_values_name_their_variable_or_key() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for (env, file, name) in [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
                OtelFile::default(),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://x")],
                OtelFile::default(),
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![ep, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
                OtelFile::default(),
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                vec![ep, ("OTEL_EXPORTER_OTLP_HEADERS", "a=%zz")],
                OtelFile::default(),
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                vec![ep, ("OTEL_TRACES_SAMPLER", "sometimes")],
                OtelFile::default(),
                "OTEL_TRACES_SAMPLER",
            ),
            (
                vec![
                    ep,
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                OtelFile::default(),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                vec![ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
                OtelFile::default(),
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![ep, ("OTEL_BSP_MAX_QUEUE_SIZE", "-1")],
                OtelFile::default(),
                "OTEL_BSP_MAX_QUEUE_SIZE",
            ),
            (
                vec![],
                OtelFile {
                    endpoint: Some("http://c".into()),
                    traces_sampler_arg: Some("x".into()),
                    ..Default::default()
                },
                "otel.traces-sampler-arg",
            ),
            (
                vec![],
                OtelFile {
                    traces_endpoint: Some("https://c/v1/traces".into()),
                    ..Default::default()
                },
                "otel.traces-endpoint",
            ),
        ] {
            let e = settle(&env, &file).unwrap_err();
            assert_eq!(e.name, name, "{e}");
        }
    }

    #[test]
    fn the_ratio_sampler_splits_by_trace_id_and_parents_decide() {
        let lo = [0u8; 16];
        let hi = [0xffu8; 16];
        let half = Sampler::Ratio(0.5);
        assert!(half.sample(None, &lo));
        assert!(!half.sample(None, &hi));
        assert!(!Sampler::Ratio(0.0).sample(None, &lo));
        assert!(Sampler::Ratio(1.0).sample(None, &hi));
        let pb = Sampler::ParentBased(Box::new(Sampler::AlwaysOff));
        assert!(pb.sample(Some(true), &hi));
        assert!(!pb.sample(None, &hi));
    }
}
