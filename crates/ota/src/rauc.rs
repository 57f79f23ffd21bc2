//! RAUC's `de.pengutronix.rauc.Installer` on the system bus (zbus). Only calls that RAUC 1.8
//! (Debian bookworm) already has are used, with no optional `InstallBundle` arguments, so
//! every RAUC since works; newer properties are read only where their absence is harmless.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use zbus::zvariant::OwnedValue;

/// An image of a bundle that RAUC may install adaptively (fetching only changed blocks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdaptiveImage {
    pub slot_class: String,
    /// The image's size in bytes.
    pub size: u64,
    /// `block-hash-index`, ...
    pub methods: Vec<String>,
}

/// A dictionary value without the variant layers around it: RAUC builds `InspectBundle`'s
/// answer with `g_variant_dict_insert(…, "v", x)`, which wraps `x` in one more variant than
/// the `a{sv}` entry already is.
fn unwrap_variant(v: &OwnedValue) -> Result<zbus::zvariant::Value<'static>, String> {
    let mut v: zbus::zvariant::Value<'static> = v
        .try_clone()
        .map_err(|e| format!("InspectBundle value: {e}"))?
        .into();
    while let zbus::zvariant::Value::Value(inner) = v {
        v = *inner;
    }
    Ok(v)
}

/// What the update engine needs from RAUC: [`Rauc`] on the system bus, or a fake in tests.
/// Errors are RAUC's words (or the bus's), for the log and the report.
pub trait Installer: Send + Sync {
    /// `BootSlot`: the boot name of the slot running now (`A`).
    fn boot_slot(&self) -> impl Future<Output = Result<String, String>> + Send;
    /// `Operation`: `idle` or `installing`.
    fn operation(&self) -> impl Future<Output = Result<String, String>> + Send;
    /// `LastError`: why the last install failed (empty after a success).
    fn last_error(&self) -> impl Future<Output = Result<String, String>> + Send;
    /// `GetSlotStatus`, sorted by slot name.
    fn slots(&self) -> impl Future<Output = Result<Vec<Slot>, String>> + Send;
    /// `GetPrimary`: the primary slot's name (`rootfs.1`).
    fn primary(&self) -> impl Future<Output = Result<String, String>> + Send;
    /// `Mark(state, slot)`: state `good`/`bad`/`active`, slot `booted`/`other`/a name.
    fn mark(&self, state: &str, slot: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Whether this RAUC streams bundles from a URL with the TLS and header options applied.
    fn streams_with_tls_options(&self) -> impl Future<Output = bool> + Send;
    /// The bundle's images that declare an adaptive method (manifest `adaptive=`), with
    /// their sizes: `InspectBundle`'s `images` (RAUC ≥ 1.9). Empty where RAUC cannot say.
    fn adaptive_images(
        &self,
        bundle: &str,
    ) -> impl Future<Output = Result<Vec<AdaptiveImage>, String>> + Send;
    /// Install `bundle` (an absolute path or a URL); `progress(percent, message)` as RAUC
    /// reports it; the result is RAUC's `Completed`, with `LastError` on failure.
    fn install(
        &self,
        bundle: &str,
        args: InstallArgs,
        progress: impl FnMut(i32, &str) + Send,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Wait (bounded) until RAUC is not installing: after an agent restart an install it
    /// started may still be running in RAUC.
    fn wait_idle(&self, limit: Duration) -> impl Future<Output = Result<(), String>> + Send {
        async move {
            let deadline = tokio::time::Instant::now() + limit;
            while self.operation().await? != "idle" {
                if tokio::time::Instant::now() > deadline {
                    return Err(format!("RAUC still installing after {limit:?}"));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(())
        }
    }

    /// Boot name of a slot name (`rootfs.1` → `B`).
    fn bootname_of(&self, slot: &str) -> impl Future<Output = Result<String, String>> + Send {
        async move {
            self.slots()
                .await?
                .into_iter()
                .find(|s| s.name == slot)
                .map(|s| s.bootname)
                .ok_or_else(|| format!("RAUC has no slot {slot}"))
        }
    }
}

/// `InstallBundle`'s optional arguments, for a bundle RAUC fetches itself (RAUC ≥ 1.9). None
/// for a local path, so every RAUC since 1.8 takes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstallArgs {
    /// `tls-ca`: the CA file RAUC verifies the server with.
    pub tls_ca: Option<String>,
    /// `tls-cert` and `tls-key`: the client certificate and key files (mTLS).
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// `http-headers`: e.g. `Authorization: TargetToken …`.
    pub http_headers: Vec<String>,
}

impl InstallArgs {
    fn to_dbus(&self) -> HashMap<&'static str, zbus::zvariant::Value<'static>> {
        use zbus::zvariant::Value;
        let mut args = HashMap::new();
        for (key, v) in [
            ("tls-ca", &self.tls_ca),
            ("tls-cert", &self.tls_cert),
            ("tls-key", &self.tls_key),
        ] {
            if let Some(v) = v {
                args.insert(key, Value::from(v.clone()));
            }
        }
        if !self.http_headers.is_empty() {
            args.insert("http-headers", Value::from(self.http_headers.clone()));
        }
        args
    }
}

const DEST: &str = "de.pengutronix.rauc";
const IFACE: &str = "de.pengutronix.rauc.Installer";

pub struct Rauc {
    conn: zbus::Connection,
    installer: zbus::Proxy<'static>,
}

/// One slot from `GetSlotStatus`, the keys the agent uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slot {
    pub name: String,
    pub bootname: String,
    pub state: String,
    pub boot_status: String,
    pub status: String,
    pub bundle_version: String,
    pub installed_timestamp: String,
}

fn e(err: impl std::fmt::Display) -> String {
    err.to_string()
}

impl Rauc {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
    pub async fn connect() -> Result<Self, String> {
        let conn = zbus::Connection::system()
            .await
            .map_err(|x| format!("system D-Bus: {x}"))?;
        let installer = zbus::proxy::Builder::new(&conn)
            .destination(DEST)
            .map_err(e)?
            .path("/")
            .map_err(e)?
            .interface(IFACE)
            .map_err(e)?
            // Read properties fresh: LastError must be the value after *this* install.
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(e)?;
        Ok(Self { conn, installer })
    }

    pub async fn compatible(&self) -> Result<String, String> {
        self.prop("Compatible").await
    }

    /// A bundle's compatible and version. `Info` is RAUC 1.8's (deprecated since, still
    /// there); `InspectBundle` (1.9+) is asked when it is gone.
    pub async fn info(&self, bundle: &str) -> Result<(String, String), String> {
        let r: Result<(String, String), zbus::Error> =
            self.installer.call("Info", &(bundle,)).await;
        match r {
            Ok(v) => Ok(v),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
            {
                let args: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::new();
                let info: HashMap<String, OwnedValue> = self
                    .installer
                    .call("InspectBundle", &(bundle, args))
                    .await
                    .map_err(|x| format!("RAUC cannot read {bundle}: {x}"))?;
                let update = info
                    .get("update")
                    .and_then(|v| unwrap_variant(v).ok())
                    .and_then(|v| HashMap::<String, OwnedValue>::try_from(v).ok())
                    .unwrap_or_default();
                let text = |k: &str| {
                    update
                        .get(k)
                        .and_then(|v| String::try_from(v.clone()).ok())
                        .unwrap_or_default()
                };
                Ok((text("compatible"), text("version")))
            }
            Err(x) => Err(format!("RAUC cannot read {bundle}: {x}")),
        }
    }

    async fn prop(&self, name: &str) -> Result<String, String> {
        self.installer
            .get_property::<String>(name)
            .await
            .map_err(|x| format!("RAUC {name}: {x}"))
    }
}

impl Installer for Rauc {
    async fn boot_slot(&self) -> Result<String, String> {
        self.prop("BootSlot").await
    }
    async fn operation(&self) -> Result<String, String> {
        self.prop("Operation").await
    }
    async fn last_error(&self) -> Result<String, String> {
        self.prop("LastError").await
    }

    async fn slots(&self) -> Result<Vec<Slot>, String> {
        let raw: Vec<(String, HashMap<String, OwnedValue>)> = self
            .installer
            .call("GetSlotStatus", &())
            .await
            .map_err(|x| format!("RAUC GetSlotStatus: {x}"))?;
        let text = |m: &HashMap<String, OwnedValue>, k: &str| {
            m.get(k)
                .and_then(|v| String::try_from(v.clone()).ok())
                .unwrap_or_default()
        };
        let mut slots: Vec<Slot> = raw
            .into_iter()
            .map(|(name, m)| Slot {
                bootname: text(&m, "bootname"),
                state: text(&m, "state"),
                boot_status: text(&m, "boot-status"),
                status: text(&m, "status"),
                bundle_version: text(&m, "bundle.version"),
                installed_timestamp: text(&m, "installed.timestamp"),
                name,
            })
            .collect();
        // RAUC returns hash-table order.
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(slots)
    }

    async fn primary(&self) -> Result<String, String> {
        self.installer
            .call("GetPrimary", &())
            .await
            .map_err(|x| format!("RAUC GetPrimary: {x}"))
    }

    async fn mark(&self, state: &str, slot: &str) -> Result<(), String> {
        let _: (String, String) = self
            .installer
            .call("Mark", &(state, slot))
            .await
            .map_err(|x| format!("RAUC Mark {state} {slot}: {x}"))?;
        Ok(())
    }

    /// RAUC 1.8 (no `InspectBundle`, added in 1.9 together with working `tls-*` options in the
    /// streaming code) downloads without them, which fails against a private CA.
    async fn streams_with_tls_options(&self) -> bool {
        let args: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::new();
        let r: Result<HashMap<String, OwnedValue>, zbus::Error> =
            self.installer.call("InspectBundle", &("", args)).await;
        match r {
            Ok(_) => true,
            Err(zbus::Error::MethodError(name, _, _)) => {
                name.as_str() != "org.freedesktop.DBus.Error.UnknownMethod"
            }
            Err(_) => false,
        }
    }

    async fn adaptive_images(&self, bundle: &str) -> Result<Vec<AdaptiveImage>, String> {
        let args: HashMap<&str, zbus::zvariant::Value<'_>> = HashMap::new();
        let info: HashMap<String, OwnedValue> = self
            .installer
            .call("InspectBundle", &(bundle, args))
            .await
            .map_err(|x| format!("RAUC InspectBundle: {x}"))?;
        let Some(images) = info.get("images") else {
            return Ok(Vec::new());
        };
        let images: Vec<HashMap<String, OwnedValue>> = Vec::try_from(unwrap_variant(images)?)
            .map_err(|e| format!("InspectBundle images: {e}"))?;
        Ok(images
            .into_iter()
            .filter_map(|img| {
                let methods: Vec<String> = img
                    .get("adaptive")
                    .and_then(|v| Vec::<String>::try_from(v.clone()).ok())
                    .unwrap_or_default();
                (!methods.is_empty()).then(|| AdaptiveImage {
                    slot_class: img
                        .get("slot-class")
                        .and_then(|v| String::try_from(v.clone()).ok())
                        .unwrap_or_default(),
                    size: img
                        .get("size")
                        .and_then(|v| u64::try_from(v.clone()).ok())
                        .unwrap_or_default(),
                    methods,
                })
            })
            .collect())
    }

    /// `progress` follows the `Progress` property.
    async fn install(
        &self,
        bundle: &str,
        args: InstallArgs,
        mut progress: impl FnMut(i32, &str) + Send,
    ) -> Result<(), String> {
        use futures_util::StreamExt;
        let args = args.to_dbus();
        // Subscribe before calling: a quick failure completes before the reply is read.
        let mut completed = self
            .installer
            .receive_signal("Completed")
            .await
            .map_err(e)?;
        let props = zbus::Proxy::new(&self.conn, DEST, "/", "org.freedesktop.DBus.Properties")
            .await
            .map_err(e)?;
        let mut changes = props.receive_signal("PropertiesChanged").await.map_err(e)?;
        let _: () = self
            .installer
            .call("InstallBundle", &(bundle, args))
            .await
            .map_err(|x| format!("RAUC refused the install: {x}"))?;
        loop {
            tokio::select! {
                msg = completed.next() => {
                    let Some(msg) = msg else { return Err("RAUC left the bus during the install".into()) };
                    let code: i32 = msg.body().deserialize().map_err(e)?;
                    if code == 0 {
                        return Ok(());
                    }
                    let why = self.last_error().await.unwrap_or_default();
                    return Err(if why.is_empty() { format!("RAUC install failed (code {code})") } else { why });
                }
                Some(msg) = changes.next() => {
                    let body = msg.body();
                    let Ok((iface, changed, _)) = body.deserialize::<(String, HashMap<String, OwnedValue>, Vec<String>)>() else { continue };
                    if iface != IFACE { continue; }
                    if let Some(v) = changed.get("Progress")
                        && let Ok((pct, text, _depth)) = <(i32, String, i32)>::try_from(v.clone())
                    {
                        progress(pct, &text);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use zbus::zvariant::Value;

    #[test]
    fn inspectbundle_images_are_read_through_their_extra_variant() {
        let mut img: HashMap<String, Value<'static>> = HashMap::new();
        img.insert("slot-class".into(), Value::from("rootfs"));
        img.insert("size".into(), Value::from(4096u64));
        img.insert(
            "adaptive".into(),
            Value::from(vec!["block-hash-index".to_string()]),
        );
        // As RAUC sends it: a{sv} whose "images" value is a variant holding aa{sv}.
        let images = Value::Value(Box::new(Value::from(vec![img])));
        let owned = OwnedValue::try_from(images).unwrap();
        let list: Vec<HashMap<String, OwnedValue>> =
            Vec::try_from(unwrap_variant(&owned).unwrap()).unwrap();
        assert_eq!(list.len(), 1);
        let methods: Vec<String> = Vec::try_from(list[0]["adaptive"].try_clone().unwrap()).unwrap();
        assert_eq!(methods, ["block-hash-index"]);
        assert_eq!(
            u64::try_from(list[0]["size"].try_clone().unwrap()).unwrap(),
            4096
        );
    }
}
