//! flanneld's command line, so a flanneld unit file or environment file can start `linen run`
//! unchanged for the flags both have:
//!
//! - Go's flag syntax: `-etcd-endpoints=…` and `-ip-masq` are read as `--etcd-endpoints=…` and
//!   `--ip-masq` (clap takes only the double dash);
//! - `FLANNELD_<NAME>` environment variables (upper case, `-` as `_`) for [`FLANNEL_FLAGS`],
//!   after the command line and the `LINEN_<NAME>` variable: a value from the command line wins,
//!   then `LINEN_*`, then `FLANNELD_*`, then the default.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};

use clap::Command;

/// The `linen run` flags that flanneld has under the same name and meaning.
pub const FLANNEL_FLAGS: &[&str] = &[
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "iface",
    "iface-regex",
    "iface-can-reach",
    "public-ip",
    "public-ipv6",
    "subnet-file",
    "subnet-lease-renew-margin",
    "ip-masq",
    "ip-masq-fully-random-disable",
    "iptables-resync",
    "iptables-forward-rules",
    "healthz-ip",
    "healthz-port",
];

/// The environment variable `prefix` + `name` in flannel's spelling: `FLANNELD_` and
/// `etcd-endpoints` give `FLANNELD_ETCD_ENDPOINTS`.
pub fn env_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// Points each of [`FLANNEL_FLAGS`] of `run` at its `FLANNELD_*` variable when `lookup` finds
/// that variable and not the flag's `LINEN_*` one (the command line still wins: clap reads an
/// argument's variable only when the flag is absent).
pub fn flanneld_env(cmd: Command, lookup: impl Fn(&str) -> Option<OsString>) -> Command {
    cmd.mut_subcommand("run", |mut run| {
        for name in FLANNEL_FLAGS {
            let flannel = env_name("FLANNELD_", name);
            if lookup(&env_name("LINEN_", name)).is_none() && lookup(&flannel).is_some() {
                run = run.mut_arg(name.replace('-', "_"), |a| a.env(flannel));
            }
        }
        run
    })
}

/// Rewrites Go-style single-dash long flags in `args` (the program name first) to clap's double
/// dash: `-name` and `-name=value`, where `name` is a long flag somewhere in `cmd`. Nothing else
/// changes: short flags (`-h`), negative numbers, words after `--`, and the word after a flag
/// that needs a value (`--iface-regex -foo` keeps its pattern).
pub fn double_dash(args: Vec<OsString>, cmd: &Command) -> Vec<OsString> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut takes_value = HashMap::new();
    collect_long(&cmd, &mut takes_value);
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    out.extend(iter.next());
    let mut value_next = false;
    while let Some(arg) = iter.next() {
        if std::mem::take(&mut value_next) {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            out.push(arg);
            out.extend(iter);
            break;
        }
        let text = arg.to_str().unwrap_or("");
        let long = text
            .strip_prefix("--")
            .or_else(|| text.strip_prefix('-').filter(|rest| !rest.starts_with('-')));
        let Some(rest) = long else {
            out.push(arg);
            continue;
        };
        let (name, inline_value) = match rest.split_once('=') {
            Some((name, _)) => (name, true),
            None => (rest, false),
        };
        match takes_value.get(name) {
            Some(&needs_value) => {
                value_next = needs_value && !inline_value;
                if text.starts_with("--") {
                    out.push(arg);
                } else {
                    let mut fixed = OsString::from("-");
                    fixed.push(&arg);
                    out.push(fixed);
                }
            }
            None => out.push(arg),
        }
    }
    out
}

/// Every long flag of `cmd` and its subcommands, with whether it must be followed by a value.
fn collect_long(cmd: &Command, into: &mut HashMap<String, bool>) {
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            let needs_value = arg
                .get_num_args()
                .is_some_and(|n| n.takes_values() && n.min_values() > 0);
            into.insert(long.to_owned(), needs_value);
        }
    }
    for sub in cmd.get_subcommands() {
        collect_long(sub, into);
    }
}

/// `args` as the owned strings [`double_dash`] takes (for tests and callers with `&str`s).
pub fn os_args<I, S>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    args.into_iter().map(|a| a.as_ref().to_owned()).collect()
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::cli::Cli;
    use clap::{CommandFactory, FromArgMatches};

    fn rewritten(args: &[&str]) -> Vec<String> {
        double_dash(os_args(args), &Cli::command())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn go_style_flags_get_a_second_dash() {
        assert_eq!(
            rewritten(&[
                "linen",
                "run",
                "-etcd-endpoints=http://198.18.0.1:2379",
                "-iface",
                "eth0",
                "-ip-masq",
                "-subnet-lease-renew-margin=30",
            ]),
            [
                "linen",
                "run",
                "--etcd-endpoints=http://198.18.0.1:2379",
                "--iface",
                "eth0",
                "--ip-masq",
                "--subnet-lease-renew-margin=30",
            ]
        );
        // Global flags and clap's own.
        assert_eq!(
            rewritten(&["linen", "-log-level", "debug", "-version"]),
            ["linen", "--log-level", "debug", "--version"]
        );
    }

    #[test]
    fn everything_else_is_left_alone() {
        for args in [
            // Short flags, unknown names (clap reports them), double dashes.
            &["linen", "-h"][..],
            &["linen", "run", "-x", "-no-such-flag", "--iface", "eth0"],
            // The value of a flag that needs one, even when it looks like a flag.
            &[
                "linen",
                "run",
                "--iface-regex",
                "-iface",
                "--iface",
                "-public-ip",
            ],
            // After `--`.
            &["linen", "run", "--", "-iface"],
            // Negative numbers.
            &["linen", "run", "--mtu", "-1"],
        ] {
            assert_eq!(rewritten(args), args, "{args:?}");
        }
        // A single-dash flag's value is skipped too.
        assert_eq!(
            rewritten(&["linen", "run", "-iface-regex", "-iface"]),
            ["linen", "run", "--iface-regex", "-iface"]
        );
        // A boolean flag's optional value is not required, so the next word is still a flag.
        assert_eq!(
            rewritten(&["linen", "run", "-ip-masq", "-iface=eth0"]),
            ["linen", "run", "--ip-masq", "--iface=eth0"]
        );
    }

    /// The variable clap will read for `run`'s flag `name`, given these variables.
    fn env_of(vars: &[(&str, &str)], name: &str) -> Option<String> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        let cmd = flanneld_env(Cli::command(), |k| vars.get(k).cloned());
        let run = cmd.find_subcommand("run").unwrap();
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(name))
            .unwrap();
        arg.get_env().map(|e| e.to_string_lossy().into_owned())
    }

    #[test]
    fn flanneld_variables_come_after_linens() {
        assert_eq!(
            env_of(&[], "etcd-endpoints").as_deref(),
            Some("LINEN_ETCD_ENDPOINTS")
        );
        assert_eq!(
            env_of(&[("FLANNELD_ETCD_ENDPOINTS", "x")], "etcd-endpoints").as_deref(),
            Some("FLANNELD_ETCD_ENDPOINTS")
        );
        assert_eq!(
            env_of(
                &[("FLANNELD_IP_MASQ", "true"), ("LINEN_IP_MASQ", "false")],
                "ip-masq"
            )
            .as_deref(),
            Some("LINEN_IP_MASQ")
        );
        // Only flannel's flags: there is no FLANNELD_WORKERS.
        assert_eq!(
            env_of(&[("FLANNELD_WORKERS", "3")], "workers").as_deref(),
            Some("LINEN_WORKERS")
        );
    }

    /// Every name in the list is a flag of `run` with a `LINEN_*` variable, so the list cannot
    /// name a flag that does not exist (`mut_arg` would panic at start).
    #[test]
    fn every_flannel_flag_exists_with_its_linen_variable() {
        let cmd = flanneld_env(Cli::command(), |k| {
            k.starts_with("FLANNELD_").then(|| OsString::from("1"))
        });
        let run = cmd.find_subcommand("run").unwrap();
        let help = run
            .get_after_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        for name in FLANNEL_FLAGS {
            let listed = if name.starts_with("etcd-") {
                "etcd-*"
            } else {
                name
            };
            assert!(
                help.contains(listed),
                "`linen run --help` does not list {name}"
            );
            let arg = run
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| panic!("--{name} is not a flag of `linen run`"));
            assert_eq!(
                arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                Some(env_name("FLANNELD_", name)),
                "{name}"
            );
            assert!(
                Cli::command()
                    .find_subcommand("run")
                    .unwrap()
                    .get_arguments()
                    .any(|a| a.get_env() == Some(OsStr::new(&env_name("LINEN_", name)))),
                "--{name} has no LINEN_ variable"
            );
        }
    }

    /// A flanneld command line parses into the same options as linen's own spelling.
    #[test]
    fn a_flanneld_command_line_parses_as_linens() {
        let parse = |args: &[&str]| {
            let cmd = Cli::command();
            let args = double_dash(os_args(args), &cmd);
            let m = cmd.try_get_matches_from(args).unwrap();
            match Cli::from_arg_matches(&m).unwrap().command {
                crate::cli::Command::Run(run) => run,
                _ => unreachable!(),
            }
        };
        let go = parse(&[
            "linen",
            "run",
            "-etcd-endpoints=http://198.18.0.1:2379,http://198.18.0.2:2379",
            "-etcd-prefix=/coreos.com/network",
            "-iface=eth1",
            "-iface-regex=^198\\.18\\.",
            "-iface-can-reach=198.18.0.1",
            "-public-ip=198.18.0.9",
            "-ip-masq",
            "-iptables-forward-rules=false",
            "-iptables-resync=10",
            "-subnet-file=/run/flannel/subnet.env",
        ]);
        let ours = parse(&[
            "linen",
            "run",
            "--etcd-endpoints",
            "http://198.18.0.1:2379,http://198.18.0.2:2379",
            "--etcd-prefix",
            "/coreos.com/network",
            "--iface",
            "eth1",
            "--iface-regex",
            "^198\\.18\\.",
            "--iface-can-reach",
            "198.18.0.1",
            "--public-ip",
            "198.18.0.9",
            "--ip-masq",
            "--iptables-forward-rules=false",
            "--iptables-resync",
            "10",
            "--subnet-file",
            "/run/flannel/subnet.env",
        ]);
        assert_eq!(format!("{go:?}"), format!("{ours:?}"));
        assert_eq!(go.registry.etcd_endpoints.len(), 2);
        assert!(go.ip_masq && !go.iptables_forward_rules);
        assert_eq!(go.iptables_resync, 10);
        assert_eq!(go.iface_regex.len(), 1);
    }
}
