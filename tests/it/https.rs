//! The API serves HTTPS: with a self-signed certificate made at first start (the test
//! orchestrator's default) or with a certificate from files; plain HTTP only when asked for.
//! Clients trust a configured CA (`lapsctl --ca`) and say so when they do not.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::apps::{READ_TOKEN, TestOrchestrator, binary, run, trusting_client, wait_until_healthy};
use crate::harness::{TestNats, TestPki, init_tracing};

/// An orchestrator started from a config whose `[http]` section the test chooses, with no tokens:
/// a 401 is answer enough to show the API was reached.
struct Served {
    /// `App::api_url`.
    api_url: String,
    /// `App::tls_certificate_path`.
    certificate: Option<PathBuf>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _data_dir: TempDir,
}

impl Served {
    async fn start(nats: &TestNats, http: &str) -> Self {
        init_tracing();
        let data_dir = tempfile::tempdir().expect("tempdir");
        let config = fleetlaps_orchestrator::Config::from_toml(&format!(
            "data_dir = \"{}\"\n[nats]\nurl = \"{}\"\nnkey_seed_file = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{http}",
            data_dir.path().display(),
            nats.url(),
            nats.orchestrator_seed_file().expect("an authenticated server").display(),
        ))
        .expect("test config is valid");
        let app = fleetlaps_orchestrator::App::build(config)
            .await
            .expect("orchestrator starts");
        let api_url = app.api_url();
        let certificate = app.tls_certificate_path().map(Path::to_owned);
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = stop.await;
        }));
        Self {
            api_url,
            certificate,
            shutdown: Some(shutdown),
            task: Some(task),
            _data_dir: data_dir,
        }
    }

    /// Signals shutdown and waits for the orchestrator to stop.
    async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("orchestrator task does not panic")
                .expect("orchestrator stops cleanly");
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `lapsctl --url <url> [--ca <ca>] --token <token> get-password --device nothing`.
async fn lapsctl_get(url: &str, ca: Option<&Path>, token: &str) -> Output {
    let mut args = vec!["--url", url];
    if let Some(ca) = ca {
        args.extend(["--ca", ca.to_str().expect("a UTF-8 temporary path")]);
    }
    args.extend(["--token", token, "get-password", "--device", "nothing"]);
    run("lapsctl", &args).await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn the_api_answers_over_tls_only_to_clients_trusting_its_self_signed_certificate() {
    // Arrange
    let nats = TestNats::start();
    let mut orchestrator = TestOrchestrator::spawn(&nats).await;
    let healthz = format!("{}/healthz", orchestrator.base_url);

    // Act and assert: a client trusting the generated certificate gets answers.
    assert!(
        orchestrator.base_url.starts_with("https://127.0.0.1:"),
        "{}",
        orchestrator.base_url
    );
    let tls_dir = orchestrator.data_dir.join("tls");
    assert_eq!(orchestrator.tls_certificate, tls_dir.join("cert.pem"));
    let key_mode = std::fs::metadata(tls_dir.join("key.pem"))
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the key is owner-only");
    assert_eq!(orchestrator.get("/healthz", None).await.status(), StatusCode::OK);

    // A client with only the built-in web roots is refused in the handshake.
    let refused = reqwest::Client::new()
        .get(&healthz)
        .send()
        .await
        .expect_err("the certificate is not trusted");
    assert!(format!("{refused:?}").contains("UnknownIssuer"), "{refused:?}");

    // Plain HTTP to the TLS port gets no HTTP answer at all.
    let plain = reqwest::Client::new()
        .get(healthz.replacen("https://", "http://", 1))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP to the TLS port: {plain:?}");

    // lapsctl without --ca says what is wrong and what to do; with it, the API answers.
    let untrusting = lapsctl_get(&orchestrator.base_url, None, READ_TOKEN).await;
    assert!(!untrusting.status.success());
    assert!(
        stderr(&untrusting).contains("certificate not trusted; pass --ca"),
        "{}",
        stderr(&untrusting)
    );
    let trusting = orchestrator
        .lapsctl(&["--token", READ_TOKEN, "get-password", "--device", "nothing"])
        .await;
    assert!(
        stderr(&trusting).contains("no device named nothing"),
        "the API answered over TLS: {}",
        stderr(&trusting)
    );

    // A restart reuses the certificate clients already trust.
    let certificate = std::fs::read(&orchestrator.tls_certificate).expect("cert.pem");
    orchestrator.restart().await;
    assert_eq!(
        std::fs::read(&orchestrator.tls_certificate).expect("cert.pem"),
        certificate
    );
    assert_eq!(orchestrator.get("/healthz", None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_certificate_from_files_is_served_and_lapsctl_trusts_its_ca_with_ca() {
    // Arrange
    let nats = TestNats::start();
    let pki = TestPki::issue();
    let mut served = Served::start(
        &nats,
        &format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[http.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.cert_file.display(),
            pki.key_file.display()
        ),
    )
    .await;
    assert!(served.api_url.starts_with("https://"), "{}", served.api_url);
    assert_eq!(served.certificate.as_deref(), Some(pki.cert_file.as_path()));

    // Act and assert: a client trusting the CA gets answers.
    let client = trusting_client(&pki.ca_file);
    wait_until_healthy(&client, &served.api_url).await;

    // lapsctl --ca reaches the API (which refuses the unknown token: that is its answer) ...
    let with_ca = lapsctl_get(&served.api_url, Some(&pki.ca_file), "unknown-token").await;
    assert!(!with_ca.status.success());
    assert!(stderr(&with_ca).contains("HTTP 401"), "{}", stderr(&with_ca));
    // ... and so does LAPSCTL_CA ...
    let with_env = tokio::process::Command::new(binary("lapsctl"))
        .args(["--url", &served.api_url, "--token", "unknown-token"])
        .args(["get-password", "--device", "nothing"])
        .env("LAPSCTL_CA", &pki.ca_file)
        .output()
        .await
        .expect("running lapsctl");
    assert!(stderr(&with_env).contains("HTTP 401"), "{}", stderr(&with_env));
    // ... while without it the certificate is not trusted.
    let without_ca = lapsctl_get(&served.api_url, None, "unknown-token").await;
    assert!(
        stderr(&without_ca).contains("certificate not trusted; pass --ca"),
        "{}",
        stderr(&without_ca)
    );

    // A CA file that is missing or not PEM is named.
    let missing = lapsctl_get(&served.api_url, Some(Path::new("/nonexistent/ca.pem")), "t").await;
    assert!(
        stderr(&missing).contains("reading CA file /nonexistent/ca.pem"),
        "{}",
        stderr(&missing)
    );
    let not_pem = lapsctl_get(&served.api_url, Some(&pki.key_file), "t").await;
    assert!(
        stderr(&not_pem).contains("no certificate; allowed: PEM with -----BEGIN CERTIFICATE-----"),
        "{}",
        stderr(&not_pem)
    );

    // Graceful shutdown still works, idle keep-alive connections and all.
    let started = Instant::now();
    served.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?}",
        started.elapsed()
    );
    drop(client);
}

#[tokio::test]
async fn plain_http_is_served_when_asked_for_and_lapsctl_says_so_to_an_https_url() {
    // Arrange
    let nats = TestNats::start();
    let served = Served::start(&nats, "[http]\nlisten = \"127.0.0.1:0\"\nplain_http = true\n").await;

    // Act and assert
    assert!(served.api_url.starts_with("http://"), "{}", served.api_url);
    assert_eq!(served.certificate, None);
    wait_until_healthy(&reqwest::Client::new(), &served.api_url).await;

    let https_url = served.api_url.replacen("http://", "https://", 1);
    let output = lapsctl_get(&https_url, None, "t").await;
    assert!(
        stderr(&output).contains("if the server serves plain HTTP, use an http:// URL"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn a_config_asking_for_neither_tls_nor_plain_http_stops_the_orchestrator_naming_the_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("orchestrator.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\ninsecure_nats = true\n[nats]\nurl = \"nats://127.0.0.1:1\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display()
        ),
    )
    .expect("writing config");

    let output = run(
        "fleetlaps-orchestrator",
        &["run", "--config", config.to_str().expect("utf-8")],
    )
    .await;

    assert!(!output.status.success());
    let stderr = stderr(&output);
    assert!(
        stderr.contains("the API serves TLS unless plain HTTP is asked for")
            && stderr.contains("[http.tls] with self_signed = true")
            && stderr.contains("http.plain_http = true"),
        "{stderr}"
    );
}
