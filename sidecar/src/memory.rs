//! Memory a burst freed, given back to the operating system.
//!
//! Why: glibc's allocator keeps what the process frees in its heap for
//! later, and returns to the kernel only the free memory at the very top
//! of the heap. After a burst of connections the heap's free memory is
//! scattered between live allocations, so the sidecar's resident memory
//! stays where the burst took it although it uses ~10 MiB again.
//! Measured on this repository's benchmark machine (a sidecar in front of
//! nginx): 2000 concurrent HTTP/1.1 clients left 65 MiB resident, 1000
//! HTTP/2 clients with 10 streams each 145–165 MiB, an attack with
//! connection churn (issue 16's notes) 2.4 GB; `malloc_trim(0)` brought
//! the 145 MiB back to 16 MiB. A container's memory limit counts all of
//! it, so one burst could get the pod killed later.
//!
//! What: [`spawn`] starts a task that reads the process's resident memory
//! (`/proc/self/statm`) every [`CHECK_EVERY`]. Above the threshold
//! (`--trim-memory-above-mib`, default 32 MiB; a sidecar under normal load
//! stays under 15 MiB) it asks glibc to give free pages back
//! (`malloc_trim(0)`, on a blocking thread). A trim that gave back less
//! than [`WORTHWHILE`] means the memory is in use, not left over: the
//! wait before the next check doubles, up to [`MAX_WAIT`], so a sidecar
//! that legitimately holds much memory is not trimmed every few seconds.
//!
//! Cost: a trim holds glibc's heap locks while it walks the free memory
//! (a few milliseconds for 150 MiB); the request path's allocations wait
//! meanwhile. It happens only above the threshold, at most once per check.
//!
//! `malloc_trim` is glibc's; elsewhere (musl, other systems) nothing is
//! started. Its call is the workspace's second `unsafe` (an FFI call with
//! no preconditions; see [`trim`]).

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often resident memory is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// The longest wait between checks, after trims that gave back little.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// A trim giving back less than this found memory in use: wait longer.
pub const WORTHWHILE: u64 = 4 << 20;

/// Starts the trimming task for a threshold of `above_bytes` of resident
/// memory (0: never trim, no task), until `stop`.
pub fn spawn(above_bytes: u64, mut stop: watch::Receiver<bool>) {
    if above_bytes == 0 || !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    tokio::spawn(async move {
        let mut wait = CHECK_EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let Some(before) = resident_bytes() else {
                return; // no /proc: nothing to judge by
            };
            if before < above_bytes {
                wait = CHECK_EVERY;
                continue;
            }
            let started = Instant::now();
            if tokio::task::spawn_blocking(trim).await.is_err() {
                return;
            }
            let after = resident_bytes().unwrap_or(before);
            tracing::debug!(
                before_mib = before >> 20,
                after_mib = after >> 20,
                took_ms = started.elapsed().as_millis() as u64,
                "gave freed memory back to the system"
            );
            wait = next_wait(wait, before.saturating_sub(after));
        }
    });
}

/// The wait before the next check, after a trim that gave back `returned`
/// bytes following a wait of `waited`.
pub fn next_wait(waited: Duration, returned: u64) -> Duration {
    if returned >= WORTHWHILE {
        CHECK_EVERY
    } else {
        (waited * 2).min(MAX_WAIT)
    }
}

/// The process's resident memory in bytes (`None` without `/proc`).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u64::try_from(size).ok())?;
    Some(pages * page_size)
}

/// Asks glibc to return the free memory of every heap arena to the
/// kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: `malloc_trim` has no preconditions: it takes the allocator's
    // own locks and only releases free pages (`madvise`); any thread may
    // call it at any time, and it touches no memory of ours.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_that_gave_back_little_doubles_the_wait_up_to_the_cap() {
        assert_eq!(next_wait(CHECK_EVERY, 0), CHECK_EVERY * 2);
        assert_eq!(next_wait(CHECK_EVERY * 2, WORTHWHILE - 1), CHECK_EVERY * 4);
        assert_eq!(next_wait(MAX_WAIT, 0), MAX_WAIT);
        assert_eq!(next_wait(Duration::from_secs(200), 0), MAX_WAIT);
        // A trim worth doing: back to the short wait.
        assert_eq!(next_wait(MAX_WAIT, WORTHWHILE), CHECK_EVERY);
    }

    #[test]
    fn resident_memory_is_read_from_proc() {
        let resident = resident_bytes().expect("/proc/self/statm");
        // A test process holds at least a few pages and less than a TiB.
        assert!(resident > 64 * 1024 && resident < 1 << 40, "{resident}");
    }
}
