//! The `linen` binary: parse flags, set up logging, dispatch. Exit codes (`cli::exit`): 0
//! success, 1 runtime failure (message on stderr), 2 bad flags or config, 130 interrupted.

#![deny(unsafe_code)]

use linen::cli::{Cli, Command, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() {
    let cli = Cli::parse_with_flannel_compat();
    let filter = match linen::cli::log_filter(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            let on_line = std::env::args().any(|a| a.contains("-log-level"));
            let from = if on_line {
                String::new()
            } else {
                " (from the environment variable LINEN_LOG_LEVEL)".to_owned()
            };
            eprintln!(
                "linen: --log-level {:?}{from} is invalid ({e}); use error, warn, info, debug or \
                 trace, or target=level pairs such as linen=debug,warn",
                cli.log_level
            );
            std::process::exit(2);
        }
    };
    // Colours only on a terminal: escape codes in a log file or the journal are noise (and
    // `NO_COLOR` turns them off there too).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        // The control plane is light (registry I/O, one table build per change, an HTTP
        // endpoint): it runs on the main thread, and forwarding has its own threads. The
        // single-threaded scheduler is also the smaller one: with it the daemon does not link
        // libm (the multi-threaded one's poll-time statistics call `pow`), 0.5 MiB less RSS.
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("linen: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => linen::daemon::run(*args).await,
            Command::Network(cmd) => linen::cli::admin::network(cmd).await,
            Command::Lease(cmd) => linen::cli::admin::lease(cmd).await,
            Command::Status(args) => linen::cli::status::run(&args),
            Command::Bench(args) => linen::bench::run(args).await,
            Command::Demo(args) => linen::demo::run(args).await,
        }
    });
    // The error first: the wait below may take its second.
    if let Err(e) = &result {
        eprintln!("linen: {}", linen::cli::exit::describe(e));
    }
    // Blocking tasks still running get a second to finish (a subnet.env rewrite, say), not
    // for ever as dropping the runtime would give them: what is left is work a stop abandoned,
    // such as a registry request waiting for another process's directory lock (up to 10 s).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Err(e) = result {
        std::process::exit(linen::cli::exit::code_for(&e));
    }
}
