//! TLS on the listener: rustls with the `ring` provider, ALPN `h2` and `http/1.1`, a
//! certificate that is re-read on SIGHUP and when its files change (established
//! connections keep theirs), an optional client CA for the server API, and the
//! development CA `switchboard cert dev` writes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::config::TlsConfig;

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    /// DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// base64 of the SHA-256 of its SubjectPublicKeyInfo (what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes).
    pub spki_sha256: String,
}

impl CertInfo {
    /// Reads the first certificate of a PEM file.
    pub fn from_pem_file(path: &Path) -> Result<CertInfo, String> {
        let chain = read_chain(path)?;
        inspect(&chain[0]).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Seconds until it expires (negative: expired).
    pub fn expires_in(&self) -> i64 {
        self.not_after - unix_now()
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A date for people: `2026-11-29 10:00:00 UTC`.
pub fn format_time(secs: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            t.month() as u8,
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{secs} (Unix seconds)"),
    }
}

fn inspect(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default()).to_string()),
                    16 => {
                        names.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default()).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spki_sha256: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, digest.as_ref()),
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain ({e:?})", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)", path.display()));
    }
    Ok(chain)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key: both parse, they match, and the
/// certificate is valid now. Every error names the file and says what is wrong.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<(CertifiedKey, CertInfo), String> {
    let chain = read_chain(cert)?;
    let info = inspect(&chain[0]).map_err(|e| format!("{}: {e}", cert.display()))?;
    let now = unix_now();
    if now < info.not_before {
        return Err(format!(
            "{}: the certificate is not valid before {}",
            cert.display(),
            format_time(info.not_before)
        ));
    }
    if now > info.not_after {
        return Err(format!(
            "{}: the certificate expired on {}; renew it (or run `switchboard cert dev` for a development one)",
            cert.display(),
            format_time(info.not_after)
        ));
    }
    let key_pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("{}: no private key in it (expected -----BEGIN PRIVATE KEY-----)", key.display()))?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("{} does not match the certificate in {}", key.display(), cert.display())
        }
        e => format!("{}: unusable private key ({e})", key.display()),
    })?;
    Ok((certified, info))
}

/// The certificate the server presents, swapped in place on reload.
#[derive(Debug)]
pub struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    pub fn new(key: CertifiedKey) -> Arc<Current> {
        Arc::new(Current(RwLock::new(Arc::new(key))))
    }

    /// New handshakes present `key` from now on.
    pub fn set(&self, key: CertifiedKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }
}

impl ResolvesServerCert for Current {
    /// One certificate whatever the client's SNI: a name it does not cover is for the
    /// client to refuse.
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The listener's TLS: the acceptor and what reloads it.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    cert: PathBuf,
    key: PathBuf,
    /// The server API requires a client certificate (a client CA is configured).
    pub api_needs_client_cert: bool,
    info: RwLock<CertInfo>,
    /// The files' modification times when last read.
    stamp: Mutex<Option<(SystemTime, SystemTime)>>,
    pub handshake_timeout: Duration,
    reload_check: Duration,
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

/// ALPN protocols offered: HTTP/2 first when enabled.
fn alpn(h2: bool) -> Vec<Vec<u8>> {
    if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    }
}

impl Tls {
    /// The TLS of `config`, if it configures any.
    pub fn from_config(config: &TlsConfig, h2: bool) -> Result<Option<Arc<Tls>>, String> {
        let (Some(cert), Some(key)) = (&config.cert, &config.key) else { return Ok(None) };
        let (certified, info) = load_certified_key(cert, key)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(certified))));
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match &config.client_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_chain(path)? {
                    roots.add(c).map_err(|e| format!("{}: not a usable CA certificate ({e})", path.display()))?;
                }
                // Optional at the TLS layer: the server API asks for it, the rest of the
                // server (browsers) does not.
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_cert_resolver(current.clone());
        server.alpn_protocols = alpn(h2);
        Ok(Some(Arc::new(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            current,
            stamp: Mutex::new(stamp(cert, key)),
            cert: cert.clone(),
            key: key.clone(),
            api_needs_client_cert: config.client_ca.is_some(),
            info: RwLock::new(info),
            handshake_timeout: Duration::from_secs(config.handshake_timeout_secs),
            reload_check: Duration::from_secs(config.reload_check_secs),
        })))
    }

    /// What presents the certificate (reloads included): for the QUIC listener.
    pub fn resolver(&self) -> Arc<Current> {
        self.current.clone()
    }

    /// The certificate presented now.
    pub fn info(&self) -> CertInfo {
        self.info.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads the certificate and key again; new handshakes present them. On any error
    /// the current certificate stays.
    pub fn reload(&self) -> Result<CertInfo, String> {
        let new_stamp = stamp(&self.cert, &self.key);
        let (certified, info) = load_certified_key(&self.cert, &self.key)?;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
        *self.info.write().unwrap_or_else(|p| p.into_inner()) = info.clone();
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = new_stamp;
        Ok(info)
    }

    fn changed(&self) -> bool {
        let now = stamp(&self.cert, &self.key);
        now.is_some() && now != *self.stamp.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads on SIGHUP and when the files change, until shutdown.
    pub fn spawn_reloader(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let tls = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = (!tls.reload_check.is_zero()).then(|| tokio::time::interval(tls.reload_check));
            loop {
                let why = tokio::select! {
                    _ = async { hup_recv(&mut hup).await } => "SIGHUP",
                    _ = async { match &mut tick { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {
                        if !tls.changed() { continue; }
                        "a change of its files"
                    }
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                match tls.reload() {
                    Ok(info) => tracing::info!(
                        subject = %info.subject,
                        expires = %format_time(info.not_after),
                        "TLS certificate reloaded after {why}"
                    ),
                    Err(e) => {
                        tracing::error!("TLS certificate not reloaded after {why}, the current one stays: {e}");
                        // Do not retry a broken pair on every tick: wait for the next change.
                        *tls.stamp.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&tls.cert, &tls.key);
                    }
                }
            }
        });
    }
}

#[cfg(unix)]
async fn hup_recv(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn hup_recv(_: &mut Option<()>) {
    std::future::pending().await
}

/// What `switchboard cert dev` wrote.
pub struct DevCert {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub info: CertInfo,
    /// Made now (false: the existing ones were still good).
    pub created: bool,
}

/// TLS for QUIC (WebTransport over HTTP/3): TLS 1.3 only, ALPN `h3`, the certificate of
/// `resolver`.
pub fn quic_server_config(resolver: Arc<Current>) -> Result<rustls::ServerConfig, String> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS for QUIC: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    c.alpn_protocols = vec![b"h3".to_vec()];
    Ok(c)
}

/// A WebTransport development certificate: self-signed ECDSA P-256 for localhost,
/// 127.0.0.1 and ::1, valid `days` in all (browsers take a certificate by its hash —
/// `serverCertificateHashes` — only when it is valid 14 days or less). Returns the key
/// pair, the SHA-256 of the certificate and when it expires (Unix seconds).
pub fn webtransport_certificate(days: i64) -> Result<(CertifiedKey, [u8; 32], i64), String> {
    let fail = |e: rcgen::Error| format!("making the WebTransport certificate: {e}");
    let now = time::OffsetDateTime::now_utc();
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut params = rcgen::CertificateParams::new(names).map_err(fail)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "Switchboard WebTransport (development)");
    params.not_before = now - time::Duration::hours(1);
    params.not_after = params.not_before + time::Duration::days(days);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let der = cert.der().clone();
    let mut hash = [0u8; 32];
    hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let certified = CertifiedKey::from_der(vec![der], key_der, &provider()).map_err(|e| format!("{e}"))?;
    Ok((certified, hash, params.not_after.unix_timestamp()))
}

/// Where development certificates live unless told otherwise.
pub fn dev_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("switchboard/dev-tls");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/switchboard/dev-tls"),
        None => PathBuf::from("switchboard-dev-tls"),
    }
}

/// A local CA and a certificate it signed for localhost, 127.0.0.1 and ::1, in `dir`
/// (`ca.pem`, `ca-key.pem`, `cert.pem`, `key.pem`). Existing ones are kept while they
/// are valid for another week, unless `force`.
pub fn dev_certificate(dir: &Path, force: bool) -> Result<DevCert, String> {
    let (ca, ca_key, cert, key) =
        (dir.join("ca.pem"), dir.join("ca-key.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    if !force {
        if let Ok((_, info)) = load_certified_key(&cert, &key) {
            if ca.exists() && info.expires_in() > 7 * 86_400 {
                return Ok(DevCert { dir: dir.into(), ca, cert, key, info, created: false });
            }
        }
    }
    let fail = |e: rcgen::Error| format!("making the development certificate: {e}");
    let now = time::OffsetDateTime::now_utc();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Switchboard development CA");
    ca_params.distinguished_name.push(rcgen::DnType::OrganizationName, "Switchboard (local development only)");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(3650);
    let ca_keypair = rcgen::KeyPair::generate().map_err(fail)?;
    let ca_cert = ca_params.self_signed(&ca_keypair).map_err(fail)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_keypair);

    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut leaf = rcgen::CertificateParams::new(names).map_err(fail)?;
    leaf.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    leaf.is_ca = rcgen::IsCa::NoCa;
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - time::Duration::days(1);
    // Browsers refuse server certificates valid for more than 398 days.
    leaf.not_after = now + time::Duration::days(397);
    let leaf_key = rcgen::KeyPair::generate().map_err(fail)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(fail)?;

    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    write_file(&ca, ca_cert.pem().as_bytes(), false)?;
    write_file(&ca_key, issuer.key().serialize_pem().as_bytes(), true)?;
    // The chain a server presents: its certificate, then the CA's.
    write_file(&cert, format!("{}{}", leaf_cert.pem(), ca_cert.pem()).as_bytes(), false)?;
    write_file(&key, leaf_key.serialize_pem().as_bytes(), true)?;
    let (_, info) = load_certified_key(&cert, &key)?;
    Ok(DevCert { dir: dir.into(), ca, cert, key, info, created: true })
}

/// Writes a file whole (private ones readable by their owner only), replacing it
/// atomically so that a reloading server never reads half of it.
fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(&tmp).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::io::Write::write_all(&mut f, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_development_certificate_loads_and_says_what_it_covers() {
        let dir = std::env::temp_dir().join(format!("sb-devcert-{}", fastrand::u64(..)));
        let made = dev_certificate(&dir, false).unwrap();
        assert!(made.created);
        assert_eq!(made.info.names, ["localhost", "127.0.0.1", "::1"]);
        assert!(made.info.expires_in() > 300 * 86_400);
        let again = dev_certificate(&dir, false).unwrap();
        assert!(!again.created, "a valid one is kept");
        assert_eq!(again.info, made.info);
        // The key of another pair does not fit this certificate.
        let other = dir.join("other");
        let o = dev_certificate(&other, false).unwrap();
        let e = load_certified_key(&made.cert, &o.key).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
