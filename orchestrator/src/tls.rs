//! TLS for the API: the rustls server configuration, from a certificate and key in PEM files
//! (`[http.tls] cert_file`, `key_file`) or from a self-signed certificate made at first start in
//! the data directory (`self_signed = true`).
//!
//! rustls runs on ring, the provider async-nats and reqwest already use. The provider is passed
//! explicitly rather than installed as the process default, so nothing depends on start-up order.
//!
//! A self-signed certificate is kept in `data_dir/tls/` (`cert.pem`, and `key.pem` with mode
//! 0600) and reused on later starts for as long as it is valid for every name it must cover; when
//! it is not (the host was renamed, a name was added to the config, it expired, or the pair does
//! not match), a new one replaces it, and clients must trust the new `cert.pem`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use chrono::Datelike;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsSource;

/// The directory, in the data directory, that holds the self-signed certificate and its key.
pub const SELF_SIGNED_DIR: &str = "tls";
/// The self-signed certificate's file name (PEM): what clients trust (`lapsctl --ca`).
pub const CERT_FILE: &str = "cert.pem";
/// The self-signed certificate's key file name (PEM, mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// The common name of a self-signed certificate.
const SELF_SIGNED_COMMON_NAME: &str = "fleetlaps orchestrator (self-signed)";
/// How long a self-signed certificate is valid. Clients trust that one certificate, not a CA, so
/// a short life buys little; it is bounded all the same.
const SELF_SIGNED_VALIDITY_YEARS: i32 = 10;

/// The API's TLS, ready to serve.
pub struct ServerTls {
    /// rustls on ring with the certificate and key loaded; offers HTTP/1.1 by ALPN, the only
    /// HTTP version the API's server speaks.
    pub config: Arc<ServerConfig>,
    /// The certificate file the server presents. For a self-signed certificate it is what clients
    /// trust; for one from `cert_file`, clients trust the CA that issued it.
    pub certificate_path: PathBuf,
}

/// Loads the API's certificate and key from `source`, making the self-signed certificate in
/// `data_dir` first if needed. Errors name the file and what is wrong with it.
pub fn load(source: &TlsSource, data_dir: &Path) -> anyhow::Result<ServerTls> {
    let (certificate_path, chain, key) = match source {
        TlsSource::Files { cert_file, key_file } => {
            let chain = read_certificates(cert_file, "http.tls.cert_file")?;
            refuse_if_world_accessible(key_file)?;
            let key = read_private_key(key_file, "http.tls.key_file")?;
            (cert_file.clone(), chain, key)
        }
        TlsSource::SelfSigned { subject_alt_names } => {
            let dir = data_dir.join(SELF_SIGNED_DIR);
            let names = self_signed_names(subject_alt_names);
            let (chain, key) = load_or_create_self_signed(&dir, &names)?;
            (dir.join(CERT_FILE), chain, key)
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "the private key does not fit the certificate {}",
                certificate_path.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        certificate_path,
    })
}

/// The names a self-signed certificate covers: the loopback names, the host name, then the
/// configured ones, without duplicates.
fn self_signed_names(configured: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let host = host_name();
    if host.is_none() {
        tracing::debug!("no usable host name for the self-signed certificate");
    }
    for name in host.iter().chain(configured) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// The kernel's host name, when it is a valid DNS name.
fn host_name() -> Option<String> {
    let text = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let host = text.trim().to_ascii_lowercase();
    (!host.is_empty() && ServerName::try_from(host.as_str()).is_ok()).then_some(host)
}

/// The self-signed pair in `dir`, reused when it is still good for `names`, otherwise made anew.
fn load_or_create_self_signed(
    dir: &Path,
    names: &[String],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if key_path.exists() {
        refuse_unless_owner_only(&key_path)?;
    }
    if cert_path.exists() || key_path.exists() {
        match reusable_self_signed(&cert_path, &key_path, names) {
            Ok(pair) => {
                tracing::info!(path = %cert_path.display(), "self-signed certificate reused");
                return Ok(pair);
            }
            Err(reason) => tracing::warn!(
                path = %cert_path.display(),
                reason = %format!("{reason:#}"),
                "self-signed certificate replaced; clients must trust the new one"
            ),
        }
    }
    create_self_signed(dir, names)?;
    let pair = reusable_self_signed(&cert_path, &key_path, names)
        .with_context(|| format!("reading back the self-signed certificate {}", cert_path.display()))?;
    tracing::info!(path = %cert_path.display(), ?names, "self-signed certificate created");
    Ok(pair)
}

/// The pair at `cert_path` and `key_path` if the key fits the certificate and the certificate is
/// valid now for every one of `names`; otherwise why not.
fn reusable_self_signed(
    cert_path: &Path,
    key_path: &Path,
    names: &[String],
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = read_certificates(cert_path, "the self-signed certificate")?;
    let key = read_private_key(key_path, "the self-signed certificate's key")?;
    let provider = provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
        .context("the key does not fit the certificate")?;
    let mut roots = RootCertStore::empty();
    roots
        .add(chain[0].clone())
        .context("the certificate cannot be a trust anchor")?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .context("building a certificate verifier")?;
    let now = UnixTime::now();
    for name in names {
        let server_name =
            ServerName::try_from(name.as_str()).with_context(|| format!("{name:?} is not a DNS name or IP address"))?;
        verifier
            .verify_server_cert(&chain[0], &[], &server_name, &[], now)
            .with_context(|| format!("the certificate is not valid for {name}"))?;
    }
    Ok((chain, key))
}

/// Makes a self-signed certificate for `names` and writes it and its key (0600) into `dir`,
/// replacing what is there. The key is written first, so a crash in between leaves a pair that
/// does not match, which the next start replaces.
fn create_self_signed(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_pair = rcgen::KeyPair::generate().context("generating the self-signed certificate's key")?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).context("the self-signed certificate's names")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SELF_SIGNED_COMMON_NAME);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    // From the first of this month, so clocks somewhat behind accept it, for ten years (the first
    // of a month exists in every year).
    let today = chrono::Utc::now().date_naive();
    let month = u8::try_from(today.month()).expect("a month is 1 to 12");
    params.not_before = rcgen::date_time_ymd(today.year(), month, 1);
    params.not_after = rcgen::date_time_ymd(today.year() + SELF_SIGNED_VALIDITY_YEARS, month, 1);
    let certificate = params
        .self_signed(&key_pair)
        .context("signing the self-signed certificate")?;
    write_replacing(&dir.join(KEY_FILE), key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_replacing(&dir.join(CERT_FILE), certificate.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Writes `bytes` to `path` through a new temporary file with `mode`, renamed over `path`, so the
/// file is never seen half-written or with a wider mode.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let temporary = path.with_extension("pem.tmp");
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", temporary.display())),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
}

/// Every certificate in the PEM file at `path`; `setting` names the file in errors.
fn read_certificates(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anyhow::anyhow!("{setting} {}: invalid PEM: {err}", path.display()))?;
    if chain.is_empty() {
        anyhow::bail!(
            "{setting} {}: no certificate; allowed: PEM with -----BEGIN CERTIFICATE-----",
            path.display()
        );
    }
    Ok(chain)
}

/// The first private key in the PEM file at `path`; `setting` names the file in errors, which
/// never quote the file's content.
fn read_private_key(path: &Path, setting: &str) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| match err {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow::anyhow!(
            "{setting} {}: no private key; allowed: PEM with -----BEGIN PRIVATE KEY----- (PKCS#8), \
             RSA PRIVATE KEY (PKCS#1) or EC PRIVATE KEY (SEC1)",
            path.display()
        ),
        other => anyhow::anyhow!("{setting} {}: invalid PEM: {other}", path.display()),
    })
}

/// Refuses a key that other users may read, as the escrow key is refused.
fn refuse_unless_owner_only(path: &Path) -> anyhow::Result<()> {
    let mode = file_mode(path)?;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "TLS key {} is readable by others (mode {:o}); allowed: owner-only, run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// Refuses a configured key that every local user may read. A group may read it, as with the
/// usual `root:ssl-cert 0640`.
fn refuse_if_world_accessible(path: &Path) -> anyhow::Result<()> {
    let mode = file_mode(path)?;
    if mode & 0o007 != 0 {
        anyhow::bail!(
            "http.tls.key_file {} is accessible to every user (mode {:o}); allowed: no access for others, \
             run `chmod o-rwx {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    Ok(())
}

fn file_mode(path: &Path) -> anyhow::Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode())
}

/// rustls's ring provider, the one the whole workspace uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> TlsSource {
        TlsSource::SelfSigned {
            subject_alt_names: names.iter().map(|name| (*name).to_owned()).collect(),
        }
    }

    #[test]
    fn the_self_signed_certificate_is_made_once_with_an_owner_only_key_and_reused() {
        let data_dir = tempfile::tempdir().unwrap();
        let first = load(&self_signed(&[]), data_dir.path()).unwrap();
        let key_path = data_dir.path().join(SELF_SIGNED_DIR).join(KEY_FILE);
        assert_eq!(fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            first.certificate_path,
            data_dir.path().join(SELF_SIGNED_DIR).join(CERT_FILE)
        );
        let pem = fs::read(&first.certificate_path).unwrap();

        load(&self_signed(&[]), data_dir.path()).unwrap();
        assert_eq!(fs::read(&first.certificate_path).unwrap(), pem, "reused, not replaced");
    }

    #[test]
    fn the_self_signed_certificate_covers_the_local_and_configured_names_and_is_replaced_when_one_is_added() {
        let data_dir = tempfile::tempdir().unwrap();
        let cert_path = data_dir.path().join(SELF_SIGNED_DIR).join(CERT_FILE);
        let key_path = data_dir.path().join(SELF_SIGNED_DIR).join(KEY_FILE);
        load(&self_signed(&["laps.example"]), data_dir.path()).unwrap();
        let names = self_signed_names(&["laps.example".to_owned()]);
        assert!(names.len() >= 4, "{names:?}");
        reusable_self_signed(&cert_path, &key_path, &names).expect("valid for every name");
        let pem = fs::read(&cert_path).unwrap();

        let more = self_signed_names(&["laps.example".to_owned(), "10.1.2.3".to_owned()]);
        let err = reusable_self_signed(&cert_path, &key_path, &more).expect_err("not valid for 10.1.2.3");
        assert!(format!("{err:#}").contains("not valid for 10.1.2.3"), "{err:#}");
        load(&self_signed(&["laps.example", "10.1.2.3"]), data_dir.path()).unwrap();
        assert_ne!(fs::read(&cert_path).unwrap(), pem, "replaced");
        reusable_self_signed(&cert_path, &key_path, &more).expect("the new one covers 10.1.2.3");
    }

    #[test]
    fn a_self_signed_key_readable_by_others_is_refused() {
        let data_dir = tempfile::tempdir().unwrap();
        load(&self_signed(&[]), data_dir.path()).unwrap();
        let key_path = data_dir.path().join(SELF_SIGNED_DIR).join(KEY_FILE);
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        let Err(err) = load(&self_signed(&[]), data_dir.path()) else {
            panic!("a readable key is refused")
        };
        assert!(err.to_string().contains("readable by others"), "{err}");
    }

    #[test]
    fn files_that_are_missing_not_pem_or_world_readable_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        let files = TlsSource::Files {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        };
        let message = |source: &TlsSource| match load(source, dir.path()) {
            Ok(_) => panic!("refused"),
            Err(err) => format!("{err:#}"),
        };
        assert!(
            message(&files).contains("reading http.tls.cert_file"),
            "{}",
            message(&files)
        );

        fs::write(&cert_file, "not a certificate").unwrap();
        assert!(message(&files).contains("no certificate"), "{}", message(&files));

        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        fs::write(&cert_file, certified.cert.pem()).unwrap();
        fs::write(&key_file, certified.signing_key.serialize_pem()).unwrap();
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            message(&files).contains("accessible to every user"),
            "{}",
            message(&files)
        );

        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o640)).unwrap();
        load(&files, dir.path()).expect("a group-readable key is allowed");

        let other = rcgen::KeyPair::generate().unwrap();
        fs::write(&key_file, other.serialize_pem()).unwrap();
        assert!(message(&files).contains("does not fit"), "{}", message(&files));

        fs::write(&key_file, certified.cert.pem()).unwrap();
        assert!(message(&files).contains("no private key"), "{}", message(&files));
    }
}
