//! Stopping `linen demo` and `linen bench` with SIGINT/SIGTERM without leaving namespaces
//! behind: the work runs on a blocking thread that checks a stop flag between steps, the
//! signals only set the flag, and the lab is dropped (everything removed) on that thread
//! whichever way it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::lab::wait_for;

/// `print!` for `linen demo` and `linen bench` that ignores a closed stdout (`linen bench |
/// head`). The std macros panic there, and the release build aborts on a panic: with the
/// namespaces and daemons still up.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// `println!` that ignores a closed stdout, as [`say!`].
macro_rules! sayln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr, as [`say!`].
macro_rules! esayln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) use {esayln, say, sayln};

/// The command was stopped by SIGINT/SIGTERM (after cleaning up); exit code 130.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; everything {0} created has been removed")]
pub struct Interrupted(pub &'static str);

/// Runs `work` on a blocking thread; SIGINT/SIGTERM set the flag it is given, and then this
/// waits for it to wind down and returns [`Interrupted`]. `what` names the command.
pub async fn run_interruptible(
    what: &'static str,
    work: impl FnOnce(&AtomicBool) -> Result<()> + Send + 'static,
) -> Result<()> {
    // Install the handlers before anything is built: from here on a signal no longer kills the
    // process, it sets the flag, and the work thread removes what it built.
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut task = tokio::task::spawn_blocking({
        let stop = Arc::clone(&stop);
        move || work(&stop)
    });
    tokio::select! {
        r = &mut task => return r.with_context(|| format!("the {what} thread panicked"))?,
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    stop.store(true, Ordering::Relaxed);
    sayln!();
    sayln!("interrupted: stopping linen and removing the namespaces…");
    // The lab is dropped on the work thread; wait for it (the current step may take a few
    // seconds).
    let _ = task.await;
    Err(Interrupted(what).into())
}

/// [`Interrupted`] once the stop flag is set.
pub fn check(stop: &AtomicBool, what: &'static str) -> Result<()> {
    if stop.load(Ordering::Relaxed) {
        Err(Interrupted(what).into())
    } else {
        Ok(())
    }
}

/// [`wait_for`] that gives up with [`Interrupted`] as soon as the stop flag is set.
pub fn wait<T>(
    stop: &AtomicBool,
    what: &'static str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<Option<T>> {
    let got = wait_for(timeout, || {
        if stop.load(Ordering::Relaxed) {
            return Some(None);
        }
        f().map(Some)
    });
    match got {
        Some(None) => Err(Interrupted(what).into()),
        Some(Some(v)) => Ok(Some(v)),
        None => Ok(None),
    }
}
