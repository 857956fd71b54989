//! `agent.toml`: parsed, then checked before anything connects. Every
//! error names the key and the problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub gateway: Option<GatewayFile>,
    pub identity: Option<IdentityFile>,
    #[serde(default)]
    pub telemetry: TelemetryFile,
    pub queue: Option<QueueFile>,
    #[serde(default)]
    pub reconnect: ReconnectFile,
    #[serde(default)]
    pub api: ApiFile,
    #[serde(default)]
    pub commands: BTreeMap<String, CommandFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub keep_alive_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    pub bundle: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_ca: Option<PathBuf>,
    pub server_crl: Option<PathBuf>,
    pub server_crl_url: Option<String>,
    pub server_crl_refresh_secs: Option<u64>,
    pub pkcs11: Option<Pkcs11File>,
}

/// `[identity.pkcs11]`: the device key in a PKCS#11 token (an HSM, a TPM
/// 2.0 through libtpm2_pkcs11, SoftHSM2) instead of a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11File {
    pub module: Option<PathBuf>,
    pub token: Option<String>,
    pub key_label: Option<String>,
    pub pin_file: Option<PathBuf>,
    pub pin_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    pub interval_secs: Option<u64>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueFile {
    pub path: Option<PathBuf>,
    pub max_messages: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectFile {
    pub min_secs: Option<f64>,
    pub max_secs: Option<f64>,
    pub refused_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandFile {
    pub program: PathBuf,
    #[serde(default)]
    pub args: Vec<String>,
    pub timeout_secs: Option<u64>,
}

/// How payloads the agent makes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The `protocol` types, postcard-encoded (the default).
    Postcard,
    /// The same types as JSON, for backends that want it.
    Json,
}

/// Where the device's private key is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyStore {
    /// A PEM file, readable by the agent's user alone.
    File(PathBuf),
    /// A key pair in a PKCS#11 token, labelled `label`; of the keys with
    /// that label, the one the certificate names is used.
    Token {
        spec: twofold_token::TokenSpec,
        label: String,
    },
}

impl std::fmt::Display for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyStore::File(path) => write!(f, "{}", path.display()),
            KeyStore::Token { spec, label } => {
                write!(f, "key \"{label}\" in token \"{}\"", spec.token)
            }
        }
    }
}

/// Where the certificate, key, server CA and server CA's CRL are.
#[derive(Clone, Debug)]
pub struct IdentityPaths {
    pub cert: PathBuf,
    pub key: KeyStore,
    pub server_ca: PathBuf,
    /// Revoked gateway certificates. Without it the gateway's certificate
    /// is not checked for revocation.
    pub server_crl: Option<PathBuf>,
    /// Whether `server_crl` must exist at start. One named in the config
    /// must; a bundle's may be missing (bundles written before the PKI had
    /// a server CRL), and the running agent takes it when it appears.
    pub server_crl_required: bool,
}

/// Where the agent fetches new server CRLs, and how often.
#[derive(Clone, Debug)]
pub struct CrlFetch {
    /// An `http://` URL: a CRL is signed, so it needs no TLS, and the
    /// device has no CA to check a web server's certificate against.
    pub url: String,
    pub every: Duration,
}

/// An operator-defined command: a program with fixed arguments.
#[derive(Clone, Debug)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
}

/// A checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub host: String,
    pub port: u16,
    pub keep_alive: Duration,
    pub identity: IdentityPaths,
    pub server_crl_fetch: Option<CrlFetch>,
    pub telemetry_interval: Duration,
    pub format: Format,
    pub queue_path: PathBuf,
    pub queue_max: u64,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The wait after the gateway refused the certificate itself.
    pub reconnect_refused: Duration,
    pub socket: PathBuf,
    pub commands: BTreeMap<String, CommandSpec>,
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The default Unix socket for local apps.
pub const DEFAULT_SOCKET: &str = "/run/twofold/agent.sock";
/// The default queue database.
pub const DEFAULT_QUEUE: &str = "/var/lib/twofold/queue.sqlite";

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(path.display().to_string(), format!("cannot read: {e}")))?;
        let file: File = toml::from_str(&text)
            .map_err(|e| err(path.display().to_string(), toml_problem(&text, &e)))?;
        file.check()
    }
}

/// A TOML error as "line N: what": never toml's own text, which quotes
/// the line, and the line may be a PIN someone wrote where it does not
/// belong.
pub fn toml_problem(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message().trim_end())
        }
        None => e.message().trim_end().to_owned(),
    }
}

impl File {
    /// Checks every value; the first problem is returned.
    pub fn check(self) -> Result<Config, ConfigError> {
        let gateway = self.gateway.unwrap_or_default();
        let host = gateway
            .host
            .filter(|h| !h.trim().is_empty())
            .ok_or_else(|| err("gateway.host", "missing: the gateway's DNS name or address"))?;
        let port = gateway.port.unwrap_or(8883);
        if port == 0 {
            return Err(err("gateway.port", "must be 1 to 65535"));
        }
        // The gateway's certificate must carry this name (or address).
        rustls_pki_types::ServerName::try_from(host.as_str()).map_err(|_| {
            err(
                "gateway.host",
                format!("{host:?} is not a DNS name or IP address"),
            )
        })?;
        let keep_alive = gateway.keep_alive_secs.unwrap_or(30);
        if !(5..=3600).contains(&keep_alive) {
            return Err(err("gateway.keep_alive_secs", "must be 5 to 3600"));
        }

        let id = self.identity.ok_or_else(|| {
            err(
                "identity",
                "missing: set identity.bundle to the directory `provisioning enroll` wrote",
            )
        })?;
        let token = id.pkcs11.map(check_pkcs11).transpose()?;
        if token.is_some() && id.key.is_some() {
            return Err(err(
                "identity.key",
                "give either identity.key or [identity.pkcs11], not both",
            ));
        }
        let identity = match id.bundle {
            Some(dir) => {
                for (key, set) in [
                    ("identity.cert", id.cert.is_some()),
                    ("identity.key", id.key.is_some()),
                    ("identity.server_ca", id.server_ca.is_some()),
                ] {
                    if set {
                        return Err(err(
                            key,
                            "give either identity.bundle or cert, key and server_ca, not both",
                        ));
                    }
                }
                // identity.server_crl may stand in for the bundle's (e.g.
                // in a directory the agent may write, for server_crl_url).
                // Bundles written before provisioning had a server CRL
                // have none; the agent says so, and watches for it.
                IdentityPaths {
                    cert: dir.join("device.pem"),
                    key: token.unwrap_or_else(|| KeyStore::File(dir.join("device.key"))),
                    server_ca: dir.join("server-ca.pem"),
                    server_crl_required: id.server_crl.is_some(),
                    server_crl: Some(id.server_crl.unwrap_or_else(|| dir.join("server-crl.pem"))),
                }
            }
            None => IdentityPaths {
                cert: id
                    .cert
                    .ok_or_else(|| err("identity.cert", "missing (or set identity.bundle)"))?,
                key: match token {
                    Some(token) => token,
                    None => KeyStore::File(id.key.ok_or_else(|| {
                        err(
                            "identity.key",
                            "missing (or set identity.bundle, or [identity.pkcs11])",
                        )
                    })?),
                },
                server_ca: id
                    .server_ca
                    .ok_or_else(|| err("identity.server_ca", "missing (or set identity.bundle)"))?,
                server_crl_required: id.server_crl.is_some(),
                server_crl: id.server_crl,
            },
        };

        let server_crl_fetch = match id.server_crl_url {
            None => {
                if id.server_crl_refresh_secs.is_some() {
                    return Err(err(
                        "identity.server_crl_refresh_secs",
                        "set identity.server_crl_url too, or remove this",
                    ));
                }
                None
            }
            Some(url) => {
                check_crl_url(&url).map_err(|p| err("identity.server_crl_url", p))?;
                let Some(path) = &identity.server_crl else {
                    return Err(err(
                        "identity.server_crl_url",
                        "needs a server CRL to start from: copy the PKI's server-crl.pem into the \
                         bundle (or set identity.server_crl)",
                    ));
                };
                if !path.exists() {
                    return Err(err(
                        "identity.server_crl_url",
                        format!(
                            "needs a server CRL to start from, and {} does not exist",
                            path.display()
                        ),
                    ));
                }
                let every = id.server_crl_refresh_secs.unwrap_or(3600);
                if !(1..=604_800).contains(&every) {
                    return Err(err(
                        "identity.server_crl_refresh_secs",
                        "must be 1 to 604800 (a week)",
                    ));
                }
                Some(CrlFetch {
                    url,
                    every: Duration::from_secs(every),
                })
            }
        };

        let interval = self.telemetry.interval_secs.unwrap_or(30);
        if !(1..=86_400).contains(&interval) {
            return Err(err("telemetry.interval_secs", "must be 1 to 86400"));
        }
        let format = match self.telemetry.format.as_deref() {
            None | Some("postcard") => Format::Postcard,
            Some("json") => Format::Json,
            Some(other) => {
                return Err(err(
                    "telemetry.format",
                    format!("{other:?}: use \"postcard\" or \"json\""),
                ));
            }
        };

        let queue = self.queue.unwrap_or_default();
        let queue_path = queue.path.unwrap_or_else(|| DEFAULT_QUEUE.into());
        let queue_max = queue.max_messages.unwrap_or(100_000);
        if !(1..=100_000_000).contains(&queue_max) {
            return Err(err("queue.max_messages", "must be 1 to 100000000"));
        }

        let min = self.reconnect.min_secs.unwrap_or(1.0);
        let max = self.reconnect.max_secs.unwrap_or(300.0);
        if !(0.1..=3600.0).contains(&min) {
            return Err(err("reconnect.min_secs", "must be 0.1 to 3600"));
        }
        if !(min..=86_400.0).contains(&max) || max < 2.0 * min {
            return Err(err(
                "reconnect.max_secs",
                "must be at least twice reconnect.min_secs and at most 86400",
            ));
        }
        let refused = self.reconnect.refused_secs.unwrap_or(3600.0);
        if !(1.0..=86_400.0).contains(&refused) {
            return Err(err("reconnect.refused_secs", "must be 1 to 86400"));
        }

        let mut commands = BTreeMap::new();
        for (name, c) in self.commands {
            let key = format!("commands.{name}");
            if name == crate::commands::PING {
                return Err(err(key, "ping is built in"));
            }
            if !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
                || name.len() > 64
            {
                return Err(err(key, "names are 1 to 64 of a-z, A-Z, 0-9, - and _"));
            }
            if !c.program.is_absolute() {
                return Err(err(
                    format!("{key}.program"),
                    "must be an absolute path (no PATH lookup)",
                ));
            }
            let timeout = c.timeout_secs.unwrap_or(30);
            if !(1..=3600).contains(&timeout) {
                return Err(err(format!("{key}.timeout_secs"), "must be 1 to 3600"));
            }
            commands.insert(
                name,
                CommandSpec {
                    program: c.program,
                    args: c.args,
                    timeout: Duration::from_secs(timeout),
                },
            );
        }

        Ok(Config {
            host,
            port,
            keep_alive: Duration::from_secs(keep_alive),
            identity,
            server_crl_fetch,
            telemetry_interval: Duration::from_secs(interval),
            format,
            queue_path,
            queue_max,
            reconnect_min: Duration::from_secs_f64(min),
            reconnect_max: Duration::from_secs_f64(max),
            reconnect_refused: Duration::from_secs_f64(refused),
            socket: self.api.socket.unwrap_or_else(|| DEFAULT_SOCKET.into()),
            commands,
        })
    }
}

/// `[identity.pkcs11]`, checked: a module path, a token and key label,
/// and the PIN from a file or the environment, never in the config.
fn check_pkcs11(file: Pkcs11File) -> Result<KeyStore, ConfigError> {
    let module = file.module.ok_or_else(|| {
        err(
            "identity.pkcs11.module",
            "missing: the PKCS#11 module, e.g. /usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
        )
    })?;
    if !module.is_absolute() {
        return Err(err("identity.pkcs11.module", "must be an absolute path"));
    }
    let token = file
        .token
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| err("identity.pkcs11.token", "missing: the token's label"))?;
    let label = file.key_label.unwrap_or_else(|| DEFAULT_KEY_LABEL.into());
    if label.is_empty() || label.len() > 64 {
        return Err(err(
            "identity.pkcs11.key_label",
            "must be 1 to 64 characters",
        ));
    }
    let pin = match (file.pin_file, file.pin_env) {
        (Some(path), None) => twofold_token::PinSource::File(path),
        (None, Some(name)) if !name.is_empty() => twofold_token::PinSource::Env(name),
        (Some(_), Some(_)) => {
            return Err(err(
                "identity.pkcs11.pin_env",
                "give pin_file or pin_env, not both",
            ));
        }
        _ => {
            return Err(err(
                "identity.pkcs11.pin_file",
                "missing: a file holding the token's user PIN (0600), or pin_env naming an \
                 environment variable; the PIN itself is never written in this file",
            ));
        }
    };
    Ok(KeyStore::Token {
        spec: twofold_token::TokenSpec { module, token, pin },
        label,
    })
}

/// The label of the device key in a token when the config gives none.
pub const DEFAULT_KEY_LABEL: &str = "twofold-device";

/// A server CRL's URL: `http://`, a host, and the path of a file.
fn check_crl_url(url: &str) -> Result<(), String> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: use http://; a CRL is signed by the server CA, so it needs no TLS"
            ));
        }
        _ => return Err(format!("{url:?}: must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.path().ends_with('/') {
        return Err(format!("{url:?} does not name a file"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str::<File>(text)
            .map_err(|e| err("toml", toml_problem(text, &e)))?
            .check()
    }

    #[test]
    fn the_example_config_parses() {
        let c = parse(include_str!("../agent.example.toml")).unwrap();
        assert_eq!(c.port, 8883);
        assert_eq!(
            c.identity.key,
            KeyStore::File("/etc/twofold/device/device.key".into())
        );
        assert!(c.commands.contains_key("reboot"));
    }

    #[test]
    fn problems_name_their_key() {
        let base = "[gateway]\nhost = \"gw\"\n[identity]\nbundle = \"/b\"\n";
        assert_eq!(parse("").unwrap_err().key, "gateway.host");
        assert_eq!(
            parse("[gateway]\nhost = \"gw\"\n").unwrap_err().key,
            "identity"
        );
        assert!(parse(base).is_ok());
        for (extra, key) in [
            ("[telemetry]\nformat = \"xml\"", "telemetry.format"),
            ("[telemetry]\ninterval_secs = 0", "telemetry.interval_secs"),
            (
                "[reconnect]\nmin_secs = 10.0\nmax_secs = 5.0",
                "reconnect.max_secs",
            ),
            ("[commands.ping]\nprogram = \"/bin/true\"", "commands.ping"),
            ("[commands.x]\nprogram = \"true\"", "commands.x.program"),
            (
                "[commands.\"a b\"]\nprogram = \"/bin/true\"",
                "commands.a b",
            ),
        ] {
            let e = parse(&format!("{base}{extra}\n")).unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
        }
        let e = parse(&format!("{base}[identity2]\n")).unwrap_err();
        assert!(e.problem.contains("identity2"), "{e}");
        let e = parse("[gateway]\nhost = \"gw\"\n[identity]\nbundle = \"/b\"\ncert = \"/c\"\n")
            .unwrap_err();
        assert_eq!(e.key, "identity.cert");
    }

    #[test]
    fn a_token_key_needs_a_module_a_token_and_a_pin_source() {
        let base = "[gateway]\nhost = \"gw\"\n[identity]\nbundle = \"/b\"\n[identity.pkcs11]\n";
        let good =
            "module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken = \"dev\"\npin_env = \"PIN\"\n";
        let c = parse(&format!("{base}{good}")).unwrap();
        match c.identity.key {
            KeyStore::Token { spec, label } => {
                assert_eq!(spec.token, "dev");
                assert_eq!(spec.pin, twofold_token::PinSource::Env("PIN".into()));
                assert_eq!(label, DEFAULT_KEY_LABEL);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.identity.cert, Path::new("/b/device.pem"));
        for (text, key, why) in [
            (
                "token = \"dev\"\npin_env = \"PIN\"\n",
                "identity.pkcs11.module",
                "missing",
            ),
            (
                "module = \"libsofthsm2.so\"\ntoken = \"dev\"\npin_env = \"PIN\"\n",
                "identity.pkcs11.module",
                "absolute",
            ),
            (
                "module = \"/m.so\"\npin_env = \"PIN\"\n",
                "identity.pkcs11.token",
                "missing",
            ),
            (
                "module = \"/m.so\"\ntoken = \"dev\"\n",
                "identity.pkcs11.pin_file",
                "never written",
            ),
            (
                "module = \"/m.so\"\ntoken = \"dev\"\npin_env = \"P\"\npin_file = \"/p\"\n",
                "identity.pkcs11.pin_env",
                "not both",
            ),
        ] {
            let e = parse(&format!("{base}{text}")).unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert!(e.problem.contains(why), "{text}: {e}");
        }
        // A PIN in clear is not a key of the file at all, and the error
        // does not repeat it.
        let e = parse(&format!("{base}{good}pin = \"1234\"\n")).unwrap_err();
        assert!(e.problem.contains("unknown field `pin`"), "{e}");
        assert!(e.problem.starts_with("line 9: "), "{e}");
        assert!(!e.problem.contains("1234"), "{e}");
        let e = parse(&format!(
            "[gateway]\nhost = \"gw\"\n[identity]\ncert = \"/c\"\nkey = \"/k\"\nserver_ca = \"/s\"\n[identity.pkcs11]\n{good}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "identity.key");
    }

    #[test]
    fn a_server_crl_url_is_http_and_needs_a_crl_to_start_from() {
        let dir = tempfile::tempdir().unwrap();
        let crl = dir.path().join("server-crl.pem");
        let base = format!(
            "[gateway]\nhost = \"gw\"\n[identity]\ncert = \"/c\"\nkey = \"/k\"\n\
             server_ca = \"/ca\"\nserver_crl = {crl:?}\n"
        );
        let with =
            |url: &str, extra: &str| parse(&format!("{base}server_crl_url = {url:?}\n{extra}"));
        let url = "http://pki.example:8080/server-crl.der";
        let e = with(url, "").unwrap_err();
        assert_eq!(e.key, "identity.server_crl_url");
        assert!(e.problem.contains("does not exist"), "{e}");
        std::fs::write(&crl, "written by provisioning").unwrap();
        let fetch = with(url, "").unwrap().server_crl_fetch.unwrap();
        assert_eq!(fetch.url, url);
        assert_eq!(fetch.every, Duration::from_secs(3600));
        let fetch = with(url, "server_crl_refresh_secs = 60\n")
            .unwrap()
            .server_crl_fetch;
        assert_eq!(fetch.unwrap().every, Duration::from_secs(60));
        for (bad, why) in [
            ("https://pki.example/server-crl.der", "use http://"),
            (
                "ftp://pki.example/server-crl.der",
                "must start with http://",
            ),
            ("http://pki.example/crls/", "does not name a file"),
            ("http://pki.example/a b", "not a URL"),
            ("server-crl.der", "must start with http://"),
        ] {
            let e = with(bad, "").unwrap_err();
            assert_eq!(e.key, "identity.server_crl_url", "{bad}");
            assert!(e.problem.contains(why), "{bad}: {e}");
        }
        let e = with(url, "server_crl_refresh_secs = 0\n").unwrap_err();
        assert_eq!(e.key, "identity.server_crl_refresh_secs");
        let e = parse(&format!("{base}server_crl_refresh_secs = 60\n")).unwrap_err();
        assert_eq!(e.key, "identity.server_crl_refresh_secs");
        assert!(parse(&base).unwrap().server_crl_fetch.is_none());
    }
}
