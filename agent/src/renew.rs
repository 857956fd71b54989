//! Renewal of the device's own certificate, over its session to the
//! gateway. The Linux agent always rekeys: a new P-256 key made here, and
//! a CSR for it.
//!
//! What is on disk says where a renewal stands, so that killing the agent
//! at any moment loses nothing (the key and certificate in force are
//! replaced only by renames, and only once the CA has committed the new
//! pair):
//!
//! | files                          | state                                      |
//! |--------------------------------|--------------------------------------------|
//! | `key`, `cert`                  | in force                                   |
//! | `key.next`                     | a request is out (its id in `cert.renewal`)|
//! | `key.next`, `cert.next`        | issued: connect with it, then commit       |
//! | `cert.next` (no `key.next`)    | a commit was being applied: finish it      |
//!
//! A commit renames `key.next` over `key`, then `cert.next` over `cert`;
//! a rollback (the gateway refused the new pair) removes `cert.next`, then
//! `key.next`. Each step leaves one of the states above.
//!
//! A key in a PKCS#11 token is rekeyed inside the token: the new pair is
//! made there under the same label with a new id (recorded in
//! `cert.renewal` before it is made), and the key in use is always the
//! one the certificate names. So `cert.next` alone says a pair is issued;
//! a commit is the one rename of `cert.next` over `cert`, after which the
//! old key is destroyed; a rollback removes `cert.next`, then destroys the
//! new key. A kill between a commit's rename and the destruction leaves
//! the old key in the token, unused.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use twofold_protocol::message::{self, CertAnswer, RenewRefusal, RenewRequest};
use twofold_protocol::{DeviceId, Identity, TrustDomain};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{IdentityPaths, KeyStore};
use crate::files;

/// The renewal's record beside the certificate, for restarts and `doctor`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The request out, if one is: the same id is sent again after a
    /// dropped connection or a restart, and gets the same certificate.
    pub request_id: Option<String>,
    /// Unix seconds at which renewal is due, from the gateway's status.
    pub due: Option<i64>,
    /// Unix seconds of the last request sent.
    pub last_attempt: Option<i64>,
    /// The last answer, in words.
    pub last_answer: Option<String>,
    /// With a key in a token: the id (hex) of the request's new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<String>,
}

/// What the session does after an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Reconnect: with the new pair (issued) or the committed one.
    Reconnect,
    /// Ask again after this many seconds.
    RetryIn(u64),
    /// Do not ask again in this session.
    Stop,
}

/// The paths of one renewal, and its state.
pub struct Renewal {
    committed: IdentityPaths,
    id: DeviceId,
    trust_domain: TrustDomain,
    state: Mutex<State>,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

impl Renewal {
    /// The record's path for the certificate at `cert`.
    pub fn state_path(cert: &Path) -> PathBuf {
        files::beside(cert, ".renewal")
    }

    /// Reads the renewal record of the identity at `paths` (none: empty).
    pub fn read_state(paths: &IdentityPaths) -> State {
        std::fs::read(Self::state_path(&paths.cert))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Finishes what a killed agent left half done, and says which
    /// certificate and key to connect with: the issued pair awaiting
    /// commit if there is one, else the pair in force.
    pub fn recover(paths: &IdentityPaths) -> Result<IdentityPaths, String> {
        let (key_next, cert_next) = next_of(paths);
        let KeyStore::File(key_next) = key_next else {
            // In a token the key follows the certificate.
            return Ok(if cert_next.exists() {
                IdentityPaths {
                    cert: cert_next,
                    ..paths.clone()
                }
            } else {
                paths.clone()
            });
        };
        if cert_next.exists() && !key_next.exists() {
            // Killed between the two renames of a commit: the key is the
            // new one already.
            files::rename(&cert_next, &paths.cert).map_err(io(&paths.cert))?;
            tracing::info!(cert = %paths.cert.display(), "finished committing the renewed certificate");
        }
        Ok(if key_next.exists() && cert_next.exists() {
            IdentityPaths {
                cert: cert_next,
                key: KeyStore::File(key_next),
                ..paths.clone()
            }
        } else {
            paths.clone()
        })
    }

    /// The renewal of device `id`'s certificate in force at `paths`.
    pub fn new(paths: &IdentityPaths, id: DeviceId, trust_domain: TrustDomain) -> Renewal {
        Renewal {
            committed: paths.clone(),
            id,
            trust_domain,
            state: Mutex::new(Self::read_state(paths)),
        }
    }

    /// Whether an issued pair awaits commit (the session connects with it).
    pub fn staged(&self) -> bool {
        let (key, cert) = next_of(&self.committed);
        match key {
            KeyStore::File(key) => key.exists() && cert.exists(),
            KeyStore::Token { .. } => cert.exists(),
        }
    }

    /// The record, for logs and `doctor`.
    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        let path = Self::state_path(&self.committed.cert);
        let json = serde_json::to_vec_pretty(&*state).unwrap_or_default();
        if let Err(e) = files::replace(&path, &json, 0o644) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the renewal state");
        }
    }

    /// Renewal is due at `due` (Unix seconds), as the gateway said.
    pub fn set_due(&self, due: i64) {
        if self.state().due != Some(due) {
            self.update(|s| s.due = Some(due));
        }
    }

    /// The renew request to publish: the request id and key of the one
    /// out, if any, else new ones (recorded before the request leaves).
    pub fn request(&self) -> Result<Vec<u8>, String> {
        // A new request would replace the staged pair's key.
        if self.staged() {
            return Err(
                "a renewed certificate awaits its commit; no new request until then".into(),
            );
        }
        let (request_id, key) = match &self.committed.key {
            KeyStore::File(_) => self.file_key()?,
            KeyStore::Token { spec, label } => self.token_key(spec, label)?,
        };
        let identity = Identity::device(self.trust_domain, self.id);
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.id.as_str());
        params.subject_alt_names = vec![rcgen::SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|e| format!("{e}"))?,
        )];
        let csr = match &key {
            RequestKey::File(key) => params.serialize_request(key).map_err(|e| e.to_string()),
            RequestKey::Token(key) => params
                .serialize_request(key)
                .map_err(|e| key.last_error().unwrap_or_else(|| e.to_string())),
        }?;
        let mut buf = vec![0u8; csr.der().len() + request_id.len() + 16];
        let request = RenewRequest {
            request_id: &request_id,
            csr: Some(csr.der()),
        };
        let payload = message::encode(&request, &mut buf)
            .map_err(|e| e.to_string())?
            .to_vec();
        self.update(|s| s.last_attempt = Some(now()));
        tracing::info!(request_id, "asking the gateway to renew the certificate");
        Ok(payload)
    }

    /// A new request's id, or the one out, new ones recorded before
    /// the request leaves.
    fn request_id(&self, out: bool) -> (String, bool) {
        match self.state().request_id {
            Some(id) if out => (id, false),
            _ => {
                let mut raw = [0u8; 8];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
                (format!("{}-{}", now(), hex_of(&raw)), true)
            }
        }
    }

    /// The request id and key of the one out, if any, else new ones: the
    /// id first, then the key, so a request never leaves without both.
    fn file_key(&self) -> Result<(String, RequestKey), String> {
        let (KeyStore::File(key_path), _) = next_of(&self.committed) else {
            unreachable!("a key file's next key is a file");
        };
        let (request_id, new) = self.request_id(key_path.exists());
        if new {
            self.update(|s| s.request_id = Some(request_id.clone()));
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| e.to_string())?;
            files::replace(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io(&key_path))?;
        }
        let pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| e.to_string())?;
        Ok((request_id, RequestKey::File(key)))
    }

    /// [`Renewal::file_key`] in a token: the new key's id is recorded
    /// with the request's, then the key is made in the token.
    fn token_key(
        &self,
        spec: &twofold_token::TokenSpec,
        label: &str,
    ) -> Result<(String, RequestKey), String> {
        let token = twofold_token::Token::open(spec).map_err(|e| e.to_string())?;
        let in_force = self.point_in_force();
        // The recorded new key, unless it is the one in force (a commit
        // cut off before its record was cleared): that is never renewed
        // into, nor destroyed.
        let existing = match self.next_key_id() {
            Some(id) => token
                .keys(label)
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|k| k.id == id && Some(&k.public) != in_force.as_ref()),
            None => None,
        };
        let (request_id, new) = self.request_id(existing.is_some());
        let info = match existing {
            Some(info) if !new => info,
            stale => {
                // A request that cannot go on as it was: its key goes
                // before a new one is made, or the token fills up.
                if let Some(old) = stale {
                    token.destroy(label, &old.id).map_err(|e| e.to_string())?;
                }
                let id = twofold_token::new_key_id();
                self.update(|s| {
                    s.request_id = Some(request_id.clone());
                    s.next_key = Some(hex_of(&id));
                });
                let info = token.generate_p256(label, &id).map_err(|e| e.to_string())?;
                tracing::info!(
                    token = spec.token,
                    label,
                    id = hex_of(&id),
                    "made the new key in the token"
                );
                info
            }
        };
        Ok((request_id, RequestKey::Token(token.key(info))))
    }

    /// The id of the request's new key in the token, as recorded.
    fn next_key_id(&self) -> Option<Vec<u8>> {
        self.state().next_key.and_then(|id| hex::decode(id).ok())
    }

    /// The public point of the certificate in force.
    fn point_in_force(&self) -> Option<Vec<u8>> {
        crate::identity::load_certs(&self.committed.cert)
            .ok()
            .and_then(|chain| twofold_token::public_point_of_cert(&chain[0]))
    }

    /// Takes the gateway's answer; says what the session does next.
    pub fn answer(&self, payload: &[u8]) -> Next {
        let answer = match message::decode::<CertAnswer>(payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "not a certificate answer; ignored");
                return Next::Stop;
            }
        };
        match answer {
            CertAnswer::Issued { request_id, certs } => {
                if self.state().request_id.as_deref() != Some(request_id) {
                    tracing::warn!(request_id, "a certificate for a request not ours; ignored");
                    return Next::Stop;
                }
                match self.stage(certs) {
                    Ok(serial) => {
                        tracing::info!(
                            serial,
                            "renewed certificate received; reconnecting with it"
                        );
                        self.update(|s| s.last_answer = Some(format!("issued {serial}")));
                        Next::Reconnect
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the renewed certificate is unusable; asking again later");
                        self.update(|s| s.last_answer = Some(format!("unusable certificate: {e}")));
                        Next::RetryIn(300)
                    }
                }
            }
            CertAnswer::Committed { serial } => {
                if !self.staged() {
                    return Next::Stop;
                }
                match self.commit() {
                    Ok(()) => {
                        let serial = hex_of(serial);
                        tracing::info!(
                            serial,
                            "renewed certificate committed; it is the one in force"
                        );
                        self.update(|s| {
                            s.request_id = None;
                            s.last_answer = Some(format!("committed {serial}"));
                        });
                        Next::Reconnect
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot put the renewed certificate in force");
                        Next::Stop
                    }
                }
            }
            CertAnswer::Refused {
                request_id,
                code,
                retry_after,
                reason,
            } => {
                // Only ours: a refusal of another request must not make
                // this one forget its id (and, in a token, lose its key).
                if self.state().request_id.as_deref() != Some(request_id) {
                    tracing::warn!(
                        request_id,
                        ?code,
                        "a refusal of a request not ours; ignored"
                    );
                    return Next::Stop;
                }
                self.update(|s| s.last_answer = Some(format!("refused ({code:?}): {reason}")));
                let next = match code {
                    RenewRefusal::Busy | RenewRefusal::RateLimited | RenewRefusal::Unavailable => {
                        Next::RetryIn(u64::from(retry_after.max(5)))
                    }
                    // The schedule comes with the next status.
                    RenewRefusal::NotDue => Next::Stop,
                    // A request that cannot succeed as it is: a new key and id.
                    RenewRefusal::InvalidCsr | RenewRefusal::BadRequest => {
                        self.update(|s| s.request_id = None);
                        Next::RetryIn(3600)
                    }
                    RenewRefusal::Revoked | RenewRefusal::NotLatest | RenewRefusal::Expired => {
                        Next::Stop
                    }
                };
                match next {
                    Next::Stop if code != RenewRefusal::NotDue => tracing::error!(
                        ?code,
                        reason,
                        "the CA refused to renew this device's certificate; it must be re-enrolled \
                         before the certificate expires"
                    ),
                    _ => tracing::warn!(?code, reason, retry_after, "renewal refused"),
                }
                next
            }
        }
    }

    /// Writes the issued chain beside the key it certifies, after checking
    /// that it does certify that key and this device.
    fn stage(&self, certs: &[u8]) -> Result<String, String> {
        let (key_path, cert_path) = next_of(&self.committed);
        let mut ders = Vec::new();
        let mut rest = certs;
        while !rest.is_empty() {
            let (after, cert) = X509Certificate::from_der(rest).map_err(|e| e.to_string())?;
            ders.push(&rest[..rest.len() - after.len()]);
            drop(cert);
            rest = after;
        }
        let leaf = ders.first().ok_or("no certificate in the answer")?;
        let (id, _) = crate::identity::device_of(leaf, &cert_path).map_err(|e| e.to_string())?;
        if id != self.id {
            return Err(format!("it is for {id}, not this device"));
        }
        let chain: Vec<CertificateDer<'static>> = ders
            .iter()
            .map(|d| CertificateDer::from(d.to_vec()))
            .collect();
        crate::identity::signing_key(&key_path, &cert_path, &chain).map_err(|e| e.to_string())?;
        // In a token the key must be the request's new one: a certificate
        // for the key in force would make the commit destroy that key.
        if let KeyStore::Token { .. } = &key_path {
            let point = twofold_token::public_point_of_cert(&chain[0]);
            if point.is_none() || point == self.point_in_force() {
                return Err("it certifies the key in force, not the request's new key".into());
            }
        }
        let pem: String = ders
            .iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.to_vec())))
            .collect();
        files::replace(&cert_path, pem.as_bytes(), 0o644).map_err(io(&cert_path))?;
        let (_, leaf) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
        Ok(twofold_trust::Serial::from_der_bytes(leaf.raw_serial()).to_string())
    }

    /// The new pair becomes the one in force: key first, then certificate.
    fn commit(&self) -> Result<(), String> {
        let (key_next, cert_next) = next_of(&self.committed);
        match (key_next, &self.committed.key) {
            (KeyStore::File(key_next), KeyStore::File(key)) => {
                files::rename(&key_next, key).map_err(io(key))?;
                files::rename(&cert_next, &self.committed.cert).map_err(io(&self.committed.cert))
            }
            (_, KeyStore::Token { spec, label }) => {
                // The old key, found by the old certificate, goes once the
                // new certificate is in force; never the new one.
                let old = self.point_in_force();
                let new = crate::identity::load_certs(&cert_next)
                    .ok()
                    .and_then(|chain| twofold_token::public_point_of_cert(&chain[0]));
                self.update(|s| s.next_key = None);
                files::rename(&cert_next, &self.committed.cert)
                    .map_err(io(&self.committed.cert))?;
                let Some(old) = old.filter(|old| Some(old) != new.as_ref()) else {
                    return Ok(());
                };
                let destroyed = twofold_token::Token::open(spec).and_then(|token| {
                    for key in token.keys(label)? {
                        if key.public == old {
                            token.destroy(label, &key.id)?;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = destroyed {
                    tracing::warn!(error = %e, "cannot destroy the replaced key in the token; it stays there unused");
                }
                Ok(())
            }
            (KeyStore::Token { .. }, KeyStore::File(_)) => unreachable!("next_of keeps the store"),
        }
    }

    /// The gateway refused the issued pair: back to the one in force.
    pub fn roll_back(&self, why: &str) {
        let (key_next, cert_next) = next_of(&self.committed);
        tracing::error!(
            why,
            "the renewed certificate did not work; rolling back to the one in force"
        );
        if let Err(e) = files::remove(&cert_next) {
            // The staged certificate stays, so its key must too: the
            // rollback is tried again at the next refusal.
            tracing::error!(path = %cert_next.display(), error = %e, "cannot remove; the rollback is not done");
            return;
        }
        // A key that could not be destroyed stays recorded, so that the
        // next request destroys it before making its own.
        let mut forget_key = true;
        match key_next {
            KeyStore::File(path) => {
                if let Err(e) = files::remove(&path) {
                    tracing::error!(path = %path.display(), error = %e, "cannot remove");
                }
            }
            KeyStore::Token { spec, label } => {
                // The refused key, unless it is the one in force.
                if let Some(id) = self.next_key_id() {
                    let in_force = self.point_in_force();
                    let destroyed = twofold_token::Token::open(&spec).and_then(|token| {
                        for key in token.keys(&label)? {
                            if key.id == id && Some(&key.public) != in_force.as_ref() {
                                token.destroy(&label, &key.id)?;
                            }
                        }
                        Ok(())
                    });
                    if let Err(e) = destroyed {
                        tracing::error!(error = %e, "cannot destroy the refused key in the token; the next request will");
                        forget_key = false;
                    }
                }
            }
        }
        self.update(|s| {
            if forget_key {
                s.next_key = None;
            }
            s.request_id = None;
            s.last_answer = Some(format!("rolled back: {why}"));
        });
    }
}

/// A request's key, to sign its CSR.
enum RequestKey {
    File(rcgen::KeyPair),
    Token(twofold_token::TokenKey),
}

/// Where the next key and certificate go: a key file beside the one in
/// force, or the same token and label.
fn next_of(paths: &IdentityPaths) -> (KeyStore, PathBuf) {
    let key = match &paths.key {
        KeyStore::File(path) => KeyStore::File(files::beside(path, ".next")),
        token => token.clone(),
    };
    (key, files::beside(&paths.cert, ".next"))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> IdentityPaths {
        IdentityPaths {
            cert: dir.join("device.pem"),
            key: KeyStore::File(dir.join("device.key")),
            server_ca: dir.join("server-ca.pem"),
            server_crl: None,
            server_crl_required: false,
        }
    }

    fn key_of(p: &IdentityPaths) -> PathBuf {
        match &p.key {
            KeyStore::File(path) => path.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn next_files(p: &IdentityPaths) -> (PathBuf, PathBuf) {
        let (key, cert) = next_of(p);
        match key {
            KeyStore::File(key) => (key, cert),
            other => panic!("{other:?}"),
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn renewal(p: &IdentityPaths) -> Renewal {
        let td = TrustDomain::parse("iot.example").unwrap();
        Renewal::new(p, DeviceId::parse("pi-1").unwrap(), td)
    }

    /// Every state a kill can leave on disk resolves to a pair that
    /// belongs together.
    #[test]
    fn a_kill_at_any_step_leaves_a_usable_pair() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let (key_next, cert_next) = next_files(&p);
        write(&key_of(&p), "old key");
        write(&p.cert, "old cert");
        // Nothing staged, or only a request out: the pair in force.
        assert_eq!(Renewal::recover(&p).unwrap().cert, p.cert);
        write(&key_next, "new key");
        assert_eq!(Renewal::recover(&p).unwrap().key, p.key);
        // Issued: the new pair, to try.
        write(&cert_next, "new cert");
        let load = Renewal::recover(&p).unwrap();
        assert_eq!(
            (load.cert, load.key),
            (cert_next.clone(), KeyStore::File(key_next.clone()))
        );
        assert!(renewal(&p).staged());
        // Killed between the commit's two renames: finished at start.
        files::rename(&key_next, &key_of(&p)).unwrap();
        let load = Renewal::recover(&p).unwrap();
        assert_eq!(load.cert, p.cert);
        assert_eq!(
            (read(&key_of(&p)), read(&p.cert)),
            ("new key".into(), "new cert".into())
        );
        assert!(!cert_next.exists());
    }

    #[test]
    fn a_roll_back_removes_the_certificate_first_and_forgets_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let (key_next, cert_next) = next_files(&p);
        write(&key_of(&p), "old key");
        write(&p.cert, "old cert");
        write(&key_next, "new key");
        write(&cert_next, "new cert");
        let r = renewal(&p);
        r.update(|s| s.request_id = Some("r1".into()));
        r.roll_back("handshake refused");
        assert!(!key_next.exists() && !cert_next.exists());
        assert_eq!(read(&p.cert), "old cert");
        let state = Renewal::read_state(&p);
        assert_eq!(state.request_id, None);
        assert_eq!(
            state.last_answer.as_deref(),
            Some("rolled back: handshake refused")
        );
    }

    #[test]
    fn answers_not_meant_for_this_request_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        write(&key_of(&p), "old key");
        write(&p.cert, "old cert");
        let r = renewal(&p);
        r.update(|s| s.request_id = Some("r1".into()));
        let mut buf = [0u8; 64];
        let other = message::encode(
            &CertAnswer::Issued {
                request_id: "r0",
                certs: &[0x30, 0x00],
            },
            &mut buf,
        )
        .unwrap()
        .to_vec();
        assert_eq!(r.answer(&other), Next::Stop);
        assert_eq!(r.answer(b"\xff\xff"), Next::Stop);
        // Nor does a refusal of another request: the id is kept.
        let refused_other = message::encode(
            &CertAnswer::Refused {
                request_id: "r0",
                code: RenewRefusal::BadRequest,
                retry_after: 0,
                reason: "not yours",
            },
            &mut buf,
        )
        .unwrap()
        .to_vec();
        assert_eq!(r.answer(&refused_other), Next::Stop);
        assert_eq!(r.state().request_id.as_deref(), Some("r1"));
        assert!(!next_of(&p).1.exists());
        // A refusal that cannot be retried as is: stop, and say why.
        let refused = message::encode(
            &CertAnswer::Refused {
                request_id: "r1",
                code: RenewRefusal::Revoked,
                retry_after: 0,
                reason: "revoked (key-compromise)",
            },
            &mut buf,
        )
        .unwrap()
        .to_vec();
        assert_eq!(r.answer(&refused), Next::Stop);
        assert!(
            r.state()
                .last_answer
                .unwrap()
                .contains("revoked (key-compromise)")
        );
        let busy = message::encode(
            &CertAnswer::Refused {
                request_id: "r1",
                code: RenewRefusal::RateLimited,
                retry_after: 42,
                reason: "slow down",
            },
            &mut buf,
        )
        .unwrap()
        .to_vec();
        assert_eq!(r.answer(&busy), Next::RetryIn(42));
    }
}
