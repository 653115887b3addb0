//! packaging/wasmpool.1 is generated from the CLI definition (clap_mangen)
//! plus the hand-written sections below; this test fails when it is stale
//! and rewrites it with WASMPOOL_BLESS=1.
mod common;
use clap::CommandFactory;
use clap_mangen::Man;
use common::root;

/// Sections the CLI definition cannot say: files, signals, environment,
/// exit status, examples.
const EXTRA: &str = r#".SH CONFIGURATION
A config file (\fB\-\-config\fR) is TOML. Its keys are the long names of the
\fBserve\fR flags without the leading dashes (for example
\fBmax\-instance\-reuse\-count = 128\fR or \fBrequest\-timeout = "10s"\fR),
plus \fBcomponent\fR, \fBlisten\fR, \fBmetrics\-listen\fR,
\fBdrain\-timeout\fR, \fBshutdown\-delay\fR and \fBexit\-idle\-after\fR. Flags given on the command
line override the file. Unknown keys and bad values are errors.
Durations need a unit (\fB500ms\fR, \fB10s\fR, \fB5min\fR); sizes take
\fBKiB\fR, \fBMiB\fR or \fBGiB\fR.
.SH TLS, HTTP/2 AND HEALTH
With \fB\-\-tls\-cert\fR and \fB\-\-tls\-key\fR, TCP listeners serve
TLS 1.2 and 1.3 (ALPN \fBh2\fR, \fBhttp/1.1\fR); unix sockets and
\fBhttp://\fR addresses stay plain; inherited sockets follow
\fB\-\-tls\-socket\fR and \fB\-\-plain\-socket\fR. The certificate is read
again on SIGHUP. HTTP/2 is served by ALPN and, in clear text, with prior
knowledge; every limit applies per stream. On \fB\-\-metrics\-listen\fR,
\fB/healthz\fR answers while the process lives and \fB/readyz\fR until a
drain begins. \fB\-\-access\-log\fR writes one line per request.
.SH HOSTILE CLIENTS
Each defence is a knob (see OPTIONS); \fIdocs/reliability.md\fR lists the
attacks and the figures of the last run.
.TP
Slow headers (slowloris)
\fB\-\-header\-read\-timeout\fR for the first request head from the accept
and for later heads from their first byte; \fB\-\-keepalive\-timeout\fR
between requests.
.TP
Slow bodies (R\-U\-Dead\-Yet)
\fB\-\-client\-body\-timeout\fR and \fB\-\-client\-body\-min\-rate\fR
answer 408 and close the connection; bodies up to
\fB\-\-client\-body\-buffer\-size\fR arrive before the request takes a slot
or an instance.
.TP
Slow readers
\fB\-\-send\-timeout\fR and \fB\-\-send\-min\-rate\fR close the
connection; \fB\-\-response\-buffer\-size\fR reads the answer ahead so the
guest finishes and frees its instance and slot.
.TP
One client against all
\fB\-\-max\-connections\-per\-client\fR and
\fB\-\-max\-requests\-per\-client\fR (429) on TCP listeners; at
\fB\-\-max\-concurrent\-connections\fR idle connections are closed first.
.TP
Memory storms
\fB\-\-memory\-budget\fR (default \fBauto\fR: the cgroup limit set by
\fBMemoryMax=\fR, else physical memory, less what the process needs) caps
the memory of all guests together: a growth past it fails for that guest
only, and new requests wait in the queue, then get 503.
.SH SIGNALS
.TP
\fBSIGTERM\fR
\fB/readyz\fR answers 503 at once; requests are still accepted and served
(HTTP/1 responses close their connections) for \fB\-\-shutdown\-delay\fR
(default 5s, 0 with socket activation), so load balancers stop sending
first; a second SIGTERM ends the delay. Then as SIGINT.
.TP
\fBSIGINT\fR
Stop accepting connections, close idle keep\-alive connections, let running
requests finish (at most \fB\-\-drain\-timeout\fR), then exit 0.
.TP
\fBSIGHUP\fR
Re\-read the config file and the component, compile off the request path and
swap atomically. On failure the old component keeps serving and the reason
is logged and shown in the service status.
.TP
\fBSIGUSR1\fR
Write out the access lines gathered so far and reopen the access log file
(after logrotate moved it).
.SH ENVIRONMENT
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_PID\fR, \fBLISTEN_FDNAMES\fR
Sockets passed by the service manager (socket activation); they replace
\fB\-\-listen\fR.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
sd_notify(3) readiness, status, reload, stopping and watchdog messages.
.TP
\fBJOURNAL_STREAM\fR
When stderr is the journal, log lines carry syslog priorities.
.TP
\fBCACHE_DIRECTORY\fR, \fBXDG_CACHE_HOME\fR
Where compiled components are cached (first match, else ~/.cache/wasmpool).
.TP
\fBWASMPOOL_LOG\fR
Log filter, e.g. \fBinfo\fR, \fBwasmpool=debug\fR or \fBguest=off\fR.
.TP
\fBWASMPOOL_SHUTDOWN_DELAY\fR
The shutdown delay, as \fB\-\-shutdown\-delay\fR (which wins).
.TP
\fBLOGS_DIRECTORY\fR
With \fBaccess\-log = on\fR (the default), the access log goes to
\fIaccess.log\fR in this directory (systemd's \fBLogsDirectory=\fR).
.TP
\fBOTEL_EXPORTER_OTLP_ENDPOINT\fR, \fBOTEL_EXPORTER_OTLP_TRACES_ENDPOINT\fR
Export OpenTelemetry traces over OTLP/HTTP (protobuf) to this collector
(\fBhttp://\fR; the first gets \fI/v1/traces\fR appended). Off when
neither is set (nor \fBendpoint\fR or \fBtraces\-endpoint\fR in the
config file's \fB[otel]\fR table, which the variables override).
.TP
\fBOTEL_EXPORTER_OTLP_HEADERS\fR, \fBOTEL_EXPORTER_OTLP_TRACES_HEADERS\fR
Headers of each export, \fIkey=value,...\fR, values percent\-encoded
(\fB[otel]\fR \fBheaders\fR).
.TP
\fBOTEL_SERVICE_NAME\fR, \fBOTEL_RESOURCE_ATTRIBUTES\fR
The resource: \fBservice.name\fR (default wasmpool) and other attributes,
\fIkey=value,...\fR (\fBservice\-name\fR, \fBresource\-attributes\fR).
.TP
\fBOTEL_TRACES_SAMPLER\fR, \fBOTEL_TRACES_SAMPLER_ARG\fR
Sampling: parentbased_traceidratio (default), traceidratio, always_on,
always_off, parentbased_always_on or parentbased_always_off; the ratio 0 to 1
(default 1) (\fBtraces\-sampler\fR, \fBtraces\-sampler\-arg\fR).
.TP
\fBOTEL_BSP_MAX_QUEUE_SIZE\fR, \fBOTEL_BSP_MAX_EXPORT_BATCH_SIZE\fR, \fBOTEL_BSP_SCHEDULE_DELAY\fR, \fBOTEL_EXPORTER_OTLP_TIMEOUT\fR
Spans waiting for export (2048; more are dropped and counted in
\fBwasmpool_trace_spans_dropped_total\fR), spans per export (512), the
longest a span waits in ms (5000), one export's limit in ms (10000).
.TP
\fBOTEL_TRACES_EXPORTER\fR, \fBOTEL_SDK_DISABLED\fR, \fBOTEL_EXPORTER_OTLP_PROTOCOL\fR
\fBnone\fR and \fBtrue\fR turn export off; the protocol may only be
\fBhttp/protobuf\fR.
.SH FILES
.TP
\fI/etc/wasmpool/wasmpool.toml\fR
Config of the default app (\fBwasmpool.socket\fR, \fBwasmpool.service\fR,
127.0.0.1:8080).
.TP
\fI/etc/wasmpool/NAME.toml\fR
Config of app NAME (\fBwasmpool@NAME.socket\fR, \fBwasmpool@NAME.service\fR,
socket \fI/run/wasmpool/NAME.sock\fR).
.TP
\fI/usr/share/wasmpool/hello.wasm\fR
The example component, served by the \fBhello\fR app.
.TP
\fI/var/cache/wasmpool/\fR
Compile cache of the packaged services.
.TP
\fI/var/log/wasmpool/NAME/access.log\fR
Access log of app NAME (\fBdefault\fR for \fBwasmpool.service\fR),
rotated by \fI/etc/logrotate.d/wasmpool\fR, which sends SIGUSR1.
.SH EXIT STATUS
0 on success and after a drain; 1 on errors (bad config, component, address
or socket); 2 on command\-line syntax errors.
.SH EXAMPLES
.nf
wasmpool serve examples/hello.wasm
wasmpool serve \-\-listen 0.0.0.0:8080 \-\-max\-instance\-reuse\-count 128 app.wasm
wasmpool check app.wasm
systemctl enable \-\-now wasmpool@hello.socket
curl \-\-unix\-socket /run/wasmpool/hello.sock http://localhost/
systemctl reload wasmpool@hello.service
journalctl \-u wasmpool@hello.service
.fi
.SH SEE ALSO
systemd.socket(5), systemd.service(5), sd_notify(3)
"#;

fn render() -> String {
    let mut cmd = wasmpool::cli::Cli::command();
    cmd.build();
    let mut out = Vec::new();
    let man = Man::new(cmd.clone());
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    man.render_options_section(&mut out).unwrap();
    // The commands are sections of this page (there are no
    // wasmpool-serve(1) pages to refer to).
    out.extend_from_slice(b".SH COMMANDS\n");
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let line = format!(".TP\n\\fB{}\\fR\n{}\n", sub.get_name(), roff_escape(&about));
        out.extend_from_slice(line.as_bytes());
    }
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let bin = sub.get_bin_name().unwrap_or(sub.get_name()).to_string();
        let mut part = Vec::new();
        let man = Man::new(sub.clone());
        man.render_synopsis_section(&mut part).unwrap();
        man.render_options_section(&mut part).unwrap();
        let part = String::from_utf8(part).unwrap();
        // Each subcommand is one section; its synopsis and options are
        // subsections of it.
        let part = part.replace(".SH ", ".SS ");
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        out.extend_from_slice(
            format!(".SH \"{}\"\n{}\n", bin.to_uppercase(), roff_escape(&about)).as_bytes(),
        );
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(EXTRA.as_bytes());
    man.render_version_section(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn roff_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('-', "\\-")
}

#[test]
fn committed_man_page_matches_cli() {
    let page = render();
    let path = root().join("packaging/wasmpool.1");
    if std::env::var_os("WASMPOOL_BLESS").is_some() {
        std::fs::write(&path, &page).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == page,
        "packaging/wasmpool.1 is stale: regenerate it with WASMPOOL_BLESS=1 cargo test --test man_page"
    );
    // Every serve flag is documented.
    for flag in [
        "max-instance-reuse-count",
        "request-timeout",
        "exit-idle-after",
    ] {
        assert!(page.contains(&flag.replace('-', "\\-")), "{flag} missing");
    }
}
