//! The CA service (`provisioning serve`): the CA online, the one place
//! certificates are renewed.
//!
//! HTTPS with client certificates from the device CA. A device (or
//! service) renews its own certificate: the identity and the presented
//! serial come from its TLS session. A gateway renews on a device's
//! behalf, relaying the device's identity and serial from the device's
//! own mTLS session; only service identities that the operator names
//! with `--ra` may do that, and every other caller asking for someone
//! else is refused. The decisions are the [`crate::renewal`] core's; this
//! module is the shell: TLS, HTTP, the one-in-flight rule and the rate
//! limit per identity, and the grace-period timer.
//!
//! The API (JSON in, JSON out):
//! - `POST /v1/renew` `{"request_id", "csr"?, "identity"?, "serial"?}`:
//!   `200 {"status":"issued", "serial", "not_after", "chain", "repeated"}`
//!   or `4xx {"status":"refused", "code", "reason", "retry_after"?}`;
//! - `POST /v1/commit` `{"serial", "identity"?}`: `200 {"status":"committed", "serial", "changed"}`;
//! - `GET /v1/crl`: the device CA's CRL, PEM.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use time::{Duration, OffsetDateTime};
use tokio::net::TcpListener;
use twofold_protocol::{Identity, Principal};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::Pki;
use crate::pki::CaIssuer;
use crate::renewal::{NewKey, Refusal, RenewError, RenewOptions, RenewRequest};
use crate::serial::Serial;

/// The largest request body: a CSR and a few fields.
const MAX_BODY: usize = 16 * 1024;

/// How the service runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// The service's certificate chain (from the server CA, as a
    /// gateway's: `provisioning gateway-cert`) and key, PEM.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Service identities allowed to renew on a device's behalf.
    pub registration_authorities: Vec<Identity>,
    pub renew: RenewOptions,
    /// How long a renewal may await the device's commit before its
    /// predecessor is superseded anyway.
    pub grace: Duration,
    /// At most this many renewal requests per identity per `rate_window`.
    pub rate_limit: u32,
    pub rate_window: std::time::Duration,
    /// CAs (DER) whose certificates, installed at the factory, may enroll
    /// a device over EST `simpleenroll`, once; nothing else.
    pub bootstrap_cas: Vec<Vec<u8>>,
    /// Lifetime of the gateway server certificates it renews.
    pub server_lifetime: Duration,
}

/// Why a request was turned away before reaching the core.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gate {
    /// Another request of this identity is being answered.
    Busy,
    /// Too many requests of this identity lately.
    RateLimited { retry_after: u64 },
}

/// One-in-flight and a sliding-window rate limit, per identity.
#[derive(Default)]
struct Admission {
    in_flight: HashSet<String>,
    recent: HashMap<String, Vec<Instant>>,
}

impl Admission {
    fn admit(
        &mut self,
        who: &str,
        limit: u32,
        window: std::time::Duration,
        now: Instant,
    ) -> Result<(), Gate> {
        let recent = self.recent.entry(who.to_owned()).or_default();
        recent.retain(|t| now.duration_since(*t) < window);
        if self.in_flight.contains(who) {
            return Err(Gate::Busy);
        }
        if recent.len() >= limit as usize {
            let oldest = recent.first().copied().unwrap_or(now);
            let wait = window.saturating_sub(now.duration_since(oldest));
            return Err(Gate::RateLimited {
                retry_after: wait.as_secs().max(1),
            });
        }
        recent.push(now);
        self.in_flight.insert(who.to_owned());
        Ok(())
    }

    fn done(&mut self, who: &str) {
        self.in_flight.remove(who);
        if self.recent.get(who).is_some_and(Vec::is_empty) {
            self.recent.remove(who);
        }
    }
}

struct State {
    pki: Mutex<Pki>,
    /// The device CA's CRL file, read without `pki`'s lock: a call that
    /// holds it may wait on the registry, and the CRL must still be served
    /// (each write replaces the file whole, by rename).
    crl_file: PathBuf,
    ca: CaIssuer,
    /// The server CA, for gateways' own certificates.
    server_ca: CaIssuer,
    config: Config,
    admission: Mutex<Admission>,
}

/// The authenticated caller: its identity and certificate serial.
#[derive(Clone, Debug)]
struct Caller {
    identity: Identity,
    serial: Serial,
}

/// A factory certificate: one from a bootstrap CA, good for a device's
/// first `simpleenroll` and nothing else.
#[derive(Clone, Debug)]
struct Factory {
    /// Its subject's CN: the device id it enrolls.
    cn: String,
    serial: String,
}

/// Runs the service until `shutdown` resolves.
pub async fn run(
    pki: Pki,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let ca = pki.device_issuer()?;
    let server_ca = pki.server_issuer()?;
    let tls = tls_config(&config, &ca.cert_der)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let state = Arc::new(State {
        crl_file: pki.dir().join(crate::pki::CRL),
        pki: Mutex::new(pki),
        ca,
        server_ca,
        config,
        admission: Mutex::new(Admission::default()),
    });
    tracing::info!(listen = %listener.local_addr()?, "CA service ready");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(settle_periodically(state.clone()));
    tokio::spawn(catch_up_crl_periodically(state.clone()));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let (caller, factory) =
                match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(leaf) => classify(
                        leaf.as_ref(),
                        &state.ca.cert_der,
                        &state.config.bootstrap_cas,
                    ),
                    None => (Err("no client certificate".to_owned()), None),
                };
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let caller = caller.clone();
                let factory = factory.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(state, caller, factory, req).await)
                }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(io, service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

fn tls_config(config: &Config, device_ca_der: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(device_ca_der.to_vec()))?;
    // EST's cacerts and token enrollment come without a client
    // certificate; every other operation refuses a caller without one.
    for ca in &config.bootstrap_cas {
        roots
            .add(CertificateDer::from(ca.clone()))
            .context("an EST bootstrap CA is not a usable CA certificate")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let chain_pem = std::fs::read(&config.cert)
        .with_context(|| format!("cannot read {}", config.cert.display()))?;
    let chain = pem::parse_many(&chain_pem)
        .with_context(|| format!("{} is not PEM", config.cert.display()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect::<Vec<_>>();
    if chain.is_empty() {
        anyhow::bail!("{} holds no certificate", config.cert.display());
    }
    let key_pem = std::fs::read(&config.key)
        .with_context(|| format!("cannot read {}", config.key.display()))?;
    let key =
        pem::parse(&key_pem).with_context(|| format!("{} is not PEM", config.key.display()))?;
    let key = PrivateKeyDer::try_from(key.into_contents())
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.key.display()))?;
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(tls))
}

/// Sorts a client certificate the TLS layer verified by the CA that
/// issued it: the device CA's carry an identity; a bootstrap CA's are
/// factory certificates, which may only enroll (whatever names they
/// carry, they are never taken for an identity).
fn classify(
    der: &[u8],
    device_ca: &[u8],
    bootstrap: &[Vec<u8>],
) -> (Result<Caller, String>, Option<Factory>) {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return (Err("the client certificate does not parse".into()), None);
    };
    if issued_by(&cert, device_ca) {
        return (caller_of(der), None);
    }
    if bootstrap.iter().any(|ca| issued_by(&cert, ca)) {
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let factory = Factory {
            cn,
            serial: cert.raw_serial_as_string(),
        };
        let why = "a factory certificate (from an EST bootstrap CA) may only enroll a device, at \
                   /.well-known/est/simpleenroll";
        return (Err(why.into()), Some(factory));
    }
    (
        Err("the client certificate is from no CA this service knows".into()),
        None,
    )
}

/// `cert` names `ca_der` as its issuer and carries its signature.
fn issued_by(cert: &X509Certificate<'_>, ca_der: &[u8]) -> bool {
    X509Certificate::from_der(ca_der).is_ok_and(|(_, ca)| {
        cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
    })
}

/// The identity (SAN URI) and serial of a verified client certificate.
fn caller_of(der: &[u8]) -> Result<Caller, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut identity = None;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    identity = Some(Identity::parse(uri).map_err(|e| e.to_string())?);
                }
            }
        }
    }
    Ok(Caller {
        identity: identity.ok_or("the client certificate has no identity URI")?,
        serial: Serial::from_bytes(cert.raw_serial()),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    request_id: String,
    /// A PKCS#10 CSR (PEM) for a rekey; absent to renew with the same key.
    csr: Option<String>,
    /// On behalf of (registration authorities only): the device's identity
    /// URI and the serial of the certificate it presented to the gateway.
    identity: Option<String>,
    serial: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    serial: Option<String>,
    identity: Option<String>,
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn refused(status: StatusCode, code: &str, reason: impl ToString) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"status": "refused", "code": code, "reason": reason.to_string()}),
    )
}

async fn handle(
    state: Arc<State>,
    caller: Result<Caller, String>,
    factory: Option<Factory>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad-request",
                format!("the body could not be read or is over {MAX_BODY} bytes: {e}"),
            );
        }
    };
    if let Some(operation) = parts.uri.path().strip_prefix(EST_PREFIX) {
        return est(state, caller, factory, &parts, operation, &body).await;
    }
    // The API below is for holders of a device CA certificate only.
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return refused(StatusCode::FORBIDDEN, "no-identity", e),
    };
    // The CRL is public, and served from its file without the registry,
    // which may be away (a caller waiting on the registry here would wait
    // behind whatever call holds the PKI).
    if parts.method == Method::GET && parts.uri.path() == "/v1/crl" {
        return crl(&state, &parts.headers);
    }
    // The TLS layer knows no CRL: a caller whose certificate the operator
    // revoked (a stolen gateway's service identity) is turned away here.
    // A superseded one goes on to the core, which answers not-latest.
    if let Some(why) = revoked(&state, &caller).await {
        return refused(StatusCode::FORBIDDEN, "revoked", why);
    }
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/renew") => renew(state, caller, &body).await,
        (&Method::POST, "/v1/commit") => commit(state, caller, &body).await,
        (&Method::POST, "/v1/server-cert") => server_cert(state, caller, &body).await,
        (_, "/v1/renew" | "/v1/commit" | "/v1/crl" | "/v1/server-cert") => refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad-request",
            format!("{} is not allowed here", parts.method),
        ),
        (_, path) => refused(
            StatusCode::NOT_FOUND,
            "bad-request",
            format!("no such endpoint {path:?}"),
        ),
    }
}

/// The device CA's CRL as gateways pull it: with an ETag (of its bytes),
/// and 304 Not Modified for a caller that has it already.
fn crl(state: &State, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
    let pem = match std::fs::read_to_string(&state.crl_file) {
        Ok(pem) => pem,
        Err(e) => {
            tracing::warn!(file = %state.crl_file.display(), error = %e, "cannot read the CRL");
            return refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed",
                "cannot read the CRL",
            );
        }
    };
    let digest = <sha2::Sha256 as sha2::Digest>::digest(pem.as_bytes());
    let etag = format!("\"{}\"", hex::encode(&digest[..16]));
    let has_it = headers
        .get_all(http::header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim() == etag);
    let mut r = if has_it {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from(pem)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-pem-file"),
        );
        r
    };
    if let Ok(value) = http::HeaderValue::from_str(&etag) {
        r.headers_mut().insert(http::header::ETAG, value);
    }
    r
}

/// Whose certificate a request is about: the caller's own, or, for a
/// registration authority, the device named in the body.
fn subject_of(
    state: &State,
    caller: &Caller,
    identity: Option<&str>,
    serial: Option<&str>,
) -> Result<(Principal, Serial), Refused> {
    let Some(identity) = identity else {
        if serial.is_some() {
            return Err(Box::new(refused(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "a serial is given only with the identity it belongs to",
            )));
        }
        return Ok((caller.identity.principal, caller.serial.clone()));
    };
    let is_ra = state
        .config
        .registration_authorities
        .contains(&caller.identity);
    if !is_ra {
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!(
                "{} is not a registration authority of this CA service and may renew only its \
                 own certificate",
                caller.identity
            ),
        )));
    }
    let target = Identity::parse(identity).map_err(|e| {
        Box::new(refused(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("identity {identity:?}: {e}"),
        ))
    })?;
    if target.trust_domain != caller.identity.trust_domain {
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!("{identity} is not in this CA's trust domain"),
        )));
    }
    let serial = serial
        .ok_or("the serial of the device's certificate is missing".to_owned())
        .and_then(|s| {
            s.parse::<Serial>()
                .map_err(|_| format!("serial {s:?} is not hex"))
        })
        .map_err(|e| Box::new(refused(StatusCode::BAD_REQUEST, "bad-request", e)))?;
    Ok((target.principal, serial))
}

/// An answer that ends a request early (boxed: it is large).
type Refused = Box<Response<Full<Bytes>>>;

/// A JSON body, and whose certificate it is about ([`subject_of`]).
fn parse<T: serde::de::DeserializeOwned>(
    state: &State,
    caller: &Caller,
    body: &[u8],
    subject: impl Fn(&T) -> (&Option<String>, &Option<String>),
) -> Result<(T, Principal, Serial), Refused> {
    let body: T = serde_json::from_slice(body)
        .map_err(|e| Box::new(refused(StatusCode::BAD_REQUEST, "bad-request", e)))?;
    let (identity, serial) = subject(&body);
    let (principal, serial) = subject_of(state, caller, identity.as_deref(), serial.as_deref())?;
    Ok((body, principal, serial))
}

async fn renew(state: Arc<State>, caller: Caller, body: &[u8]) -> Response<Full<Bytes>> {
    let (body, principal, presented) =
        match parse::<RenewBody>(&state, &caller, body, |b| (&b.identity, &b.serial)) {
            Ok(parsed) => parsed,
            Err(r) => return *r,
        };
    let key = match body.csr {
        Some(csr) => NewKey::Rekey(csr.into_bytes()),
        None => NewKey::Same,
    };
    match renew_core(&state, &caller, principal, presented, body.request_id, key).await {
        Answer::Issued(renewed) => json(
            StatusCode::OK,
            serde_json::json!({
                "status": "issued",
                "serial": renewed.record.serial.to_string(),
                "not_before": renewed.record.not_before.unix_timestamp(),
                "not_after": renewed.record.not_after.unix_timestamp(),
                "chain": renewed.chain_pem,
                "repeated": renewed.repeated,
            }),
        ),
        Answer::Refused {
            status,
            code,
            reason,
            retry_after,
        } => {
            let mut body = serde_json::json!({"status": "refused", "code": code, "reason": reason});
            if let Some(secs) = retry_after {
                body["retry_after"] = secs.into();
            }
            let mut r = json(status, body);
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert(http::header::RETRY_AFTER, secs.into());
            }
            r
        }
    }
}

/// What the renewal core made of a request, for either front door.
enum Answer {
    Issued(crate::renewal::Renewed),
    Refused {
        status: StatusCode,
        code: &'static str,
        reason: String,
        retry_after: Option<u64>,
    },
}

fn refusal(status: StatusCode, code: &'static str, reason: impl ToString) -> Answer {
    Answer::Refused {
        status,
        code,
        reason: reason.to_string(),
        retry_after: None,
    }
}

/// One renewal through the core, under the one-in-flight rule and the
/// rate limit of the identity renewed.
async fn renew_core(
    state: &Arc<State>,
    caller: &Caller,
    principal: Principal,
    presented: Serial,
    request_id: String,
    key: NewKey,
) -> Answer {
    let who = format!("{} {}", principal.kind(), principal.name());
    let gate = match state.admission.lock() {
        Ok(mut a) => a.admit(
            &who,
            state.config.rate_limit,
            state.config.rate_window,
            Instant::now(),
        ),
        Err(_) => return refusal(StatusCode::INTERNAL_SERVER_ERROR, "failed", "poisoned"),
    };
    match gate {
        Ok(()) => {}
        Err(Gate::Busy) => {
            return refusal(
                StatusCode::CONFLICT,
                "busy",
                "another renewal of this identity is in progress; retry when it is answered",
            );
        }
        Err(Gate::RateLimited { retry_after }) => {
            return Answer::Refused {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "rate-limited",
                reason: format!("too many renewal requests; retry in {retry_after} s"),
                retry_after: Some(retry_after),
            };
        }
    }
    let request = RenewRequest {
        principal,
        presented,
        request_id,
        key,
    };
    let core = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut pki = core
            .pki
            .lock()
            .map_err(|_| "the registry lock is poisoned")?;
        Ok::<_, &str>(pki.renew(
            &core.ca,
            request,
            core.config.renew,
            OffsetDateTime::now_utc(),
        ))
    })
    .await;
    if let Ok(mut a) = state.admission.lock() {
        a.done(&who);
    }
    match outcome {
        Ok(Ok(Ok(renewed))) => {
            tracing::info!(
                identity = %who, serial = %renewed.record.serial, by = %caller.identity,
                repeated = renewed.repeated, "renewed"
            );
            Answer::Issued(renewed)
        }
        Ok(Ok(Err(RenewError::Refused(r)))) => {
            tracing::info!(identity = %who, by = %caller.identity, code = r.code(), "renewal refused: {r}");
            refusal(status_of(&r), r.code(), &r)
        }
        Ok(Ok(Err(RenewError::Failed(e)))) => {
            tracing::error!(identity = %who, error = %e, "renewal failed");
            refusal(StatusCode::SERVICE_UNAVAILABLE, "failed", e)
        }
        Ok(Err(e)) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
    }
}

/// Where EST lives (RFC 7030 3.2.2), with no CA label.
const EST_PREFIX: &str = "/.well-known/est/";

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A base64 EST answer of `content_type`.
fn est_body(content_type: &'static str, der: &[u8]) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(crate::est::encode_body(der))));
    let headers = r.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    headers.insert(
        "content-transfer-encoding",
        http::HeaderValue::from_static("base64"),
    );
    r
}

const PKCS7_CERTS: &str = "application/pkcs7-mime; smime-type=certs-only";

fn pkcs7(ders: &[&[u8]]) -> Response<Full<Bytes>> {
    match crate::est::certs_only(ders) {
        Ok(der) => est_body(PKCS7_CERTS, &der),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode PKCS#7: {e}"),
        ),
    }
}

/// The EST operations. Errors are plain text with the status, as the RFC
/// has them.
async fn est(
    state: Arc<State>,
    caller: Result<Caller, String>,
    factory: Option<Factory>,
    parts: &http::request::Parts,
    operation: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    match (&parts.method, operation) {
        (&Method::GET, "cacerts") => pkcs7(&[&state.ca.cert_der]),
        (&Method::GET, "csrattrs") => match crate::est::csr_attributes() {
            Ok(der) => est_body("application/csrattrs", &der),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        (&Method::POST, "simplereenroll") => {
            let caller = match caller {
                Ok(c) => c,
                Err(e) => {
                    return text(
                        StatusCode::UNAUTHORIZED,
                        format!("simplereenroll needs the current client certificate: {e}"),
                    );
                }
            };
            let csr = match crate::est::decode_body(body) {
                Ok(der) => der,
                Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
            };
            // The same CSR again (a retry) is the same request.
            let request_id = format!(
                "est-{}",
                &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&csr))[..32]
            );
            let principal = caller.identity.principal;
            let presented = caller.serial.clone();
            match renew_core(
                &state,
                &caller,
                principal,
                presented,
                request_id,
                NewKey::Rekey(csr),
            )
            .await
            {
                Answer::Issued(renewed) => pkcs7(&[&renewed.record.der]),
                Answer::Refused {
                    status,
                    reason,
                    retry_after,
                    ..
                } => {
                    let mut r = text(status, reason);
                    if let Some(secs) = retry_after {
                        r.headers_mut()
                            .insert(http::header::RETRY_AFTER, secs.into());
                    }
                    r
                }
            }
        }
        (&Method::POST, "simpleenroll") => simpleenroll(state, factory, parts, body).await,
        (_, "cacerts" | "csrattrs" | "simpleenroll" | "simplereenroll") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} is not allowed here", parts.method),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            format!(
                "no EST operation {operation:?} (cacerts, simpleenroll, simplereenroll, csrattrs)"
            ),
        ),
    }
}

/// `simpleenroll` with a one-time enrollment token as HTTP Basic
/// credentials (the device id, and the token), or else with a factory
/// certificate.
async fn simpleenroll(
    state: Arc<State>,
    factory: Option<Factory>,
    parts: &http::request::Parts,
    body: &[u8],
) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    let credentials = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    if credentials.is_none()
        && let Some(factory) = factory
    {
        return factory_enroll(state, factory, body).await;
    }
    let Some((user, token)) = credentials else {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            crate::est::EstError::NoToken.to_string(),
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"twofold-est\""),
        );
        return r;
    };
    let id = match twofold_protocol::DeviceId::parse(&user) {
        Ok(id) => id,
        Err(e) => {
            return text(
                StatusCode::UNAUTHORIZED,
                format!("user {user:?} is not a device id: {e}"),
            );
        }
    };
    let csr = match crate::est::decode_body(body) {
        Ok(der) => der,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let days = u32::try_from(state.config.renew.lifetime.whole_days().max(1)).unwrap_or(1);
    let core = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut pki = core
            .pki
            .lock()
            .map_err(|_| "the registry lock is poisoned".to_owned())?;
        pki.enroll_with_token(&id, &token, &csr, days, OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())
            .map(|e| (e, id))
    })
    .await;
    match outcome {
        Ok(Ok((enrolled, id))) => {
            tracing::info!(device = %id, serial = %enrolled.record.serial, "enrolled over EST");
            pkcs7(&[&enrolled.record.der])
        }
        Ok(Err(e)) => {
            tracing::info!(user, "EST enrollment refused: {e}");
            let status = if e.contains("token") {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::BAD_REQUEST
            };
            text(status, e)
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `simpleenroll` with a factory certificate: the device its CN names,
/// enrolled once.
async fn factory_enroll(state: Arc<State>, factory: Factory, body: &[u8]) -> Response<Full<Bytes>> {
    let csr = match crate::est::decode_body(body) {
        Ok(der) => der,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let days = u32::try_from(state.config.renew.lifetime.whole_days().max(1)).unwrap_or(1);
    let core = state.clone();
    let cn = factory.cn.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let Ok(mut pki) = core.pki.lock() else {
            let poisoned = "the registry lock is poisoned".to_owned();
            return Err((StatusCode::INTERNAL_SERVER_ERROR, poisoned));
        };
        pki.enroll_with_factory(&cn, &csr, days).map_err(|e| {
            let status = match e {
                crate::est::EstError::AlreadyEnrolled(_) => StatusCode::CONFLICT,
                crate::est::EstError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            (status, e.to_string())
        })
    })
    .await;
    match outcome {
        Ok(Ok(enrolled)) => {
            tracing::info!(
                device = %factory.cn,
                factory_serial = %factory.serial,
                serial = %enrolled.record.serial,
                "enrolled over EST with a factory certificate"
            );
            pkcs7(&[&enrolled.record.der])
        }
        Ok(Err((status, why))) => {
            tracing::info!(
                device = %factory.cn,
                factory_serial = %factory.serial,
                "EST factory enrollment refused: {why}"
            );
            text(status, why)
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Why `caller`'s certificate may not be used here, if it is revoked
/// for anything but being superseded.
async fn revoked(state: &Arc<State>, caller: &Caller) -> Option<String> {
    let core = state.clone();
    let serial = caller.serial.clone();
    let record = tokio::task::spawn_blocking(move || {
        let pki = core.pki.lock().ok()?;
        let filter = crate::registry::Filter {
            serial: Some(serial),
            ..Default::default()
        };
        crate::registry::Store::find(pki.store(), &filter)
            .ok()?
            .pop()
    })
    .await
    .ok()??;
    let revocation = record.revocation?;
    (revocation.reason != crate::registry::RevocationReason::Superseded).then(|| {
        format!(
            "{}'s certificate {} is revoked ({}): it may not use the CA service",
            caller.identity,
            record.serial,
            revocation.reason.as_str()
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerCertBody {
    /// The gateway's current server certificate, PEM.
    cert: String,
    /// A PKCS#10 CSR (PEM) for its new key.
    csr: String,
}

/// `POST /v1/server-cert`: a gateway (a registration authority) renews
/// its own server certificate, for a new key, with the names it has.
async fn server_cert(state: Arc<State>, caller: Caller, body: &[u8]) -> Response<Full<Bytes>> {
    if !state
        .config
        .registration_authorities
        .contains(&caller.identity)
    {
        return refused(
            StatusCode::FORBIDDEN,
            "not-authorized",
            format!(
                "{} is not a registration authority of this CA service: only gateways renew \
                 server certificates",
                caller.identity
            ),
        );
    }
    let body: ServerCertBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return refused(StatusCode::BAD_REQUEST, "bad-request", e),
    };
    let presented = match pem::parse(&body.cert) {
        Ok(p) if p.tag() == "CERTIFICATE" => p.into_contents(),
        _ => {
            return refused(
                StatusCode::BAD_REQUEST,
                "bad-request",
                "cert is not a PEM certificate",
            );
        }
    };
    let core = state.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut pki = core
            .pki
            .lock()
            .map_err(|_| "the registry lock is poisoned")?;
        Ok::<_, &str>(pki.renew_gateway(
            &core.server_ca,
            &presented,
            body.csr.as_bytes(),
            core.config.server_lifetime,
            OffsetDateTime::now_utc(),
        ))
    })
    .await;
    match outcome {
        Ok(Ok(Ok(renewed))) => {
            tracing::info!(
                gateway = %caller.identity,
                name = %renewed.record.name,
                serial = %renewed.record.serial,
                "renewed a gateway server certificate"
            );
            json(
                StatusCode::OK,
                serde_json::json!({
                    "status": "issued",
                    "serial": renewed.record.serial.to_string(),
                    "not_after": renewed.record.not_after.unix_timestamp(),
                    "chain": renewed.chain_pem,
                }),
            )
        }
        Ok(Ok(Err(RenewError::Refused(r)))) => refused(status_of(&r), r.code(), r),
        Ok(Ok(Err(e))) => refused(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
        Ok(Err(e)) => refused(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
        Err(e) => refused(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
    }
}

fn status_of(r: &Refusal) -> StatusCode {
    match r {
        Refusal::BadRequestId | Refusal::InvalidCsr(_) | Refusal::CsrForAnother { .. } => {
            StatusCode::BAD_REQUEST
        }
        Refusal::UnknownCertificate | Refusal::Revoked { .. } | Refusal::Expired { .. } => {
            StatusCode::FORBIDDEN
        }
        Refusal::NotLatest | Refusal::NotDue { .. } => StatusCode::CONFLICT,
    }
}

async fn commit(state: Arc<State>, caller: Caller, body: &[u8]) -> Response<Full<Bytes>> {
    let (_, principal, serial) =
        match parse::<CommitBody>(&state, &caller, body, |b| (&b.identity, &b.serial)) {
            Ok(parsed) => parsed,
            Err(r) => return *r,
        };
    let core = state.clone();
    let committed = serial.to_string();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut pki = core
            .pki
            .lock()
            .map_err(|_| "the registry lock is poisoned")?;
        Ok::<_, &str>(pki.commit_renewal(&core.ca, &principal, &serial, OffsetDateTime::now_utc()))
    })
    .await;
    match outcome {
        Ok(Ok(Ok(changed))) => json(
            StatusCode::OK,
            serde_json::json!({"status": "committed", "serial": committed, "changed": changed}),
        ),
        Ok(Ok(Err(RenewError::Refused(r)))) => refused(status_of(&r), r.code(), &r),
        Ok(Ok(Err(RenewError::Failed(e)))) => refused(StatusCode::SERVICE_UNAVAILABLE, "failed", e),
        Ok(Err(e)) => refused(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
        Err(e) => refused(StatusCode::INTERNAL_SERVER_ERROR, "failed", e),
    }
}

/// Supersedes uncommitted renewals once their grace period is over.
async fn settle_periodically(state: Arc<State>) {
    let grace = state.config.grace;
    let every: Duration = (grace / 4_i32).clamp(Duration::seconds(1), Duration::minutes(1));
    let mut tick = tokio::time::interval(every.unsigned_abs());
    loop {
        tick.tick().await;
        let core = state.clone();
        let settled = tokio::task::spawn_blocking(move || {
            core.pki
                .lock()
                .map_err(|_| "poisoned".to_owned())?
                .settle_renewals(&core.ca, grace, OffsetDateTime::now_utc())
                .map_err(|e| e.to_string())
        })
        .await;
        match settled {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(count = n, "grace period over: predecessors superseded"),
            Ok(Err(e)) => tracing::warn!(error = %e, "settling renewals failed"),
            Err(e) => tracing::warn!(error = %e, "settling renewals failed"),
        }
    }
}

/// Keeps the CRL this service hands out (`GET /v1/crl`) up with the
/// registry, which other provisioning nodes may share and revoke in.
async fn catch_up_crl_periodically(state: Arc<State>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    // The CRL file last found to list what the registry holds, though
    // its digest differs from the one recorded (see `catch_up_crl`).
    let settled = Arc::new(Mutex::new(None));
    // A registry that is away is said once, not every second.
    let mut failing = false;
    loop {
        tick.tick().await;
        let core = state.clone();
        let settled = settled.clone();
        let caught = tokio::task::spawn_blocking(move || {
            let mut settled = settled.lock().map_err(|_| "poisoned".to_owned())?;
            core.pki
                .lock()
                .map_err(|_| "poisoned".to_owned())?
                .catch_up_crl(&core.ca, &mut settled)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        match caught {
            Ok(n) => {
                if failing {
                    tracing::info!("the registry answers again");
                }
                if let Some(number) = n {
                    tracing::info!(number, "CRL signed again: the shared registry moved on");
                }
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot check the registry for new revocations");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_in_flight_and_a_rate_limit_per_identity() {
        let mut a = Admission::default();
        let window = std::time::Duration::from_secs(60);
        let t0 = Instant::now();
        a.admit("a", 2, window, t0).unwrap();
        assert_eq!(a.admit("a", 2, window, t0), Err(Gate::Busy));
        // Another identity is not held up.
        a.admit("b", 2, window, t0).unwrap();
        a.done("a");
        a.admit("a", 2, window, t0).unwrap();
        a.done("a");
        let later = t0 + std::time::Duration::from_secs(20);
        assert_eq!(
            a.admit("a", 2, window, later),
            Err(Gate::RateLimited { retry_after: 40 })
        );
        let after = t0 + window;
        a.admit("a", 2, window, after).unwrap();
    }
}
