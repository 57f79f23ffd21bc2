//! The enrollment CA: a root and an issuing CA (created by `init`, or imported PEMs), the
//! bridge's own server certificate, and the profile every device certificate is signed with.
//! Device certificates are built from our profile alone: nothing the CSR asks for is copied.

use anyhow::{Context, bail};
use rand_core::{OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use time::OffsetDateTime;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Issuing CA then root, PEM: what devices get as `ca_chain_pem`.
    pub chain_pem: String,
    pub root_pem: String,
}

/// Where `init` puts the CA material inside the data directory.
pub struct CaPaths {
    pub dir: PathBuf,
}

impl CaPaths {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("ca"),
        }
    }
    pub fn root_crt(&self) -> PathBuf {
        self.dir.join("root.crt")
    }
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("root.key")
    }
    pub fn issuing_crt(&self) -> PathBuf {
        self.dir.join("issuing.crt")
    }
    pub fn issuing_key(&self) -> PathBuf {
        self.dir.join("issuing.key")
    }
    pub fn chain(&self) -> PathBuf {
        self.dir.join("chain.pem")
    }
    pub fn server_crt(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
}

pub fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    thingsly_core::state_dir::write_atomic(path, data, mode)
        .with_context(|| format!("writing {}", path.display()))
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f; // positive INTEGER
    b[0] |= 0x01; // and no leading zero byte, so the hex form is stable
    SerialNumber::from_slice(&b)
}

fn ca_params(cn: &str, years: i64, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Thingsly Edge");
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(365 * years);
    p.serial_number = Some(random_serial());
    p
}

/// Options of `thingsly-bridge init`.
#[derive(Default)]
pub struct InitOptions {
    /// Root certificate, and its key unless the root stays offline (then the issuing CA
    /// must be imported too).
    pub import_root: Option<(PathBuf, Option<PathBuf>)>,
    pub import_issuing: Option<(PathBuf, PathBuf)>,
    pub force: bool,
}

/// Create or import the root and issuing CA and issue the server certificate.
pub fn init(data_dir: &Path, server_names: &[String], opts: &InitOptions) -> anyhow::Result<()> {
    let paths = CaPaths::new(data_dir);
    if paths.issuing_crt().exists() && !opts.force {
        bail!(
            "{} already holds a CA; refusing to replace it (use --force to start a new PKI)",
            paths.dir.display()
        );
    }
    fs::create_dir_all(&paths.dir)?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700))?;

    let (root_pem, root_issuer) = match &opts.import_root {
        Some((crt, None)) => {
            if opts.import_issuing.is_none() {
                bail!(
                    "--import-root-cert without --import-root-key needs --import-issuing-cert/--import-issuing-key (an offline root signs nothing here)"
                );
            }
            let crt_pem = fs::read_to_string(crt).with_context(|| format!("{}", crt.display()))?;
            (crt_pem, None)
        }
        Some((crt, Some(key))) => {
            let crt_pem = fs::read_to_string(crt).with_context(|| format!("{}", crt.display()))?;
            let key_pem = fs::read_to_string(key).with_context(|| format!("{}", key.display()))?;
            let kp = KeyPair::from_pem(&key_pem).context("root key")?;
            let issuer = Issuer::from_ca_cert_pem(&crt_pem, kp).context("root certificate")?;
            write_file(&paths.root_key(), key_pem.as_bytes(), 0o600)?;
            (crt_pem, Some(issuer))
        }
        None if opts.import_issuing.is_some() => {
            bail!("--import-issuing needs --import-root (the chain must end at the root)")
        }
        None => {
            let kp = KeyPair::generate().context("root key")?;
            let params = ca_params("Thingsly Edge Root CA", 20, Some(1));
            let cert = params.self_signed(&kp)?;
            write_file(&paths.root_key(), kp.serialize_pem().as_bytes(), 0o600)?;
            (cert.pem(), Some(Issuer::new(params, kp)))
        }
    };
    write_file(&paths.root_crt(), root_pem.as_bytes(), 0o644)?;

    let issuing_pem = match &opts.import_issuing {
        Some((crt, key)) => {
            let crt_pem = fs::read_to_string(crt).with_context(|| format!("{}", crt.display()))?;
            let key_pem = fs::read_to_string(key).with_context(|| format!("{}", key.display()))?;
            KeyPair::from_pem(&key_pem).context("issuing key")?;
            write_file(&paths.issuing_key(), key_pem.as_bytes(), 0o600)?;
            crt_pem
        }
        None => {
            let root = root_issuer.context("no root key to sign the issuing CA")?;
            let kp = KeyPair::generate()?;
            let params = ca_params("Thingsly Edge Device Issuing CA", 10, Some(0));
            let cert = params.signed_by(&kp, &root)?;
            write_file(&paths.issuing_key(), kp.serialize_pem().as_bytes(), 0o600)?;
            cert.pem()
        }
    };
    write_file(&paths.issuing_crt(), issuing_pem.as_bytes(), 0o644)?;
    write_file(
        &paths.chain(),
        format!("{issuing_pem}{root_pem}").as_bytes(),
        0o644,
    )?;
    let ca = Ca::load(data_dir)?;
    let (crt, key) = ca.issue_server(server_names, Duration::from_secs(825 * 24 * 3600))?;
    write_file(
        &paths.server_crt(),
        format!("{crt}{}", ca.chain_pem).as_bytes(),
        0o644,
    )?;
    write_file(&paths.server_key(), key.as_bytes(), 0o600)?;
    // An empty CRL from the start, so a broker configured with `crlfile` can start before
    // the bridge serves (which rewrites it with every revocation and renewal).
    let crl = ca.crl_pem(&[], 0, crate::api::CRL_VALIDITY)?;
    write_file(&data_dir.join("crl.pem"), crl.as_bytes(), 0o644)?;
    Ok(())
}

/// A signed device certificate.
pub struct Issued {
    pub pem: String,
    pub serial_hex: String,
    pub not_after: OffsetDateTime,
}

impl Ca {
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let paths = CaPaths::new(data_dir);
        let read = |p: PathBuf| {
            fs::read_to_string(&p)
                .with_context(|| format!("{} (run `thingsly-bridge init` first)", p.display()))
        };
        let issuing_pem = read(paths.issuing_crt())?;
        let key = KeyPair::from_pem(&read(paths.issuing_key())?).context("issuing key")?;
        let issuer = Issuer::from_ca_cert_pem(&issuing_pem, key).context("issuing certificate")?;
        let root_pem = read(paths.root_crt())?;
        Ok(Self {
            issuer,
            chain_pem: format!("{issuing_pem}{root_pem}"),
            root_pem,
        })
    }

    /// A client certificate for `cn` with the key in `spki_der`: digitalSignature, clientAuth,
    /// not a CA, our lifetime. The CSR's own extensions are ignored on purpose.
    pub fn sign_device(
        &self,
        cn: &str,
        spki_der: &[u8],
        lifetime: Duration,
    ) -> anyhow::Result<Issued> {
        let now = OffsetDateTime::now_utc();
        // A little backdating tolerates device clocks that are slightly behind; bounded by a
        // tenth of the lifetime so short-lived certificates still renew at the intended point.
        let backdate = Duration::from_secs(60).min(lifetime / 10);
        self.sign_device_with_validity(
            cn,
            spki_der,
            now - time::Duration::try_from(backdate)?,
            now + time::Duration::try_from(lifetime)?,
        )
    }

    /// A CRL of the issuing CA listing `revoked` (serial hex, revocation time): what the
    /// broker's `crlfile` reads. `crl_number` must grow with every new list (RFC 5280 §5.2.3).
    pub fn crl_pem(
        &self,
        revoked: &[(String, OffsetDateTime)],
        crl_number: u64,
        next_update: Duration,
    ) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&hex::decode(serial)?),
                    revocation_time: *at,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::try_from(next_update)?,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// The device profile with explicit validity (tests use it for expired certificates).
    pub fn sign_device_with_validity(
        &self,
        cn: &str,
        spki_der: &[u8],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Issued> {
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(spki_der).context("CSR public key")?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let serial = random_serial();
        let serial_hex = hex::encode(serial.as_ref());
        p.serial_number = Some(serial);
        let cert = p.signed_by(&public_key, &self.issuer)?;
        Ok(Issued {
            pem: cert.pem(),
            serial_hex,
            not_after,
        })
    }

    /// A TLS server certificate (for the bridge itself, or a broker in tests and local runs).
    /// Returns (certificate PEM, PKCS#8 key PEM).
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> anyhow::Result<(String, String)> {
        let kp = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(
            DnType::CommonName,
            names
                .first()
                .map(String::as_str)
                .unwrap_or("thingsly-bridge"),
        );
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::try_from(lifetime)?;
        p.serial_number = Some(random_serial());
        let cert = p.signed_by(&kp, &self.issuer)?;
        Ok((cert.pem(), kp.serialize_pem()))
    }
}
