//! The gateway's side of renewal: it takes a device's renew request or
//! commit, made on `$twofold/v1/cert/…` inside the device's mTLS session,
//! to the CA service (`provisioning serve`) as a registration authority.
//!
//! The gateway holds no CA key. It tells the CA service who the device is
//! and which certificate it presented, both from the device's TLS
//! session; the CA service checks that this gateway's service identity is
//! one it accepts as a registration authority. One HTTPS request per
//! renewal, on a fresh connection: renewals are rare, and a pool would be
//! state to get wrong for no measurable gain.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use twofold_protocol::message::RenewRefusal;

use crate::session::{CertReply, CertRequest};

/// How long one call to the CA service may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read from the CA service (a chain and some JSON).
const MAX_ANSWER: usize = 64 * 1024;
/// How long a device waits after the CA service could not be reached.
const RETRY_UNAVAILABLE: u32 = 60;

/// Where the CA service is and how the gateway proves who it is.
pub struct CaClient {
    /// `host:port`, as configured.
    addr: String,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl CaClient {
    /// A client for the CA service at `addr` (`host:port`), whose
    /// certificate must chain to `ca_pem` and name `host`, calling with
    /// the service identity in `cert_pem`/`key_pem`.
    pub fn new(
        addr: &str,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<CaClient, String> {
        let host = addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| format!("{addr:?} is not host:port"))?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host:?} is not a host name or address: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in pem_blocks(ca_pem, "CERTIFICATE")? {
            roots
                .add(cert.into())
                .map_err(|e| format!("the CA certificate: {e}"))?;
        }
        let chain = pem_blocks(cert_pem, "CERTIFICATE")?
            .into_iter()
            .map(rustls_pki_types::CertificateDer::from)
            .collect::<Vec<_>>();
        if chain.is_empty() {
            return Err("the gateway's service certificate file holds no certificate".into());
        }
        let key = pem::parse(key_pem).map_err(|e| format!("the service key: {e}"))?;
        let key = rustls_pki_types::PrivateKeyDer::try_from(key.into_contents())
            .map_err(|e| format!("the service key: {e}"))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("the service certificate and key: {e}"))?;
        Ok(CaClient {
            addr: addr.to_owned(),
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Takes `request` of the device `identity` (its URI), connected with
    /// the certificate `serial` (hex), to the CA service; never fails: a
    /// CA that cannot be reached is an answer too.
    pub async fn call(&self, identity: &str, serial: &str, request: CertRequest) -> CertReply {
        let request_id = request.request_id().to_owned();
        let (path, body) = match &request {
            CertRequest::Renew { request_id, csr } => {
                let mut body = serde_json::json!({
                    "request_id": request_id, "identity": identity, "serial": serial,
                });
                if let Some(der) = csr {
                    body["csr"] =
                        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.clone())).into();
                }
                ("/v1/renew", body)
            }
            CertRequest::Commit => (
                "/v1/commit",
                serde_json::json!({"identity": identity, "serial": serial}),
            ),
        };
        let unavailable = |why: String| CertReply::Refused {
            request_id: request_id.clone(),
            code: RenewRefusal::Unavailable,
            retry_after: RETRY_UNAVAILABLE,
            reason: why,
        };
        let answer = match tokio::time::timeout(CALL_TIMEOUT, self.post(path, &body)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::warn!(ca = %self.addr, error = %e, "the CA service failed");
                return unavailable(format!("the CA service could not be reached: {e}"));
            }
            Err(_) => {
                tracing::warn!(ca = %self.addr, "the CA service did not answer in time");
                return unavailable("the CA service did not answer in time".into());
            }
        };
        reply_of(&request_id, &answer)
    }

    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let request = http::Request::post(path)
            .header(http::header::HOST, self.addr.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let (_, _, bytes) = self.exchange(request, MAX_ANSWER).await?;
        serde_json::from_slice(&bytes).map_err(|e| format!("the answer is not JSON: {e}"))
    }

    /// The device CA's CRL (`GET /v1/crl`): `None` while it still has
    /// `etag`, else the new ETag and the PEM.
    pub async fn crl(
        &self,
        etag: Option<&str>,
    ) -> Result<Option<(Option<String>, Vec<u8>)>, String> {
        let mut request =
            http::Request::get("/v1/crl").header(http::header::HOST, self.addr.clone());
        if let Some(tag) = etag {
            request = request.header(http::header::IF_NONE_MATCH, tag);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let call = self.exchange(request, crate::crl_feed::MAX_CRL);
        let (status, headers, body) = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| "no answer in time".to_owned())??;
        match status {
            http::StatusCode::NOT_MODIFIED => Ok(None),
            http::StatusCode::OK => {
                let tag = headers
                    .get(http::header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                Ok(Some((tag, body.to_vec())))
            }
            other => Err(format!(
                "GET /v1/crl: {other}: {}",
                String::from_utf8_lossy(&body)
            )),
        }
    }

    /// One request on a fresh connection; the answer's body up to `max`.
    async fn exchange(
        &self,
        request: http::Request<Full<Bytes>>,
        max: usize,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("{}: {e}", self.addr))?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", self.addr))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let bytes = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| format!("the answer: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }
}

fn pem_blocks(text: &[u8], tag: &str) -> Result<Vec<Vec<u8>>, String> {
    Ok(pem::parse_many(text)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|p| p.tag() == tag)
        .map(pem::Pem::into_contents)
        .collect())
}

/// The device's answer from the CA service's JSON.
fn reply_of(request_id: &str, answer: &serde_json::Value) -> CertReply {
    let text = |key: &str| answer[key].as_str().unwrap_or_default().to_owned();
    match answer["status"].as_str() {
        Some("issued") => match pem_blocks(text("chain").as_bytes(), "CERTIFICATE") {
            Ok(certs) if !certs.is_empty() => CertReply::Issued {
                request_id: request_id.to_owned(),
                certs: certs.concat(),
            },
            _ => CertReply::Refused {
                request_id: request_id.to_owned(),
                code: RenewRefusal::Unavailable,
                retry_after: RETRY_UNAVAILABLE,
                reason: "the CA service sent no certificate".into(),
            },
        },
        Some("committed") => CertReply::Committed {
            serial: text("serial")
                .parse::<twofold_trust::Serial>()
                .map(|s| s.as_bytes().to_vec())
                .unwrap_or_default(),
        },
        _ => {
            let code = text("code");
            let (code, retry_after) = match code.as_str() {
                "busy" => (RenewRefusal::Busy, 5),
                "rate-limited" => (
                    RenewRefusal::RateLimited,
                    answer["retry_after"]
                        .as_u64()
                        .map_or(60, |s| u32::try_from(s).unwrap_or(u32::MAX)),
                ),
                "revoked" => (RenewRefusal::Revoked, 0),
                // A certificate the registry does not know as this
                // device's newest: the device must use its newest, or be
                // re-enrolled.
                "not-latest" | "unknown-certificate" => (RenewRefusal::NotLatest, 0),
                "invalid-csr" => (RenewRefusal::InvalidCsr, 0),
                "not-due" => (RenewRefusal::NotDue, 0),
                "expired" => (RenewRefusal::Expired, 0),
                "bad-request-id" | "bad-request" => (RenewRefusal::BadRequest, 0),
                // "not-authorized" (this gateway is not a registration
                // authority: the operator's to fix), "failed" and anything
                // unknown: the CA is not available to this device for now.
                _ => (RenewRefusal::Unavailable, RETRY_UNAVAILABLE),
            };
            let mut reason = text("reason");
            if reason.is_empty() {
                reason = "the CA service refused without a reason".into();
            }
            CertReply::Refused {
                request_id: request_id.to_owned(),
                code,
                retry_after,
                reason,
            }
        }
    }
}

/// The gateway's own server certificate, renewed from the CA service
/// before it expires: at two thirds of its life (less the same jitter as
/// devices), for a new key, with the names it has. The new key and
/// certificate replace the files in place; the file watcher that reloads
/// them for a changed CRL swaps them in, and a key that does not match
/// the certificate (between the two renames) is refused and the old pair
/// kept, as for any bad file.
pub async fn keep_server_cert(
    ca: Arc<CaClient>,
    files: crate::tls::TlsFiles,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let wait = match server_cert_due(&files.cert) {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!(cert = %files.cert.display(), error = %e, "cannot read the server certificate to schedule its renewal; trying again in an hour");
                Duration::from_secs(3600)
            }
        };
        if !wait.is_zero() {
            tracing::info!(
                in_secs = wait.as_secs(),
                "server certificate renewal scheduled"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        match renew_server_cert(&ca, &files).await {
            Ok((serial, not_after)) => {
                tracing::info!(%serial, not_after, "server certificate renewed");
            }
            Err(e) => {
                tracing::warn!(error = %e, "server certificate renewal failed; trying again in 5 minutes");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(300)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

/// How long until the certificate at `path` is due for renewal (zero when
/// it is), at most a day: the file may be replaced by hand meanwhile.
fn server_cert_due(path: &std::path::Path) -> Result<Duration, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let der = pem_blocks(&text, "CERTIFICATE")?
        .into_iter()
        .next()
        .ok_or("no certificate in it")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default();
    let due = twofold_trust::renewal::due_at(
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
        name,
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let secs = u64::try_from(due - now).unwrap_or(0).min(86_400);
    Ok(Duration::from_secs(secs))
}

/// One renewal: a new key and CSR, the CA service's certificate for it,
/// and the files replaced (key first). Returns the new serial and expiry.
async fn renew_server_cert(
    ca: &CaClient,
    files: &crate::tls::TlsFiles,
) -> Result<(String, i64), String> {
    let text = std::fs::read(&files.cert).map_err(|e| format!("{}: {e}", files.cert.display()))?;
    let current = pem_blocks(&text, "CERTIFICATE")?
        .into_iter()
        .next()
        .ok_or("no certificate in the server certificate file")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("cannot make a key: {e}"))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("cannot make a CSR: {e}"))?;
    let body = serde_json::json!({
        "cert": pem::encode(&pem::Pem::new("CERTIFICATE", current)),
        "csr": csr,
    });
    let answer = tokio::time::timeout(CALL_TIMEOUT, ca.post("/v1/server-cert", &body))
        .await
        .map_err(|_| "the CA service did not answer in time".to_owned())??;
    if answer["status"] != "issued" {
        return Err(format!(
            "the CA service refused ({}): {}",
            answer["code"].as_str().unwrap_or("?"),
            answer["reason"].as_str().unwrap_or("no reason given")
        ));
    }
    let chain = answer["chain"].as_str().unwrap_or_default();
    if pem_blocks(chain.as_bytes(), "CERTIFICATE")?.is_empty() {
        return Err("the CA service sent no certificate".into());
    }
    twofold_trust::files::replace(&files.key, key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    twofold_trust::files::replace(&files.cert, chain.as_bytes(), 0o644)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    Ok((
        answer["serial"].as_str().unwrap_or_default().to_owned(),
        answer["not_after"].as_i64().unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_services_refusals_keep_their_meaning() {
        let answer = serde_json::json!({
            "status": "refused", "code": "rate-limited", "reason": "too many", "retry_after": 42,
        });
        assert_eq!(
            reply_of("r1", &answer),
            CertReply::Refused {
                request_id: "r1".into(),
                code: RenewRefusal::RateLimited,
                retry_after: 42,
                reason: "too many".into(),
            }
        );
        for (code, expected) in [
            ("revoked", RenewRefusal::Revoked),
            ("not-latest", RenewRefusal::NotLatest),
            ("unknown-certificate", RenewRefusal::NotLatest),
            ("invalid-csr", RenewRefusal::InvalidCsr),
            ("not-due", RenewRefusal::NotDue),
            ("expired", RenewRefusal::Expired),
            ("bad-request-id", RenewRefusal::BadRequest),
            ("not-authorized", RenewRefusal::Unavailable),
            ("something-new", RenewRefusal::Unavailable),
        ] {
            let answer = serde_json::json!({"status": "refused", "code": code, "reason": "r"});
            let CertReply::Refused { code: got, .. } = reply_of("r", &answer) else {
                panic!("{code} was not a refusal");
            };
            assert_eq!(got, expected, "{code}");
        }
        // An "issued" without a certificate is not taken for one.
        let empty = serde_json::json!({"status": "issued", "chain": ""});
        assert!(matches!(
            reply_of("r", &empty),
            CertReply::Refused {
                code: RenewRefusal::Unavailable,
                ..
            }
        ));
    }
}
