//! Which addresses to give clients, per side (external, intranet) and listener.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::Serialize;

use crate::config::{AdvertiseConfig, Config};

/// The route API's address triple. A listener that is not enabled is `""`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Addrs {
    /// `host:port` for TCP clients.
    #[schema(example = "192.0.2.2:5100")]
    pub tcp_addr: String,
    /// `ws://host:port` for WebSocket clients.
    #[schema(example = "ws://192.0.2.2:5200")]
    pub ws_addr: String,
    /// `wss://host:port` for WebSocket Secure clients.
    #[schema(example = "")]
    pub wss_addr: String,
}

/// The client listeners' actual local addresses (port 0 resolved), `None` when disabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    pub tcp: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
}

/// Works out both sides' addresses, and warnings for an external side that would hand
/// clients on other machines an address they cannot reach.
pub fn advertise(config: &Config, bound: &Bound) -> (Addrs, Addrs, Vec<String>) {
    let detected = first_non_loopback();
    let external = side(&config.node.external, bound, detected);
    let intranet = side(&config.node.intranet, bound, detected);

    let mut warnings = Vec::new();
    for (name, addr) in
        [("tcp_addr", &external.tcp_addr), ("ws_addr", &external.ws_addr), ("wss_addr", &external.wss_addr)]
    {
        if let Some(host) = host_of(addr)
            && is_local(host)
        {
            warnings.push(format!(
                "external {name} is {addr}, which clients on other machines cannot reach; \
                 set [node.external] host = \"<public name or IP>\" (or {name}) in the config"
            ));
        }
    }
    (external, intranet, warnings)
}

fn side(cfg: &AdvertiseConfig, bound: &Bound, detected: Option<IpAddr>) -> Addrs {
    let host_for = |bind: SocketAddr| -> String {
        if let Some(h) = &cfg.host {
            return match h.parse::<std::net::Ipv6Addr>() {
                Ok(v6) => format!("[{v6}]"),
                Err(_) => h.clone(),
            };
        }
        let ip =
            if bind.ip().is_unspecified() { detected.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)) } else { bind.ip() };
        match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        }
    };
    let pick = |over: &Option<String>, bind: Option<SocketAddr>, scheme: &str| -> String {
        match (over, bind) {
            (_, None) => String::new(),
            (Some(addr), Some(_)) => addr.clone(),
            (None, Some(b)) => format!("{scheme}{}:{}", host_for(b), b.port()),
        }
    };
    Addrs {
        tcp_addr: pick(&cfg.tcp_addr, bound.tcp, ""),
        ws_addr: pick(&cfg.ws_addr, bound.ws, "ws://"),
        wss_addr: pick(&cfg.wss_addr, bound.wss, "wss://"),
    }
}

/// The host part of `host:port` or `scheme://host[:port][/path]`.
fn host_of(addr: &str) -> Option<&str> {
    if addr.is_empty() {
        return None;
    }
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h))
}

fn is_local(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// The first IPv4 address of a non-loopback interface, else the first IPv6 one.
fn first_non_loopback() -> Option<IpAddr> {
    let ifaces = if_addrs::get_if_addrs().ok()?;
    let candidates = ifaces.iter().filter(|i| !i.is_loopback()).map(|i| i.ip());
    let all: Vec<IpAddr> = candidates.collect();
    all.iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| all.iter().find(|ip| matches!(ip, IpAddr::V6(v6) if !v6.is_unicast_link_local())))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        format!("[apps.a]\nsecret = \"0123456789abcdef\"\n{extra}").parse().unwrap()
    }

    fn bound(ip: [u8; 4]) -> Bound {
        Bound { tcp: Some((ip, 5100).into()), ws: Some((ip, 5200).into()), wss: None }
    }

    #[test]
    fn loopback_bind_is_advertised_with_warning() {
        let (ext, int, warnings) = advertise(&cfg(""), &bound([127, 0, 0, 1]));
        assert_eq!(ext.tcp_addr, "127.0.0.1:5100");
        assert_eq!(ext.ws_addr, "ws://127.0.0.1:5200");
        assert_eq!(ext.wss_addr, "", "disabled listener is empty");
        assert_eq!(int, ext);
        assert_eq!(warnings.len(), 2);
        assert!(warnings[0].contains("[node.external] host"), "{warnings:?}");
    }

    #[test]
    fn configured_host_and_overrides_win() {
        let c = cfg(
            "[node.external]\nhost = \"im.example.com\"\nws_addr = \"ws://lb.example.com\"\n[node.intranet]\nhost = \"10.0.0.5\"\n",
        );
        let (ext, int, warnings) = advertise(&c, &bound([0, 0, 0, 0]));
        assert_eq!(ext.tcp_addr, "im.example.com:5100");
        assert_eq!(ext.ws_addr, "ws://lb.example.com");
        assert_eq!(int.ws_addr, "ws://10.0.0.5:5200");
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn ipv6_host_is_bracketed() {
        let c = cfg("[node.external]\nhost = \"2001:db8::1\"\n");
        let (ext, _, _) = advertise(&c, &bound([0, 0, 0, 0]));
        assert_eq!(ext.ws_addr, "ws://[2001:db8::1]:5200");
        assert_eq!(ext.tcp_addr, "[2001:db8::1]:5100");
    }

    #[test]
    fn host_parsing() {
        assert_eq!(host_of("wss://im.example.com/ws"), Some("im.example.com"));
        assert_eq!(host_of("ws://[::1]:5200"), Some("::1"));
        assert_eq!(host_of("127.0.0.1:5100"), Some("127.0.0.1"));
        assert_eq!(host_of(""), None);
        assert!(is_local("0.0.0.0") && is_local("::1") && is_local("LOCALHOST") && !is_local("10.1.2.3"));
    }
}
