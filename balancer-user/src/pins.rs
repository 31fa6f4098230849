//! The bpffs directory where the data plane is pinned:
//! `<pin_dir>/v<LAYOUT_VERSION>/<MAP NAME>` for every map and
//! `<pin_dir>/v<LAYOUT_VERSION>/xdp_link` for the XDP attachment, which is
//! pinned last and so doubles as the "data plane ready" signal.
//!
//! [`PinDir`] makes sure the directory is on a bpffs (mounting one at
//! `/sys/fs/bpf` when it is missing there), takes a lock so two agents never
//! share it, clears what a crashed agent left behind, and removes everything
//! on drop. It does not pin anything itself: see `dataplane`.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use balancer_common::LAYOUT_VERSION;
use nix::{
    fcntl::{Flock, FlockArg},
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};
use tracing::{info, warn};

/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// File name of the pinned XDP link inside the versioned directory.
pub const LINK_PIN_NAME: &str = "xdp_link";

/// `<pin_dir>/v<LAYOUT_VERSION>`: the directory this agent pins into.
pub fn versioned_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// `<pin_dir>/v<LAYOUT_VERSION>/xdp_link`: exists exactly while an agent's
/// data plane is attached and ready.
pub fn link_pin_path(pin_dir: &Path) -> PathBuf {
    versioned_dir(pin_dir).join(LINK_PIN_NAME)
}

#[derive(Debug, thiserror::Error)]
pub enum PinDirError {
    #[error("{path} is not on a bpffs (mount one there, or set [dataplane] pin_dir)")]
    NotBpffs { path: PathBuf },
    #[error("cannot mount bpffs at {BPFFS_ROOT}")]
    Mount(#[source] nix::Error),
    #[error("cannot examine {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is in use by another balancer agent")]
    Locked { path: PathBuf },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

fn is_bpffs(path: &Path) -> Result<bool, PinDirError> {
    statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .map_err(|source| PinDirError::Stat {
            path: path.to_path_buf(),
            source,
        })
}

/// The closest ancestor of `path` (or `path` itself) that exists.
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"))
}

/// Makes sure `pin_dir` will be on a bpffs: mounts one at `/sys/fs/bpf`
/// if `pin_dir` is below it and it is not mounted. Creates nothing.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), PinDirError> {
    let ancestor = existing_ancestor(pin_dir);
    if is_bpffs(ancestor)? {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && root.is_dir() && ancestor == root {
        mount(
            Some("bpf"),
            root,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(PinDirError::Mount)?;
        info!(path = BPFFS_ROOT, "mounted bpffs");
        return Ok(());
    }
    Err(PinDirError::NotBpffs {
        path: pin_dir.to_path_buf(),
    })
}

/// The pin directory, locked by this agent. On drop, everything still
/// pinned in the versioned directory is unpinned and the directories are
/// removed.
#[derive(Debug)]
pub struct PinDir {
    root: PathBuf,
    dir: PathBuf,
    _lock: Flock<File>,
}

impl PinDir {
    /// Creates `<pin_dir>/v<LAYOUT_VERSION>/`, removing a stale one left by
    /// an agent that did not stop cleanly. `pin_dir` must be on a bpffs
    /// (see [`ensure_bpffs`]).
    pub fn create(pin_dir: &Path) -> Result<PinDir, PinDirError> {
        fs::create_dir_all(pin_dir).map_err(|source| PinDirError::Create {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        if !is_bpffs(pin_dir)? {
            return Err(PinDirError::NotBpffs {
                path: pin_dir.to_path_buf(),
            });
        }
        let handle = File::open(pin_dir).map_err(|source| PinDirError::Create {
            path: pin_dir.to_path_buf(),
            source,
        })?;
        let lock = Flock::lock(handle, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                PinDirError::Locked {
                    path: pin_dir.to_path_buf(),
                }
            } else {
                PinDirError::Lock {
                    path: pin_dir.to_path_buf(),
                    source: errno,
                }
            }
        })?;

        let dir = versioned_dir(pin_dir);
        if dir.exists() {
            let leftovers: Vec<String> = fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            warn!(
                dir = %dir.display(),
                ?leftovers,
                "removing the pins of an agent that did not stop cleanly"
            );
            fs::remove_dir_all(&dir).map_err(|source| PinDirError::Remove {
                path: dir.clone(),
                source,
            })?;
        }
        fs::create_dir(&dir).map_err(|source| PinDirError::Create {
            path: dir.clone(),
            source,
        })?;
        Ok(PinDir {
            root: pin_dir.to_path_buf(),
            dir,
            _lock: lock,
        })
    }

    /// The versioned directory pins go into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => info!(dir = %self.dir.display(), "removed the pin directory"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(dir = %self.dir.display(), %error, "could not remove the pin directory")
            }
        }
        // Leave the parent if something else lives there (another layout
        // version, another tool's pins).
        let _ = fs::remove_dir(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths_are_versioned() {
        let root = Path::new("/sys/fs/bpf/balancer");
        assert_eq!(
            versioned_dir(root),
            PathBuf::from(format!("/sys/fs/bpf/balancer/v{LAYOUT_VERSION}"))
        );
        assert_eq!(
            link_pin_path(root),
            PathBuf::from(format!("/sys/fs/bpf/balancer/v{LAYOUT_VERSION}/xdp_link"))
        );
    }

    #[test]
    fn a_directory_not_on_bpffs_is_refused() {
        let dir = std::env::temp_dir().join(format!("balancer-pins-test-{}", std::process::id()));
        let err = ensure_bpffs(&dir.join("pins")).unwrap_err();
        assert!(matches!(err, PinDirError::NotBpffs { .. }), "{err}");
        assert!(!dir.exists());
    }
}
