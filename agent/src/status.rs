//! `thingsly-agent status`: identity and enrollment from the state directory, module states
//! from the running daemon's `status.json` (if it runs).

use thingsly_core::config::AgentConfig;
use thingsly_core::state_dir::StateDir;
use thingsly_enroll::{cert_info, paths};

pub fn print(cfg: &AgentConfig, json: bool) -> anyhow::Result<()> {
    let dir = StateDir::at(&cfg.device.state_dir);
    let key_present = dir.exists(paths::DEVICE_KEY);
    let cert = dir
        .read(paths::DEVICE_CERT)
        .ok()
        .flatten()
        .and_then(|pem| cert_info(&pem).ok());
    let wg: Option<serde_json::Value> =
        dir.read(paths::WIREGUARD_CONFIG)
            .ok()
            .flatten()
            .and_then(|d| {
                let mut v: serde_json::Value = serde_json::from_slice(&d).ok()?;
                // Never print key material.
                v.as_object_mut()?.remove("private_key");
                Some(v)
            });
    let daemon = thingsly_core::device_state::daemon_status(&cfg.device.runtime_dir);
    let fmt = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let out = serde_json::json!({
        "device_id": cfg.device.id,
        "state_dir": cfg.device.state_dir,
        "identity": {
            "key_present": key_present,
            "enrolled": cert.is_some(),
            "certificate": cert.as_ref().map(|c| serde_json::json!({
                "subject_cn": c.subject_cn,
                "serial": c.serial_hex,
                "not_before": fmt(c.not_before),
                "not_after": fmt(c.not_after),
                "renew_at": fmt(c.renew_at(cfg.enroll.renew_fraction)),
            })),
            "wireguard": wg,
        },
        "daemon": daemon.as_ref().map(|d| serde_json::json!({
            "pid": d["pid"],
            "updated_at": d["updated_at"],
        })),
        "state": daemon.as_ref().map(|d| d["state"].clone()),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("device:      {}", cfg.device.id);
    match &cert {
        Some(c) => println!(
            "enrolled:    yes (serial {}, valid until {}, renews at {})",
            c.serial_hex,
            fmt(c.not_after),
            fmt(c.renew_at(cfg.enroll.renew_fraction))
        ),
        None => println!(
            "enrolled:    no (key {})",
            if key_present {
                "present"
            } else {
                "not yet created"
            }
        ),
    }
    if let Some(w) = &wg {
        println!(
            "tunnel:      {} via {}",
            w["address"].as_str().unwrap_or("?"),
            w["endpoint"].as_str().unwrap_or("?")
        );
    }
    match &daemon {
        None => println!("daemon:      not running"),
        Some(d) => {
            println!(
                "daemon:      running (pid {}, updated {})",
                d["pid"],
                d["updated_at"].as_str().unwrap_or("")
            );
            let s = &d["state"];
            println!(
                "software:    {} slot {} ota {}",
                s["sw_version"].as_str().unwrap_or(""),
                s["rauc_slot"].as_str().unwrap_or("-"),
                s["ota_status"].as_str().unwrap_or("")
            );
            if let Some(mods) = s["modules"].as_object() {
                for (name, m) in mods {
                    let counters = m["counters"]
                        .as_object()
                        .map(|c| {
                            c.iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                        .unwrap_or_default();
                    println!(
                        "  {name:<10} {:<10} {} {counters}",
                        m["state"].as_str().unwrap_or(""),
                        m["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(())
}
