//! flannel's network config (`<prefix>/config`), read as Go's `encoding/json` reads it (keys
//! case-insensitive, unknown keys ignored) and validated as flannel's `CheckNetworkConfig`
//! validates it, with the same defaults (`flannel-compat.md` §a).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::json::InOrder;

/// flannel's udp backend port.
pub const DEFAULT_PORT: u16 = 8285;

/// The config as written: every field optional, nothing defaulted or checked yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkConfigSpec {
    /// `Network`, host bits already masked off (Go parses it as a CIDR).
    pub network: Option<Ipv4Network>,
    /// `SubnetLen` (0 or absent: default).
    pub subnet_len: Option<u8>,
    /// `SubnetMin`.
    pub subnet_min: Option<Ipv4Addr>,
    /// `SubnetMax` (inclusive: the start of the last subnet).
    pub subnet_max: Option<Ipv4Addr>,
    /// `EnableIPv4` (default true).
    pub enable_ipv4: Option<bool>,
    /// `EnableIPv6` (default false).
    pub enable_ipv6: Option<bool>,
    /// `IPv6Network`.
    pub ipv6_network: Option<Ipv6Network>,
    /// `IPv6SubnetLen`.
    pub ipv6_subnet_len: Option<u8>,
    /// `IPv6SubnetMin`.
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// `IPv6SubnetMax`.
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// `EnableNFTables`.
    pub enable_nftables: Option<bool>,
    /// `Backend.Type`, lower-cased (absent: flannel picks `udp`).
    pub backend_type: Option<String>,
    /// `Backend.Port`.
    pub backend_port: Option<u16>,
    /// `Backend` was given without a `Type` (`{}`, `null`, or `"Type":""`). flannel's code
    /// picks udp only when `Backend` is absent: flanneld refuses these configs ("unknown
    /// backend type"), linen takes udp.
    pub backend_without_type: bool,
}

/// The udp backend's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// UDP port every host listens on and sends to (flannel: 8285).
    pub port: u16,
}

/// A validated network config with flannel's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The IPv4 cluster network, when IPv4 is enabled.
    pub network: Option<Ipv4Network>,
    /// Prefix length of each host's IPv4 subnet.
    pub subnet_len: u8,
    /// Start of the first IPv4 subnet that may be leased.
    pub subnet_min: Ipv4Addr,
    /// Start of the last IPv4 subnet that may be leased (inclusive).
    pub subnet_max: Ipv4Addr,
    /// The IPv6 cluster network, when IPv6 is enabled.
    pub ipv6_network: Option<Ipv6Network>,
    /// Prefix length of each host's IPv6 subnet.
    pub ipv6_subnet_len: u8,
    /// Start of the first IPv6 subnet that may be leased.
    pub ipv6_subnet_min: Ipv6Addr,
    /// Start of the last IPv6 subnet that may be leased (inclusive).
    pub ipv6_subnet_max: Ipv6Addr,
    /// Masquerade rules go to nftables instead of iptables.
    pub enable_nftables: bool,
    /// The udp backend's settings.
    pub backend: BackendConfig,
    /// The spec this was derived from (written back by `linen network init`).
    pub spec: NetworkConfigSpec,
}

/// Why a network config was rejected. Messages quote the value and say what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a JSON object.
    #[error("network config is not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
    /// A field has the wrong JSON type or cannot be parsed.
    #[error("network config field {field} is invalid: {value} (expected {expected})")]
    Field {
        /// Field name as flannel spells it.
        field: &'static str,
        /// The offending JSON text.
        value: String,
        /// What would be valid.
        expected: &'static str,
    },
    /// A semantic rule was broken.
    #[error("network config: {0}")]
    Invalid(String),
}

impl NetworkConfigSpec {
    /// Reads the JSON text of `<prefix>/config`.
    pub fn from_json(text: &str) -> Result<NetworkConfigSpec, ConfigError> {
        // In the document's order: of two keys for one field, the later wins, as in Go.
        let members: InOrder<Box<RawValue>> = serde_json::from_str(text)?;
        let mut spec = NetworkConfigSpec::default();
        for (key, raw) in members.0 {
            let value: Value = serde_json::from_str(raw.get())?;
            let key = key.to_ascii_lowercase();
            // Go: null into a plain uint or bool field changes nothing (an earlier value stays).
            let plain = [
                "subnetlen",
                "ipv6subnetlen",
                "enableipv4",
                "enableipv6",
                "enablenftables",
            ];
            if value.is_null() && plain.contains(&key.as_str()) {
                continue;
            }
            match key.as_str() {
                "network" => {
                    spec.network = parse_str(&value, "Network", "a CIDR such as 198.19.0.0/16")?
                        .map(|s| parse_v4_cidr(s, "Network"))
                        .transpose()?
                }
                "subnetlen" => spec.subnet_len = parse_len(&value, "SubnetLen")?,
                "subnetmin" => spec.subnet_min = parse_ip(&value, "SubnetMin", "an IPv4 address")?,
                "subnetmax" => spec.subnet_max = parse_ip(&value, "SubnetMax", "an IPv4 address")?,
                "enableipv4" => spec.enable_ipv4 = parse_bool(&value, "EnableIPv4")?,
                "enableipv6" => spec.enable_ipv6 = parse_bool(&value, "EnableIPv6")?,
                "enablenftables" => spec.enable_nftables = parse_bool(&value, "EnableNFTables")?,
                "ipv6network" => {
                    spec.ipv6_network =
                        parse_str(&value, "IPv6Network", "a CIDR such as fd00:198:19::/48")?
                            .map(parse_v6_cidr)
                            .transpose()?
                }
                "ipv6subnetlen" => spec.ipv6_subnet_len = parse_len(&value, "IPv6SubnetLen")?,
                "ipv6subnetmin" => {
                    spec.ipv6_subnet_min = parse_ip(&value, "IPv6SubnetMin", "an IPv6 address")?
                }
                "ipv6subnetmax" => {
                    spec.ipv6_subnet_max = parse_ip(&value, "IPv6SubnetMax", "an IPv6 address")?
                }
                "backend" => spec.read_backend(&value, &raw)?,
                _ => {}
            }
        }
        Ok(spec)
    }

    fn read_backend(&mut self, value: &Value, raw: &RawValue) -> Result<(), ConfigError> {
        // flannel keeps Backend as raw JSON, read later: a second Backend (or a null one)
        // replaces the first whole, fields it lacks included.
        self.backend_type = None;
        self.backend_port = None;
        self.backend_without_type = true;
        let members: InOrder<Value> = match value {
            Value::Null => return Ok(()),
            Value::Object(_) => serde_json::from_str(raw.get())?,
            other => {
                return Err(field_err(
                    "Backend",
                    other,
                    "an object such as {\"Type\":\"udp\"}",
                ));
            }
        };
        for (key, value) in &members.0 {
            match key.to_ascii_lowercase().as_str() {
                "type" => {
                    self.backend_type =
                        parse_str(value, "Backend.Type", "a string such as \"udp\"")?
                            .map(str::to_ascii_lowercase)
                }
                "port" => match value {
                    Value::Null => {}
                    Value::Number(n) => match n.as_u64() {
                        Some(0) => {}
                        Some(p) if p <= u64::from(u16::MAX) => self.backend_port = Some(p as u16),
                        _ => return Err(field_err("Backend.Port", value, "a port 1..65535")),
                    },
                    other => return Err(field_err("Backend.Port", other, "a port 1..65535")),
                },
                _ => {}
            }
        }
        self.backend_without_type = self.backend_type.is_none();
        Ok(())
    }

    /// Writes the spec as flannel's JSON: only the fields that are set, flannel's spelling.
    pub fn to_json(&self) -> String {
        let mut map = Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                map.insert(k.to_owned(), v);
            }
        };
        let s = |x: String| Value::String(x);
        put("Network", self.network.map(|n| s(n.to_string())));
        put("SubnetLen", self.subnet_len.map(Value::from));
        put("SubnetMin", self.subnet_min.map(|a| s(a.to_string())));
        put("SubnetMax", self.subnet_max.map(|a| s(a.to_string())));
        put("EnableIPv4", self.enable_ipv4.map(Value::Bool));
        put("EnableIPv6", self.enable_ipv6.map(Value::Bool));
        put("IPv6Network", self.ipv6_network.map(|n| s(n.to_string())));
        put("IPv6SubnetLen", self.ipv6_subnet_len.map(Value::from));
        put(
            "IPv6SubnetMin",
            self.ipv6_subnet_min.map(|a| s(a.to_string())),
        );
        put(
            "IPv6SubnetMax",
            self.ipv6_subnet_max.map(|a| s(a.to_string())),
        );
        put("EnableNFTables", self.enable_nftables.map(Value::Bool));
        let mut backend = Map::new();
        backend.insert(
            "Type".into(),
            s(self.backend_type.clone().unwrap_or_else(|| "udp".into())),
        );
        if let Some(p) = self.backend_port {
            backend.insert("Port".into(), Value::from(p));
        }
        map.insert("Backend".into(), Value::Object(backend));
        // serde_json's map is sorted; flannel does not care about key order.
        Value::Object(map).to_string()
    }

    /// Applies flannel's defaults and checks (`CheckNetworkConfig`, plus SubnetMin ≤ SubnetMax
    /// and the backend type, which flannel checks elsewhere).
    pub fn validate(self) -> Result<NetworkConfig, ConfigError> {
        let enable_ipv4 = self.enable_ipv4.unwrap_or(true);
        let enable_ipv6 = self.enable_ipv6.unwrap_or(false);
        if !enable_ipv4 && !enable_ipv6 {
            return invalid("EnableIPv4 and EnableIPv6 are both false; enable at least one".into());
        }
        let (network, subnet_len, subnet_min, subnet_max) = if enable_ipv4 {
            let Some(net) = self.network else {
                return invalid(
                    "Network is missing: please define a correct Network parameter in the \
                     flannel config, e.g. {\"Network\":\"198.19.0.0/16\"}"
                        .into(),
                );
            };
            let r = check_range(
                &Family::V4,
                u128::from(u32::from(net.network())),
                net.prefix(),
                self.subnet_len,
                // flannel reads "0.0.0.0" as unset: Go's zero value, which any program that
                // marshals flannel's Config struct writes for a field it left alone.
                self.subnet_min
                    .filter(|a| !a.is_unspecified())
                    .map(|a| u128::from(u32::from(a))),
                self.subnet_max
                    .filter(|a| !a.is_unspecified())
                    .map(|a| u128::from(u32::from(a))),
            )?;
            (
                Some(net),
                r.len,
                Ipv4Addr::from(r.min as u32),
                Ipv4Addr::from(r.max as u32),
            )
        } else {
            (None, 0, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
        };
        let (ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) = if enable_ipv6 {
            let Some(net) = self.ipv6_network else {
                return invalid(
                    "EnableIPv6 is true but IPv6Network is missing; add e.g. \
                     \"IPv6Network\":\"fd00:198:19::/48\""
                        .into(),
                );
            };
            let r = check_range(
                &Family::V6,
                u128::from(net.network()),
                net.prefix(),
                self.ipv6_subnet_len,
                self.ipv6_subnet_min.map(u128::from),
                self.ipv6_subnet_max.map(u128::from),
            )?;
            (
                Some(net),
                r.len,
                Ipv6Addr::from(r.min),
                Ipv6Addr::from(r.max),
            )
        } else {
            (None, 0, Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED)
        };
        match self.backend_type.as_deref() {
            None | Some("udp") => {}
            Some(other) => {
                return invalid(format!(
                    "Backend.Type is {other:?}, but linen implements only flannel's \"udp\" \
                     backend; set \"Backend\":{{\"Type\":\"udp\"}}"
                ));
            }
        }
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6_network,
            ipv6_subnet_len,
            ipv6_subnet_min,
            ipv6_subnet_max,
            enable_nftables: self.enable_nftables.unwrap_or(false),
            backend: BackendConfig {
                port: self.backend_port.unwrap_or(DEFAULT_PORT),
            },
            spec: self,
        })
    }
}

impl NetworkConfig {
    /// What a flanneld sharing this config would refuse, for a warning: linen reads it.
    pub fn flanneld_refuses(&self) -> Option<&'static str> {
        self.spec.backend_without_type.then_some(
            "the network config's Backend has no Type: linen takes it as udp, but flanneld \
             refuses it (\"unknown backend type\"), so a flanneld host sharing this network \
             would not start; write \"Backend\":{\"Type\":\"udp\"} (or leave Backend out)",
        )
    }

    /// Parses and validates the JSON text of `<prefix>/config`.
    pub fn from_json(text: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfigSpec::from_json(text)?.validate()
    }

    /// Whether an IPv4 subnet may be leased under this config: inside the network, of length
    /// `SubnetLen`, and its start within `[SubnetMin, SubnetMax]`.
    pub fn is_valid_v4_subnet(&self, subnet: Ipv4Network) -> bool {
        let Some(net) = self.network else {
            return false;
        };
        subnet.prefix() == self.subnet_len
            && net.contains(subnet.network())
            && subnet.network() >= self.subnet_min
            && subnet.network() <= self.subnet_max
    }

    /// Whether `ip` lies in the network (either family).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.network.is_some_and(|n| n.contains(a)),
            IpAddr::V6(a) => self.ipv6_network.is_some_and(|n| n.contains(a)),
        }
    }

    /// Whether `ip` lies in a subnet this config may lease, so that a host could be given it.
    pub fn leases(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                Ipv4Network::new(a, self.subnet_len).is_ok_and(|n| self.is_valid_v4_subnet(n))
            }
            IpAddr::V6(a) => {
                Ipv6Network::new(a, self.ipv6_subnet_len).is_ok_and(|n| self.is_valid_v6_subnet(n))
            }
        }
    }

    /// Whether an IPv6 subnet may be leased under this config.
    pub fn is_valid_v6_subnet(&self, subnet: Ipv6Network) -> bool {
        let Some(net) = self.ipv6_network else {
            return false;
        };
        subnet.prefix() == self.ipv6_subnet_len
            && net.contains(subnet.network())
            && subnet.network() >= self.ipv6_subnet_min
            && subnet.network() <= self.ipv6_subnet_max
    }
}

enum Family {
    V4,
    V6,
}

impl Family {
    /// A network to suggest in messages.
    fn example(&self) -> &'static str {
        match self {
            Family::V4 => "10.244.0.0/16",
            Family::V6 => "fd00:10:244::/48",
        }
    }
}

struct Range {
    len: u8,
    min: u128,
    max: u128,
}

/// flannel's checks for one family, on addresses widened to u128.
fn check_range(
    family: &Family,
    net: u128,
    prefix: u8,
    len: Option<u8>,
    min: Option<u128>,
    max: Option<u128>,
) -> Result<Range, ConfigError> {
    let (bits, name, default_len, max_prefix, max_len) = match family {
        Family::V4 => (32u8, "", 24u8, 28u8, 30u8),
        Family::V6 => (128u8, "IPv6", 64u8, 124u8, 126u8),
    };
    let fmt = |a: u128| match family {
        Family::V4 => Ipv4Addr::from(a as u32).to_string(),
        Family::V6 => Ipv6Addr::from(a).to_string(),
    };
    let len = match len {
        None | Some(0) => {
            if prefix <= default_len - 2 {
                default_len
            } else if prefix <= max_prefix {
                prefix + 2
            } else {
                return invalid(format!(
                    "{name}Network {}/{prefix} is too small. Minimum useful network prefix is /{max_prefix}",
                    fmt(net)
                ));
            }
        }
        Some(l) if l > max_len => {
            return invalid(format!(
                "{name}SubnetLen {l} is too long: {name}SubnetLen must be less than /{}",
                max_len + 1
            ));
        }
        // No SubnetLen fits: say so, rather than suggest one the check above refuses.
        Some(_) if prefix > max_prefix => {
            return invalid(format!(
                "{name}Network {}/{prefix} is too small: it must hold at least four subnets of \
                 at most /{max_len}, so its prefix must be /{max_prefix} or shorter",
                fmt(net)
            ));
        }
        Some(l) if u16::from(l) < u16::from(prefix) + 2 => {
            return invalid(format!(
                "{name}SubnetLen {l} is too short for {name}Network {}/{prefix}: the network must \
                 be able to accommodate at least four subnets, so use at least /{}",
                fmt(net),
                prefix + 2
            ));
        }
        Some(l) => l,
    };
    let host_bits = u32::from(bits - len);
    let size: u128 = 1u128 << host_bits;
    if prefix == 0 {
        return invalid(format!(
            "{name}Network {}/0 is every address: the host's own traffic, the underlay's \
             included, would be routed into the overlay; use a private range such as {}",
            fmt(net),
            family.example()
        ));
    }
    let last = net + ((1u128 << u32::from(bits - prefix)) - 1);
    // Blocks (first, last address) no host can give a subnet of: traffic to them never
    // reaches a TUN device.
    let reserved: &[(u128, u128, &str)] = match family {
        Family::V4 => &[
            (0x0000_0000, 0x00ff_ffff, "0.0.0.0/8 (\"this network\")"),
            (0x7f00_0000, 0x7fff_ffff, "loopback 127.0.0.0/8"),
            (0xe000_0000, 0xefff_ffff, "multicast 224.0.0.0/4"),
        ],
        Family::V6 => &[
            (0, 1, "the unspecified and loopback addresses ::/127"),
            (0xff00_u128 << 112, u128::MAX, "multicast ff00::/8"),
        ],
    };
    if let Some((_, _, what)) = reserved
        .iter()
        .find(|&&(first, end, _)| net <= end && first <= last)
    {
        return invalid(format!(
            "{name}Network {}/{prefix} covers {what}, which cannot be an overlay; use a private \
             range such as {}",
            fmt(net),
            family.example()
        ));
    }
    let check = |a: u128, field: &str| -> Result<u128, ConfigError> {
        if a < net || a > last {
            return invalid(format!(
                "{name}{field} {} is outside {name}Network {}/{prefix}",
                fmt(a),
                fmt(net)
            ));
        }
        if !a.is_multiple_of(size) {
            return invalid(format!(
                "{name}{field} {} is not on a {name}SubnetLen boundary (/{len}); use {}",
                fmt(a),
                fmt(a - a % size)
            ));
        }
        Ok(a)
    };
    let min = match min {
        None => net + size,
        Some(a) => check(a, "SubnetMin")?,
    };
    let max = match max {
        None => last - (size - 1),
        Some(a) => check(a, "SubnetMax")?,
    };
    if min > max {
        return invalid(format!(
            "{name}SubnetMin {} is above {name}SubnetMax {}; no subnet could be leased",
            fmt(min),
            fmt(max)
        ));
    }
    Ok(Range { len, min, max })
}

fn invalid<T>(msg: String) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg))
}

fn field_err(field: &'static str, value: &Value, expected: &'static str) -> ConfigError {
    ConfigError::Field {
        field,
        value: value.to_string(),
        expected,
    }
}

fn parse_str<'a>(
    value: &'a Value,
    field: &'static str,
    expected: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(field_err(field, other, expected)),
    }
}

fn parse_v4_cidr(s: &str, field: &'static str) -> Result<Ipv4Network, ConfigError> {
    let bad = || {
        field_err(
            field,
            &Value::String(s.into()),
            "an IPv4 CIDR such as 198.19.0.0/16",
        )
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv4Network::new(addr, len).map_err(|_| bad())?;
    Ipv4Network::new(net.network(), len).map_err(|_| bad())
}

fn parse_v6_cidr(s: &str) -> Result<Ipv6Network, ConfigError> {
    let bad = || {
        field_err(
            "IPv6Network",
            &Value::String(s.into()),
            "an IPv6 CIDR such as fd00:198:19::/48",
        )
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv6Network::new(addr, len).map_err(|_| bad())?;
    Ipv6Network::new(net.network(), len).map_err(|_| bad())
}

fn parse_ip<A: std::str::FromStr>(
    value: &Value,
    field: &'static str,
    expected: &'static str,
) -> Result<Option<A>, ConfigError> {
    parse_str(value, field, expected)?
        .map(|s| s.parse().map_err(|_| field_err(field, value, expected)))
        .transpose()
}

fn parse_len(value: &Value, field: &'static str) -> Result<Option<u8>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(l) if l <= 128 => Ok(Some(l as u8)),
            _ => Err(field_err(field, value, "a prefix length such as 24")),
        },
        other => Err(field_err(field, other, "a prefix length such as 24")),
    }
}

fn parse_bool(value: &Value, field: &'static str) -> Result<Option<bool>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => Err(field_err(field, other, "true or false")),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn err(text: &str) -> String {
        NetworkConfig::from_json(text).unwrap_err().to_string()
    }

    /// Of two keys naming one field, the later in the document wins, as in flanneld (Go's
    /// encoding/json), whatever their case.
    #[test]
    fn the_later_of_two_keys_for_one_field_wins() {
        let c = NetworkConfig::from_json(
            r#"{"network":"10.1.0.0/16","Network":"10.2.0.0/16",
                "Backend":{"port":9001,"Port":9000,"Type":"udp"}}"#,
        )
        .unwrap();
        assert_eq!(c.network, Some("10.2.0.0/16".parse().unwrap()));
        assert_eq!(c.backend.port, 9000);
        // A second Backend replaces the first whole (flannel keeps it as raw JSON), and null
        // into a length or a switch changes nothing (Go's rule for plain fields).
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.0.0.0/8","Backend":{"Type":"udp","Port":9000},
                "backend":{"Type":"udp"},"SubnetLen":20,"subnetlen":null}"#,
        )
        .unwrap();
        assert_eq!(c.backend.port, 8285);
        assert_eq!(c.subnet_len, 20);
        let c = NetworkConfig::from_json(r#"{"Network":"10.2.0.0/16","network":"10.1.0.0/16"}"#)
            .unwrap();
        assert_eq!(c.network, Some("10.1.0.0/16".parse().unwrap()));
    }

    #[test]
    fn flannel_defaults_lowercase_keys() {
        let c = NetworkConfig::from_json(r#"{"network":"10.3.0.0/16"}"#).unwrap();
        assert_eq!(c.network.unwrap().to_string(), "10.3.0.0/16");
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, v4("10.3.1.0"));
        assert_eq!(c.subnet_max, v4("10.3.255.0"));
        assert_eq!(c.backend.port, 8285);
        assert!(c.ipv6_network.is_none());
    }

    #[test]
    fn flannel_overrides_kept() {
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.8.0","SubnetLen":28}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.subnet_min, v4("10.3.5.0"));
        assert_eq!(c.subnet_max, v4("10.3.8.0"));
    }

    /// flannel takes a zero SubnetMin or SubnetMax for unset (Go's zero value, which a program
    /// marshalling flannel's Config struct writes), not for an address outside the network.
    #[test]
    fn a_zero_subnet_min_or_max_is_unset() {
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.3.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0","SubnetLen":0}"#,
        )
        .unwrap();
        assert_eq!(
            (c.subnet_len, c.subnet_min, c.subnet_max),
            (24, v4("10.3.1.0"), v4("10.3.255.0"))
        );
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.3.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"10.3.8.0"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.subnet_min, c.subnet_max),
            (v4("10.3.1.0"), v4("10.3.8.0"))
        );
        // Any other address outside the network is still refused.
        assert!(err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.4.0.0"}"#).contains("SubnetMin"));
    }

    #[test]
    fn observed_config_range() {
        let c = NetworkConfig::from_json(
            r#"{"Network":"198.19.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.subnet_min, c.subnet_max),
            (v4("198.19.1.0"), v4("198.19.255.0"))
        );
    }

    #[test]
    fn default_subnet_len_by_prefix() {
        let len = |net: &str| {
            NetworkConfig::from_json(&format!(r#"{{"Network":"{net}"}}"#))
                .unwrap()
                .subnet_len
        };
        assert_eq!(len("10.0.0.0/8"), 24);
        assert_eq!(len("10.0.0.0/22"), 24);
        assert_eq!(len("10.0.0.0/23"), 25);
        assert_eq!(len("10.0.0.0/28"), 30);
        assert!(
            err(r#"{"Network":"10.0.0.0/29"}"#).contains("Minimum useful network prefix is /28")
        );
    }

    #[test]
    fn networks_no_host_can_route_are_refused() {
        for (net, why) in [
            ("0.0.0.0/0", "every address"),
            ("0.0.0.0/1", "this network"),
            ("127.0.0.0/8", "loopback"),
            ("96.0.0.0/3", "loopback"),
            ("224.0.0.0/8", "multicast"),
            ("128.0.0.0/1", "multicast"),
            // Inside a block, not only holding its first addresses.
            ("127.5.0.0/16", "loopback"),
            ("239.1.0.0/16", "multicast"),
            ("0.1.0.0/16", "this network"),
        ] {
            let e = err(&format!(r#"{{"Network":"{net}"}}"#));
            assert!(e.contains(why) && e.contains("10.244.0.0/16"), "{net}: {e}");
        }
        for (net, why) in [
            ("::/0", "every address"),
            ("::/64", "loopback"),
            ("ff00::/16", "multicast"),
            ("ff02::/16", "multicast"),
        ] {
            let e = err(&format!(
                r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{net}"}}"#
            ));
            assert!(e.contains(why) && e.contains("IPv6Network"), "{net}: {e}");
        }
        // Next to them, but clear of them.
        for net in ["1.0.0.0/8", "126.0.0.0/8", "128.0.0.0/2", "208.0.0.0/4"] {
            NetworkConfig::from_json(&format!(r#"{{"Network":"{net}"}}"#)).expect(net);
        }
        NetworkConfig::from_json(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"0:0:0:1::/64"}"#,
        )
        .unwrap();
    }

    #[test]
    fn host_bits_masked_and_unknown_keys_ignored() {
        let c = NetworkConfig::from_json(r#"{"NETWORK":"10.3.7.9/16","Whatever":[1,2]}"#).unwrap();
        assert_eq!(c.network.unwrap().to_string(), "10.3.0.0/16");
    }

    #[test]
    fn ipv6_defaults_and_overrides() {
        let c = NetworkConfig::from_json(
            r#"{"EnableIPv4":false,"enableIPv6":true,"IPv6Network":"fc00::/48"}"#,
        )
        .unwrap();
        assert!(c.network.is_none());
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(
            c.ipv6_subnet_min,
            "fc00:0:0:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            c.ipv6_subnet_max,
            "fc00:0:0:ffff::".parse::<Ipv6Addr>().unwrap()
        );
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.3.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":56,"IPv6SubnetMin":"fc00:0:0:200::","IPv6SubnetMax":"fc00:0:0:f000::"}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, 56);
        assert_eq!(
            c.ipv6_subnet_min,
            "fc00:0:0:200::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            c.ipv6_subnet_max,
            "fc00:0:0:f000::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            NetworkConfig::from_json(
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/120"}"#
            )
            .unwrap()
            .ipv6_subnet_len,
            122
        );
    }

    #[test]
    fn validation_errors_quote_the_value() {
        assert!(err(r#"{}"#).contains("please define a correct Network parameter"));
        assert!(err(r#"{"Network":"10.3.0.0/16","SubnetLen":31}"#).contains("less than /31"));
        assert!(
            err(r#"{"Network":"10.3.0.0/16","SubnetLen":17}"#).contains("at least four subnets")
        );
        // A network too small for any SubnetLen is named so, not answered with a length the
        // check above refuses ("use at least /31").
        for (text, want) in [
            (
                r#"{"Network":"10.3.0.0/29","SubnetLen":30}"#,
                "/28 or shorter",
            ),
            (
                r#"{"Network":"10.3.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125","IPv6SubnetLen":126}"#,
                "/124 or shorter",
            ),
        ] {
            let e = err(text);
            assert!(e.contains("too small") && e.contains(want), "{e}");
        }
        let e = err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.7"}"#);
        assert!(
            e.contains("10.3.5.7") && e.contains("boundary") && e.contains("10.3.5.0"),
            "{e}"
        );
        let e = err(r#"{"Network":"10.3.0.0/16","SubnetMax":"10.4.0.0"}"#);
        assert!(e.contains("10.4.0.0") && e.contains("outside"), "{e}");
        let e = err(r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.9.0","SubnetMax":"10.3.8.0"}"#);
        assert!(e.contains("above"), "{e}");
        let e = err(r#"{"Network":"10.3.0.0/33"}"#);
        assert!(e.contains("10.3.0.0/33"), "{e}");
        let e = err(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"VXLAN"}}"#);
        assert!(e.contains("vxlan") && e.contains("udp"), "{e}");
        assert!(err(r#"{"Network":"10.3.0.0/16","Backend":{"Port":70000}}"#).contains("70000"));
        assert!(err(r#"{"Network":"10.3.0.0/16","SubnetLen":"24"}"#).contains("SubnetLen"));
        assert!(err(r#"{"EnableIPv6":true,"EnableIPv4":false}"#).contains("IPv6Network"));
        assert!(err(r#"{"EnableIPv4":false}"#).contains("both false"));
        assert!(err("[1]").contains("not a JSON object"));
    }

    #[test]
    fn backend_type_and_port() {
        let c = NetworkConfig::from_json(
            r#"{"Network":"10.3.0.0/16","backend":{"type":"UDP","port":9999}}"#,
        )
        .unwrap();
        assert_eq!(c.backend.port, 9999);
    }

    /// flannel's code picks udp only when Backend is absent; flanneld refuses a Backend
    /// without a Type, which linen reads as udp and warns about.
    #[test]
    fn a_backend_without_a_type_is_read_as_udp_with_a_warning() {
        for backend in [
            r#""Backend":{}"#,
            r#""Backend":null"#,
            r#""Backend":{"Type":""}"#,
            r#""backend":{"port":9000}"#,
        ] {
            let c = NetworkConfig::from_json(&format!(r#"{{"Network":"10.3.0.0/16",{backend}}}"#))
                .unwrap();
            assert!(c.flanneld_refuses().is_some(), "{backend}");
        }
        for backend in [
            "",
            r#","Backend":{"Type":"udp"}"#,
            r#","Backend":{},"Backend":{"type":"UDP"}"#,
        ] {
            let c = NetworkConfig::from_json(&format!(r#"{{"Network":"10.3.0.0/16"{backend}}}"#))
                .unwrap();
            assert_eq!(c.flanneld_refuses(), None, "{backend}");
        }
    }

    #[test]
    fn spec_json_round_trips() {
        let text = r#"{"Network":"10.3.0.0/16","SubnetLen":26,"EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"udp","Port":8300}}"#;
        let spec = NetworkConfigSpec::from_json(text).unwrap();
        let again = NetworkConfigSpec::from_json(&spec.to_json()).unwrap();
        assert_eq!(spec, again);
        assert_eq!(again.validate().unwrap().subnet_len, 26);
    }

    #[test]
    fn subnet_validity() {
        let c = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let n = |s: &str| s.parse::<Ipv4Network>().unwrap();
        assert!(c.is_valid_v4_subnet(n("198.19.1.0/24")));
        assert!(c.is_valid_v4_subnet(n("198.19.255.0/24")));
        assert!(!c.is_valid_v4_subnet(n("198.19.0.0/24")));
        assert!(!c.is_valid_v4_subnet(n("198.19.1.0/25")));
        assert!(!c.is_valid_v4_subnet(n("198.20.1.0/24")));
    }
}
