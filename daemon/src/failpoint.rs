//! Crash points: places where a test may end a daemon as `kill -9` would,
//! to prove that every step is safe to repeat. They exist only in builds
//! with the cargo feature `failpoints` (the `*-failpoints` binaries the
//! end-to-end tests build); in every other build [`crash_point!`] leaves
//! nothing behind. The points' names, each saying what it sits between,
//! are listed in `walbridge_migration::failpoint`.
//!
//! A test arms points with the variable `FAILPOINTS`, read once at
//! startup, in the `fail` crate's syntax: `name=actions;name=actions`,
//! where `return` crashes (`2*off->return`: the third time the point is
//! reached) and `fail`'s other actions (`sleep(ms)`, `pause`, ...) work
//! as documented there.
//!
//! The crash is `raise(SIGKILL)`: the kernel ends the process exactly as
//! an operator's `kill -9` does — no destructor, no flush, no goodbye on
//! any socket, sessions on the servers simply cut — so what a test shows
//! about recovering from it holds for the real thing. (`abort()` would be
//! SIGABRT, which runs a handler if there is one and may dump core.)

/// The variable that arms crash points (the `fail` crate's own name).
pub const VARIABLE: &str = "FAILPOINTS";

/// Arms the points `FAILPOINTS` names; returns them (none when unset).
#[cfg(feature = "failpoints")]
pub fn arm() -> Result<Vec<String>, String> {
    let Ok(spec) = std::env::var(VARIABLE) else {
        return Ok(Vec::new());
    };
    let mut armed = Vec::new();
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("{VARIABLE}: {entry:?} is not name=actions"))?;
        let name = name.trim();
        fail::cfg(name, actions.trim()).map_err(|e| format!("{VARIABLE}: {name}: {e}"))?;
        armed.push(format!("{name}={}", actions.trim()));
    }
    Ok(armed)
}

/// A crash point was reached: runs what it was armed with (`return`:
/// the process ends here).
#[cfg(feature = "failpoints")]
pub fn reached(name: &'static str) {
    let _: Option<()> = fail::eval(name, |_| crash(name));
}

#[cfg(feature = "failpoints")]
fn crash(name: &str) -> ! {
    tracing::error!(failpoint = %name, "crash point reached: the process kills itself (SIGKILL)");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    // Not reached: SIGKILL cannot be caught.
    std::process::abort()
}

/// Marks a crash point (see [`crate::failpoint`]). Compiled only where
/// the calling crate's feature `failpoints` is on (it turns on
/// `walbridge-daemon/failpoints`); elsewhere the point is gone.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {{
        #[cfg(feature = "failpoints")]
        $crate::failpoint::reached($name);
        #[cfg(not(feature = "failpoints"))]
        let _ = $name;
    }};
}
