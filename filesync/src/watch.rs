//! File events as "something changed, rescan" signals, with the inotify watch limit
//! detected and reported rather than silently missing changes.

use notify::{EventKind, RecursiveMode, Watcher as _};
use protocol::sync::{Notice, NoticeKind};
use std::path::{Path, PathBuf};

/// More paths than this between two rescans: rescan everything instead.
const MAX_PATHS: usize = 4096;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Watches a folder recursively. [`Watcher::changed`] fires after file events (reads do
/// not count); [`Watcher::take_problem`] says when watching stopped working.
pub struct Watcher {
    _inner: Option<notify::RecommendedWatcher>,
    changed: Arc<Notify>,
    /// Paths named by events since the last [`Watcher::take`]; `None` after an overflow
    /// (rescan everything).
    paths: Arc<Mutex<Option<Vec<PathBuf>>>>,
    problem: Arc<Mutex<Option<Notice>>>,
    reported: std::sync::atomic::AtomicBool,
}

fn describe(e: &notify::Error) -> Notice {
    if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
        let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        Notice {
            kind: NoticeKind::WatchLimit,
            message: format!(
                "the inotify watch limit (fs.inotify.max_user_watches = {limit}) is reached: \
                 changes are found by periodic rescans only; raise it with \
                 `sysctl fs.inotify.max_user_watches=524288`"
            ),
        }
    } else {
        Notice {
            kind: NoticeKind::WatchFailed,
            message: format!("watching failed ({e}): changes are found by periodic rescans only"),
        }
    }
}

impl Watcher {
    pub fn new(dir: &Path) -> Watcher {
        let changed = Arc::new(Notify::new());
        let problem = Arc::new(Mutex::new(None));
        let paths = Arc::new(Mutex::new(Some(Vec::new())));
        let (c, p, seen) = (changed.clone(), problem.clone(), paths.clone());
        let handler = move |event: notify::Result<notify::Event>| match event {
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            Ok(event) => {
                if let Ok(mut seen) = seen.lock() {
                    let overflow = event.need_rescan()
                        || seen
                            .as_ref()
                            .is_some_and(|v| v.len() + event.paths.len() > MAX_PATHS);
                    match seen.as_mut() {
                        Some(_) if overflow => *seen = None,
                        Some(v) => v.extend(event.paths),
                        None => {}
                    }
                }
                c.notify_one()
            }
            Err(e) => {
                if let Ok(mut slot) = p.lock() {
                    slot.get_or_insert_with(|| describe(&e));
                }
                if let Ok(mut seen) = seen.lock() {
                    *seen = None;
                }
                c.notify_one();
            }
        };
        let inner = notify::recommended_watcher(handler).and_then(|mut w| {
            w.watch(dir, RecursiveMode::Recursive)?;
            Ok(w)
        });
        let inner = match inner {
            Ok(w) => Some(w),
            Err(e) => {
                if let Ok(mut slot) = problem.lock() {
                    *slot = Some(describe(&e));
                }
                None
            }
        };
        Watcher {
            _inner: inner,
            changed,
            paths,
            problem,
            reported: Default::default(),
        }
    }

    /// A watcher that watches nothing (one-off syncs): never signals, always asks for a
    /// full scan.
    pub fn idle() -> Watcher {
        Watcher {
            _inner: None,
            changed: Arc::new(Notify::new()),
            paths: Arc::new(Mutex::new(None)),
            problem: Arc::new(Mutex::new(None)),
            reported: Default::default(),
        }
    }

    /// Whether events are coming at all (false: rescans only).
    pub fn watching(&self) -> bool {
        self._inner.is_some() && self.problem.lock().is_ok_and(|p| p.is_none())
    }

    /// Waits for the next change signal.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The paths events named since the last call; `None` means "rescan everything".
    pub fn take(&self) -> Option<Vec<PathBuf>> {
        let mut seen = self.paths.lock().ok()?;
        let mut out = seen.replace(Vec::new())?;
        out.sort();
        out.dedup();
        Some(out)
    }

    /// A problem to report, once.
    pub fn take_problem(&self) -> Option<Notice> {
        use std::sync::atomic::Ordering;
        let problem = self.problem.lock().ok().and_then(|p| p.clone())?;
        (!self.reported.swap(true, Ordering::Relaxed)).then_some(problem)
    }
}
