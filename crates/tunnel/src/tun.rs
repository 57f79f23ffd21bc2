//! The TUN interface, with errors that say what to fix.

use crate::TunnelError;
use ipnet::Ipv4Net;

pub fn open(name: &str, address: Ipv4Net, mtu: u16) -> Result<tun_rs::AsyncDevice, TunnelError> {
    if name.is_empty() || name.len() > 15 {
        return Err(TunnelError::Config(format!(
            "interface name {name:?} must be 1-15 bytes"
        )));
    }
    if let Err(e) = std::fs::metadata("/dev/net/tun") {
        return Err(TunnelError::NoTun(e.to_string()));
    }
    tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(address.addr(), address.prefix_len(), None)
        .mtu(mtu)
        .build_async()
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TunnelError::NoCapability(e.to_string()),
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                TunnelError::NoTun(e.to_string())
            }
            Some(libc::EBUSY) => TunnelError::Io(format!(
                "interface {name} is in use by another process: {e}"
            )),
            _ => TunnelError::Io(format!("creating TUN interface {name}: {e}")),
        })
}
