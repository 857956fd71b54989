//! Keys that never leave a PKCS#11 token: an HSM, a TPM 2.0 through its
//! PKCS#11 module (`libtpm2_pkcs11.so`), or SoftHSM2.
//!
//! Only ECDSA P-256 keys, the one kind Twofold issues for. A key is made
//! inside the token as sensitive and never extractable; what leaves the
//! token is its public point and signatures. A key is named by its label
//! (`CKA_LABEL`) and, since renewal makes a second key under the same
//! label before the first goes, found by its public key: the one that
//! matches the certificate in use.
//!
//! The PIN comes from a file or an environment variable
//! ([`PinSource`]), never from a command line or a config file in clear.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::{Digest, Sha256};

/// DER of the P-256 curve's OID (prime256v1), as `CKA_EC_PARAMS` holds it.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// An uncompressed P-256 point: 0x04, then x and y.
const POINT_LEN: usize = 65;

/// Where the token's PIN comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (one line; a final newline is not part of it).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::File(path) => write!(f, "the PIN file {}", path.display()),
            PinSource::Env(name) => write!(f, "the environment variable {name}"),
        }
    }
}

/// A token: which module, which token in it, and how to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSpec {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token's label (`CKA_LABEL` of the token, as `pkcs11-tool -L` shows).
    pub token: String,
    pub pin: PinSource,
}

/// Why a token or a key in it cannot be used; [`TokenError::fix`] says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot load the PKCS#11 module {module}: {detail}")]
    Module { module: PathBuf, detail: String },
    #[error("no token labelled \"{token}\" in {module} (tokens there: {available})")]
    NoToken {
        token: String,
        module: PathBuf,
        available: String,
    },
    #[error("cannot read the token's PIN from {source_}: {detail}")]
    Pin { source_: PinSource, detail: String },
    #[error("the PIN for token \"{token}\" is wrong (from {source_})")]
    WrongPin { token: String, source_: PinSource },
    #[error("the user PIN of token \"{token}\" is locked after too many wrong tries")]
    PinLocked { token: String },
    #[error("no P-256 key labelled \"{label}\" in token \"{token}\"")]
    NoKey { token: String, label: String },
    #[error(
        "{count} key(s) labelled \"{label}\" in token \"{token}\", but none is the certificate's key"
    )]
    NoMatchingKey {
        token: String,
        label: String,
        count: usize,
    },
    #[error("token \"{token}\": {operation} failed: {detail}")]
    Pkcs11 {
        token: String,
        operation: &'static str,
        detail: String,
    },
}

impl TokenError {
    /// What to do about it.
    pub fn fix(&self) -> String {
        match self {
            TokenError::Module { .. } => "install the module (Debian: softhsm2, libtpm2-pkcs11-1, or the HSM vendor's) and give its absolute path".into(),
            TokenError::NoToken { token, .. } => format!(
                "give one of the tokens listed, or initialize one labelled \"{token}\" (softhsm2-util --init-token --free --label {token}; for a TPM, tpm2_ptool addtoken)"
            ),
            TokenError::Pin { source_: PinSource::File(path), .. } => format!(
                "write the token's user PIN into {} (mode 0600, owned by the user that runs this)",
                path.display()
            ),
            TokenError::Pin { source_: PinSource::Env(name), .. } => {
                format!("set {name} to the token's user PIN in this process's environment")
            }
            TokenError::WrongPin { source_, .. } => format!(
                "put the token's user PIN in {source_}; each wrong try counts towards locking the token"
            ),
            TokenError::PinLocked { .. } => "the token's security officer must set a new user PIN (pkcs11-tool --init-pin --login --login-type so)".into(),
            TokenError::NoKey { .. } => "make the key in the token (agent keygen --config …, or provisioning init --pkcs11-module …) or give the label it has (pkcs11-tool -O lists them)".into(),
            TokenError::NoMatchingKey { .. } => "use the certificate issued for this token's key, or make a new key and CSR there (agent keygen --config …) and enroll again".into(),
            TokenError::Pkcs11 { .. } => "check the token (pkcs11-tool --module … -L, -O) and its daemon (a TPM's resource manager), then try again".into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TokenError>;

/// The return value's name, short: cryptoki's own text is paragraphs.
fn rv_text(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => format!("{rv:?}"),
        other => other.to_string(),
    }
}

fn rv_of(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// One context per module per process: C_Initialize may run only once.
fn context(module: &Path) -> Result<Pkcs11> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = modules.get(module) {
        return Ok(ctx.clone());
    }
    let failed = |detail: String| TokenError::Module {
        module: module.to_owned(),
        detail,
    };
    if !module.is_file() {
        return Err(failed("no such file".into()));
    }
    let ctx = Pkcs11::new(module).map_err(|e| failed(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(failed(format!("C_Initialize: {}", rv_text(&e)))),
    }
    modules.insert(module.to_owned(), ctx.clone());
    Ok(ctx)
}

impl PinSource {
    fn read(&self) -> Result<AuthPin> {
        let failed = |detail: String| TokenError::Pin {
            source_: self.clone(),
            detail,
        };
        let pin = match self {
            PinSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
                text.strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text)
                    .to_owned()
            }
            // Never the error's own text: for a value that is not UTF-8
            // it quotes the value.
            PinSource::Env(name) => std::env::var(name).map_err(|e| {
                failed(match e {
                    std::env::VarError::NotPresent => "it is not set".into(),
                    std::env::VarError::NotUnicode(_) => "it is not UTF-8".into(),
                })
            })?,
        };
        if pin.is_empty() {
            return Err(failed("it is empty".into()));
        }
        Ok(AuthPin::from(pin))
    }
}

/// A logged-in session with one token, shared by the keys found in it.
#[derive(Clone)]
pub struct Token(Arc<Inner>);

struct Inner {
    spec: TokenSpec,
    ctx: Pkcs11,
    slot: Slot,
    /// The PIN the token refused when a dropped session was opened again:
    /// not tried again (each try counts towards locking the token) until
    /// the PIN's source says something else.
    refused: Mutex<Option<AuthPin>>,
    /// A session is not `Sync`; signing is one call at a time anyway.
    session: Mutex<Session>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("module", &self.0.spec.module)
            .field("token", &self.0.spec.token)
            .finish_non_exhaustive()
    }
}

/// The labels of the tokens a module has, for messages.
pub fn token_labels(module: &Path) -> Result<Vec<String>> {
    let ctx = context(module)?;
    let slots = ctx.get_slots_with_token().map_err(|e| TokenError::Module {
        module: module.to_owned(),
        detail: format!("C_GetSlotList: {}", rv_text(&e)),
    })?;
    Ok(slots
        .into_iter()
        .filter_map(|s| ctx.get_token_info(s).ok())
        .map(|info| info.label().trim().to_owned())
        .collect())
}

impl Token {
    /// Loads the module, finds the token by its label, and logs in.
    pub fn open(spec: &TokenSpec) -> Result<Token> {
        let ctx = context(&spec.module)?;
        let slots = ctx.get_slots_with_token().map_err(|e| TokenError::Module {
            module: spec.module.clone(),
            detail: format!("C_GetSlotList: {}", rv_text(&e)),
        })?;
        let mut labels = Vec::new();
        let mut found = None;
        for slot in slots {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            let label = info.label().trim().to_owned();
            if label == spec.token && info.token_initialized() {
                found = Some(slot);
                break;
            }
            labels.push(format!("\"{label}\""));
        }
        let Some(slot) = found else {
            return Err(TokenError::NoToken {
                token: spec.token.clone(),
                module: spec.module.clone(),
                available: if labels.is_empty() {
                    "none".into()
                } else {
                    labels.join(", ")
                },
            });
        };
        let pin = spec.pin.read()?;
        let session = login(&ctx, slot, spec, &pin)?;
        Ok(Token(Arc::new(Inner {
            spec: spec.clone(),
            ctx,
            slot,
            refused: Mutex::new(None),
            session: Mutex::new(session),
        })))
    }

    pub fn spec(&self) -> &TokenSpec {
        &self.0.spec
    }

    fn failed(&self, operation: &'static str, e: &CkError) -> TokenError {
        TokenError::Pkcs11 {
            token: self.0.spec.token.clone(),
            operation,
            detail: rv_text(e),
        }
    }

    /// Runs `f` on the session; a session the token dropped (the token
    /// was reset or replugged, the daemon behind it restarted) is opened
    /// again and `f` tried once more.
    fn with_session<T>(
        &self,
        operation: &'static str,
        f: impl Fn(&Session) -> std::result::Result<T, CkError>,
    ) -> Result<T> {
        let mut session = self.0.session.lock().unwrap_or_else(|e| e.into_inner());
        match f(&session) {
            Ok(v) => Ok(v),
            Err(e)
                if matches!(
                    rv_of(&e),
                    Some(
                        RvError::SessionHandleInvalid
                            | RvError::SessionClosed
                            | RvError::UserNotLoggedIn
                            | RvError::DeviceRemoved
                            | RvError::TokenNotPresent
                    )
                ) =>
            {
                *session = self.relogin()?;
                f(&session).map_err(|e| self.failed(operation, &e))
            }
            Err(e) => Err(self.failed(operation, &e)),
        }
    }

    /// A new session, logged in with the PIN read again from its source
    /// (it may have been changed), but never with one refused before.
    fn relogin(&self) -> Result<Session> {
        use secrecy::ExposeSecret;
        let pin = self.0.spec.pin.read()?;
        let mut refused = self.0.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused
            .as_ref()
            .is_some_and(|r| r.expose_secret() == pin.expose_secret())
        {
            return Err(TokenError::WrongPin {
                token: self.0.spec.token.clone(),
                source_: self.0.spec.pin.clone(),
            });
        }
        match login(&self.0.ctx, self.0.slot, &self.0.spec, &pin) {
            Err(e @ TokenError::WrongPin { .. }) => {
                *refused = Some(pin);
                Err(e)
            }
            other => other,
        }
    }

    /// The P-256 keys labelled `label`, each with its public key.
    pub fn keys(&self, label: &str) -> Result<Vec<KeyInfo>> {
        self.with_session("finding keys", |s| {
            let privates = s.find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Label(label.as_bytes().to_vec()),
            ])?;
            let mut keys = Vec::new();
            for private in privates {
                let Some(id) = s
                    .get_attributes(private, &[AttributeType::Id])?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Id(id) => Some(id),
                        _ => None,
                    })
                else {
                    continue;
                };
                // The public half: the point is not an attribute of the
                // private key object in PKCS#11.
                // Under the same label too, and only one: another pair
                // with the same id (pkcs11-tool --id 01 is common) must not
                // lend its point.
                let publics = s.find_objects(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.clone()),
                ])?;
                let [public] = publics.as_slice() else {
                    continue;
                };
                let mut params = None;
                let mut point = None;
                for a in
                    s.get_attributes(*public, &[AttributeType::EcParams, AttributeType::EcPoint])?
                {
                    match a {
                        Attribute::EcParams(p) => params = Some(p),
                        Attribute::EcPoint(p) => point = Some(p),
                        _ => {}
                    }
                }
                if params.as_deref() != Some(&P256_PARAMS[..]) {
                    continue;
                }
                let Some(point) = point.as_deref().and_then(unwrap_point) else {
                    continue;
                };
                keys.push(KeyInfo {
                    label: label.to_owned(),
                    id,
                    public: point,
                });
            }
            Ok(keys)
        })
    }

    /// Makes a P-256 key pair in the token, labelled `label` with `id`:
    /// private, sensitive, never extractable, for signing and never for
    /// key agreement. (CKA_DECRYPT and CKA_ENCRYPT are left to the token:
    /// tpm2-pkcs11 refuses a template that turns them off, and no EC
    /// mechanism uses them.)
    pub fn generate_p256(&self, label: &str, id: &[u8]) -> Result<KeyInfo> {
        let (public, _) = self.with_session("generating a key", |s| {
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Derive(false),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ];
            s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        })?;
        let point = self
            .with_session("reading the new public key", |s| {
                s.get_attributes(public, &[AttributeType::EcPoint])
            })
            .and_then(|attributes| {
                attributes
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::EcPoint(p) => unwrap_point(&p),
                        _ => None,
                    })
                    .ok_or_else(|| TokenError::Pkcs11 {
                        token: self.0.spec.token.clone(),
                        operation: "reading the new public key",
                        detail: "no P-256 point".into(),
                    })
            });
        let point = match point {
            Ok(point) => point,
            Err(e) => {
                // A key no one can name by its public half is no use.
                let _ = self.destroy(label, id);
                return Err(e);
            }
        };
        Ok(KeyInfo {
            label: label.to_owned(),
            id: id.to_vec(),
            public: point,
        })
    }

    /// Destroys the key pair labelled `label` with `id` (both halves).
    pub fn destroy(&self, label: &str, id: &[u8]) -> Result<()> {
        self.with_session("destroying a key", |s| {
            for object in s.find_objects(&[
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ])? {
                s.destroy_object(object)?;
            }
            Ok(())
        })
    }

    /// The key labelled `label` whose public point is `public` (the
    /// certificate's), ready to sign.
    pub fn key_for(&self, label: &str, public: &[u8]) -> Result<TokenKey> {
        let keys = self.keys(label)?;
        if keys.is_empty() {
            return Err(TokenError::NoKey {
                token: self.0.spec.token.clone(),
                label: label.to_owned(),
            });
        }
        let count = keys.len();
        keys.into_iter()
            .find(|k| k.public == public)
            .map(|info| self.key(info))
            .ok_or_else(|| TokenError::NoMatchingKey {
                token: self.0.spec.token.clone(),
                label: label.to_owned(),
                count,
            })
    }

    /// The key `info` as a signer.
    pub fn key(&self, info: KeyInfo) -> TokenKey {
        TokenKey {
            token: self.clone(),
            info,
            last_error: Arc::default(),
        }
    }

    fn private_handle(
        &self,
        s: &Session,
        info: &KeyInfo,
    ) -> std::result::Result<ObjectHandle, CkError> {
        s.find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(info.label.as_bytes().to_vec()),
            Attribute::Id(info.id.clone()),
        ])?
        .into_iter()
        .next()
        .ok_or(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            cryptoki::context::Function::FindObjects,
        ))
    }
}

fn login(ctx: &Pkcs11, slot: Slot, spec: &TokenSpec, pin: &AuthPin) -> Result<Session> {
    let failed = |operation, e: &CkError| TokenError::Pkcs11 {
        token: spec.token.clone(),
        operation,
        detail: rv_text(e),
    };
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| failed("opening a session", &e))?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) => Ok(session),
        // Logins are per application: another session did it already.
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
            Err(TokenError::WrongPin {
                token: spec.token.clone(),
                source_: spec.pin.clone(),
            })
        }
        Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(TokenError::PinLocked {
            token: spec.token.clone(),
        }),
        Err(e) => Err(failed("logging in", &e)),
    }
}

/// `CKA_EC_POINT` is the point inside a DER OCTET STRING (some modules
/// give it bare); the uncompressed point or nothing.
fn unwrap_point(raw: &[u8]) -> Option<Vec<u8>> {
    let point = match raw {
        // The OCTET STRING of a 65-byte point is 67 bytes; a bare point
        // is 65, whatever its x begins with.
        [0x04, 0x41, rest @ ..] if rest.len() == POINT_LEN => rest,
        bare => bare,
    };
    (point.len() == POINT_LEN && point[0] == 0x04).then(|| point.to_vec())
}

/// A key pair in a token, by label and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub label: String,
    pub id: Vec<u8>,
    /// The uncompressed public point (65 bytes).
    pub public: Vec<u8>,
}

/// What the token says about a private key's protection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    pub sensitive: bool,
    pub extractable: bool,
    /// Whether asking for the key's value (`CKA_VALUE`) was refused.
    pub value_refused: bool,
}

/// A key in a token that signs: for rcgen (CSRs, certificates, CRLs) and,
/// through [`TokenKey::sign_sha256`], for TLS.
#[derive(Clone, Debug)]
pub struct TokenKey {
    token: Token,
    info: KeyInfo,
    last_error: Arc<Mutex<Option<String>>>,
}

impl TokenKey {
    pub fn info(&self) -> &KeyInfo {
        &self.info
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    /// Why the last signing through rcgen failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// ECDSA P-256 over SHA-256 of `message`, DER-encoded (as X.509 and
    /// TLS carry it). The digest is made here and the token does raw
    /// ECDSA (`CKM_ECDSA`), which every module has; `CKM_ECDSA_SHA256`
    /// is missing from some TPM modules.
    pub fn sign_sha256(&self, message: &[u8]) -> Result<Vec<u8>> {
        let digest = Sha256::digest(message);
        let raw = self.token.with_session("signing", |s| {
            let key = self.token.private_handle(s, &self.info)?;
            s.sign(&Mechanism::Ecdsa, key, &digest)
        })?;
        if raw.len() != 64 {
            return Err(TokenError::Pkcs11 {
                token: self.token.0.spec.token.clone(),
                operation: "signing",
                detail: format!("a {}-byte signature, not 64", raw.len()),
            });
        }
        Ok(der_signature(&raw[..32], &raw[32..]))
    }

    /// Asks the token for the private key's value and protection
    /// attributes: a key made by [`Token::generate_p256`] is sensitive and
    /// not extractable, and its value is refused.
    pub fn protection(&self) -> Result<Protection> {
        self.token
            .with_session("reading the key's attributes", |s| {
                let key = self.token.private_handle(s, &self.info)?;
                let mut p = Protection {
                    sensitive: false,
                    extractable: true,
                    value_refused: false,
                };
                for a in
                    s.get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])?
                {
                    match a {
                        Attribute::Sensitive(v) => p.sensitive = v,
                        Attribute::Extractable(v) => p.extractable = v,
                        _ => {}
                    }
                }
                let value = s.get_attribute_info(key, &[AttributeType::Value])?;
                p.value_refused = matches!(
                    value.first(),
                    Some(
                        AttributeInfo::Sensitive
                            | AttributeInfo::Unavailable
                            | AttributeInfo::TypeInvalid
                    )
                );
                Ok(p)
            })
    }
}

impl rcgen::PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.info.public
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        // rcgen's error carries no text: the reason is kept for
        // [`TokenKey::last_error`].
        self.sign_sha256(msg).map_err(|e| {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
            rcgen::Error::RemoteKeyError
        })
    }
}

/// `r` and `s` (32 bytes each, big-endian) as a DER ECDSA-Sig-Value.
/// Written here: a SEQUENCE of two INTEGERs is all it is, and the
/// crates that do it pull in a whole ASN.1 stack for one function.
fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, bytes: &[u8]) {
        let trimmed = match bytes.iter().position(|b| *b != 0) {
            Some(i) => &bytes[i..],
            None => &[0u8][..],
        };
        out.push(0x02);
        if trimmed[0] & 0x80 != 0 {
            out.push(trimmed.len() as u8 + 1);
            out.push(0);
        } else {
            out.push(trimmed.len() as u8);
        }
        out.extend_from_slice(trimmed);
    }
    let mut body = Vec::with_capacity(72);
    integer(&mut body, r);
    integer(&mut body, s);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    out
}

/// The uncompressed public point of a certificate's key, to find its key
/// in a token; `None` if it is not a P-256 key.
pub fn public_point_of_cert(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let point = cert.public_key().subject_public_key.data.to_vec();
    (point.len() == POINT_LEN && point[0] == 0x04).then_some(point)
}

/// A new random key id (`CKA_ID`), 8 bytes.
pub fn new_key_id() -> Vec<u8> {
    let mut id = vec![0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_der() {
        let sig = der_signature(&[0x80; 32], &[0x01; 32]);
        assert_eq!(&sig[..4], &[0x30, 69, 0x02, 33]);
        assert_eq!(sig[4], 0);
        let sig = der_signature(&[0u8; 32], &[0x00, 0x7f, 0x01].repeat(11)[..32]);
        // r = 0 is one zero byte; s loses its leading zero.
        assert_eq!(&sig[2..5], &[0x02, 1, 0]);
        assert_eq!(&sig[5..7], &[0x02, 31]);
    }

    #[test]
    fn points_come_wrapped_or_bare() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&point);
        assert_eq!(unwrap_point(&wrapped), Some(point.clone()));
        assert_eq!(unwrap_point(&point), Some(point));
        assert_eq!(unwrap_point(&[0x04, 2, 1, 2]), None);
        // A bare point whose x starts with 0x3f is not a 63-byte wrapper.
        let mut odd = vec![0x04, 0x3f];
        odd.extend([9u8; 63]);
        assert_eq!(unwrap_point(&odd), Some(odd.clone()));
    }

    #[test]
    fn a_missing_module_says_so() {
        let spec = TokenSpec {
            module: "/nonexistent/libpkcs11.so".into(),
            token: "t".into(),
            pin: PinSource::Env("TWOFOLD_TEST_NO_SUCH_PIN".into()),
        };
        let e = Token::open(&spec).unwrap_err();
        assert!(matches!(e, TokenError::Module { .. }), "{e}");
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
