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
    ca: CaIssuer,
    config: Config,
    admission: Mutex<Admission>,
}

/// The authenticated caller: its identity and certificate serial.
#[derive(Clone, Debug)]
struct Caller {
    identity: Identity,
    serial: Serial,
}

/// Runs the service until `shutdown` resolves.
pub async fn run(
    pki: Pki,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let ca = pki.device_issuer()?;
    let tls = tls_config(&config, &ca.cert_der)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let state = Arc::new(State {
        pki: Mutex::new(pki),
        ca,
        config,
        admission: Mutex::new(Admission::default()),
    });
    tracing::info!(listen = %listener.local_addr()?, "CA service ready");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(settle_periodically(state.clone()));
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
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| "no client certificate".to_owned())
                .and_then(|leaf| caller_of(leaf.as_ref()));
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let caller = caller.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(state, caller, req).await) }
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
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
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
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => return refused(StatusCode::FORBIDDEN, "no-identity", e),
    };
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
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/v1/renew") => renew(state, caller, &body).await,
        (&Method::POST, "/v1/commit") => commit(state, caller, &body).await,
        (&Method::GET, "/v1/crl") => match state.pki.lock().map(|p| p.crl_pem()) {
            Ok(Ok(pem)) => {
                let mut r = Response::new(Full::new(Bytes::from(pem)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-pem-file"),
                );
                r
            }
            _ => refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed",
                "cannot read the CRL",
            ),
        },
        (_, "/v1/renew" | "/v1/commit" | "/v1/crl") => refused(
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

/// Whose certificate a request is about: the caller's own, or, for a
/// registration authority, the device named in the body.
fn subject_of(
    state: &State,
    caller: &Caller,
    identity: Option<&str>,
    serial: Option<&str>,
) -> Result<(Principal, Serial), Box<Response<Full<Bytes>>>> {
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

async fn renew(state: Arc<State>, caller: Caller, body: &[u8]) -> Response<Full<Bytes>> {
    let body: RenewBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return refused(StatusCode::BAD_REQUEST, "bad-request", e),
    };
    let (principal, presented) = match subject_of(
        &state,
        &caller,
        body.identity.as_deref(),
        body.serial.as_deref(),
    ) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let who = format!("{} {}", principal.kind(), principal.name());
    let gate = match state.admission.lock() {
        Ok(mut a) => Ok(a.admit(
            &who,
            state.config.rate_limit,
            state.config.rate_window,
            Instant::now(),
        )),
        Err(_) => Err(()),
    };
    match gate {
        Ok(Ok(())) => {}
        Ok(Err(Gate::Busy)) => {
            return refused(
                StatusCode::CONFLICT,
                "busy",
                "another renewal of this identity is in progress; retry when it is answered",
            );
        }
        Ok(Err(Gate::RateLimited { retry_after })) => {
            let mut r = json(
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({
                    "status": "refused", "code": "rate-limited",
                    "reason": format!("too many renewal requests; retry in {retry_after} s"),
                    "retry_after": retry_after,
                }),
            );
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, retry_after.into());
            return r;
        }
        Err(_) => return refused(StatusCode::INTERNAL_SERVER_ERROR, "failed", "poisoned"),
    }
    let request = RenewRequest {
        principal,
        presented,
        request_id: body.request_id,
        key: match body.csr {
            Some(csr) => NewKey::Rekey(csr.into_bytes()),
            None => NewKey::Same,
        },
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
            json(
                StatusCode::OK,
                serde_json::json!({
                    "status": "issued",
                    "serial": renewed.record.serial.to_string(),
                    "not_before": renewed.record.not_before.unix_timestamp(),
                    "not_after": renewed.record.not_after.unix_timestamp(),
                    "chain": renewed.chain_pem,
                    "repeated": renewed.repeated,
                }),
            )
        }
        Ok(Ok(Err(RenewError::Refused(r)))) => {
            tracing::info!(identity = %who, by = %caller.identity, code = r.code(), "renewal refused: {r}");
            refused(status_of(&r), r.code(), &r)
        }
        Ok(Ok(Err(RenewError::Failed(e)))) => {
            tracing::error!(identity = %who, error = %e, "renewal failed");
            refused(StatusCode::SERVICE_UNAVAILABLE, "failed", e)
        }
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
    let body: CommitBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return refused(StatusCode::BAD_REQUEST, "bad-request", e),
    };
    let (principal, serial) = match subject_of(
        &state,
        &caller,
        body.identity.as_deref(),
        body.serial.as_deref(),
    ) {
        Ok(s) => s,
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
