//! Lease values: flannel's `LeaseAttrs` JSON (`{"PublicIP":"198.18.1.1","PublicIPv6":null}`),
//! read as Go's `encoding/json` reads it and written byte-identically.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use serde_json::Value;
use serde_json::value::RawValue;

use super::SubnetKey;
use super::json::InOrder;

/// The value stored under a subnet key.
///
/// Written in flannel's field order: `PublicIP` (always), `PublicIPv6` (always, `null` when
/// unset, as flannel has no `omitempty` on it), then `BackendType`, `BackendData` and
/// `BackendV6Data` only when set. The udp backend writes only the first two.
#[derive(Clone, Debug, Default)]
pub struct LeaseAttrs {
    /// The host's IPv4 underlay address, its identity, and where its datagrams go.
    pub public_ip: Option<Ipv4Addr>,
    /// The host's IPv6 underlay address.
    pub public_ipv6: Option<Ipv6Addr>,
    /// Backend type (flannel's udp backend leaves it empty).
    pub backend_type: Option<String>,
    /// Backend data, kept verbatim so a renewal rewrites it unchanged.
    pub backend_data: Option<Box<RawValue>>,
    /// IPv6 backend data, kept verbatim.
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        fn raw(v: &Option<Box<RawValue>>) -> Option<&str> {
            v.as_deref().map(RawValue::get)
        }
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&self.backend_v6_data) == raw(&other.backend_v6_data)
    }
}

impl Eq for LeaseAttrs {}

/// Why a lease value was rejected.
#[derive(Debug, thiserror::Error)]
pub enum LeaseValueError {
    /// Not a JSON object.
    #[error("lease value is not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
    /// A field has the wrong type or an unparsable address.
    #[error("lease value field {field} is invalid: {value} (expected {expected})")]
    Field {
        /// The field name as flannel spells it.
        field: &'static str,
        /// The offending JSON text.
        value: String,
        /// What would be valid.
        expected: &'static str,
    },
    /// Neither `PublicIP` nor `PublicIPv6` is set.
    #[error("lease value has neither PublicIP nor PublicIPv6; a lease must name its host")]
    NoAddress,
}

/// Public addresses as a table or log line shows them: `198.18.0.1`, `198.18.0.1 fd00::1`,
/// `fd00::1`, or `-` for none.
pub fn addresses_text(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> String {
    match (v4, v6) {
        (Some(a), Some(b)) => format!("{a} {b}"),
        (Some(a), None) => a.to_string(),
        (None, Some(b)) => b.to_string(),
        (None, None) => "-".to_owned(),
    }
}

impl LeaseAttrs {
    /// The public addresses for a log line or a table ([`addresses_text`]).
    pub fn addresses(&self) -> String {
        addresses_text(self.public_ip, self.public_ipv6)
    }

    /// Whether `other` names the same host: a public IPv4 or IPv6 address in common.
    pub fn shares_address(&self, other: &LeaseAttrs) -> bool {
        (self.public_ip.is_some() && self.public_ip == other.public_ip)
            || (self.public_ipv6.is_some() && self.public_ipv6 == other.public_ipv6)
    }

    /// Attributes of an IPv4-underlay host, as the udp backend writes them.
    pub fn with_public_ip(ip: Ipv4Addr) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Some(ip),
            ..LeaseAttrs::default()
        }
    }

    /// Parses a lease value. Keys match case-insensitively and unknown keys are ignored, as
    /// in Go's `encoding/json`; `"0.0.0.0"` and `null` both mean "unset".
    pub fn from_json(text: &str) -> Result<LeaseAttrs, LeaseValueError> {
        // Values stay raw until a field needs them, so BackendData keeps its exact bytes (a
        // parse into `Value` and back would reprint floats differently: found by fuzzing).
        // In the document's order: of two keys for one field, the later wins, as in Go.
        let members: InOrder<Box<RawValue>> = serde_json::from_str(text)?;
        let mut attrs = LeaseAttrs::default();
        for (key, raw_value) in members.0 {
            let lower = key.to_ascii_lowercase();
            if lower == "backenddata" || lower == "backendv6data" {
                let kept = (raw_value.get() != "null").then_some(raw_value);
                if lower == "backenddata" {
                    attrs.backend_data = kept;
                } else {
                    attrs.backend_v6_data = kept;
                }
                continue;
            }
            let value: Value = serde_json::from_str(raw_value.get())?;
            match lower.as_str() {
                "publicip" => attrs.public_ip = parse_addr(value, "PublicIP", "an IPv4 address")?,
                "publicipv6" => {
                    attrs.public_ipv6 = parse_addr(value, "PublicIPv6", "an IPv6 address or null")?
                }
                "backendtype" => {
                    attrs.backend_type = match value {
                        Value::Null => None,
                        Value::String(s) if s.is_empty() => None,
                        Value::String(s) => Some(s),
                        other => return Err(field_err("BackendType", &other, "a string")),
                    }
                }
                _ => {}
            }
        }
        if attrs.public_ip.is_none() && attrs.public_ipv6.is_none() {
            return Err(LeaseValueError::NoAddress);
        }
        Ok(attrs)
    }

    /// The value as flannel writes it, e.g. `{"PublicIP":"198.18.1.1","PublicIPv6":null}`.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push_str("{\"PublicIP\":\"");
        out.push_str(&self.public_ip.unwrap_or(Ipv4Addr::UNSPECIFIED).to_string());
        out.push_str("\",\"PublicIPv6\":");
        match self.public_ipv6 {
            Some(ip) => {
                out.push('"');
                out.push_str(&ip.to_string());
                out.push('"');
            }
            None => out.push_str("null"),
        }
        if let Some(t) = &self.backend_type {
            out.push_str(",\"BackendType\":");
            out.push_str(&Value::String(t.clone()).to_string());
        }
        if let Some(d) = &self.backend_data {
            out.push_str(",\"BackendData\":");
            out.push_str(d.get());
        }
        if let Some(d) = &self.backend_v6_data {
            out.push_str(",\"BackendV6Data\":");
            out.push_str(d.get());
        }
        out.push('}');
        out
    }
}

fn field_err(field: &'static str, value: &Value, expected: &'static str) -> LeaseValueError {
    LeaseValueError::Field {
        field,
        value: value.to_string(),
        expected,
    }
}

fn parse_addr<A: std::str::FromStr + IsUnspecified>(
    value: Value,
    field: &'static str,
    expected: &'static str,
) -> Result<Option<A>, LeaseValueError> {
    match &value {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => match s.parse::<A>() {
            Ok(a) if a.unspecified() => Ok(None),
            Ok(a) => Ok(Some(a)),
            Err(_) => Err(field_err(field, &value, expected)),
        },
        _ => Err(field_err(field, &value, expected)),
    }
}

trait IsUnspecified {
    fn unspecified(&self) -> bool;
}
impl IsUnspecified for Ipv4Addr {
    fn unspecified(&self) -> bool {
        self.is_unspecified()
    }
}
impl IsUnspecified for Ipv6Addr {
    fn unspecified(&self) -> bool {
        self.is_unspecified()
    }
}

/// A subnet lease: which subnet, held by which host, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The leased subnet(s).
    pub key: SubnetKey,
    /// The value stored under the key.
    pub attrs: LeaseAttrs,
    /// When the lease runs out; `None` for a reservation (a key without a TTL).
    pub expiration: Option<SystemTime>,
    /// A registry-specific handle on the TTL holder (the etcd lease ID); `None` for the
    /// directory registry and for reservations.
    pub lease_id: Option<i64>,
}

impl Lease {
    /// Whether this lease is a reservation (no expiry).
    pub fn is_reservation(&self) -> bool {
        self.expiration.is_none()
    }

    /// When the lease expires, for a log line: `in 86400 s`, `expired`, or `never` for a
    /// reservation.
    pub fn expiry(&self) -> String {
        match self.expiration {
            None => "never".to_owned(),
            Some(t) => match t.duration_since(SystemTime::now()) {
                Ok(left) => format!("in {} s", left.as_secs()),
                Err(_) => "expired".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_lease_sharing_an_address_names_the_same_host() {
        let own = LeaseAttrs {
            public_ip: Some(Ipv4Addr::new(198, 18, 9, 2)),
            public_ipv6: Some("fd00:18::2".parse().unwrap()),
            ..LeaseAttrs::default()
        };
        let v4 = |ip: [u8; 4]| LeaseAttrs::with_public_ip(Ipv4Addr::from(ip));
        assert!(v4([198, 18, 9, 2]).shares_address(&own));
        assert!(!v4([198, 18, 9, 1]).shares_address(&own));
        let v6_only = LeaseAttrs {
            public_ipv6: Some("fd00:18::2".parse().unwrap()),
            ..LeaseAttrs::default()
        };
        assert!(v6_only.shares_address(&own));
        // No address in common: an IPv6-only host against another's IPv4-only lease.
        assert!(!v4([198, 18, 9, 1]).shares_address(&v6_only));
        assert!(!LeaseAttrs::default().shares_address(&LeaseAttrs::default()));
    }

    #[test]
    fn addresses_and_expiry_read_as_written() {
        let mut lease = Lease {
            key: "198.19.5.0-24".parse().unwrap(),
            attrs: LeaseAttrs::with_public_ip(Ipv4Addr::new(198, 18, 0, 1)),
            expiration: None,
            lease_id: None,
        };
        assert_eq!(lease.attrs.addresses(), "198.18.0.1");
        assert_eq!(lease.expiry(), "never");
        lease.attrs.public_ipv6 = Some("fd00::1".parse().unwrap());
        assert_eq!(lease.attrs.addresses(), "198.18.0.1 fd00::1");
        lease.attrs.public_ip = None;
        assert_eq!(lease.attrs.addresses(), "fd00::1");
        assert_eq!(LeaseAttrs::default().addresses(), "-");
        lease.expiration = Some(SystemTime::now() + std::time::Duration::from_secs(3600));
        assert!(
            ["in 3599 s", "in 3600 s"].contains(&lease.expiry().as_str()),
            "{}",
            lease.expiry()
        );
        lease.expiration = Some(SystemTime::UNIX_EPOCH);
        assert_eq!(lease.expiry(), "expired");
    }

    #[test]
    fn writes_flannel_udp_value_byte_identically() {
        let attrs = LeaseAttrs::with_public_ip(Ipv4Addr::new(198, 18, 1, 1));
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"198.18.1.1","PublicIPv6":null}"#
        );
    }

    #[test]
    fn round_trips_flannel_values() {
        for text in [
            r#"{"PublicIP":"198.18.1.1","PublicIPv6":null}"#,
            r#"{"PublicIP":"198.18.1.2","PublicIPv6":"fd00::2"}"#,
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:00:00:00:01"}}"#,
        ] {
            let attrs = LeaseAttrs::from_json(text).unwrap();
            assert_eq!(attrs.to_json(), text);
        }
    }

    /// Of two keys naming one field, the later in the document wins, as in flanneld: peers
    /// of both send to the same address.
    #[test]
    fn the_later_of_two_keys_for_one_field_wins() {
        for (text, want) in [
            (
                r#"{"publicip":"198.18.1.9","PublicIP":"198.18.1.1"}"#,
                [198, 18, 1, 1],
            ),
            (
                r#"{"PublicIP":"198.18.1.1","publicip":"198.18.1.9"}"#,
                [198, 18, 1, 9],
            ),
        ] {
            let attrs = LeaseAttrs::from_json(text).unwrap();
            assert_eq!(attrs.public_ip, Some(Ipv4Addr::from(want)), "{text}");
        }
    }

    #[test]
    fn reads_like_go() {
        // Case-insensitive keys, unknown keys ignored, a hand-written value without PublicIPv6.
        let attrs = LeaseAttrs::from_json(r#"{"publicip":"198.18.1.3","BackendType":"udp","X":1}"#)
            .unwrap();
        assert_eq!(attrs.public_ip, Some(Ipv4Addr::new(198, 18, 1, 3)));
        assert_eq!(attrs.public_ipv6, None);
        assert_eq!(attrs.backend_type.as_deref(), Some("udp"));
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"198.18.1.3","PublicIPv6":null,"BackendType":"udp"}"#
        );
        let v6only =
            LeaseAttrs::from_json(r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::1"}"#).unwrap();
        assert_eq!(v6only.public_ip, None);
    }

    #[test]
    fn backend_data_is_kept_byte_for_byte() {
        // Found by fuzzing: a float that a parse-and-print round trip would change.
        let text = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendData":{"x":1.7777777777777782e+55, "y" : [1,2]}}"#;
        let attrs = LeaseAttrs::from_json(text).unwrap();
        assert_eq!(
            attrs.backend_data.as_deref().map(RawValue::get),
            Some(r#"{"x":1.7777777777777782e+55, "y" : [1,2]}"#)
        );
        let again = LeaseAttrs::from_json(&attrs.to_json()).unwrap();
        assert_eq!(again, attrs);
        assert_eq!(again.to_json(), attrs.to_json());
    }

    #[test]
    fn rejects_bad_values() {
        for text in [
            "",
            "null",
            "[]",
            r#"{"PublicIP":"300.1.1.1"}"#,
            r#"{"PublicIP":12}"#,
            r#"{"PublicIP":"fd00::1"}"#,
            r#"{"PublicIP":"198.18.1.1","PublicIPv6":"198.18.1.1"}"#,
            r#"{"PublicIPv6":null}"#,
            r#"{"PublicIP":"198.18.1.1","BackendType":5}"#,
        ] {
            assert!(LeaseAttrs::from_json(text).is_err(), "{text:?}");
        }
        let msg = LeaseAttrs::from_json(r#"{"PublicIP":"300.1.1.1"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("300.1.1.1") && msg.contains("PublicIP"),
            "{msg}"
        );
    }
}
