//! Files only the platform's own user may read. The data directory and the stores in it
//! hold device keys (PSKs), password hashes, operator tokens and device payloads.

use std::io;
use std::path::Path;

/// Creates `dir` (and missing parents) readable by its owner only (0700). A directory
/// that already exists is left as the operator made it (it may be shared on purpose, e.g.
/// `/tmp`); a warning says so when others may read it.
///
/// # Errors
/// The directory cannot be created.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.exists() {
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "data directory readable by other users; consider chmod 700");
        }
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Makes the file at `path` readable and writable by its owner only (0600).
///
/// # Errors
/// The file's permissions cannot be changed.
pub fn restrict_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_directories_and_files_are_private_existing_directories_kept() {
        let base = std::env::temp_dir().join(format!("ferrule-private-{}", std::process::id()));
        let dir = base.join("data/inner");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&base.join("data")), 0o700, "created parents too");
        let file = dir.join("store.redb");
        std::fs::write(&file, b"x").unwrap();
        restrict_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o755, "an existing directory is the operator's");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
