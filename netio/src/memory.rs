//! Memory a burst freed, given back to the operating system.
//!
//! Why: glibc's allocator keeps what the process frees in its heap for
//! later, and returns to the kernel only the free memory at the very top
//! of the heap. After a burst of connections the heap's free memory is
//! scattered between live allocations, so a server's resident memory
//! stays where the burst took it although it uses little again.
//! Measured on this repository's benchmark machine (a sidecar in front of
//! nginx): 2000 concurrent HTTP/1.1 clients left 65 MiB resident, 1000
//! HTTP/2 clients with 10 streams each 145–165 MiB, an attack with
//! connection churn (an earlier attack) 2.4 GB; `malloc_trim(0)` brought
//! the 145 MiB back to 16 MiB. A container's memory limit counts all of
//! it, so one burst could get the pod killed later.
//!
//! The sidecar and the control plane both start it (`--trim-memory-above-mib`
//! of either binary).
//!
//! What: [`spawn`] starts a task that reads the process's anonymous
//! resident memory (resident minus file-backed pages such as the binary's
//! own ~10 MiB, from `/proc/self/statm`) every [`CHECK_EVERY`]. Above the
//! threshold (`--trim-memory-above-mib`, default 32 MiB; a sidecar holds
//! ~1 MiB idle, ~2 MiB serving 32 connections, ~16 MiB serving 500: ~30
//! KiB per busy connection) it asks glibc to give free pages back
//! (`malloc_trim(0)`, on a blocking thread). A trim that gave back less
//! than [`WORTHWHILE`] means the memory is in use, not left over: the
//! wait before the next check doubles, up to [`MAX_WAIT`], so a sidecar
//! that legitimately holds much memory is not trimmed every 10 s; memory
//! left over after a long burst (whose trims, during the burst, gave back
//! little) is then given back within that minute. A check that cannot
//! read the memory (no file descriptor left) logs a warning and tries
//! again at the next one.
//!
//! Cost: a trim holds glibc's heap lock while it walks the free memory,
//! and with the single-threaded runtime every request waits meanwhile:
//! measured ~10 ms for 150 MiB given back, 50 ms for 600 MiB, 110 ms for
//! 1.7 GB; a trim that finds little free memory takes under 3 ms. It
//! happens only above the threshold, at most once per check. A trim that
//! gave back 64 MiB or more is logged at info, others at debug.
//!
//! `malloc_trim` is glibc's; elsewhere (musl, other systems) nothing is
//! started. Its call is one of the workspace's two `unsafe`s (an FFI call
//! with no preconditions; see [`trim`]).

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often resident memory is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// The longest wait between checks, after trims that gave back little.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// A trim giving back less than this found memory in use: wait longer.
pub const WORTHWHILE: u64 = 4 << 20;

/// A trim giving back at least this much is logged at info.
const NOTEWORTHY: u64 = 64 << 20;

/// Starts the trimming task for a threshold of `above_bytes` of anonymous
/// resident memory (0: never trim, no task), until `stop`. Not started
/// where there is no glibc or no `/proc`.
pub fn spawn(above_bytes: u64, stop: watch::Receiver<bool>) {
    if above_bytes == 0
        || !cfg!(all(target_os = "linux", target_env = "gnu"))
        || anonymous_bytes().is_err()
    {
        return;
    }
    tokio::spawn(keep_trimming(
        above_bytes,
        stop,
        anonymous_bytes,
        trim_and_measure,
    ));
}

/// The task: every check, `read` the memory held and, at or above
/// `above_bytes`, `trim` it (on a blocking thread), until `stop`.
async fn keep_trimming<R, T>(above_bytes: u64, mut stop: watch::Receiver<bool>, read: R, trim: T)
where
    R: Fn() -> std::io::Result<u64>,
    T: Fn() -> Option<Trimmed> + Clone + Send + 'static,
{
    let mut wait = CHECK_EVERY;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        // Read before the trim (a failure, e.g. no file descriptor
        // left, skips this check only).
        match read() {
            Ok(held) if held >= above_bytes => {}
            Ok(_) => {
                wait = CHECK_EVERY;
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read this process's memory use; trying again at the next check");
                continue;
            }
        }
        let Ok(trimmed) = tokio::task::spawn_blocking(trim.clone()).await else {
            return; // the runtime is shutting down
        };
        let Some(Trimmed {
            before,
            after,
            took,
        }) = trimmed
        else {
            continue;
        };
        let returned = before.saturating_sub(after);
        if returned >= NOTEWORTHY {
            tracing::info!(
                before_mib = before >> 20,
                after_mib = after >> 20,
                took_ms = took.as_millis() as u64,
                "gave memory freed after a burst back to the system"
            );
        } else {
            tracing::debug!(
                before_mib = before >> 20,
                after_mib = after >> 20,
                took_ms = took.as_millis() as u64,
                "gave freed memory back to the system"
            );
        }
        wait = next_wait(wait, returned);
    }
}

/// One trim: anonymous memory before and after, and how long it took.
#[derive(Debug)]
struct Trimmed {
    before: u64,
    after: u64,
    took: Duration,
}

/// Trims, measuring around the trim only (on the blocking thread); `None`
/// if the memory could not be read.
fn trim_and_measure() -> Option<Trimmed> {
    let before = anonymous_bytes().ok()?;
    let started = Instant::now();
    trim();
    let took = started.elapsed();
    let after = anonymous_bytes().ok()?;
    Some(Trimmed {
        before,
        after,
        took,
    })
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

/// The process's anonymous resident memory in bytes: resident pages
/// less the file-backed ones (`/proc/self/statm`'s second and third
/// fields), i.e. the heap and stacks a trim could shrink.
pub fn anonymous_bytes() -> std::io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let unreadable = || std::io::Error::other(format!("unexpected /proc/self/statm: {statm:?}"));
    let mut fields = statm.split_whitespace().skip(1);
    let mut next = || -> Option<u64> { fields.next()?.parse().ok() };
    let (resident, file_backed) = next().zip(next()).ok_or_else(unreadable)?;
    let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u64::try_from(size).ok())
        .ok_or_else(unreadable)?;
    Ok(resident.saturating_sub(file_backed) * page_size)
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

    /// A check that cannot read the memory (EMFILE: every descriptor in
    /// use) skips that check only; the next one trims (the task used to
    /// end there, for good).
    #[tokio::test(start_paused = true)]
    async fn a_check_that_cannot_read_the_memory_does_not_end_the_task() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};

        let readings = Arc::new(Mutex::new(vec![
            Ok(200 << 20),
            Err(std::io::Error::from_raw_os_error(24)), // EMFILE
        ]));
        let read = {
            let readings = Arc::clone(&readings);
            move || readings.lock().unwrap().pop().unwrap_or(Ok(1 << 20))
        };
        let trims = Arc::new(AtomicUsize::new(0));
        let trim = {
            let trims = Arc::clone(&trims);
            move || {
                trims.fetch_add(1, Ordering::SeqCst);
                Some(Trimmed {
                    before: 200 << 20,
                    after: 10 << 20,
                    took: Duration::ZERO,
                })
            }
        };
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(keep_trimming(16 << 20, stopped, read, trim));
        tokio::time::sleep(CHECK_EVERY * 3 + Duration::from_secs(1)).await;
        assert_eq!(
            trims.load(Ordering::SeqCst),
            1,
            "the check after the failed one trims"
        );
        assert!(readings.lock().unwrap().is_empty());
        stop.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn anonymous_memory_is_read_from_proc_and_grows_with_the_heap() {
        let before = anonymous_bytes().expect("/proc/self/statm");
        // A test process holds at least a few pages and less than a TiB.
        assert!(before > 64 * 1024 && before < 1 << 40, "{before}");
        // 64 MiB written (so resident) on the heap shows.
        let held = std::hint::black_box(vec![1u8; 64 << 20]);
        let during = anonymous_bytes().expect("/proc/self/statm");
        assert!(during >= before + (48 << 20), "{before} -> {during}");
        drop(held);
    }
}
