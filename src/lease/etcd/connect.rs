//! Connecting to etcd: [`EtcdOptions`] (flannel's `-etcd-*` flags), TLS and auth set-up, and
//! turning `etcd-client` errors into [`RegistryError`]s that say what to fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::lease::RegistryError;
use crate::model::{DEFAULT_PREFIX, LEASE_TTL};

/// flanneld's default `-etcd-endpoints`.
pub const DEFAULT_ENDPOINTS: [&str; 2] = ["http://127.0.0.1:4001", "http://127.0.0.1:2379"];

/// How to reach etcd: flanneld's `-etcd-*` flags plus linen's timeouts.
///
/// TLS is used when a client certificate and key are given (as flanneld does) or when a CA is
/// given; it then needs the CA, as linen does not read the system trust store.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix (flannel: `/coreos.com/network`).
    pub prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    pub cafile: Option<PathBuf>,
    /// Client certificate (PEM).
    pub certfile: Option<PathBuf>,
    /// Client private key (PEM).
    pub keyfile: Option<PathBuf>,
    /// etcd user for password authentication.
    pub username: Option<String>,
    /// That user's password.
    pub password: Option<String>,
    /// A file holding that user's password (instead of `password`): a flag shows in `ps`, and
    /// an environment variable in `/proc/PID/environ` to root and to the same user.
    pub password_file: Option<PathBuf>,
    /// TTL of the etcd lease attached to each subnet key (flannel: 24 h; whole seconds).
    pub lease_ttl: Duration,
    /// How long to wait for a TCP (and TLS) connection to an endpoint.
    pub connect_timeout: Duration,
    /// How long one request may take before the registry counts as unavailable.
    pub request_timeout: Duration,
    /// Whether to warn, once per process, that the connection is plain http: a daemon's log
    /// should, a one-shot admin command's output need not every time.
    pub plain_http_warning: bool,
    /// How often HTTP/2 pings check a connection that carries a stream (the watch). etcd
    /// refuses pings more often than every 5 s (`--grpc-keepalive-min-time`).
    pub keep_alive: Duration,
}

impl Default for EtcdOptions {
    fn default() -> EtcdOptions {
        EtcdOptions {
            endpoints: DEFAULT_ENDPOINTS.iter().map(|e| e.to_string()).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            cafile: None,
            certfile: None,
            keyfile: None,
            username: None,
            password: None,
            password_file: None,
            lease_ttl: LEASE_TTL,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            plain_http_warning: true,
            keep_alive: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for EtcdOptions {
    // Hand-written so the password never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("cafile", &self.cafile)
            .field("certfile", &self.certfile)
            .field("keyfile", &self.keyfile)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("lease_ttl", &self.lease_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("plain_http_warning", &self.plain_http_warning)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// Why an [`EtcdRegistry`](super::EtcdRegistry) could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EtcdSetupError {
    /// The options contradict each other or are incomplete.
    #[error("etcd options are invalid: {0}")]
    Options(String),
    /// A TLS file could not be read.
    #[error("cannot read the etcd {what} {path}: {source}; check the {flag} flag")]
    ReadFile {
        /// Which file (e.g. "CA certificate").
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The flag that names it.
        flag: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file was read but holds no PEM block of the expected kind.
    #[error("the etcd {what} {path} holds no PEM {expected} block; check the {flag} flag")]
    NotPem {
        /// Which file.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The flag that names it.
        flag: &'static str,
        /// The PEM label looked for.
        expected: &'static str,
    },
    /// The first contact (authentication) failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The validated connection settings, ready for `Client::connect`.
pub(super) struct Connection {
    pub endpoints: Vec<String>,
    pub options: ConnectOptions,
}

/// Checks the options, reads the TLS files and builds the client options.
pub(super) fn prepare(opts: &EtcdOptions) -> Result<Connection, EtcdSetupError> {
    if opts.endpoints.is_empty() {
        return Err(EtcdSetupError::Options(
            "no endpoints given; pass at least one, e.g. http://127.0.0.1:2379".into(),
        ));
    }
    if opts.lease_ttl.as_secs() == 0 {
        return Err(EtcdSetupError::Options(format!(
            "lease TTL {:?} is below etcd's one-second granularity; use at least 1 s",
            opts.lease_ttl
        )));
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(opts.connect_timeout)
        .with_timeout(opts.request_timeout)
        // Without a leader etcd cannot commit; fail (and re-list later) instead of waiting.
        .with_require_leader(true)
        // HTTP/2 pings find a dead connection under a silent watch stream. Only where a stream
        // is open: etcd (grpc-go, PermitWithoutStream false) counts each ping on a connection
        // without one as a strike and closes it with GOAWAY "too_many_pings" at the third, so
        // pinging idle connections (every member's but the watch's) had them torn down and
        // rebuilt about every 40 s, a request caught in that failing as unavailable. flanneld's
        // Go client does not ping idle connections either. A request on an idle connection
        // that died has its own timeout.
        .with_keep_alive(opts.keep_alive, opts.request_timeout)
        .with_keep_alive_while_idle(false);

    // TLS with any TLS file or any https:// endpoint (as flannel's etcd client: an https
    // endpoint without files verifies against the system's trust store).
    let any_https = opts
        .endpoints
        .iter()
        .any(|e| e.trim().starts_with("https://"));
    let tls = match (&opts.certfile, &opts.keyfile) {
        (Some(cert), Some(key)) => Some(Some((cert, key))),
        (None, None) if opts.cafile.is_some() || any_https => Some(None),
        (None, None) => None,
        (Some(_), None) => {
            return Err(EtcdSetupError::Options(
                "--etcd-certfile is given without --etcd-keyfile; a client certificate needs its key".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(EtcdSetupError::Options(
                "--etcd-keyfile is given without --etcd-certfile; a client key needs its certificate".into(),
            ));
        }
    };
    let mut endpoints = Vec::with_capacity(opts.endpoints.len());
    for e in &opts.endpoints {
        let e = e.trim();
        check_endpoint(e).map_err(|why| {
            EtcdSetupError::Options(format!(
                "endpoint {:?} {why} (--etcd-endpoints takes URLs such as http://198.18.0.1:2379)",
                redacted(e)
            ))
        })?;
        let tls_url = e.starts_with("https://");
        match (&tls, tls_url) {
            (Some(_), false) if any_https => {
                return Err(EtcdSetupError::Options(format!(
                    "endpoint {e} is not https:// but others are; use https:// for all"
                )));
            }
            (Some(_), false) if e.starts_with("http://") => {
                return Err(EtcdSetupError::Options(format!(
                    "endpoint {e} is plain HTTP but TLS files are given; use https://{}",
                    &e["http://".len()..]
                )));
            }
            _ => {}
        }
        endpoints.push(e.to_owned());
    }
    match tls {
        Some(identity) => {
            let mut config = match &opts.cafile {
                Some(ca) => {
                    let ca = read_pem(ca, "CA certificate", "--etcd-cafile", "CERTIFICATE")?;
                    TlsOptions::new().ca_certificate(Certificate::from_pem(ca))
                }
                None => {
                    static SAID: Once = Once::new();
                    SAID.call_once(|| {
                        tracing::info!(
                            "no --etcd-cafile: verifying etcd's certificate against the system \
                             trust store (SSL_CERT_FILE or SSL_CERT_DIR replace it)"
                        )
                    });
                    TlsOptions::new().with_native_roots()
                }
            };
            if let Some((cert, key)) = identity {
                let cert = read_pem(cert, "client certificate", "--etcd-certfile", "CERTIFICATE")?;
                let key = read_pem(key, "client key", "--etcd-keyfile", "PRIVATE KEY")?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(config);
        }
        None if !opts.plain_http_warning && opts.username.is_none() => {}
        None => {
            // Once: `linen run` prepares again each second while etcd is out of reach. With a
            // user, admin commands warn too: the password crosses the network readable.
            static SAID: Once = Once::new();
            let secrets = match opts.username {
                Some(_) => {
                    ", so the etcd password and token cross the network in clear text; \
                            use https://"
                }
                None => "",
            };
            SAID.call_once(|| {
                tracing::warn!(
                    endpoints = %endpoints.join(","),
                    "no TLS files given: connecting to etcd with plain http{secrets}"
                )
            });
        }
    }
    if let Some((user, password)) = credentials(opts)? {
        options = options
            .with_user(user, password)
            // etcd's simple tokens expire after 5 idle minutes; a daemon idles for hours.
            .with_auto_token_refresh(true);
    }
    Ok(Connection { endpoints, options })
}

/// The user name and password the options give (the password read from its file), if any.
pub(super) fn credentials(opts: &EtcdOptions) -> Result<Option<(String, String)>, EtcdSetupError> {
    let password = match (&opts.password, &opts.password_file) {
        (Some(_), Some(_)) => {
            return Err(EtcdSetupError::Options(
                "both --etcd-password and --etcd-password-file are given; pass one".into(),
            ));
        }
        (_, Some(path)) => Some(read_password(path)?),
        (password, None) => password.clone(),
    };
    match (&opts.username, password) {
        (Some(user), password) => Ok(Some((user.clone(), password.unwrap_or_default()))),
        (None, Some(_)) => Err(EtcdSetupError::Options(
            "an etcd password is given (--etcd-password or --etcd-password-file) without \
             --etcd-username"
                .into(),
        )),
        (None, None) => Ok(None),
    }
}

/// `endpoint` with any user and password in it replaced by `…`, for messages.
pub fn redacted(endpoint: &str) -> String {
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), endpoint),
    };
    // Up to the last `@` anywhere: a password may hold a `/` (typed unescaped), which would
    // otherwise look like the start of a path. A path with an `@` is cut too, which is
    // harmless: endpoints with paths are refused anyway.
    match rest.rfind('@') {
        Some(at) => format!("{scheme}…{}", &rest[at..]),
        None => endpoint.to_owned(),
    }
}

/// Checks one endpoint as etcd-client will read it: `http://` or `https://` (or no scheme,
/// which TLS settings decide), a host name or address, and a port. Without the check a typo
/// such as `--etcd-endpoints foo` is taken for a host on port 80 and retried for ever. So a
/// port is required where there is no scheme; with one, a URL without a port means 80 or
/// 443, as for flanneld (an etcd behind an HTTPS proxy).
fn check_endpoint(e: &str) -> Result<(), String> {
    if e.is_empty() {
        return Err("is empty (a stray comma?)".into());
    }
    let (scheme, rest) = match e.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (Some(scheme), rest),
        Some((scheme, _)) => return Err(format!("has scheme {scheme:?}; use http:// or https://")),
        None => (None, e),
    };
    // flanneld's examples sometimes end in a slash; a longer path would be sent nowhere.
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err("has a path; an endpoint is only scheme, host and port".into());
    }
    if authority.contains('@') {
        return Err("holds credentials; pass them with --etcd-username and --etcd-password".into());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (addr, after) = bracketed
            .split_once(']')
            .ok_or("has an unclosed '[' around its IPv6 address")?;
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "has {addr:?} in brackets, which is no IPv6 address"
            ));
        }
        (addr, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err(
                    "holds an IPv6 address without brackets; write http://[fd00::1]:2379".into(),
                );
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let name_ok = |h: &str| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !authority.starts_with('[') && !name_ok(host) {
        return Err(format!(
            "has {host:?} for a host, which is no host name or address"
        ));
    }
    match port {
        None if scheme.is_some() => Ok(()),
        None => Err(format!(
            "has neither scheme nor port; etcd's client port is usually 2379, as in \
             http://{authority}:2379"
        )),
        Some(p) => match p.parse::<u16>() {
            Ok(1..) => Ok(()),
            _ => Err(format!("has {p:?} for a port, which is not 1 to 65535")),
        },
    }
}

/// The password in `path`: its whole content but one final line end (`echo secret > file` and
/// editors add one), so a password may hold spaces.
fn read_password(path: &Path) -> Result<String, EtcdSetupError> {
    let read_error = |source| EtcdSetupError::ReadFile {
        what: "password file",
        path: path.to_owned(),
        flag: "--etcd-password-file",
        source,
    };
    let text = crate::files::read_regular(path, true).map_err(read_error)?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(EtcdSetupError::Options(format!(
            "the password file {} is empty; write the etcd password into it",
            path.display()
        )));
    }
    Ok(password.to_owned())
}

fn read_pem(
    path: &Path,
    what: &'static str,
    flag: &'static str,
    label: &'static str,
) -> Result<Vec<u8>, EtcdSetupError> {
    let bytes = std::fs::read(path).map_err(|source| EtcdSetupError::ReadFile {
        what,
        path: path.to_owned(),
        flag,
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    // "PRIVATE KEY" also matches "RSA PRIVATE KEY" and "EC PRIVATE KEY".
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !found {
        return Err(EtcdSetupError::NotPem {
            what,
            path: path.to_owned(),
            flag,
            expected: label,
        });
    }
    Ok(bytes)
}

/// Turns an `etcd-client` error from trying to `what` into a [`RegistryError`]: TLS and
/// authentication problems are [`RegistryError::Refused`] with advice, everything else is
/// [`RegistryError::Unavailable`] (retrying may help).
pub(super) fn registry_error(
    location: &str,
    what: &str,
    err: &etcd_client::Error,
) -> RegistryError {
    use etcd_client::Error as E;
    use tonic::Code;

    let detail = error_chain(err);
    if looks_like_tls_failure(&detail) {
        return refused_tls(location, &detail);
    }
    let refused = |advice: &str| RegistryError::Refused {
        location: location.to_owned(),
        reason: format!("{what}: {detail}; {advice}"),
    };
    match err {
        E::GRpcStatus(status) => match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => refused(
                "check --etcd-username/--etcd-password and that the user's role may read and \
                 write the key prefix",
            ),
            // A JWT older than the last change to users or roles: renewed by
            // `Shared::request`, so the next request passes.
            Code::InvalidArgument if token_outdated(err) => unavailable(
                location,
                what,
                &format!(
                    "{detail} (users or roles changed since the token was issued; the next \
                     request takes a new one)"
                ),
            ),
            Code::InvalidArgument if mentions_auth(status.message()) => {
                refused("check --etcd-username/--etcd-password (etcd has authentication enabled)")
            }
            Code::InvalidArgument | Code::Unimplemented => {
                refused("this etcd does not accept the request; linen needs etcd v3.3 or later")
            }
            _ => unavailable(location, what, &detail),
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => {
            refused("check the endpoint URLs and credentials")
        }
        _ => unavailable(location, what, &detail),
    }
}

pub(super) fn unavailable(location: &str, what: &str, detail: &str) -> RegistryError {
    RegistryError::Unavailable {
        location: location.to_owned(),
        reason: format!("{what}: {detail}"),
    }
}

pub(super) fn refused_tls(location: &str, detail: &str) -> RegistryError {
    RegistryError::Refused {
        location: location.to_owned(),
        reason: format!(
            "TLS verification failed for {location}: {detail}; check that --etcd-cafile holds \
             the CA that signed etcd's server certificate, that the certificate names the \
             endpoint's host or IP, and that etcd trusts the client certificate"
        ),
    }
}

/// Whether etcd refused a request without a token because it has authentication enabled.
pub(super) fn auth_required(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::InvalidArgument
            && s.message().contains("user name is empty"))
}

/// Whether etcd refused an authentication because it has authentication disabled.
pub(super) fn auth_not_enabled(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::FailedPrecondition
            && s.message().contains("authentication is not enabled"))
}

/// Whether etcd refused a token made before the last change to users or roles: a JWT carries
/// the auth store's revision. etcd-client renews a token only when etcd calls it invalid;
/// clientv3 renews it on this too.
pub(super) fn token_outdated(err: &etcd_client::Error) -> bool {
    matches!(err, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::InvalidArgument
            && s.message().contains("revision of auth store is old"))
}

fn mentions_auth(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("user name") || m.contains("authentication") || m.contains("password")
}

/// Whether an error text is a certificate or handshake failure (rustls and tonic wordings).
/// Not a connection closed during the handshake (tokio-rustls: "tls handshake eof"): a load
/// balancer with no healthy etcd behind it, or a member going down, does that, and it may
/// pass; taken for a certificate problem, it stopped the daemon with advice about CAs.
pub(super) fn looks_like_tls_failure(detail: &str) -> bool {
    let d = detail.to_ascii_lowercase();
    if d.contains("eof") || d.contains("connection reset") {
        return false;
    }
    [
        "certificate",
        "unknownissuer",
        "unknown issuer",
        "handshake",
        "badsignature",
        "tls",
    ]
    .iter()
    .any(|needle| d.contains(needle))
}

/// The error's message and its causes, joined, so the root cause (a refused connection, a
/// rustls alert) is shown without the Debug noise of tonic's `Display`.
pub(super) fn error_chain(err: &etcd_client::Error) -> String {
    use etcd_client::Error as E;
    use std::error::Error;

    // etcd-client's error does not expose its sources; its variants' payloads do.
    let (mut text, mut source): (String, Option<&(dyn Error + 'static)>) = match err {
        E::GRpcStatus(s) if !s.message().is_empty() => (s.message().to_owned(), s.source()),
        E::GRpcStatus(s) => (s.code().description().to_owned(), s.source()),
        E::TransportError(t) => (t.to_string(), t.source()),
        E::IoError(e) => (e.to_string(), e.source()),
        other => (other.to_string(), None),
    };
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) && s_text != "transport error" {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn endpoints_are_checked_before_connecting() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd-0.example:2379",
            "http://198.18.0.1:2379/",
            "127.0.0.1:2379",
            "http://[fd00::1]:2379",
            "etcd_a:1",
            // With a scheme, no port means the scheme's (an etcd behind an HTTPS proxy).
            "https://etcd.example",
            "http://foo",
            "http://[fd00::1]",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("foo", "neither scheme nor port"),
            ("foo", "http://foo:2379"),
            ("fd00::1", "brackets"),
            ("[fd00::1]", "http://[fd00::1]:2379"),
            ("unix:///run/etcd.sock", "scheme \"unix\""),
            ("HTTP://foo:2379", "scheme"),
            ("http://foo:2379/v3", "path"),
            ("http://root:pw@foo:2379", "--etcd-username"),
            ("http://fd00::1:2379", "brackets"),
            ("http://[fd00::1:2379", "unclosed"),
            ("http://[foo]:2379", "no IPv6 address"),
            ("http://:2379", "for a host"),
            ("http://et cd:2379", "for a host"),
            ("http://foo:0", "not 1 to 65535"),
            ("http://foo:65536", "not 1 to 65535"),
            ("http://foo:", "not 1 to 65535"),
        ] {
            let err = check_endpoint(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn credentials_in_an_endpoint_stay_out_of_messages() {
        assert_eq!(redacted("http://root:pw@foo:2379"), "http://…@foo:2379");
        assert_eq!(redacted("root:pw@foo:2379/"), "…@foo:2379/");
        assert_eq!(redacted("http://u:p/ss@h:2379"), "http://…@h:2379");
        assert_eq!(redacted("http://foo:2379/a"), "http://foo:2379/a");
        let opts = EtcdOptions {
            endpoints: vec!["http://root:hunter2@foo:2379".into()],
            ..EtcdOptions::default()
        };
        let Err(e) = prepare(&opts) else {
            panic!("accepted")
        };
        let text = e.to_string();
        assert!(
            text.contains("credentials") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_endpoint_is_an_options_error() {
        let opts = EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into(), " foo ".into()],
            ..EtcdOptions::default()
        };
        match prepare(&opts) {
            Err(EtcdSetupError::Options(m)) => {
                assert!(m.contains("\"foo\" has neither scheme nor port"), "{m}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_password_file_loses_one_line_end_and_must_hold_something() {
        let dir = tempfile::tempdir().unwrap();
        let read = |content: &str| {
            let path = dir.path().join("password");
            std::fs::write(&path, content).unwrap();
            read_password(&path)
        };
        assert_eq!(read("s3cret\n").unwrap(), "s3cret");
        assert_eq!(read("s3cret\r\n").unwrap(), "s3cret");
        assert_eq!(read("pass word").unwrap(), "pass word");
        assert_eq!(read("s3cret\n\n").unwrap(), "s3cret\n");
        for empty in ["", "\n"] {
            match read(empty) {
                Err(EtcdSetupError::Options(m)) => assert!(m.contains("is empty"), "{m}"),
                other => panic!("{empty:?}: {:?}", other.map(|_| ())),
            }
        }
        let missing = dir.path().join("missing");
        match read_password(&missing) {
            Err(e @ EtcdSetupError::ReadFile { .. }) => {
                assert!(e.to_string().contains("--etcd-password-file"), "{e}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // With both, or without a user, the options say so.
        std::fs::write(dir.path().join("password"), "s3cret").unwrap();
        let both = EtcdOptions {
            username: Some("root".into()),
            password: Some("s3cret".into()),
            password_file: Some(dir.path().join("password")),
            ..EtcdOptions::default()
        };
        assert!(matches!(prepare(&both), Err(EtcdSetupError::Options(m)) if m.contains("both")));
        let no_user = EtcdOptions {
            password_file: Some(dir.path().join("password")),
            ..EtcdOptions::default()
        };
        assert!(
            matches!(prepare(&no_user), Err(EtcdSetupError::Options(m)) if m.contains("without --etcd-username"))
        );
    }

    #[test]
    fn options_debug_hides_the_password() {
        let opts = EtcdOptions {
            username: Some("root".into()),
            password: Some("hunter2".into()),
            ..EtcdOptions::default()
        };
        let text = format!("{opts:?}");
        assert!(
            !text.contains("hunter2") && text.contains("redacted"),
            "{text}"
        );
    }

    #[test]
    fn rejects_incomplete_tls_and_names_the_file() {
        let opts = EtcdOptions {
            certfile: Some("/c.pem".into()),
            ..EtcdOptions::default()
        };
        let msg = prepare(&opts).err().unwrap().to_string();
        assert!(msg.contains("--etcd-keyfile"), "{msg}");

        let opts = EtcdOptions {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            cafile: Some("/nonexistent/linen-ca.pem".into()),
            ..EtcdOptions::default()
        };
        let msg = prepare(&opts).err().unwrap().to_string();
        assert!(
            msg.contains("/nonexistent/linen-ca.pem") && msg.contains("--etcd-cafile"),
            "{msg}"
        );

        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("ca.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let opts = EtcdOptions {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            cafile: Some(junk.clone()),
            ..EtcdOptions::default()
        };
        let msg = prepare(&opts).err().unwrap().to_string();
        assert!(
            msg.contains(junk.to_str().unwrap()) && msg.contains("PEM"),
            "{msg}"
        );
    }

    /// https:// alone means TLS against the system trust store (as flannel); mixing schemes
    /// is refused, naming the odd endpoint.
    #[test]
    fn https_needs_no_files_but_one_scheme_for_all() {
        let only = EtcdOptions {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            ..EtcdOptions::default()
        };
        assert!(prepare(&only).is_ok());
        let mixed = EtcdOptions {
            endpoints: vec![
                "https://127.0.0.1:2379".into(),
                "http://127.0.0.2:2379".into(),
            ],
            ..EtcdOptions::default()
        };
        let msg = prepare(&mixed).err().unwrap().to_string();
        assert!(
            msg.contains("http://127.0.0.2:2379") && msg.contains("https:// for all"),
            "{msg}"
        );
    }

    #[test]
    fn classifies_tls_failures() {
        assert!(looks_like_tls_failure(
            "transport error: invalid peer certificate: UnknownIssuer"
        ));
        assert!(!looks_like_tls_failure(
            "transport error: connection refused"
        ));
        assert!(!looks_like_tls_failure(
            "transport error: tls handshake eof"
        ));
        assert!(looks_like_tls_failure(
            "transport error: received fatal alert: CertificateRequired"
        ));
    }
}
