//! The `subnet.env` file in flannel's format, read by the flannel CNI plugin and
//! `mk-docker-opts.sh`. Formatting and parsing only; writing it atomically is the daemon's job.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::SubnetKey;

/// The contents of `subnet.env`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the IPv4 cluster network.
    pub network: Option<Ipv4Network>,
    /// `FLANNEL_SUBNET`: the first host address of the lease with the lease prefix
    /// (`198.19.1.1/24` for `198.19.1.0/24`).
    pub subnet: Option<Ipv4Network>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Network>,
    /// `FLANNEL_IPV6_SUBNET`: the first host address of the IPv6 lease with its prefix.
    pub ipv6_subnet: Option<Ipv6Network>,
    /// `FLANNEL_MTU`: the overlay MTU.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
}

/// Why a `subnet.env` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// A line is not `NAME=value`, or a value does not parse.
    #[error("subnet.env line {line}: {text:?} is invalid ({why})")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
        /// What was expected.
        why: &'static str,
    },
}

impl SubnetEnv {
    /// The file for a lease: `FLANNEL_SUBNET` is the lease's first host address.
    pub fn for_lease(
        network: Option<Ipv4Network>,
        ipv6_network: Option<Ipv6Network>,
        key: &SubnetKey,
        mtu: u32,
        ipmasq: bool,
    ) -> SubnetEnv {
        SubnetEnv {
            network,
            subnet: key.ipv4().map(|n| {
                let first = Ipv4Addr::from(u32::from(n.network()).wrapping_add(1));
                Ipv4Network::new(first, n.prefix()).unwrap_or(n)
            }),
            ipv6_network,
            ipv6_subnet: key.ipv6().map(|n| {
                let first = Ipv6Addr::from(u128::from(n.network()).wrapping_add(1));
                Ipv6Network::new(first, n.prefix()).unwrap_or(n)
            }),
            mtu,
            ipmasq,
        }
    }

    /// The file's text, in flannel's order.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(n) = self.network {
            let _ = writeln!(s, "FLANNEL_NETWORK={n}");
        }
        if let Some(n) = self.subnet {
            let _ = writeln!(s, "FLANNEL_SUBNET={}/{}", n.ip(), n.prefix());
        }
        if let Some(n) = self.ipv6_network {
            let _ = writeln!(s, "FLANNEL_IPV6_NETWORK={n}");
        }
        if let Some(n) = self.ipv6_subnet {
            let _ = writeln!(s, "FLANNEL_IPV6_SUBNET={}/{}", n.ip(), n.prefix());
        }
        let _ = writeln!(s, "FLANNEL_MTU={}", self.mtu);
        let _ = writeln!(s, "FLANNEL_IPMASQ={}", self.ipmasq);
        s
    }

    /// Reads a `subnet.env` (dotenv style: `NAME=value`, blank lines and `#` comments ignored,
    /// optional quotes). Unknown names are ignored.
    pub fn parse(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let mut env = SubnetEnv {
            network: None,
            subnet: None,
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 0,
            ipmasq: false,
        };
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |why| SubnetEnvError::Line {
                line: i + 1,
                text: raw.to_owned(),
                why,
            };
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| err("expected NAME=value"))?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            match name.trim() {
                "FLANNEL_NETWORK" => {
                    env.network = Some(value.parse().map_err(|_| err("expected an IPv4 CIDR"))?)
                }
                "FLANNEL_SUBNET" => {
                    env.subnet = Some(value.parse().map_err(|_| err("expected an IPv4 CIDR"))?)
                }
                "FLANNEL_IPV6_NETWORK" => {
                    env.ipv6_network =
                        Some(value.parse().map_err(|_| err("expected an IPv6 CIDR"))?)
                }
                "FLANNEL_IPV6_SUBNET" => {
                    env.ipv6_subnet = Some(value.parse().map_err(|_| err("expected an IPv6 CIDR"))?)
                }
                "FLANNEL_MTU" => env.mtu = value.parse().map_err(|_| err("expected a number"))?,
                "FLANNEL_IPMASQ" => {
                    env.ipmasq = value.parse().map_err(|_| err("expected true or false"))?
                }
                _ => {}
            }
        }
        Ok(env)
    }

    /// The previous subnet in a `subnet.env` text: only the `FLANNEL_SUBNET` and
    /// `FLANNEL_IPV6_SUBNET` lines count (flannel also reads only `FLANNEL_SUBNET`, though its
    /// dotenv parser gives up on a line that is not `NAME=value`), so another line linen cannot
    /// read (`FLANNEL_MTU=`, `FLANNEL_IPMASQ=True`, a hand edit) does not lose the subnet.
    pub fn previous_key_in(text: &str) -> Option<SubnetKey> {
        let subnet_lines: String = text
            .lines()
            .filter(|l| {
                let l = l.trim();
                let l = l.strip_prefix("export ").unwrap_or(l);
                l.split_once('=').is_some_and(|(name, _)| {
                    matches!(name.trim(), "FLANNEL_SUBNET" | "FLANNEL_IPV6_SUBNET")
                })
            })
            .map(|l| format!("{l}\n"))
            .collect();
        SubnetEnv::parse(&subnet_lines).ok()?.previous_key()
    }

    /// The lease this file describes (`FLANNEL_SUBNET` taken back to its network address), the
    /// "previous subnet" flannel tries to reuse at start-up.
    pub fn previous_key(&self) -> Option<SubnetKey> {
        let v4 = self
            .subnet
            .and_then(|n| Ipv4Network::new(n.network(), n.prefix()).ok());
        let v6 = self
            .ipv6_subnet
            .and_then(|n| Ipv6Network::new(n.network(), n.prefix()).ok());
        SubnetKey::new(v4, v6)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn renders_flannel_format() {
        let key = SubnetKey::parse("198.19.1.0-24").unwrap();
        let env = SubnetEnv::for_lease(
            Some("198.19.0.0/16".parse().unwrap()),
            None,
            &key,
            1472,
            false,
        );
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.1.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let back = SubnetEnv::parse(&env.render()).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.previous_key(), Some(key));
    }

    #[test]
    fn dual_stack() {
        let key = SubnetKey::parse("198.19.1.0-24&fd00:198:19:1::-64").unwrap();
        let env = SubnetEnv::for_lease(
            Some("198.19.0.0/16".parse().unwrap()),
            Some("fd00:198:19::/48".parse().unwrap()),
            &key,
            1452,
            true,
        );
        let text = env.render();
        assert!(
            text.contains("FLANNEL_IPV6_SUBNET=fd00:198:19:1::1/64\n"),
            "{text}"
        );
        assert!(
            text.contains("FLANNEL_IPV6_NETWORK=fd00:198:19::/48\n"),
            "{text}"
        );
        assert_eq!(SubnetEnv::parse(&text).unwrap().previous_key(), Some(key));
    }

    #[test]
    fn parse_tolerates_dotenv_and_rejects_garbage() {
        let env =
            SubnetEnv::parse("# c\n\nexport FLANNEL_SUBNET=\"10.1.2.1/24\"\nOTHER=x\n").unwrap();
        assert_eq!(env.previous_key().unwrap().to_string(), "10.1.2.0-24");
        let e = SubnetEnv::parse("FLANNEL_SUBNET=10.1.2.300/24\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("10.1.2.300"), "{e}");
        assert!(SubnetEnv::parse("garbage\n").is_err());
    }

    /// As flannel: a line linen cannot read elsewhere in the file does not lose the previous
    /// subnet; a bad subnet line gives none.
    #[test]
    fn the_previous_subnet_survives_other_bad_lines() {
        let text = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.2.1/24\nFLANNEL_MTU=\n\
                    FLANNEL_IPMASQ=True # set by hand\nnot a line\n";
        assert!(SubnetEnv::parse(text).is_err());
        let key = SubnetEnv::previous_key_in(text).unwrap();
        assert_eq!(key.to_string(), "10.1.2.0-24");
        let v6 = "export FLANNEL_IPV6_SUBNET=fd00:19:0:5::1/64\nFLANNEL_SUBNET = 10.1.2.1/24\n";
        assert_eq!(
            SubnetEnv::previous_key_in(v6).unwrap().to_string(),
            "10.1.2.0-24&fd00:19:0:5::-64"
        );
        assert_eq!(SubnetEnv::previous_key_in("FLANNEL_SUBNET=garbage\n"), None);
        assert_eq!(SubnetEnv::previous_key_in(""), None);
    }
}
