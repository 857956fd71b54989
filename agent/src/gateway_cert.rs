//! What the agent accepts as its gateway's certificate: what webpki checks
//! (chain to the server CA, name, dates, the server CRL) and, on top, the
//! profile provisioning issues to gateways and nothing else.
//!
//! webpki accepts more than our PKI ever issues: a leaf without
//! extendedKeyUsage (valid for any purpose), a leaf with an RSA key, and a
//! chain through a CA below the server CA (the server CA is a trust
//! anchor, and webpki does not apply an anchor's pathLenConstraint, 0
//! here). Each of these could only come from a mistake or a forgery, so
//! the device refuses it, with its own [`GatewayRefusal`] (defence in
//! depth: devices refuse what the PKI never issues). A handshake not
//! signed by the certificate's key gets its own refusal too: it means a
//! copy of a real certificate without its key, not a wrong server CA.
//!
//! Refusals reach rustls callers as
//! `Error::InvalidCertificate(CertificateError::Other(..))` holding a
//! [`GatewayRefusal`]; [`refusal_of`] finds it again, by type.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why the agent refuses a gateway that webpki would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayRefusal {
    /// The leaf has no extendedKeyUsage at all; a gateway's has serverAuth
    /// only.
    #[error(
        "the gateway's certificate has no extendedKeyUsage (a Twofold gateway certificate is for serverAuth only)"
    )]
    NoExtendedKeyUsage,
    /// The leaf's key is not ECDSA P-256, the only kind provisioning makes.
    #[error(
        "the gateway's certificate has a {algorithm} key; Twofold gateways have ECDSA P-256 keys"
    )]
    NotP256 { algorithm: String },
    /// The leaf is issued by a CA below the server CA, not by the server
    /// CA itself.
    #[error(
        "the gateway's certificate is issued by \"{issuer}\", a CA below the server CA; Twofold gateway certificates are issued by the server CA itself"
    )]
    BelowServerCa { issuer: String },
    /// The handshake is not signed by the key of the certificate presented.
    #[error("the gateway's handshake is not signed by the key of its certificate ({detail})")]
    HandshakeSignature { detail: String },
    /// The leaf does not parse (after webpki has read it).
    #[error("the gateway's certificate does not parse: {detail}")]
    Unreadable { detail: String },
}

impl From<GatewayRefusal> for rustls::Error {
    fn from(refusal: GatewayRefusal) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
    }
}

/// The [`GatewayRefusal`] inside a rustls error, if it holds one.
pub fn refusal_of(error: &rustls::Error) -> Option<&GatewayRefusal> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref()
        }
        _ => None,
    }
}

/// The agent's server certificate verifier: webpki's, then the gateway
/// profile.
#[derive(Debug)]
pub struct GatewayVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The server CAs (DER), the only issuers of gateway certificates.
    server_ca: Vec<CertificateDer<'static>>,
}

impl GatewayVerifier {
    pub fn new(
        webpki: Arc<WebPkiServerVerifier>,
        server_ca: Vec<CertificateDer<'static>>,
    ) -> GatewayVerifier {
        GatewayVerifier { webpki, server_ca }
    }
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Before webpki: with a server CRL, webpki would call a chain
        // through a sub-CA "unknown revocation status" (the sub-CA has no
        // CRL), which hides what it is.
        below_server_ca(end_entity, intermediates, &self.server_ca)?;
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        gateway_profile(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki
            .verify_tls12_signature(message, cert, dss)
            .map_err(handshake_signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki
            .verify_tls13_signature(message, cert, dss)
            .map_err(handshake_signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A handshake signature that does not verify with the certificate's key
/// (a wrong signature, or one by a key of another type).
fn handshake_signature(error: rustls::Error) -> rustls::Error {
    match error {
        rustls::Error::InvalidCertificate(
            CertificateError::BadSignature
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. },
        ) => GatewayRefusal::HandshakeSignature {
            detail: error.to_string(),
        }
        .into(),
        other => other,
    }
}

fn parse<'a>(der: &'a [u8]) -> Option<X509Certificate<'a>> {
    X509Certificate::from_der(der).ok().map(|(_, c)| c)
}

/// Whether `issuer` signed `cert`: the names match and the signature
/// verifies with `issuer`'s key.
fn signed_by(cert: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    cert.issuer() == issuer.subject() && cert.verify_signature(Some(issuer.public_key())).is_ok()
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// Refuses a leaf that reaches a server CA through CA certificates the
/// gateway sent: the server CA issues gateway certificates itself
/// (pathLenConstraint 0). Anything else (an unknown issuer, a leaf signed
/// by a non-CA) is left to webpki, which names it.
pub fn below_server_ca(
    end_entity: &[u8],
    intermediates: &[CertificateDer<'_>],
    server_ca: &[CertificateDer<'_>],
) -> Result<(), GatewayRefusal> {
    let Some(leaf) = parse(end_entity) else {
        return Ok(());
    };
    let anchors: Vec<X509Certificate<'_>> = server_ca.iter().filter_map(|c| parse(c)).collect();
    let sent: Vec<X509Certificate<'_>> = intermediates.iter().filter_map(|c| parse(c)).collect();
    let mut current = &leaf;
    let mut leaf_issuer = None;
    // At most as many steps as certificates sent: a loop cannot go on.
    for _ in 0..=sent.len() {
        if anchors.iter().any(|a| signed_by(current, a)) {
            return match leaf_issuer {
                None => Ok(()),
                Some(issuer) => Err(GatewayRefusal::BelowServerCa { issuer }),
            };
        }
        let Some(issuer) = sent.iter().find(|c| is_ca(c) && signed_by(current, c)) else {
            return Ok(());
        };
        leaf_issuer.get_or_insert_with(|| issuer.subject().to_string());
        current = issuer;
    }
    Ok(())
}

/// The leaf profile provisioning issues to gateways, beyond what webpki
/// checks (it refuses an extendedKeyUsage without serverAuth, and a CA as
/// a leaf): an extendedKeyUsage must be there, and the key is P-256.
pub fn gateway_profile(end_entity: &[u8]) -> Result<(), GatewayRefusal> {
    let (_, leaf) =
        X509Certificate::from_der(end_entity).map_err(|e| GatewayRefusal::Unreadable {
            detail: e.to_string(),
        })?;
    match leaf.extended_key_usage() {
        Ok(Some(_)) => {}
        Ok(None) => return Err(GatewayRefusal::NoExtendedKeyUsage),
        Err(e) => {
            return Err(GatewayRefusal::Unreadable {
                detail: e.to_string(),
            });
        }
    }
    let spki = leaf.public_key();
    let algorithm = &spki.algorithm;
    let curve = algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    if algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        let name = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                format!("RSA-{}", rsa.key_size())
            }
            Ok(x509_parser::public_key::PublicKey::EC(_)) => match curve {
                Some(oid) => format!("elliptic-curve ({oid})"),
                None => "elliptic-curve".to_owned(),
            },
            _ => algorithm.algorithm.to_id_string(),
        };
        return Err(GatewayRefusal::NotP256 { algorithm: name });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    fn ca(
        name: &str,
        issuer: Option<&Issuer<'_, KeyPair>>,
    ) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = match issuer {
            Some(issuer) => p.signed_by(&key, issuer).unwrap(),
            None => p.self_signed(&key).unwrap(),
        };
        (cert.der().clone(), Issuer::new(p, key))
    }

    fn leaf(
        issuer: &Issuer<'_, KeyPair>,
        key: &KeyPair,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(vec!["gw.example".into()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        edit(&mut p);
        p.signed_by(key, issuer).unwrap().der().clone()
    }

    #[test]
    fn only_the_gateway_profile_passes() {
        let (_, server) = ca("Server CA", None);
        let p256 = KeyPair::generate().unwrap();
        assert_eq!(gateway_profile(&leaf(&server, &p256, |_| {})), Ok(()));
        assert_eq!(
            gateway_profile(&leaf(&server, &p256, |p| p.extended_key_usages.clear())),
            Err(GatewayRefusal::NoExtendedKeyUsage)
        );
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            gateway_profile(&leaf(&server, &p384, |_| {})),
            Err(GatewayRefusal::NotP256 { algorithm }) if algorithm.contains("1.3.132.0.34")
        ));
    }

    #[test]
    fn a_leaf_below_a_sub_ca_is_refused_and_an_unknown_issuer_left_to_webpki() {
        let (server_der, server) = ca("Server CA", None);
        let (sub_der, sub) = ca("Sub CA", Some(&server));
        let key = KeyPair::generate().unwrap();
        let direct = leaf(&server, &key, |_| {});
        let anchors = [server_der.clone()];
        assert_eq!(below_server_ca(&direct, &anchors, &anchors), Ok(()));
        let below = leaf(&sub, &key, |_| {});
        assert_eq!(
            below_server_ca(&below, &[sub_der.clone(), server_der.clone()], &anchors),
            Err(GatewayRefusal::BelowServerCa {
                issuer: "CN=Sub CA".into()
            })
        );
        // Without the sub-CA sent, or from another PKI: webpki's to say.
        assert_eq!(below_server_ca(&below, &[], &anchors), Ok(()));
        let (_, foreign) = ca("Server CA", None);
        let other = leaf(&foreign, &key, |_| {});
        assert_eq!(below_server_ca(&other, &[sub_der], &anchors), Ok(()));
    }
}
